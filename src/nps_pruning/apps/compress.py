"""The compression store (SPEC §2 "Compression", Eq. 8, App. C.3).

A store keeps θ_pre once and, per task, its pruned task vector τ̂_i as a 1-bit mask over the D
prunable entries plus the kept values, and the task-specific tensors verbatim::

    STORE/
      manifest.json                    format, layout, D, θ_pre's sha256, per task: counts, parts
      pretrained.safetensors           θ_pre's prunable tensors (omitted with embed_pretrained=False)
      tasks/000/mask.safetensors       packed bits (numpy.packbits) or a range-coded mask
      tasks/000/values.safetensors     the kept values, in order, as fp32 | fp16 | bf16
      tasks/000/task_specific.safetensors, tasks/000/buffers.safetensors
      tasks/000/side/000 ...           the task folder's config/tokenizer files, byte for byte

Every part has its size and sha256 in the manifest, and the manifest carries a checksum of
itself. Sizes are checked when a store is opened (a missing part = a partial store, a short one =
truncated); checksums when a task is read. Stores are written into a temporary folder next to
the destination and renamed into place, so a store is either complete or absent.

**Bit-identical restore.** :func:`restore_task` returns ``base_flat + τ̂`` where τ̂ is a float32
zero vector with the stored values (cast to float32) scattered into the mask positions. That is
exactly the float arithmetic of the pruned model ``base_flat + τ̂.to(dtype).float()`` built with
the same value precision ``dtype``, so the two are equal bit for bit (``torch.equal``). (IEEE
addition of a zero is exact except that −0.0 + 0.0 = +0.0: a pruned entry is restored as
``θ_pre + 0.0``, which differs from ``θ_pre + (−0.0)`` only where θ_pre itself holds −0.0.)

**Entropy-coded mask.** The mask is cut into chunks of 65,536 entries; each chunk's kept count
is stored (32 bits) and its bits are range-coded (``constriction``) under a Bernoulli model with
that chunk's keep frequency. At r = 0.05 this costs about H(0.05) ≈ 0.29 bits per entry, less
where the kept entries cluster (some layers keep far more than others), against 1 bit packed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from ..atomic import staging_dir, swap_in_dir
from ..dtypes import from_name, registry, torch_name
from ..errors import NPSError
from ..task_vector import Layout
from ..paths import safe_relpath
from ..workdirs import unmark
from .mask_coding import ENTROPY_CHUNK, MASK_CODINGS, decode_mask, encode_mask
from .store_manifest import (MAX_MANIFEST_BYTES, all_parts, check_manifest, side_file_reserved)

__all__ = ["StoreTask", "Store", "RestoredTask", "write_store", "read_store", "restore_task",
           "store_info", "encode_mask", "decode_mask", "flat_sha256", "VALUE_DTYPES",
           "MASK_CODINGS"]

FORMAT = "nps-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALUE_DTYPES: Dict[str, torch.dtype] = registry("fp32", "fp16", "bf16")   # --values' names


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


class RestoredTask(NamedTuple):
    theta_flat: torch.Tensor            # float32 (D,), θ_pre + τ̂ in the store's layout
    task_specific: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    side_files: Dict[str, bytes]


# -- hashing -------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flat_sha256(flat: torch.Tensor) -> str:
    """sha256 of a flat vector's float32 bytes: the identity of a θ_pre in a layout."""
    array = flat.detach().to(torch.float32).contiguous().cpu().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _manifest_sha256(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# -- writing ------------------------------------------------------------------------------------------
def _is_our_store(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_destination(store_dir: Path) -> None:
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
    if values_dtype not in VALUE_DTYPES:
        raise NPSError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, got {values_dtype!r}")
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
        kept = values[values != 0].to(VALUE_DTYPES[values_dtype])
        if not bool(torch.isfinite(kept).all()):
            raise NPSError(f"task {task.name!r}: kept values overflow {values_dtype}; "
                           "store them as fp32 or bf16")
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


def _safe_side_name(name) -> bool:
    """A side file name is a relative POSIX path inside the model folder (see paths.safe_relpath)."""
    try:
        safe_relpath(Path("/"), name)
    except NPSError:
        return False
    return True


def _mask_sha256(mask: np.ndarray) -> str:
    return _sha256(np.packbits(mask, bitorder="little").tobytes())


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


def _write_task(root: Path, index: int, task: StoreTask, num: int, values_dtype: str,
                mask_coding: str) -> dict:
    folder = f"tasks/{index:03d}"
    values = task.pruned_values.detach().cpu()
    mask = values != 0
    kept = int(mask.sum())
    mask_arrays = encode_mask(mask.numpy(), mask_coding)
    coding_note = ("numpy.packbits, little bit order" if mask_coding == "packed" else
                   f"constriction range coder, Bernoulli(perfect=False) per {ENTROPY_CHUNK} entries")
    parts = {
        "mask": _write_part(root, f"{folder}/mask.safetensors", safetensors.numpy.save(
            mask_arrays, metadata={"coding": mask_coding, "num_entries": str(num),
                                   "model": coding_note})),
        "values": _write_part(root, f"{folder}/values.safetensors", safetensors.torch.save(
            {"values": values[mask].to(VALUE_DTYPES[values_dtype]).contiguous()})),
        "task_specific": _write_part(root, f"{folder}/task_specific.safetensors",
                                     _tensor_bytes(task.task_specific)),
        "buffers": _write_part(root, f"{folder}/buffers.safetensors", _tensor_bytes(task.buffers)),
    }
    side = {}
    for j, (fname, data) in enumerate(sorted(task.side_files.items())):
        side[fname] = _write_part(root, f"{folder}/side/{j:03d}", bytes(data))
    return {"name": task.name, "kept": kept, "keep_ratio": kept / num,
            "mask_sha256": _mask_sha256(mask.numpy()),
            "value_dtype": values_dtype, "mask_coding": mask_coding, "parts": parts,
            "side_files": side,
            "task_specific_entries": sum(t.numel() for t in task.task_specific.values()),
            "meta": task.meta}


def write_store(store_dir, base_flat: torch.Tensor, layout: Layout, tasks: List[StoreTask], *,
                values_dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
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
    _check_destination(store_dir)
    num = layout.numel
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
            "tasks": [_write_task(tmp, i, task, num, values_dtype, mask_coding)
                      for i, task in enumerate(tasks)],
        }
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
        _write_part(tmp, MANIFEST, json.dumps(manifest, indent=1).encode())
        unmark(tmp)
        _check_destination(store_dir)
        swap_in_dir(tmp, store_dir)       # an old store is put back if this fails
    return manifest


# -- reading ------------------------------------------------------------------------------------------
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
        check_manifest(self.path, manifest, str(manifest_path), value_dtypes=tuple(VALUE_DTYPES),
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
            mask_array = decode_mask(arrays, entry["mask_coding"], self.num_entries)
        except (KeyError, ValueError) as err:
            raise NPSError(f"{self.path / mask_part['file']}: bad mask ({owner}): {err}") from None
        if entry.get("mask_sha256") != _mask_sha256(mask_array):   # end to end, decoder included
            raise NPSError(f"{self.path / mask_part['file']}: the mask does not decode to the "
                           f"recorded one ({owner})")
        mask = torch.from_numpy(mask_array)
        values = self._load(values_part, owner).get("values")
        expected = VALUE_DTYPES.get(entry["value_dtype"])
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
        bits per prunable entry of mask + values, bytes, against the paper's 32r + 1."""
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
                "mask_bytes": mask_bytes, "values_bytes": values_bytes, "bytes": task_bytes,
                "mask_bits_per_entry": 8 * mask_bytes / num,
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
