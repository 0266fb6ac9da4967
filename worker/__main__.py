"""`python -m worker` runs the same CLI as `tagger`."""

import sys

from worker.cli import main

sys.exit(main())
