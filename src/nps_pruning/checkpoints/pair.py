"""Building a task vector τ = θ_ft − θ_pre from two checkpoints (SPEC §1 "Prunable entries").

* prunable: floating-point tensors present in both checkpoints (after :func:`match_names`) with
  the same shape; the layout uses the fine-tuned names, in the fine-tuned checkpoint's order;
* task-specific: fine-tuned tensors with no counterpart (a new head), kept verbatim;
* buffers: integer / bool tensors of the fine-tuned model, copied verbatim;
* base-only tensors are ignored.

The flat vectors are filled tensor by tensor into preallocated buffers, so the peak memory is
about ``base_flat + τ + one tensor``.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..errors import NPSError
from ..task_vector import Layout, TaskVector
from .load import Checkpoint, open_checkpoint
from .names import match_names


def _check_finite(t: torch.Tensor, ckpt: Checkpoint, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NPSError(f"{ckpt.file_of(name)}: tensor {name} contains {kind} values")


def _verbatim(t: torch.Tensor) -> torch.Tensor:
    # a private copy: never a view into a memory-mapped input file
    return t.detach().clone().contiguous()


def load_task_vector(pretrained, finetuned, *, allow_shape_mismatch: bool = False,
                     name: str | None = None, check_finite: bool = True
                     ) -> Tuple[torch.Tensor, TaskVector]:
    """``(base_flat, τ)``: θ_pre (float32) in the layout of the prunable tensors, and the task
    vector. ``pretrained`` / ``finetuned`` are paths or :class:`Checkpoint` objects."""
    base = open_checkpoint(pretrained)
    ft = open_checkpoint(finetuned)

    bt, ftt = base.model_type, ft.model_type
    if bt is not None and ftt is not None and bt != ftt:
        raise NPSError(f"{ft.path}: model_type {ftt!r} differs from {base.path}'s {bt!r}; "
                       "a task vector needs two checkpoints of one architecture")

    mapping = match_names(base.keys(), ft.keys())
    if not mapping:
        raise NPSError(f"{ft.path}: no tensor in common with {base.path}; "
                       "they are not the same architecture")

    names: List[str] = []
    shapes: List[Tuple[int, ...]] = []
    dtypes: List[torch.dtype] = []
    base_names: Dict[str, str] = {}
    task_specific: Dict[str, torch.Tensor] = {}
    buffers: Dict[str, torch.Tensor] = {}

    for k in ft.keys():
        dt = ft.dtype(k)
        if not dt.is_floating_point:
            buffers[k] = _verbatim(ft.get(k))
            continue
        b = mapping.get(k)
        if b is None or not base.dtype(b).is_floating_point:
            t = ft.get(k)
            if check_finite:
                _check_finite(t, ft, k)
            task_specific[k] = _verbatim(t)
            continue
        fs, bs = ft.shape(k), base.shape(b)
        if fs != bs:
            if not allow_shape_mismatch:
                where = k if b == k else f"{k} (base {b})"
                raise NPSError(f"tensor {where}: shape {fs} in {ft.file_of(k)} but {bs} in "
                               f"{base.file_of(b)}; pass allow_shape_mismatch "
                               "(--allow-shape-mismatch) to keep it whole as task-specific")
            t = ft.get(k)
            if check_finite:
                _check_finite(t, ft, k)
            task_specific[k] = _verbatim(t)
            continue
        names.append(k)
        shapes.append(fs)
        dtypes.append(dt)
        base_names[k] = b

    if not names:
        raise NPSError(f"{ft.path}: no floating-point tensor shared with {base.path} with the "
                       "same shape; nothing to build a task vector from")

    layout = Layout(tuple(names), tuple(shapes), tuple(dtypes))
    d = layout.numel
    base_flat = torch.empty(d, dtype=torch.float32)
    values = torch.empty(d, dtype=torch.float32)
    for k, start, stop, _shape in layout.spans():
        b = base_names[k]
        tb = base.get(b)
        if check_finite:
            _check_finite(tb, base, b)
        base_flat[start:stop].copy_(tb.reshape(-1))
        del tb
        tf = ft.get(k)
        if check_finite:
            _check_finite(tf, ft, k)
        values[start:stop].copy_(tf.reshape(-1))
        del tf
        values[start:stop].sub_(base_flat[start:stop])
    if check_finite and not bool(torch.isfinite(values).all()):
        bad = next(k for k, v in layout.unflatten(values).items() if not bool(torch.isfinite(v).all()))
        raise NPSError(f"{ft.file_of(bad)}: tensor {bad}: fine-tuned minus pre-trained "
                       "overflows float32")

    tv = TaskVector(layout=layout, values=values, task_specific=task_specific, buffers=buffers,
                    base_names=base_names, name=name if name is not None else ft.name)
    return base_flat, tv
