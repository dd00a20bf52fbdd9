"""The benchmark's step result cache, and the small runtime helpers every job uses.

Every step's result is one small JSON file ``<root>/<suite>/<task>/<step>-<hash>.json``. For the
full profile the root is ``benchmarks/results/steps`` in the repository (``$NPS_BENCH_STEPS``
overrides it), so measured steps are committed and travel with the code; the quick (CI) profile
keeps its own under ``$NPS_CACHE`` (``~/.cache/nps-pruning/bench-results-quick``).

A step's hash covers the settings it uses, the SHA-256 of the fine-tuned checkpoint's tensors
(``weights``, see :func:`nps_bench.suites.weights_digest`) and the numbers versions of the code
groups it runs (:mod:`.code_versions`): a checkpoint that rebuilds differently, or a code change
recorded as changing numbers, makes exactly its steps missing; nothing stale is ever reused. Each
file also records the commit, date and CPU model that computed it (``_cpu``: fine-tunes rebuild
bit for bit on the same CPU model, not across CPU vendors, so a new machine's checkpoints can miss
every step; ``make bench-status`` says so).

``--budget``: with ``$NPS_BENCH_DEADLINE`` (epoch seconds) set, a step whose recorded time would
end after the deadline is not started: :class:`BudgetReached` is raised instead, and the run
reports what is left. The recorded time is the ``seconds`` of an earlier file of the same step (any
key), else of the same step on another task of the suite, else of the same step at another keep
ratio, else the longest step of the suite (:meth:`ResultCache.estimate`); only in a suite with no
step files at all does a step start unestimated.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from nps_pruning.atomic import atomic_write_text

DEADLINE_ENV = "NPS_BENCH_DEADLINE"


def default_results_cache(profile: str = "full") -> Path:
    if profile == "full":
        env = os.environ.get("NPS_BENCH_STEPS")
        if env:
            return Path(env).expanduser()
        from .paths import repo_root
        return repo_root() / "benchmarks" / "results" / "steps"
    from .paths import nps_cache_root
    return nps_cache_root() / f"bench-results-{profile}"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_step(step: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in step)


class BudgetReached(Exception):
    """A step was not started: its recorded time would end after the run's budget."""

    def __init__(self, suite: str, task: str, step: str, estimate_s: Optional[float]):
        super().__init__(suite, task, step, estimate_s)
        self.suite, self.task, self.step, self.estimate_s = suite, task, step, estimate_s

    def __str__(self) -> str:
        est = f"~{self.estimate_s / 60:.1f} min" if self.estimate_s is not None else "time unknown"
        return f"budget reached before {self.suite}/{self.task}/{self.step} ({est})"


def set_budget(minutes: Optional[float]) -> bool:
    """``--budget MINUTES``: set the deadline steps check (:meth:`ResultCache.check_budget`);
    False (nothing set) for a budget that is not a positive number of minutes."""
    if minutes is None:
        return True
    if not minutes > 0:
        return False
    os.environ[DEADLINE_ENV] = str(time.time() + 60.0 * minutes)
    return True


def restores_deadline(command: Callable) -> Callable:
    """A command whose ``--budget`` deadline holds for its call only (the environment is
    restored after it, so an in-process caller keeps no deadline)."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        before = os.environ.get(DEADLINE_ENV)
        try:
            return command(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(DEADLINE_ENV, None)
            else:
                os.environ[DEADLINE_ENV] = before
    return wrapped


_COMMIT: list = []


def _commit() -> str:
    if not _COMMIT:
        from .paths import git_output
        _COMMIT.append(git_output("rev-parse", "--short", "HEAD") or "?")
    return _COMMIT[0]


# a keep ratio inside a step name ("prune-dare-r0.05", "wins-nps-default-r0.0005-..."), for a step's
# family in ResultCache.estimate
_FAMILY_RE = re.compile(r"(?<=-)r\d[\d.]*(?:e-\d+)?(?=-|$)")


class ResultCache:
    """One JSON file per step: ``<dir>/<suite>/<task>/<step>-<hash>.json`` (atomic writes)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_params(task: str, step: str, params: dict, suite: Optional[str] = None) -> dict:
        from .code_versions import code_key
        return {**params, "_code": code_key(task, step, suite)}

    def path(self, suite: str, task: str, step: str, params: dict) -> Path:
        key = _hash(self.key_params(task, step, params, suite))
        return self.root / suite / task / f"{safe_step(step)}-{key}.json"

    def get(self, suite, task, step, params) -> Optional[dict]:
        p = self.path(suite, task, step, params)
        if p.is_file():
            try:
                value = json.loads(p.read_text())
                self.hits += 1
                return value
            except json.JSONDecodeError:
                return None
        return None

    def put(self, suite, task, step, params, value: dict) -> dict:
        """Write the step's file; return ``value`` with what the file records of the step (its
        name, parameters, code versions, commit and date), as :meth:`get` returns it, so results rows
        carry the versions they were computed with (a renderer marks stale ones)."""
        p = self.path(suite, task, step, params)
        p.parent.mkdir(parents=True, exist_ok=True)
        from .code_versions import code_key
        from .paths import cpu_model
        meta = {"_step": step, "_code": code_key(task, step, suite), "_commit": _commit(),
                "_date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "_cpu": cpu_model()}
        atomic_write_text(p, json.dumps({**value, "_step": step, "_params": params, **meta},
                                        indent=1, default=_jsonable))
        self.misses += 1
        return {**value, "_params": params, **meta}

    def estimate(self, suite: str, task: str, step: str) -> Optional[float]:
        """The seconds this step will take, from the step files: the newest file of this step on
        this task (any key); else the longest of this step on the suite's other tasks; else the
        longest of its family (the same step at any keep ratio, ``-r<keep>`` read as any) on
        any of the suite's tasks; else, a step like none recorded, the longest step recorded in
        the suite (a cautious guess); None in a suite with no step files. (A step never run before
        counted zero here, so a fresh machine's run started steps until the very deadline and
        ended minutes after its budget.)"""
        name = safe_step(step)
        own = [(m, sec) for st, m, sec in self._times(self.root / suite / task, name) if st == name]
        if own:
            return max(own)[1]
        folder = self.root / suite
        found = [r for d in (sorted(folder.iterdir()) if folder.is_dir() else []) if d.is_dir()
                 for r in self._times(d, "*")]
        family = _FAMILY_RE.sub("r*", name)
        for kin in (lambda st: st == name, lambda st: _FAMILY_RE.sub("r*", st) == family, lambda st: True):
            times = [sec for st, _, sec in found if kin(st)]
            if times:
                return max(times)
        return None

    @staticmethod
    def _times(folder: Path, name: str):
        """(step, mtime, seconds) of each step file in ``folder`` whose name matches the glob
        ``name`` (a step's name, or "*")."""
        out = []
        for p in folder.glob(f"{name}-*.json") if folder.is_dir() else ():
            step, _, digest = p.stem.rpartition("-")
            if not (len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)):
                continue
            try:
                v = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(v.get("seconds"), (int, float)):
                out.append((step, p.stat().st_mtime, float(v["seconds"])))
        return out

    def check_budget(self, suite: str, task: str, step: str) -> None:
        deadline = os.environ.get(DEADLINE_ENV)
        if not deadline:
            return
        est = self.estimate(suite, task, step)
        if time.time() + (est or 0.0) > float(deadline):
            raise BudgetReached(suite, task, step, est)

    def step(self, suite, task, step, params, compute: Callable[[], dict], log=None) -> dict:
        got = self.get(suite, task, step, params)
        if got is not None:
            return got
        self.check_budget(suite, task, step)
        t0 = time.perf_counter()
        value = compute()
        value["seconds"] = time.perf_counter() - t0
        if log:
            log(f"{step}: {_brief(value)} ({value['seconds']:.1f}s)")
        return self.put(suite, task, step, params, value)


def _jsonable(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _brief(v: dict) -> str:
    parts = []
    for k in ("test", "calib", "test_mean", "calib_mean", "lambda"):
        if k in v and v[k] is not None:
            x = v[k]
            if isinstance(x, float):
                parts.append(f"{k} {x:.4f}")
            elif isinstance(x, list) and x and isinstance(x[0], float):
                parts.append(f"{k} [{', '.join(f'{y:.3f}' for y in x)}]")
    return " ".join(parts)


def _logger(prefix: str):
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] [{prefix}] {msg}", flush=True)
    return log


def _set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, int(n)))
