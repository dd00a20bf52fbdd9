"""The slim task vector τ̂ on disk: ``OUT/task_vector.safetensors`` in a sparse layout.

A pruned τ̂ is mostly zeros (95% at ``--keep 0.05``); written dense it is as large as the model.
The sparse file is an ordinary safetensors file holding, for every prunable tensor ``NAME``:

* ``NAME.mask``   — uint8, the tensor's non-zero pattern in row-major order, packed 8 entries a
  byte, most significant bit first (``numpy.packbits``). Zeros of either sign are pruned entries
  (a pruner's ``τ·0`` gives ``-0.0`` for a negative τ) and read back as ``+0.0``; every other
  value, NaN included, is kept bit for bit;
* ``NAME.values`` — the non-zero entries in row-major order, in τ̂'s dtype;

and the metadata ``format = "nps-sparse-tau/1"`` and ``shapes`` (JSON: name -> shape). At keep
ratio r a float32 τ̂ takes (1/32 + r) of the dense file: 8.1% at r = 0.05. Reading it back
(:func:`read_task_vector`, or without nps)::

    import json, numpy as np, torch
    from safetensors import safe_open
    with safe_open("OUT/task_vector.safetensors", "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        tau = {}
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(f.get_tensor(name + ".mask").numpy(), count=n).astype(bool))
            values = f.get_tensor(name + ".values")
            dense = torch.zeros(n, dtype=values.dtype)
            dense[keep] = values
            tau[name] = dense.reshape(shape)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import NPSError
from .save import save_tensors

SPARSE_FORMAT = "nps-sparse-tau/1"


def sparse_parts(tensors: Mapping[str, torch.Tensor]):
    """({NAME.mask, NAME.values}, shapes) of the tensors (see the module doc)."""
    parts: Dict[str, torch.Tensor] = {}
    shapes = {}
    for name, t in tensors.items():
        flat = t.detach().reshape(-1).cpu()
        keep = flat != 0            # NaN != 0: kept; -0.0 == 0: a pruned entry
        parts[name + ".mask"] = torch.from_numpy(np.packbits(keep.numpy()))
        parts[name + ".values"] = flat[keep].contiguous()
        shapes[name] = list(t.shape)
    return parts, shapes


def save_sparse_tensors(path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None, *,
                        inputs=()) -> Path:
    """Write τ̂ sparse (atomically, as :func:`.save.save_tensors`)."""
    parts, shapes = sparse_parts(tensors)
    meta = {**(metadata or {}), "format": SPARSE_FORMAT, "shapes": json.dumps(shapes)}
    return save_tensors(path, parts, metadata=meta, inputs=inputs)


def read_task_vector(path) -> Dict[str, torch.Tensor]:
    """A ``task_vector.safetensors`` as dense tensors, whether written sparse (this module) or
    dense (older outputs, or any safetensors file of τ)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SPARSE_FORMAT:
                return load_file(str(path))
            shapes = json.loads(meta["shapes"])
            out = {}
            for name, shape in shapes.items():
                n = int(np.prod(shape)) if shape else 1
                bits = f.get_tensor(name + ".mask").numpy()
                if bits.size != (n + 7) // 8:
                    raise NPSError(f"{path}: {name}.mask has {bits.size} bytes for {n} entries")
                keep = torch.from_numpy(np.unpackbits(bits, count=n).astype(bool))
                values = f.get_tensor(name + ".values")
                if values.numel() != int(keep.sum()):
                    raise NPSError(f"{path}: {name}: {values.numel()} values for {int(keep.sum())} "
                                   "set mask bits")
                dense = torch.zeros(n, dtype=values.dtype)
                dense[keep] = values
                out[name] = dense.reshape(shape)
            return out
    except NPSError:
        raise
    except Exception as exc:      # a truncated or foreign file
        raise NPSError(f"{path}: not a readable task vector ({type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:200]})") from None
