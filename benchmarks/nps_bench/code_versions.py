"""Which version of the code a benchmark step measured (part of every step's cache key).

The code a step runs is split into groups of source files (:data:`GROUPS`). Each group has a
*numbers version*, recorded with the SHA-256 of its sources in ``benchmarks/code_versions.json``.
A step's key holds the versions of the groups it depends on (:func:`groups_of`), so bumping a
group's version makes exactly the steps that use it stale, and nothing else.

The rule that keeps this honest is a test (tests/test_bench_steps.py): the recorded SHA-256 of
every group must equal the SHA-256 of its sources today. A change to a group's code therefore
fails ``make test`` until its author records it, saying whether the change alters numbers::

    python -m nps_bench.code_versions --numbers-changed prune   # bump: its steps are recomputed
    python -m nps_bench.code_versions --same-numbers            # a refactor: the steps stay valid
    python -m nps_bench.code_versions --numbers-changed eval --suites llm,llm-lora

The last form is for a change that provably alters numbers only on some suites (e.g. a rule that
applies below 128 calibration rows, which only the LLM suites' calibration cap reaches): those
suites' steps get the next version of the group (recorded under ``"suites"``), every other
suite's keys stay as they were. A later bump of the whole group goes past every suite's version
and clears them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .paths import repo_root

# group -> source files (globs relative to the repository root)
GROUPS: Dict[str, List[str]] = {
    # scoring a model on data: every step's numbers go through it
    "eval": ["src/nps_pruning/evaluation/*.py", "src/nps_pruning/checkpoints/load.py",
             "src/nps_pruning/apps/session.py"],
    # τ, masks, bands and the search space's candidates
    "prune": ["src/nps_pruning/task_vector.py", "src/nps_pruning/checkpoints/pair.py",
              "src/nps_pruning/core/mask.py", "src/nps_pruning/core/sparsify.py",
              "src/nps_pruning/core/bands.py", "src/nps_pruning/core/space.py",
              "src/nps_pruning/core/magnitude_space.py",
              "src/nps_pruning/core/entries.py", "src/nps_pruning/core/__init__.py",
              "src/nps_pruning/core/prepared.py", "src/nps_pruning/core/ranks.py"],
    # the hybrid space (the shipped default's): its candidates and its start points. Steps that
    # search only the paper's magnitude space (:data:`MAGNITUDE_STEP`) do not depend on it
    "hybrid": ["src/nps_pruning/core/hybrid.py", "src/nps_pruning/core/rank_sample.py",
               "src/nps_pruning/core/hybrid_space.py"],
    # the CMA-ES search, its settings and the prune command's search path
    "search": ["src/nps_pruning/search/*.py", "src/nps_pruning/apps/prune.py",
               "src/nps_pruning/apps/holdout.py", "src/nps_pruning/apps/settings.py",
               "src/nps_pruning/cli/prune.py", "src/nps_pruning/cli/settings.py"],
    # merges
    "merge": ["src/nps_pruning/core/merge.py", "src/nps_pruning/core/merge_svd.py",
              "src/nps_pruning/core/collide.py", "src/nps_pruning/core/joint_space.py",
              "src/nps_pruning/core/merge_registry.py", "src/nps_pruning/apps/merge.py",
              "src/nps_pruning/cli/merge.py"],
    # stores and value codings
    "store": ["src/nps_pruning/store/*.py", "src/nps_pruning/cli/store.py"],
    # what the benchmark's steps themselves compute
    "bench": ["benchmarks/nps_bench/exp_*.py", "benchmarks/nps_bench/context.py",
              "benchmarks/nps_bench/transfer_eval.py", "benchmarks/nps_bench/wins.py"],
}

RECORD = "benchmarks/code_versions.json"
# a task's baseline steps: a pruner of core/ at one keep ratio (the tuned rescale: a fixed grid of
# scales scored by the session), never the CMA-ES search
BASELINE_STEP = re.compile(r"^(wins-(magnitude|magnitude-rescaled|dare|della)|"
                           r"prune-(magnitude|dare|random|della))-r[0-9.e-]+$")


# a task's searches of the paper's magnitude space only (the paper's NPS, the default search
# with ``--space magnitude``, the pruning section's focused / uniform bands): no hybrid candidate
MAGNITUDE_STEP = re.compile(r"^(wins-nps-(paper|default-magnitude|default-magnitude-accuracy)|"
                            r"prune-nps-[a-z0-9-]+)-r[0-9.e-]+$")


def groups_of(task: str, step: str) -> List[str]:
    """The groups a step depends on (``task``: a task name, or ``_fusion`` / ``_compression`` /
    ``_merge_aware`` for a suite's shared steps)."""
    if step in ("finetuned", "wins-finetuned", "tau-norm") or BASELINE_STEP.match(step):
        return ["eval", "prune", "bench"]     # no search runs in them
    if task in ("_fusion", "_merge_aware", "_memory"):     # _memory: prune and merge commands
        return ["eval", "prune", "hybrid", "search", "merge", "bench"]
    if task == "_compression":
        return ["eval", "prune", "hybrid", "search", "store", "bench"]
    if MAGNITUDE_STEP.match(step):
        return ["eval", "prune", "search", "bench"]
    return ["eval", "prune", "hybrid", "search", "bench"]


def _files(group: str, root: Path) -> List[Path]:
    out = []
    for pattern in GROUPS[group]:
        out += [p for p in root.glob(pattern) if p.is_file()]
    return sorted(set(out))


def source_sha256(group: str, root: Path | None = None) -> str:
    """SHA-256 over the group's files (their repository paths and contents)."""
    root = root or repo_root()
    h = hashlib.sha256()
    for p in _files(group, root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def recorded(root: Path | None = None) -> Dict[str, dict]:
    path = (root or repo_root()) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


_VERSIONS: Dict[str, int] = {}
_SUITE_VERSIONS: Dict[str, Dict[str, int]] = {}


def versions(suite: Optional[str] = None) -> Dict[str, int]:
    """group -> recorded numbers version (read once per process); ``suite``: with the versions
    bumped for that suite alone."""
    if not _VERSIONS:
        rec = recorded()
        _VERSIONS.update({g: int(rec.get(g, {}).get("version", 1)) for g in GROUPS})
        _SUITE_VERSIONS.update({g: {s: int(v) for s, v in (rec.get(g, {}).get("suites") or {}).items()}
                                for g in GROUPS})
    out = dict(_VERSIONS)
    if suite is not None:
        for g in out:
            out[g] = _SUITE_VERSIONS.get(g, {}).get(suite, out[g])
    return out


def code_key(task: str, step: str, suite: Optional[str] = None) -> Dict[str, int]:
    """What goes into a step's key: the numbers versions of the groups it depends on (of
    ``suite``'s steps: with that suite's own bumps)."""
    v = versions(suite)
    return {g: v[g] for g in groups_of(task, step)}


def changed(root: Path | None = None) -> List[str]:
    """Groups whose sources differ from the recorded SHA-256 (the test's rule)."""
    rec = recorded(root)
    return [g for g in GROUPS if rec.get(g, {}).get("sha256") != source_sha256(g, root)]


def update(bump: List[str], root: Path | None = None,
           suites: Optional[List[str]] = None) -> Dict[str, dict]:
    """Record every group's SHA-256 today; bump the numbers version of the groups in ``bump``
    (for ``suites`` alone when given)."""
    root = root or repo_root()
    rec = recorded(root)
    unknown = sorted(set(bump) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s) {', '.join(unknown)} (groups: {', '.join(GROUPS)})")
    out = {}
    for g in GROUPS:
        version = int(rec.get(g, {}).get("version", 1))
        own = {s: int(v) for s, v in (rec.get(g, {}).get("suites") or {}).items()}
        if g in bump and suites:
            for s in suites:
                own[s] = own.get(s, version) + 1
        elif g in bump:              # past every suite's own version, which it replaces
            version, own = max([version, *own.values()]) + 1, {}
        out[g] = {"version": version, **({"suites": dict(sorted(own.items()))} if own else {}),
                  "sha256": source_sha256(g, root), "files": GROUPS[g]}
    (root / RECORD).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.code_versions", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--numbers-changed", nargs="+", metavar="GROUP", default=None,
                   help="bump these groups' versions (their benchmark steps become stale)")
    g.add_argument("--same-numbers", action="store_true",
                   help="record today's sources; no version changes (the cached steps stay current)")
    ap.add_argument("--suites", default=None, metavar="S1,S2",
                    help="with --numbers-changed: only these suites' steps change numbers")
    args = ap.parse_args(argv)
    if args.suites and args.numbers_changed is None:
        ap.error("--suites goes with --numbers-changed")
    if args.numbers_changed is None and not args.same_numbers:
        diff = changed()
        v = versions()
        for grp in GROUPS:
            print(f"{grp:8s} version {v[grp]}  {'CHANGED since recorded' if grp in diff else 'as recorded'}")
        return 1 if diff else 0
    out = update(args.numbers_changed or [],
                 suites=[x for x in (args.suites or "").split(",") if x] or None)
    print(", ".join(f"{k} v{v['version']}" + "".join(f" ({s} v{n})" for s, n in v.get("suites", {}).items())
                    for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
