"""What the store's writer and reader share (:mod:`nps_pruning.store` describes the
format): its name and version, the value dtypes, the task records and the checksums."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..dtypes import registry
from .value_coding import VALUE_CODINGS as _VALUE_CODING_NAMES

FORMAT = "nps-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES: Dict[str, torch.dtype] = registry("fp32", "fp16", "bf16")   # the float codings
# --values' names: the float dtypes and the quantized codings of :mod:`.value_coding`
VALUE_CODINGS: Dict[str, str] = {name: name for name in _VALUE_CODING_NAMES}


@dataclass
class StoreTask:
    """One task to store. ``pruned_values`` is τ̂ (D,), zero where pruned: its nonzero entries are
    the mask. ``side_files`` maps file names (config.json, tokenizer files) to their bytes."""

    name: str
    pruned_values: torch.Tensor
    task_specific: Dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    side_files: Dict[str, bytes] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    level_scale: Optional[Sequence[float]] = None     # quantized codings: tuned level factors
    # the ``seeded`` mask coding: the pruner's seed and domain (the (start, stop) spans of the
    # entries it could keep; None: all of them). Without a seed the mask is coded flat.
    mask_seed: Optional[int] = None
    mask_domain: Optional[Sequence[Tuple[int, int]]] = None


class RestoredTask(NamedTuple):
    theta_flat: torch.Tensor            # float32 (D,), θ_pre + τ̂ in the store's layout
    task_specific: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    side_files: Dict[str, bytes]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flat_sha256(flat: torch.Tensor) -> str:
    """sha256 of a flat vector's float32 bytes: the identity of a θ_pre in a layout."""
    array = flat.detach().to(torch.float32).contiguous().cpu().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _manifest_sha256(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _values_sha256(values: np.ndarray) -> str:
    """sha256 of decoded kept values' float32 bytes (a quantized coding's end-to-end check)."""
    return _sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes())


def _mask_sha256(mask: np.ndarray) -> str:
    """sha256 of a boolean mask packed little-endian: recorded on write, checked after decoding."""
    return _sha256(np.packbits(mask, bitorder="little").tobytes())
