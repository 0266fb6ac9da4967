"""`python -m worker` runs the same CLI as `tagger`."""

from worker.cli import main

main(prog_name="tagger")
