"""The benchmark's step result cache, and the small runtime helpers every job uses.

Every step's result is cached as JSON under ``<cache>/bench-results`` (``$NPS_CACHE`` or
``~/.cache/nps-pruning``), keyed by (suite, task, step, a hash of the settings the step uses and
of the fine-tuned checkpoint's build key), so a killed ``make bench`` resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from nps_pruning.atomic import atomic_write_text


def default_results_cache() -> Path:
    env = os.environ.get("NPS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "nps-pruning"
    return root / "bench-results"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultCache:
    """One JSON file per step: ``<dir>/<suite>/<task>/<step>-<hash>.json`` (atomic writes)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, suite: str, task: str, step: str, params: dict) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in step)
        return self.root / suite / task / f"{safe}-{_hash(params)}.json"

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
        p = self.path(suite, task, step, params)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps({**value, "_step": step, "_params": params}, indent=1,
                                        default=_jsonable))
        self.misses += 1
        return value

    def step(self, suite, task, step, params, compute: Callable[[], dict], log=None) -> dict:
        got = self.get(suite, task, step, params)
        if got is not None:
            return got
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
