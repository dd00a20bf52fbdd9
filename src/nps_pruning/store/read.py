"""Reading a compression store (format: :mod:`nps_pruning.store`): :class:`Store` opens
and checks the manifest and every part's size, reads a task's mask and values (checksums verified,
the mask checked after decoding), its carried tensors and files, θ_pre, and the bits-per-entry
report; :func:`restore_task` is θ_pre + τ̂ bit for bit."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from ..dtypes import from_name
from ..errors import NPSError
from ..paths import safe_relpath
from ..task_vector import Layout
from .manifest import MAX_MANIFEST_BYTES, all_parts, check_manifest
from .mask_coding import MASK_CODINGS, decode_mask, decode_seeded
from .types import (FORMAT, FORMAT_VERSION, MANIFEST, VALUE_CODINGS, VALUE_DTYPES, RestoredTask,
                    _manifest_sha256, _mask_sha256, _sha256, _values_sha256, flat_sha256)
from .value_coding import decode_values, group_sizes_of, is_float_coding

__all__ = ["Store", "read_store", "restore_task", "store_info"]


class Store:
    """An opened store: manifest checked (structure, own checksum, every part's presence and size);
    part checksums are checked when a task (or θ_pre) is read."""

    def __init__(self, store_dir) -> None:
        self.path = Path(store_dir)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise NPSError(f"{self.path}: no such store folder")
        if not manifest_path.is_file():
            raise NPSError(f"{manifest_path}: missing; not an nps store (or a partial one)")
        try:
            if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise NPSError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; "
                               "not an nps store manifest")
            manifest = json.loads(manifest_path.read_bytes())
        except (OSError, ValueError, RecursionError) as err:
            raise NPSError(f"{manifest_path}: unreadable or corrupted ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise NPSError(f"{manifest_path}: not an nps store manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise NPSError(f"{manifest_path}: store format version {manifest.get('format_version')!r:.40}"
                           f" is not supported (this nps reads version {FORMAT_VERSION})")
        if manifest.get("manifest_sha256") != _manifest_sha256(manifest):
            raise NPSError(f"{manifest_path}: checksum mismatch (corrupted manifest)")
        # every field used below is checked first; part paths are confined to the store
        check_manifest(self.path, manifest, str(manifest_path), value_dtypes=tuple(VALUE_CODINGS),
                       codings=MASK_CODINGS)
        lay = manifest["layout"]
        self.layout = Layout(tuple(lay["names"]), tuple(tuple(s) for s in lay["shapes"]),
                             tuple(from_name(d) for d in lay["dtypes"]))
        self.num_entries = manifest["num_entries"]
        self.pretrained = manifest["pretrained"]
        self._tasks = {t["name"]: t for t in manifest["tasks"]}
        self.manifest = manifest
        self.base_names: Dict[str, str] = dict(manifest.get("base_names") or {})
        for part, owner in all_parts(manifest):
            self._check_size(part, owner)

    # -- parts -------------------------------------------------------------------------------
    @property
    def tasks(self) -> List[str]:
        return list(self._tasks)

    def _check_size(self, part: dict, owner: str) -> Path:
        path = safe_relpath(self.path, part["file"], what=f"part of {owner}")
        if path.is_symlink() or not path.is_file():
            raise NPSError(f"{path}: missing ({owner}); the store is partial")
        size = path.stat().st_size
        if size < part["bytes"]:
            raise NPSError(f"{path}: truncated ({owner}): {size} of {part['bytes']} bytes")
        if size > part["bytes"]:
            raise NPSError(f"{path}: corrupted ({owner}): {size} bytes, expected {part['bytes']}")
        return path

    def _read_part(self, part: dict, owner: str) -> bytes:
        path = self._check_size(part, owner)
        data = path.read_bytes()
        if len(data) != part["bytes"]:
            raise NPSError(f"{path}: truncated ({owner}): {len(data)} of {part['bytes']} bytes")
        if _sha256(data) != part["sha256"]:
            raise NPSError(f"{path}: checksum mismatch, the file is corrupted ({owner})")
        return data

    def _load(self, part: dict, owner: str, numpy_arrays: bool = False):
        data = self._read_part(part, owner)
        try:
            return (safetensors.numpy.load(data) if numpy_arrays
                    else safetensors.torch.load(data))
        except Exception as err:  # a file that passed its checksum but was written wrong
            raise NPSError(f"{self.path / part['file']}: unreadable ({owner}): {err}") from None

    # -- tasks -------------------------------------------------------------------------------
    def entry(self, task_name: str) -> dict:
        if task_name not in self._tasks:
            raise NPSError(f"{self.path}: unknown task {task_name!r} "
                           f"(known: {', '.join(self._tasks)})")
        return self._tasks[task_name]

    def task_vector(self, task_name: str) -> torch.Tensor:
        """τ̂ as a float32 (D,) vector: the stored values scattered into the mask positions."""
        entry = self.entry(task_name)
        owner = f"task {task_name!r}"
        mask_part, values_part = entry["parts"]["mask"], entry["parts"]["values"]
        arrays = self._load(mask_part, owner, numpy_arrays=True)
        try:
            if entry["mask_coding"] == "seeded":
                mask_array = decode_seeded(arrays, self.num_entries, entry["mask_order"], entry.get("mask_seed"),
                                           entry.get("mask_domain") or [(0, self.num_entries)])
            else:
                mask_array = decode_mask(arrays, entry["mask_coding"], self.num_entries)
        except (KeyError, ValueError) as err:
            raise NPSError(f"{self.path / mask_part['file']}: bad mask ({owner}): {err}") from None
        if entry.get("mask_sha256") != _mask_sha256(mask_array):   # end to end, decoder included
            drawn = (f"; its {entry['mask_order']} order was drawn by {entry.get('mask_drawn_by', '?')}, "
                     f"this is torch {torch.__version__}" if entry.get("mask_order", "flat") != "flat" else "")
            raise NPSError(f"{self.path / mask_part['file']}: the mask does not decode to the "
                           f"recorded one ({owner}{drawn})")
        mask = torch.from_numpy(mask_array)
        if is_float_coding(entry["value_dtype"]):
            values = self._load(values_part, owner).get("values")
        else:
            values = self._quantized_values(entry, values_part, mask_array, owner)
        expected = VALUE_DTYPES.get(entry["value_dtype"], torch.float32)
        if (values is None or values.dtype != expected or values.dim() != 1
                or values.numel() != int(mask.sum()) or values.numel() != entry["kept"]):
            raise NPSError(f"{self.path / values_part['file']}: kept values do not match the "
                           f"mask ({owner})")
        try:
            tau = torch.zeros(self.num_entries, dtype=torch.float32)
        except (RuntimeError, MemoryError):
            raise NPSError(f"{self.path / MANIFEST}: {self.num_entries} entries do not fit in "
                           "memory") from None
        tau[mask] = values.to(torch.float32)
        return tau

    def _quantized_values(self, entry: dict, part: dict, mask: "np.ndarray", owner: str) -> torch.Tensor:
        """A quantized coding's kept values, decoded and checked against the recorded sha256."""
        path = self.path / part["file"]
        arrays = self._load(part, owner, numpy_arrays=True)
        sizes = group_sizes_of(mask, [(a, b) for _, a, b, _ in self.layout.spans()])
        try:
            values = decode_values(arrays, entry["value_dtype"], sizes)
        except (KeyError, ValueError) as err:
            raise NPSError(f"{path}: bad {entry['value_dtype']} values ({owner}): {err}") from None
        if entry.get("values_sha256") != _values_sha256(values):
            raise NPSError(f"{path}: the values do not decode to the recorded ones ({owner})")
        return torch.from_numpy(values)

    def carried(self, task_name: str) -> Tuple[dict, dict, Dict[str, bytes]]:
        """(task_specific, buffers, side_files) of a task, checksums verified."""
        entry = self.entry(task_name)
        owner = f"task {task_name!r}"
        return (self._load(entry["parts"]["task_specific"], owner),
                self._load(entry["parts"]["buffers"], owner),
                {fname: self._read_part(part, owner)
                 for fname, part in entry["side_files"].items()})

    def pretrained_flat(self) -> Optional[torch.Tensor]:
        """θ_pre (float32, D) when embedded, checked against its recorded sha256; else None."""
        part = self.pretrained.get("part")
        if not part:
            return None
        tensors = self._load(part, "pre-trained model")
        try:
            flat = self.layout.flatten(tensors, torch.float32)
        except (KeyError, NPSError) as err:
            raise NPSError(f"{self.path / part['file']}: does not match the layout ({err})") from None
        if flat_sha256(flat) != self.pretrained["sha256"]:
            raise NPSError(f"{self.path / part['file']}: checksum mismatch of θ_pre (corrupted)")
        return flat

    def check_pretrained(self, base_flat: torch.Tensor, source: str = "pre-trained model") -> None:
        if base_flat.dim() != 1 or base_flat.numel() != self.num_entries:
            raise NPSError(f"{source}: wrong pre-trained model for store {self.path}: "
                           f"{base_flat.numel()} prunable entries, the store has {self.num_entries}")
        if flat_sha256(base_flat) != self.pretrained["sha256"]:
            raise NPSError(f"{source}: wrong pre-trained model for store {self.path} "
                           "(its checksum differs from the one recorded)")

    def verify(self) -> None:
        """Check every part's checksum and decode every task (``nps info --verify``)."""
        self.pretrained_flat()
        for name in self._tasks:
            self.task_vector(name)
            self.carried(name)

    def info(self) -> dict:
        """Sizes and bits per entry (SPEC §3 ``nps info --json``): per task the keep ratio,
        bits per prunable entry of mask + values (and split: mask / values / side data, the
        task's other parts and files), bytes, against the paper's 32r + 1."""
        num = self.num_entries
        tasks = []
        for name, entry in self._tasks.items():
            parts = entry["parts"]
            mask_bytes, values_bytes = parts["mask"]["bytes"], parts["values"]["bytes"]
            task_bytes = (sum(p["bytes"] for p in parts.values())
                          + sum(p["bytes"] for p in entry["side_files"].values()))
            tasks.append({
                "name": name, "kept": entry["kept"], "keep_ratio": entry["keep_ratio"],
                "value_dtype": entry["value_dtype"], "mask_coding": entry["mask_coding"],
                "mask_order": entry.get("mask_order"),
                "mask_bytes": mask_bytes, "values_bytes": values_bytes, "bytes": task_bytes,
                "mask_bits_per_entry": 8 * mask_bytes / num,
                "values_bits_per_entry": 8 * values_bytes / num,
                # everything else of the task (its own head, buffers, config/tokenizer files)
                "side_bits_per_entry": 8 * (task_bytes - mask_bytes - values_bytes) / num,
                "bits_per_entry": 8 * (mask_bytes + values_bytes) / num,
                "paper_bits_per_entry": 32 * entry["keep_ratio"] + 1,
                "task_specific_entries": entry.get("task_specific_entries", 0),
            })
        pretrained_bytes = self.pretrained["part"]["bytes"] if self.pretrained.get("part") else 0
        total = sum(os.lstat(os.path.join(d, f)).st_size           # links are not followed
                    for d, _, files in os.walk(self.path) for f in files
                    if os.path.isfile(os.path.join(d, f))
                    and not os.path.islink(os.path.join(d, f)))
        # Eq. 8 / App. C.3: 32·P + (32r + 1)·N·P' bits, with P = P' = D (θ_pre's prunable entries,
        # which is what the store keeps) and Σ over tasks when their keep ratios differ.
        paper_bits = 32 * num + sum((32 * t["keep_ratio"] + 1) * num for t in tasks)
        return {
            "store": str(self.path), "format_version": FORMAT_VERSION, "num_entries": num,
            "num_tasks": len(tasks), "tasks": tasks, "total_bytes": total,
            "pretrained": {"embedded": bool(self.pretrained.get("embedded")),
                           "ref": self.pretrained.get("ref"), "sha256": self.pretrained["sha256"],
                           "bytes": pretrained_bytes},
            "bits_per_entry": {t["name"]: t["bits_per_entry"] for t in tasks},
            "paper_formula_bits": paper_bits, "paper_formula_bytes": paper_bits / 8,
        }


def read_store(store_dir) -> Store:
    return Store(store_dir)


def restore_task(store_dir, task_name: str, base_flat: Optional[torch.Tensor] = None) -> RestoredTask:
    """θ_pre + τ̂ of one task (float32, in the store's layout) and its carried tensors and files.

    ``base_flat`` is required when the store does not embed θ_pre and is always checked against
    the recorded sha256. The result equals ``base_flat + τ̂.to(value_dtype).float()`` bit for bit
    (see the module docstring). Nothing is written; every check happens before returning."""
    store = read_store(store_dir)
    store.entry(task_name)
    if base_flat is None:
        base_flat = store.pretrained_flat()
        if base_flat is None:
            ref = store.pretrained.get("ref")
            raise NPSError(f"{store.path}: the store does not embed the pre-trained model; pass it"
                           + (f" (recorded: {ref})" if ref else ""))
    else:
        store.check_pretrained(base_flat)
    tau = store.task_vector(task_name)
    task_specific, buffers, side_files = store.carried(task_name)
    return RestoredTask(base_flat.to(torch.float32) + tau, task_specific, buffers, side_files)


def store_info(store_dir) -> dict:
    return read_store(store_dir).info()
