"""The search's JSONL log: what makes a killed search resumable (SPEC §1 "Search").

Every candidate is appended as soon as it is known (flushed and fsync'd). On resume the log is
read back, checked to be of the same run (:func:`check_same_run`), a truncated last line is
dropped, and new records are appended.

A log is not trusted on its word: every line carries ``"chain"``, the SHA-256 of the previous
line's chain and this line's canonical JSON, so an edited score or records of another run pasted
in (whose chain starts from another header) break the chain, and every replayed record is checked
(finite numbers, a known status, a score where it succeeded). A log that fails either is refused
in one line; the search itself only replays a record whose weights are those the seeded search
asks for at that (generation, index).

Log format (one JSON object per line)::

    {"type": "header", "format": "nps-search-log/1", "num_bands": M, "settings": {...},
     "run": {...}, "chain": "..."}     # the run identity (search/identity.py), when given
    {"gen": 0, "idx": 0, "weights": [...], "score": 0.75, "status": "ok", "error": null,
     "build_s": 0.01, "eval_s": 0.5, "chain": "..."}
    ...

Generation 0 is the baseline (the search space's start points, w = 1 first); generations 1..G are
CMA-ES generations.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import NPSError
from .identity import identity_diff

LOG_FORMAT = "nps-search-log/1"

Records = Dict[Tuple[int, int], dict]     # {(gen, idx): record}
Tail = Tuple[int, str]                    # (byte length of the complete lines, the last chain)
STATUSES = ("ok", "failed", "eliminated")


def chain_next(prev: str, obj: dict) -> str:
    """The chain value of a log line ``obj`` (without its own ``"chain"``) after ``prev``."""
    body = json.dumps({k: v for k, v in obj.items() if k != "chain"}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256((prev + "\n" + body).encode()).hexdigest()


def _number(v, *, integer: bool = False, nonneg: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer and not isinstance(v, int):
        return False
    return math.isfinite(v) and (not nonneg or v >= 0)


def check_record(obj: dict) -> Optional[str]:
    """What is wrong with a candidate record read back from a log, or None."""
    for key in ("gen", "idx"):
        if not _number(obj.get(key), integer=True, nonneg=True):
            return f"{key} {obj.get(key)!r} is not a non-negative integer"
    status = obj.get("status")
    if status not in STATUSES:
        return f"status {status!r} is not one of {', '.join(STATUSES)}"
    w = obj.get("weights")
    if not isinstance(w, list) or not w or not all(_number(x) for x in w):
        return "weights are not a list of finite numbers"
    if status == "ok" and not _number(obj.get("score")):
        return f"score {obj.get('score')!r} is not a finite number"
    if status != "ok" and obj.get("score") is not None:
        return f"a {status} candidate has a score ({obj.get('score')!r})"
    if status == "eliminated" and not _number(obj.get("partial_score")):
        return f"partial_score {obj.get('partial_score')!r} is not a finite number"
    for key in ("build_s", "eval_s"):
        if obj.get(key) is not None and not _number(obj[key], nonneg=True):
            return f"{key} {obj[key]!r} is not a finite non-negative number"
    for key in ("examples", "rows_scored", "eliminated_at"):
        if obj.get(key) is not None and not _number(obj[key], integer=True, nonneg=True):
            return f"{key} {obj[key]!r} is not a non-negative integer"
    if obj.get("error") is not None and not isinstance(obj["error"], str):
        return "error is not a string"
    return None


def settings_dict(settings) -> dict:
    """``asdict(settings)`` without the settings of features that are off (patience, racing),
    so the log header and report of a run that uses neither are what they were before those
    settings existed (and such older logs still resume)."""
    d = asdict(settings)
    if d.get("patience", 0) is None:       # no early stop: its refinements are unused too
        for key in ("patience", "min_gain", "min_generations", "patience_gap"):
            d.pop(key, None)
    for key in ("min_gain", "patience_gap", "race_gap", "refine_gap"):   # refinements that are off
        if d.get(key, 0) is None:
            d.pop(key)
    if d.get("min_generations") == 0:
        d.pop("min_generations")
    if d.get("subspace") == "full":         # CMA-ES over the whole space, as before the setting
        d.pop("subspace")
    if "race" in d and d["race"] is None:
        for key in ("race", "race_min_rows", "race_eta", "race_z", "race_gap"):
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
    if "run" in new and "run" not in old:
        raise NPSError(f"{log_path}: cannot resume: the log carries no run identity (written by an "
                       "older nps), so it cannot be checked against this run; rerun without --resume")
    keys = ("num_bands", "settings", "run")
    diffs = identity_diff({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
    if diffs:
        raise NPSError(f"{log_path}: cannot resume: the log is of another run ({'; '.join(diffs)}); "
                       "rerun without --resume to start afresh")


def read_log(path: Path, on_header=None) -> Tuple[Optional[dict], Records, Tail]:
    """(header, {(gen, idx): record}, (byte length of the complete lines, their last chain)).

    A last line without its newline (the run was killed while writing it) is ignored; any other
    unreadable line, a broken checksum chain or an invalid record is an error. Later records for
    the same (gen, idx) win. ``on_header(header)`` runs as soon as the header is read (so a log of
    another run is refused as such, before its chain is checked)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1           # complete lines only
    header, records, chain = None, {}, ""
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise NPSError(f"{path}: line {lineno} of the search log is not valid JSON") from None
        if not isinstance(obj, dict):
            raise NPSError(f"{path}: line {lineno} of the search log is not a JSON object")
        if lineno == 1 or obj.get("type") == "header":
            if obj.get("type") != "header" or obj.get("format") != LOG_FORMAT:
                raise NPSError(f"{path}: not an nps search log (no header on line 1)")
            if header is not None:
                raise NPSError(f"{path}: line {lineno}: second header in the search log")
            header = obj
            if on_header is not None:
                on_header(header)
        else:
            why = check_record(obj)
            if why is not None:
                raise NPSError(f"{path}: line {lineno} of the search log is not a valid candidate "
                               f"record ({why}); rerun without --resume to start afresh")
        if "chain" not in obj:
            raise NPSError(f"{path}: line {lineno} of the search log has no checksum (written by "
                           "an older nps, or by hand); rerun without --resume to start afresh")
        chain = chain_next(chain, obj)
        if obj["chain"] != chain:
            raise NPSError(f"{path}: line {lineno}: the search log's checksum chain breaks there "
                           "(the line was edited, or lines of another run were added); rerun "
                           "without --resume to start afresh")
        if obj is not header:
            records[(int(obj["gen"]), int(obj["idx"]))] = {k: v for k, v in obj.items()
                                                           if k != "chain"}
    return header, records, (end, chain)


def previous_records(log_path: Optional[Path], header: dict,
                     resume: bool) -> Tuple[Records, Optional[Tail]]:
    """What a run starts from: (the records of the log it resumes, or {}; where that log goes on
    — the byte length to keep and the chain to continue — or None for a fresh log). Refuses a
    log of another run, an edited one, or one with invalid records."""
    if not resume:
        return {}, None
    if log_path is None:
        raise NPSError("search: resume needs a log path")
    if not (log_path.exists() and log_path.stat().st_size > 0):
        return {}, None
    old_header, previous, tail = read_log(log_path,
                                          lambda old: check_same_run(log_path, old, header))
    if old_header is None:
        raise NPSError(f"{log_path}: search log has no header; cannot resume from it")
    return previous, tail


class SearchLog:
    """The append-only log file (a no-op without a path); each line chained to the one before."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._fh = None
        self._chain = ""

    def open(self, header: dict, tail: Optional[Tail]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tail is None:                   # fresh log
            self._fh = open(self.path, "w", encoding="utf-8")
            self._chain = ""
            self.write(header)
        else:                              # resume: drop a truncated last line, then append
            keep_bytes, self._chain = tail
            with open(self.path, "r+b") as fh:
                fh.truncate(keep_bytes)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self._fh is None:
            return
        self._chain = chain_next(self._chain, obj)
        self._fh.write(json.dumps({**obj, "chain": self._chain}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
