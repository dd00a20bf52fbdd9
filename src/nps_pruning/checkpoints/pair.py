"""Building a task vector τ = θ_ft − θ_pre from two checkpoints (SPEC §1 "Prunable entries").

* prunable: floating-point tensors present in both checkpoints (after :func:`match_names`) with
  the same shape; the layout uses the fine-tuned names, in the fine-tuned checkpoint's order;
* task-specific: fine-tuned tensors with no counterpart (a new head), kept verbatim;
* buffers: integer / bool tensors of the fine-tuned model, copied verbatim;
* running statistics (BatchNorm's ``running_mean`` / ``running_var``): with
  ``running_stats="finetuned"`` (the default) the fine-tuned model's are kept whole as
  task-specific tensors, like a head; ``"prune"`` treats them as prunable entries (SPEC §1 read
  literally). They are estimates of activation statistics, not learned weights: band weights,
  rescales and DARE's 1/r make a variance negative (the model then outputs NaN), and a pruned
  mix of two models' statistics matches neither model's activations;
* base-only tensors are ignored.

The flat vectors are filled tensor by tensor (from memory-mapped safetensors) into preallocated
buffers, so the peak memory is about ``base_flat + τ + a few copies of one tensor``.

Compact forms for large models: ``dtype=torch.bfloat16`` (or float16) keeps τ in 16 bits — each
tensor's difference is computed in float32 and rounded once to ``dtype`` (bfloat16 keeps float32's
range with 8 significant bits; float16 has 11 bits but underflows below 6e-5 and overflows above
65504, which is an error naming the tensor). ``base_dtype="checkpoint"`` keeps θ_pre in the
checkpoint's own floating dtype (e.g. bfloat16), which is lossless: the values are those of the
file. ``device`` puts both flat vectors there (e.g. "cuda"), filled tensor by tensor.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..dtypes import all_finite, registry
from ..errors import NPSError
from ..task_vector import Layout, TaskVector
from .load import Checkpoint, open_checkpoint
from .names import match_names


def _check_finite(t: torch.Tensor, ckpt: Checkpoint, name: str) -> None:
    if not all_finite(t):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NPSError(f"{ckpt.file_of(name)}: tensor {name} contains {kind} values")


def _verbatim(t: torch.Tensor) -> torch.Tensor:
    # a private copy: never a view into a memory-mapped input file
    return t.detach().clone().contiguous()


RUNNING_STATS = ("finetuned", "prune")
STAT_SUFFIXES = ("running_mean", "running_var")


def is_running_stat(name: str) -> bool:
    """A BatchNorm running statistic, by torch's naming (``<module>.running_mean`` / ``_var``)."""
    return name.rsplit(".", 1)[-1] in STAT_SUFFIXES


TAU_DTYPES = registry("float32", "bfloat16", "float16")     # --tau-dtype's names


def _as_dtype(dtype, what: str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in TAU_DTYPES:
            raise ValueError(f"{what} must be one of {', '.join(TAU_DTYPES)}, got {dtype!r}")
        return TAU_DTYPES[dtype]
    if dtype not in TAU_DTYPES.values():
        raise ValueError(f"{what} must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def load_task_vector(pretrained, finetuned, *, allow_shape_mismatch: bool = False,
                     name: str | None = None, check_finite: bool = True,
                     dtype: torch.dtype | str = torch.float32,
                     base_dtype: torch.dtype | str = torch.float32,
                     device: torch.device | str | None = None,
                     running_stats: str = "finetuned"
                     ) -> Tuple[torch.Tensor, TaskVector]:
    """``(base_flat, τ)``: θ_pre in the layout of the prunable tensors, and the task vector.
    ``pretrained`` / ``finetuned`` are paths or :class:`Checkpoint` objects.

    ``dtype``: τ's dtype (float32 default; bfloat16 / float16 round each difference once).
    ``base_dtype``: θ_pre's dtype (float32 default; ``"checkpoint"``: the pre-trained tensors'
    own dtype when they share a 16-bit one — lossless — else float32). ``device``: where both
    flat vectors live (default CPU). ``running_stats``: ``"finetuned"`` (keep BatchNorm running
    statistics whole, task-specific) or ``"prune"`` (prunable entries)."""
    if running_stats not in RUNNING_STATS:
        raise ValueError(f"running_stats must be one of {', '.join(RUNNING_STATS)}, got {running_stats!r}")
    dtype = _as_dtype(dtype, "dtype")
    if not (isinstance(base_dtype, str) and base_dtype == "checkpoint"):
        base_dtype = _as_dtype(base_dtype, "base_dtype")
    device = torch.device(device) if device is not None else torch.device("cpu")
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
        if b is None or not base.dtype(b).is_floating_point or (
                running_stats == "finetuned" and is_running_stat(k)):
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
    if base_dtype == "checkpoint":
        bdts = {base.dtype(base_names[k]) for k in names}
        base_dtype = bdts.pop() if len(bdts) == 1 and next(iter(bdts)) in (
            torch.float16, torch.bfloat16) else torch.float32
    base_flat = torch.empty(d, dtype=base_dtype, device=device)
    values = torch.empty(d, dtype=dtype, device=device)
    for k, start, stop, _shape in layout.spans():
        b = base_names[k]
        tb = base.get(b)
        if check_finite:
            _check_finite(tb, base, b)
        tb = tb.reshape(-1).to(device)
        base_flat[start:stop].copy_(tb)
        tf = ft.get(k)
        if check_finite:
            _check_finite(tf, ft, k)
        tf = tf.reshape(-1).to(device)
        # τ in float32 (the fine-tuned value and θ_pre rounded to float32, as before), then
        # stored in ``dtype``: one rounding for a compact τ.
        diff = tf.to(torch.float32) if tf.dtype != torch.float32 else tf.clone()
        del tf
        if base_dtype == torch.float32:
            diff.sub_(base_flat[start:stop])
        else:
            diff.sub_(tb.to(torch.float32))
        del tb
        if check_finite and not all_finite(diff):
            raise NPSError(f"{ft.file_of(k)}: tensor {k}: fine-tuned minus pre-trained "
                           "overflows float32")
        dst = values[start:stop]
        dst.copy_(diff)
        del diff
        if check_finite and dtype != torch.float32 and not all_finite(dst):
            raise NPSError(f"{ft.file_of(k)}: tensor {k}: fine-tuned minus pre-trained "
                           f"overflows {str(dtype).replace('torch.', '')}; use a wider task "
                           "vector dtype (bfloat16 or float32)")

    tv = TaskVector(layout=layout, values=values, task_specific=task_specific, buffers=buffers,
                    base_names=base_names, name=name if name is not None else ft.name)
    return base_flat, tv
