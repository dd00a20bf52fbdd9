"""Names of torch dtypes, in one table.

Three spellings are in use: torch's own (``"float32"``, what ``--tau-dtype`` and a store's
layout record), the short names of stored values (``"fp32"``, ``--values``) and the safetensors
header codes (``"F32"``). Each registry elsewhere (``pair.TAU_DTYPES``,
``compress.VALUE_DTYPES``) is a fixed selection of names from here, built by :func:`registry`.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

# torch name -> safetensors code; the optional dtypes only where this torch has them
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
          "bool": "BOOL"}
_OPTIONAL_CODES = {"uint16": "U16", "uint32": "U32", "uint64": "U64",
                   "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}

#: short name -> torch name
SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: torch.dtype -> safetensors code, and back
SAFETENSORS_CODES: Dict[torch.dtype, str] = {
    getattr(torch, name): code for name, code in {**_CODES, **_OPTIONAL_CODES}.items()
    if hasattr(torch, name)}
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {code: dt for dt, code in SAFETENSORS_CODES.items()}

#: the floating dtypes a flat task vector / a store layout holds
FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")


def from_name(name: str) -> torch.dtype:
    """The dtype of a torch name (``"bfloat16"``) or a short name (``"bf16"``); KeyError else."""
    full = SHORT_NAMES.get(name, name)
    if full not in _CODES and full not in _OPTIONAL_CODES or not hasattr(torch, full):
        raise KeyError(name)
    return getattr(torch, full)


def torch_name(dtype: torch.dtype) -> str:
    """torch's own name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


def registry(*names: str) -> Dict[str, torch.dtype]:
    """``{name: dtype}`` for exactly ``names``, in that order (a registry's public key set)."""
    return {name: from_name(name) for name in names}


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (True for a non-floating or empty tensor): its
    smallest and largest values, one vectorized pass and no temporary (torch's min/max propagate
    NaN, and an infinity is the min or the max), about 30x faster than ``isfinite(t).all()`` on
    this project's CPUs."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
