"""Experiment: per-candidate build speed (``benchmarks/bench_candidate.py``, run at the end of
``make bench``)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from .config import BenchConfig


def run_speed(cfg: BenchConfig, bench_dir: Optional[Path]) -> Optional[dict]:
    """benchmarks/bench_candidate.py's bench_candidate (one subprocess per size, cfg.threads threads)."""
    if bench_dir is None or not (bench_dir / "bench_candidate.py").is_file():
        return None
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_candidate as bc
    finally:
        sys.path.pop(0)
    t0 = time.perf_counter()
    rows = bc.bench_candidate(list(cfg.speed_sizes), 0.05, cfg.bands, 3, threads=cfg.threads)
    return {"rows": rows, "table": bc.format_table(rows), "seconds": time.perf_counter() - t0}
