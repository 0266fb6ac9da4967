"""Summarise `mutmut results --all true` (read on stdin): kill rate per module and overall, and the survivors.

Used by `make mutation`; not a test. A mutant counts as killed when a test failed or timed out on it.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict


def main() -> None:
    """Print one line per module, the total, and every mutant that was not killed."""
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for line in sys.stdin:
        name, _, status = line.strip().rpartition(": ")
        if not name:
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
    tested = every - counts["no tests"]
    return (
        f"{label:28} killed {killed:4}/{every:4} = {killed / max(every, 1):6.1%}"
        f"   (of mutants some test runs: {killed}/{tested} = {killed / max(tested, 1):6.1%})   {dict(counts)}"
    )


if __name__ == "__main__":
    main()
