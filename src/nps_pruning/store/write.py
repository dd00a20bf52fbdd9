"""Writing a compression store (format: :mod:`nps_pruning.store`): the inputs checked,
one part writer (each part fsynced, its size and sha256 recorded), the per-task parts, and the
manifest last, all in a staging folder next to the destination that is renamed into place."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional

import safetensors.numpy
import safetensors.torch
import torch

from ..atomic import staging_dir, swap_in_dir
from ..dtypes import torch_name
from ..errors import NPSError
from ..paths import safe_relpath
from ..task_vector import Layout
from ..workdirs import unmark
from .manifest import side_file_reserved
from .mask_coding import ENTROPY_CHUNK, MASK_CODINGS, encode_mask, encode_seeded, spans_in_order
from .types import (FORMAT, FORMAT_VERSION, MANIFEST, VALUE_CODINGS, VALUE_DTYPES, StoreTask,
                    _manifest_sha256, _mask_sha256, _sha256, _values_sha256, flat_sha256)
from .value_coding import encode_values, group_sizes_of, is_float_coding, levels_of

__all__ = ["write_store"]


def _is_our_store(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(store_dir: Path) -> None:
    if not store_dir.exists() and not store_dir.is_symlink():
        return
    if store_dir.is_dir() and not store_dir.is_symlink():
        if not any(store_dir.iterdir()) or _is_our_store(store_dir):
            return
    raise NPSError(f"{store_dir}: exists and is neither an empty folder nor an nps store; "
                   "refusing to overwrite it")


def _check_tensor_dict(task: str, what: str, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise NPSError(f"task {task!r}: {what} must map names to tensors")


def _validate(base_flat: torch.Tensor, layout: Layout, tasks: List[StoreTask],
              values_dtype: str, mask_coding: str) -> None:
    if values_dtype not in VALUE_CODINGS:
        raise NPSError(f"value coding must be one of {', '.join(VALUE_CODINGS)}, got {values_dtype!r}")
    if mask_coding not in MASK_CODINGS:
        raise NPSError(f"mask coding must be one of {', '.join(MASK_CODINGS)}, got {mask_coding!r}")
    num = layout.numel
    if base_flat.dim() != 1 or base_flat.numel() != num or not base_flat.is_floating_point():
        raise NPSError(f"pre-trained flat vector must be 1-D float with {num} entries, "
                       f"got {tuple(base_flat.shape)} {base_flat.dtype}")
    if not tasks:
        raise NPSError("no tasks to store")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise NPSError(f"task names must be unique non-empty strings, got {names}")
    for task in tasks:
        values = task.pruned_values
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != num:
            raise NPSError(f"task {task.name!r}: pruned values must be 1-D with {num} entries")
        if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
            raise NPSError(f"task {task.name!r}: pruned values must be finite floats")
        kept = values[values != 0].to(VALUE_DTYPES.get(values_dtype, torch.float32))
        if not bool(torch.isfinite(kept).all()):
            raise NPSError(f"task {task.name!r}: kept values overflow {values_dtype}; "
                           "store them as fp32 or bf16")
        if task.level_scale is not None:
            if is_float_coding(values_dtype):
                raise NPSError(f"task {task.name!r}: level factors need a quantized value coding")
            scale = list(task.level_scale)
            if len(scale) != levels_of(values_dtype) or not all(math.isfinite(float(x)) and float(x) > 0
                                                                for x in scale):
                raise NPSError(f"task {task.name!r}: {values_dtype} needs {levels_of(values_dtype)} "
                               "finite positive level factors")
        _check_seeded(task, num)
        _check_tensor_dict(task.name, "task-specific tensors", task.task_specific)
        _check_tensor_dict(task.name, "buffers", task.buffers)
        for fname, data in task.side_files.items():
            if not _safe_side_name(fname) or not isinstance(data, (bytes, bytearray)):
                raise NPSError(f"task {task.name!r}: side file {fname!r}: must be a relative "
                               "path inside the model folder, mapped to bytes")
            if side_file_reserved(fname):
                raise NPSError(f"task {task.name!r}: side file {fname!r}: has the name of a "
                               "weight file; side files may not replace the model's weights")
        try:
            json.dumps(task.meta)
        except (TypeError, ValueError) as err:
            raise NPSError(f"task {task.name!r}: meta is not JSON-serialisable ({err})") from None


def _check_seeded(task: StoreTask, num: int) -> None:
    """The seeded mask coding's inputs: a seed in [0, 2^63) and domain spans ascending, disjoint,
    inside 0 .. num."""
    seed = task.mask_seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise NPSError(f"task {task.name!r}: mask seed must be an integer in [0, 2^63), got {seed!r}")
    try:
        spans = [tuple(int(x) for x in span) for span in task.mask_domain or ()]
    except (TypeError, ValueError):
        spans = [()]
    if not all(len(s) == 2 for s in spans) or not spans_in_order(spans, num):
        raise NPSError(f"task {task.name!r}: mask domain spans must be ascending, disjoint and "
                       f"inside 0..{num}, got {list(task.mask_domain)}")


def _safe_side_name(name) -> bool:
    """A side file name is a relative POSIX path inside the model folder (see paths.safe_relpath)."""
    try:
        safe_relpath(Path("/"), name)
    except NPSError:
        return False
    return True


def _write_part(root: Path, relpath: str, data: bytes) -> dict:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"file": relpath, "bytes": len(data), "sha256": _sha256(data)}


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous().clone()
                                   for k, v in tensors.items()})


def _pretrained_tensors(base_flat: torch.Tensor, layout: Layout) -> Dict[str, torch.Tensor]:
    """θ_pre per tensor, in the tensor's own 16-bit dtype when that holds it exactly, else float32."""
    out = {}
    base_flat = base_flat.detach().cpu().to(torch.float32).contiguous()
    for (name, start, stop, shape), dtype in zip(layout.spans(), layout.dtypes):
        segment = base_flat[start:stop]
        if dtype in (torch.float16, torch.bfloat16):
            narrow = segment.to(dtype)
            if torch.equal(narrow.float().view(torch.int32), segment.view(torch.int32)):
                segment = narrow
        out[name] = segment.reshape(shape)
    return out


def _values_part(values: torch.Tensor, mask: torch.Tensor, layout: Layout, coding: str, level_scale=None):
    """(bytes of the values part, extra manifest fields) of one task's kept values."""
    if is_float_coding(coding):
        return safetensors.torch.save({"values": values[mask].to(VALUE_DTYPES[coding]).contiguous()}), {}
    sizes = group_sizes_of(mask.numpy(), [(a, b) for _, a, b, _ in layout.spans()])
    arrays, decoded = encode_values(values[mask].to(torch.float32).numpy(), sizes, coding, level_scale)
    data = safetensors.numpy.save(arrays, metadata={"coding": coding, "groups": "one per layout tensor"})
    return data, {"values_sha256": _values_sha256(decoded)}


def _write_task(root: Path, index: int, task: StoreTask, layout: Layout, values_dtype: str,
                mask_coding: str, shared: Optional[Dict[str, dict]] = None) -> dict:
    folder = f"tasks/{index:03d}"
    num = layout.numel
    values = task.pruned_values.detach().cpu()
    mask = values != 0
    kept = int(mask.sum())
    values_bytes, values_fields = _values_part(values, mask, layout, values_dtype, task.level_scale)
    if task.level_scale is not None:
        values_fields["level_scale"] = [float(x) for x in task.level_scale]
    seeded = {}
    if mask_coding == "seeded":
        spans = [(int(a), int(b)) for a, b in (task.mask_domain or [(0, num)])]
        order, mask_arrays = encode_seeded(mask.numpy(), task.mask_seed, spans)
        seeded = {"mask_order": order}
        if order != "flat":
            seeded.update(mask_seed=int(task.mask_seed), mask_domain=[list(s) for s in spans],
                          mask_drawn_by=f"torch {torch.__version__}")
    else:
        mask_arrays = encode_mask(mask.numpy(), mask_coding)
    coding_note = ("numpy.packbits, little bit order" if mask_coding == "packed" else
                   f"constriction range coder, Bernoulli(perfect=False) per {ENTROPY_CHUNK} entries"
                   + (f", in the {seeded['mask_order']} order" if seeded else ""))
    parts = {
        "mask": _write_part(root, f"{folder}/mask.safetensors", safetensors.numpy.save(
            mask_arrays, metadata={"coding": mask_coding, "num_entries": str(num),
                                   "model": coding_note})),
        "values": _write_part(root, f"{folder}/values.safetensors", values_bytes),
        "task_specific": _write_part(root, f"{folder}/task_specific.safetensors",
                                     _tensor_bytes(task.task_specific)),
        "buffers": _write_part(root, f"{folder}/buffers.safetensors", _tensor_bytes(task.buffers)),
    }
    side = {}
    shared = {} if shared is None else shared
    for fname, data in sorted(task.side_files.items()):
        # side files are content-addressed and kept once per store (every task of one model
        # family carries the same tokenizer: tens of MB once, not once per task)
        digest = _sha256(bytes(data))
        if digest not in shared:
            shared[digest] = _write_part(root, f"side/{digest[:32]}", bytes(data))
        side[fname] = dict(shared[digest])
    return {"name": task.name, "kept": kept, "keep_ratio": kept / num,
            "mask_sha256": _mask_sha256(mask.numpy()), **values_fields,
            "value_dtype": values_dtype, "mask_coding": mask_coding, **seeded, "parts": parts,
            "side_files": side,
            "task_specific_entries": sum(t.numel() for t in task.task_specific.values()),
            "meta": task.meta}


def write_store(store_dir, base_flat: torch.Tensor, layout: Layout, tasks: List[StoreTask], *,
                values_dtype: str = "fp32",
                mask_coding: Literal["packed", "entropy"] = "packed",
                embed_pretrained: bool = True, pretrained_ref: Optional[str] = None,
                base_names: Optional[Dict[str, str]] = None) -> dict:
    """Write a store atomically and return its manifest.

    ``base_flat`` is θ_pre in ``layout`` (the layout's names are the fine-tuned models'). With
    ``embed_pretrained=False`` only its sha256 (and ``pretrained_ref``, e.g. its path) is kept and
    :func:`restore_task` needs the pre-trained model again. ``store_dir`` may be absent, an empty
    folder or an existing store (replaced); anything else is refused. Nothing is left behind on
    error."""
    store_dir = Path(store_dir)
    _validate(base_flat, layout, tasks, values_dtype, mask_coding)
    check_destination(store_dir)
    num = layout.numel
    shared_side: Dict[str, dict] = {}          # side files kept once: sha256 -> part
    with staging_dir(store_dir) as tmp:
        pretrained = {"embedded": bool(embed_pretrained), "sha256": flat_sha256(base_flat),
                      "ref": pretrained_ref, "part": None}
        if embed_pretrained:
            pretrained["part"] = _write_part(tmp, "pretrained.safetensors", _tensor_bytes(
                _pretrained_tensors(base_flat, layout)))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "num_entries": num,
            "layout": {"names": list(layout.names), "shapes": [list(s) for s in layout.shapes],
                       "dtypes": [torch_name(d) for d in layout.dtypes]},
            "base_names": dict(base_names or {}),
            "pretrained": pretrained,
            "tasks": [_write_task(tmp, i, task, layout, values_dtype, mask_coding, shared_side)
                      for i, task in enumerate(tasks)],
        }
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
        _write_part(tmp, MANIFEST, json.dumps(manifest, indent=1).encode())
        unmark(tmp)
        check_destination(store_dir)
        swap_in_dir(tmp, store_dir)       # an old store is put back if this fails
    return manifest
