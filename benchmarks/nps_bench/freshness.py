"""BENCHMARKS.md's freshness block: per suite and per part of the document, how many of the
committed step files (``benchmarks/results/steps``) are what the current code computes.

Judged by the code alone (the numbers versions of :mod:`.code_versions` and the shipped default's
settings, :func:`.status.shipped_changed`), not by the checkpoint a step ran on (each section names
its checkpoints), so the block is the same on every machine: a test holds the committed
BENCHMARKS.md to it, and every benchmark entry point re-writes it (:func:`refresh`). A bumped code
version or a changed default therefore shows here in the same commit, never as "current" by a
document rendered before.

    python -m nps_bench.freshness            # re-write the block in BENCHMARKS.md
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from .status import SUITES, suite_status

START, END = "<!-- freshness:start -->", "<!-- freshness:end -->"

# the part of BENCHMARKS.md built from a step: a shared job's folder, else the step's name
_FOLDERS = {"_fusion": "Fusion", "_merge_aware": "Fusion (merge-aware rows)",
            "_compression": "Compression", "_memory": "Memory on LLM-sized inputs"}
_SHARED = ("Fusion", "Compression")       # the suite sections' shared jobs every suite runs
_PREFIXES = (("wins-", "NPS that wins, the lossless frontier"), ("abl-", "What the search is worth"),
             ("cli-time-", "What the search is worth"))
_OTHER = "the suite's section: Pruning, Transfer, size of τ"


def part_of(task: str, step: str) -> str:
    if task in _FOLDERS:
        return _FOLDERS[task]
    return next((part for pre, part in _PREFIXES if step.startswith(pre)), _OTHER)


def counts(suite: str, steps_dir: Path, results_dir: Path) -> Dict[str, Counter]:
    """part -> Counter of "current" and of each stale reason, over the suite's steps (the
    newest current file of each step, else its newest)."""
    st = suite_status(suite, steps_dir, results_dir, code_only=True)
    out: Dict[str, Counter] = {}
    for task, t in st["tasks"].items():
        for step, v in t["steps"].items():
            if v["state"] == "missing":     # planned, no file: nothing in this document shows it
                continue
            c = out.setdefault(part_of(task, step), Counter())
            c["current" if v["state"] == "current" else v["state"][len("stale: "):]] += 1
    return out


def all_counts(steps_dir: Path, results_dir: Path, suites=SUITES) -> Dict[str, Dict[str, Counter]]:
    """suite -> :func:`counts` (one read of the step files, for the block and the README)."""
    return {suite: counts(suite, steps_dir, results_dir) for suite in suites}


def render(steps_dir: Path, results_dir: Path, suites=SUITES,
           counted: Optional[Dict[str, Dict[str, Counter]]] = None) -> str:
    """The block; ``counted``: :func:`all_counts` of these suites when already read."""
    counted = counted if counted is not None else all_counts(steps_dir, results_dir, suites)
    lines = [START,
             "Freshness (`python -m nps_bench.freshness`, re-written by every benchmark entry point; a "
             "test holds this block to the committed step files): per suite and part of this document, "
             "how many of its step files (the newest of each step) are what the code of this commit "
             "computes, judged by the code's numbers versions and the shipped default's settings (the "
             "checkpoint each step ran on is named in its section). Tables built from stale steps mark "
             "them ‡ where they can; the suites' own sections (Pruning, Fusion, Compression, Transfer) "
             "are written whole by `make bench` and carry no marks: read their staleness here.", ""]
    rows = []
    for suite in suites:
        parts = counted[suite]
        if not parts:
            rows.append(f"| {suite} | – | no step files (numbers older than the step keys) | |")
        for part in sorted(parts):
            c = parts[part]
            why = "; ".join(f"{w} ({k})" for w, k in sorted(c.items(), key=lambda x: (-x[1], x[0]))
                            if w != "current")
            rows.append(f"| {suite} | {part} | {c['current']} of {sum(c.values())} | {why} |")
    lines += ["| suite | part of this document | current steps | stale: why (steps) |",
              "|---|---|---|---|"] + rows
    lines.append(END)
    return "\n".join(lines)


def stale_parts(parts: Dict[str, Counter]) -> List[str]:
    """The parts (of one suite's :func:`counts`) that have stale steps, for tables outside
    BENCHMARKS.md; a shared part every suite runs (Fusion, Compression) with no step files at all
    is listed as "PART (no step files)"."""
    return sorted([p for p, c in parts.items() if sum(c.values()) > c["current"]]
                  + [f"{p} (no step files)" for p in _SHARED if p not in parts])


def refresh(md: Optional[Path] = None, root: Optional[Path] = None) -> Dict[str, Dict[str, Counter]]:
    """Re-write the block in ``md`` (BENCHMARKS.md) from the repository's step files; returns
    the counts it read (:func:`all_counts`)."""
    from .paths import repo_root
    from .report_common import write_marked
    root = root or repo_root()
    md = Path(md or root / "BENCHMARKS.md")
    res = root / "benchmarks" / "results"
    counted = all_counts(res / "steps", res)
    if md.is_file():
        write_marked(md, START, END, render(res / "steps", res, counted=counted))
    return counted


def main(argv=None) -> int:
    refresh()
    print("BENCHMARKS.md freshness block re-written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
