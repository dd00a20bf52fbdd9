"""What every command shares: its inputs resolved (GGUF files and LoRA adapters converted to
model folders) and reported as the user named them, and its work folder (the search log kept
for ``--resume``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict

from ..checkpoints.external import CONVERSIONS, resolve_input
from ..checkpoints.save import check_output_dir
from ..errors import NPSError
from ..workdirs import check_work_dir, release_work_dir


def work_dir(output: str | Path) -> Path:
    """Where a search keeps its log until the output appears (what --resume reads)."""
    out = Path(output)
    return out.with_name(out.name + ".nps-run")


def prepare_work_dir(output, resume: bool, inputs, *, check_output: bool = True,
                     searches: bool = True) -> Path:
    """Check the output against the inputs (and, with ``check_output``, that an existing output
    may be replaced) before any work, and return the work folder. The folder is created, with its
    ownership marker, just before a search writes its log (:func:`nps_pruning.apps.prune.prune`), so a run that
    fails before any search leaves nothing behind; a folder of that name that nps did not make
    is refused, never removed (:mod:`nps_pruning.workdirs`)."""
    wd = work_dir(output)
    o = Path(output).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if o == p or p in o.parents:
            raise NPSError(f"{output}: refusing to write inside an input ({p})")
        if o in p.parents:
            raise NPSError(f"{output}: refusing to write over a folder that holds an input ({p})")
    if check_output:
        check_output_dir(output, inputs=inputs)
    check_work_dir(wd, resume=resume, inputs=inputs)
    if resume and not searches:
        raise NPSError("--resume continues an NPS search from its log, and this method runs no "
                       "search: rerun without --resume (another run's log is never taken over)")
    # prune/transfer log to search.jsonl, merge/compress to one search-<task>.jsonl per task
    if resume and not any(wd.glob("search*.jsonl")):
        raise NPSError(f"{wd / 'search.jsonl'}: no search log to resume from")
    if wd.exists() and not resume:
        release_work_dir(wd)
        check_work_dir(wd, resume=resume, inputs=inputs)   # it held files nps did not write
    return wd


def given_input(opts, field: str) -> str:
    """The input as the user gave it (a GGUF file or LoRA adapter, not its converted folder)."""
    value = str(getattr(opts, field))
    conv = CONVERSIONS.get(value) or {}
    return conv.get("hub_id") or conv.get("file") or conv.get("adapter") or value


def resolve_options(opts):
    """``opts`` (a command's options) with its PRETRAINED / FINETUNED / MODEL inputs resolved
    (:func:`resolve_input`; a LoRA adapter's base is PRETRAINED when the command has one)."""
    names = {f.name for f in dataclasses.fields(opts)}
    changes = {}
    base = getattr(opts, "pretrained", None) if "pretrained" in names else None
    if base:
        base = changes["pretrained"] = resolve_input(base)
    for field in ("finetuned", "model"):
        value = getattr(opts, field, None) if field in names else None
        if isinstance(value, (list, tuple)):
            changes[field] = type(value)(resolve_input(v, base=base) for v in value)
            if "names" in names and not opts.names and list(changes[field]) != list(value):
                # tasks keep the names of the inputs given (an adapter folder, a .gguf file), not
                # of the converted folders in the input cache
                changes["names"] = [Path(v).stem if Path(v).is_file() else Path(v).resolve().name for v in value]
        elif value:
            changes[field] = resolve_input(value, base=base)
    changes = {k: v for k, v in changes.items() if v != getattr(opts, k)}
    return dataclasses.replace(opts, **changes) if changes else opts


def input_sources(opts) -> Dict[str, dict]:
    """For the report: each input of ``opts`` that is a converted GGUF file or LoRA adapter,
    with what it was converted from (a LoRA adapter: the base model folder that was used)."""
    out = {}
    for f in dataclasses.fields(opts):
        if f.name not in ("pretrained", "finetuned", "model"):
            continue
        values = getattr(opts, f.name)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is not None and str(v) in CONVERSIONS:
                out[str(v)] = CONVERSIONS[str(v)]
    return out
