"""report.json: what a run did, reproducibly (settings, seed, versions, candidates, scores, timings)."""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_write_text


def versions() -> Dict[str, str]:
    out = {"nps_pruning": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform()}
    for mod in ("transformers", "cmaes", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional or absent: the report says so rather than failing the run
            out[mod] = "absent"
    return out


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_text(data: Any, **kwargs) -> str:
    """Strict JSON of ``data``: NaN and infinities become null (``json.dumps`` would print
    ``NaN``/``Infinity``, which no JSON parser accepts)."""
    return json.dumps(_jsonable(data), allow_nan=False, **kwargs)


def write_json(path: str | Path, data: Any) -> None:
    """Atomic JSON write (temporary name, fsync, then rename)."""
    atomic_write_text(path, json_text(data, indent=2, sort_keys=False) + "\n")


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory so far (``getrusage`` ru_maxrss), or None where the
    platform does not report it."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, AttributeError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024   # macOS: bytes; Linux: KiB


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
