"""The identity of a search run: everything that changes a candidate's score.

A search log (``OUT.nps-run/search*.jsonl``) starts with a header that carries the run identity
built here; ``--resume`` replays the log only when the identity of the new run is the same
(:func:`identity_diff` says what differs otherwise). The identity holds:

* the content of the inputs: a SHA-256 of every regular top-level file of the pre-trained and
  fine-tuned model (weights, config, tokenizer files); files above ``FULL_HASH_BYTES`` are
  fingerprinted by their size and a SHA-256 of ``SAMPLE_BLOCKS`` evenly spaced 1 MiB blocks
  (first and last included), so a re-trained model is always caught without reading gigabytes;
* the calibration data: the evaluator kind and a SHA-256 of its file (for ``python:`` specs the
  spec and the module's source file), the calibration subsample size and seed;
* the pruning recipe: method, keep ratio, bands, scheme, focus, kept values, and what changes the
  arithmetic of a score (batch size, max length, device, τ dtype, model factory, shape-mismatch
  handling). The CMA-ES settings are in the header's ``settings`` already.

Paths are not part of the identity: a model folder moved or copied elsewhere resumes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..evaluation import spec_kind
from ..evaluation.python_eval import parse_python_spec

FULL_HASH_BYTES = 512 << 20
SAMPLE_BLOCKS = 64
_BLOCK = 1 << 20


def file_fingerprint(path: Path) -> str:
    """``sha256:HEX`` of the file, or ``size:N,sampled-sha256:HEX`` for a large one."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(_BLOCK), b""):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        step = (size - _BLOCK) / (SAMPLE_BLOCKS - 1)
        for i in range(SAMPLE_BLOCKS):
            f.seek(int(i * step))
            h.update(f.read(_BLOCK))
    return f"size:{size},sampled-sha256:{h.hexdigest()}"


def path_fingerprint(path) -> Dict[str, str]:
    """{file name: fingerprint} of a model file, or of every regular top-level file of a folder
    (hidden files excepted)."""
    p = Path(path)
    if p.is_file():
        return {p.name: file_fingerprint(p)}
    if not p.is_dir():
        return {}
    out = {}
    for child in sorted(p.iterdir()):
        if child.name.startswith(".") or not child.is_file():
            continue
        out[child.name] = file_fingerprint(child)
    return out


def eval_fingerprint(spec: Optional[str]) -> Optional[Dict[str, Any]]:
    """What the calibration evaluator reads: its kind and its file's fingerprint."""
    if not spec:
        return None
    kind, arg = spec_kind(spec)
    if kind == "python":
        module, func = parse_python_spec(str(spec).strip())
        out: Dict[str, Any] = {"kind": kind, "function": func}
        if module.endswith(".py") or os.sep in module or "/" in module:
            origin: Optional[str] = str(Path(module).expanduser())
        else:
            out["module"] = module
            try:
                origin = getattr(importlib.util.find_spec(module), "origin", None)
            except (ImportError, ValueError):
                origin = None
        out["source"] = file_fingerprint(Path(origin)) if origin and os.path.isfile(origin) else None
        return out
    f = Path(arg)
    return {"kind": kind, "file": file_fingerprint(f) if f.is_file() else None}


def run_identity(*, pretrained, finetuned, eval_spec, fields: Dict[str, Any], method: str = "nps") -> Dict[str, Any]:
    """The identity of one search (see the module docstring); JSON-ready. ``fields``: the run's
    settings under the names the log headers use (:func:`nps_pruning.apps.prune.prune` gives them)."""
    g = fields.get
    return {
        "method": method,
        "pretrained": path_fingerprint(pretrained),
        "finetuned": path_fingerprint(finetuned),
        "eval": eval_fingerprint(eval_spec),
        "calib_size": g("calib_size"),
        "keep": g("keep"), "bands": g("bands"), "scheme": g("scheme"), "focus": g("focus"),
        "kept_values": g("kept_values"),
        "batch_size": g("batch_size"), "max_length": g("max_length"), "device": g("device"),
        "tau_dtype": g("tau_dtype"), "model_factory": g("model_factory"),
        "allow_shape_mismatch": g("allow_shape_mismatch"),
        "running_stats": g("running_stats"),
        # the fitness and the search/held-out split of the calibration rows change every score
        "fitness": g("fitness"), "holdout": g("holdout"), "rescore_top": g("rescore_top"),
        # bf16 autocast changes every score (absent when off: older logs still resume)
        **({"autocast": g("autocast")} if g("autocast") else {}),
        # oneDNN's linear kernel changes the scores' last bits (absent for torch's: older logs resume)
        **({"cpu_linear": g("cpu_linear")} if g("cpu_linear") not in (None, "torch") else {}),
    }


def _flatten(obj: Any, prefix: str, out: Dict[str, Any]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = obj


def _show(value: Any) -> str:
    if value is None:
        return "absent"
    text = str(value)
    if text.startswith(("sha256:", "size:")):
        return "other content" if len(text) > 20 else text
    return text if len(text) <= 40 else text[:37] + "..."


def identity_diff(old: Any, new: Any, limit: int = 4) -> List[str]:
    """Human-readable differences between two headers' identities (empty when equal)."""
    a: Dict[str, Any] = {}
    b: Dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if str(a.get(key)).startswith(("sha256:", "size:")) or str(b.get(key)).startswith(("sha256:", "size:")):
                what = "changed" if key in a and key in b else ("is new" if key in b else "is gone")
                diffs.append(f"{key} {what}")
            else:
                diffs.append(f"{key} {_show(a.get(key))} in the log, {_show(b.get(key))} now")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    return diffs
