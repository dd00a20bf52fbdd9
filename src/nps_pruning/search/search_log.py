"""The search's JSONL log: what makes a killed search resumable (SPEC §1 "Search").

Every candidate is appended as soon as it is known (flushed and fsync'd). On resume the log is
read back, checked to be of the same run (:func:`check_same_run`), a truncated last line is
dropped, and new records are appended.

Log format (one JSON object per line)::

    {"type": "header", "format": "nps-search-log/1", "num_bands": M, "settings": {...},
     "run": {...}}                     # the run identity (search/identity.py), when given
    {"gen": 0, "idx": 0, "weights": [...], "score": 0.75, "status": "ok", "error": null,
     "build_s": 0.01, "eval_s": 0.5}
    ...

Generation 0 is the baseline (the search space's start points, w = 1 first); generations 1..G are
CMA-ES generations.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import NPSError

LOG_FORMAT = "nps-search-log/1"

Records = Dict[Tuple[int, int], dict]     # {(gen, idx): record}


def settings_dict(settings) -> dict:
    """``asdict(settings)`` without the settings of features that are off (patience, racing),
    so the log header and report of a run that uses neither are what they were before those
    settings existed (and such older logs still resume)."""
    d = asdict(settings)
    if d.get("patience", 0) is None:
        d.pop("patience")
    if "race" in d and d["race"] is None:
        for key in ("race", "race_min_rows", "race_eta", "race_z"):
            d.pop(key, None)
    return d


def log_header(num_bands: int, settings, run_id: Optional[dict] = None) -> dict:
    """The header line of a run's log (``settings``: a SearchSettings)."""
    header = {"type": "header", "format": LOG_FORMAT, "num_bands": int(num_bands),
              "settings": settings_dict(settings)}
    if run_id is not None:
        header["run"] = run_id
    return header


def check_same_run(log_path: Path, old: dict, new: dict) -> None:
    """Refuse to resume from the log of another run, saying what differs."""
    from .identity import identity_diff
    if "run" in new and "run" not in old:
        raise NPSError(f"{log_path}: cannot resume: the log carries no run identity (written by an "
                       "older nps), so it cannot be checked against this run; rerun without --resume")
    keys = ("num_bands", "settings", "run")
    diffs = identity_diff({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
    if diffs:
        raise NPSError(f"{log_path}: cannot resume: the log is of another run ({'; '.join(diffs)}); "
                       "rerun without --resume to start afresh")


def read_log(path: Path) -> Tuple[Optional[dict], Records, int]:
    """(header, {(gen, idx): record}, byte length of the complete lines).

    A last line without its newline (the run was killed while writing it) is ignored; any other
    unreadable line is an error. Later records for the same (gen, idx) win."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1           # complete lines only
    header, records = None, {}
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise NPSError(f"{path}: line {lineno} of the search log is not valid JSON") from None
        if lineno == 1 or obj.get("type") == "header":
            if obj.get("type") != "header" or obj.get("format") != LOG_FORMAT:
                raise NPSError(f"{path}: not an nps search log (no header on line 1)")
            if header is not None:
                raise NPSError(f"{path}: line {lineno}: second header in the search log")
            header = obj
            continue
        try:
            records[(int(obj["gen"]), int(obj["idx"]))] = obj
        except (KeyError, TypeError, ValueError):
            raise NPSError(f"{path}: line {lineno} of the search log is not a candidate record") from None
    return header, records, end


def previous_records(log_path: Optional[Path], header: dict,
                     resume: bool) -> Tuple[Records, Optional[int]]:
    """What a run starts from: (the records of the log it resumes, or {}; the byte length to keep
    of that log, or None for a fresh log). Refuses a log of another run."""
    if not resume:
        return {}, None
    if log_path is None:
        raise NPSError("search: resume needs a log path")
    if not (log_path.exists() and log_path.stat().st_size > 0):
        return {}, None
    old_header, previous, keep_bytes = read_log(log_path)
    if old_header is None:
        raise NPSError(f"{log_path}: search log has no header; cannot resume from it")
    check_same_run(log_path, old_header, header)
    return previous, keep_bytes


class SearchLog:
    """The append-only log file (a no-op without a path)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._fh = None

    def open(self, header: dict, keep_bytes: Optional[int]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_bytes is None:             # fresh log
            self._fh = open(self.path, "w", encoding="utf-8")
            self.write(header)
        else:                              # resume: drop a truncated last line, then append
            with open(self.path, "r+b") as fh:
                fh.truncate(keep_bytes)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(obj) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
