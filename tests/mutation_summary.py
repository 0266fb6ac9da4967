"""Summarise `mutmut results --all true` (read on stdin): kill rate per module and overall, and the survivors.

Used by `make mutation`; not a test. With a scope file (tests/mutation-scope.txt: fnmatch globs of mutant
names, `#` comments), only the mutants it names count. A mutant counts as killed when a test failed or timed
out on it.
"""

from __future__ import annotations

import fnmatch
import sys
from collections import Counter, defaultdict
from pathlib import Path


def scope(path: str | None) -> list[str]:
    """The globs of a scope file, or every mutant."""
    if path is None:
        return ["*"]
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def main() -> None:
    """Print one line per module, the total, and every mutant in scope that was not killed."""
    globs = scope(sys.argv[1] if len(sys.argv) > 1 else None)
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        name, _, status = line.strip().rpartition(": ")
        if not name or not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        module = name.split(".x")[0]  # worker.posts.x_atomic_write__mutmut_3, worker.posts.xǁPostǁterms__mutmut_1
        by_module[module][status] += 1
        if status not in ("killed", "timeout"):
            survivors.append(f"{name}: {status}")
    total: Counter[str] = Counter()
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        print(_line(module, counts))
    print(_line("all", total))
    print(f"\nnot killed ({len(survivors)}):")
    print("\n".join(f"  {s}" for s in survivors))


def _line(label: str, counts: Counter[str]) -> str:
    killed = counts["killed"] + counts["timeout"]
    every = sum(counts.values())
    return f"{label:28} killed {killed:4}/{every:4} = {killed / max(every, 1):6.1%}   {dict(counts)}"


if __name__ == "__main__":
    main()
