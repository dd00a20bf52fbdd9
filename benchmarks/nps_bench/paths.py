"""Where the benchmark writes: the repository that holds it (``BENCHMARKS.md``,
``benchmarks/results``, ``benchmarks/figures``). ``NPS_BENCH_REPO`` overrides it; an installed
copy outside a checkout writes into the current directory."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("NPS_BENCH_REPO")
    if env:
        return Path(env).resolve()
    root = Path(__file__).resolve().parents[2]     # <repo>/benchmarks/nps_bench/paths.py
    if (root / "benchmarks").is_dir() and (root / "pyproject.toml").is_file():
        return root
    return Path.cwd()


def git_output(*args: str) -> str:
    """``git -C <repo_root()> ARGS``' stripped output, "" where git is missing or fails."""
    try:
        return subprocess.run(["git", "-C", str(repo_root()), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
