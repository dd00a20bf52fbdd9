"""Where the benchmark writes: the repository that holds it (``BENCHMARKS.md``,
``benchmarks/results``, ``benchmarks/figures``). ``NPS_BENCH_REPO`` overrides it; an installed
copy outside a checkout writes into the current directory."""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

WEIGHTS_FILE = "weights.json"   # beside a built checkpoint's info.json: its weights digest


def repo_root() -> Path:
    env = os.environ.get("NPS_BENCH_REPO")
    if env:
        return Path(env).resolve()
    root = Path(__file__).resolve().parents[2]     # <repo>/benchmarks/nps_bench/paths.py
    if (root / "benchmarks").is_dir() and (root / "pyproject.toml").is_file():
        return root
    return Path.cwd()


def nps_cache_root() -> Path:
    """The benchmark's machine-local cache: ``$NPS_CACHE`` or ``~/.cache/nps-pruning``."""
    env = os.environ.get("NPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nps-pruning"


def bench_cache_dir() -> Path:
    """Where the suites' fine-tuned checkpoints are built: ``<nps_cache_root()>/bench``."""
    return nps_cache_root() / "bench"


def git_output(*args: str) -> str:
    """``git -C <repo_root()> ARGS``' stripped output, "" where git is missing or fails."""
    try:
        return subprocess.run(["git", "-C", str(repo_root()), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), or ``platform.processor()``. Fine-tunes
    rebuild bit for bit on the same CPU model and software, not across CPU vendors (the float
    kernels differ): checkpoints and step files record it so a mismatch has its reason."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
