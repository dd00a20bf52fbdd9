"""Reading checkpoints lazily, tensor by tensor.

:func:`open_checkpoint` accepts

* a Hugging Face model folder with ``model.safetensors``, or sharded weights listed in
  ``model.safetensors.index.json``;
* a bare ``.safetensors`` file;
* a folder with ``pytorch_model.bin`` (or its sharded index), or a bare ``.bin`` / ``.pt`` /
  ``.pth`` file. These are pickles: they are read **only** with
  ``torch.load(weights_only=True)``, which refuses any pickle that would run code.

safetensors files are memory-mapped (``safe_open``): nothing is read until a tensor is asked for.
Every failure is an :class:`~nps_pruning.errors.NPSError` whose one-line message names the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import NPSError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


class Checkpoint:
    """A read-only, lazily read set of named tensors.

    ``path`` is what was opened (a folder or a file), ``folder`` the model folder holding
    ``config.json`` and tokenizer files (``None`` for a bare file), ``config`` the parsed
    ``config.json`` (``None`` if absent). ``files`` lists the weight files read.
    """

    path: Path
    folder: Path | None
    config: dict | None
    files: List[Path]

    def __init__(self, path: Path, folder: Path | None, config: dict | None) -> None:
        self.path = path
        self.folder = folder
        self.config = config
        self.files = []

    # -- interface implemented by the subclasses -------------------------------------------
    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, name: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor, in checkpoint order (safetensors tensors stay memory-mapped)."""
        return {k: self.get(k) for k in self.keys()}

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def file_of(self, name: str) -> Path:
        """The weight file holding ``name`` (for error messages)."""
        return self.files[0] if self.files else self.path

    @property
    def name(self) -> str:
        """A short name: the model folder's name, or the file's stem."""
        return self.folder.name if self.folder is not None else self.path.stem

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def __contains__(self, name: object) -> bool:
        return name in self._key_set()

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def _key_set(self):
        ks = getattr(self, "_keyset_cache", None)
        if ks is None:
            ks = self._keyset_cache = frozenset(self.keys())
        return ks

    def _missing(self, name: str) -> NPSError:
        return NPSError(f"{self.path}: no tensor named {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class SafetensorsCheckpoint(Checkpoint):
    """One or several (sharded) safetensors files, memory-mapped."""

    def __init__(self, path: Path, folder: Path | None, config: dict | None,
                 files: List[Path], weight_map: Dict[str, Path] | None = None) -> None:
        super().__init__(path, folder, config)
        self.files = list(files)
        self._handles = {}
        self._where: Dict[str, Path] = {}
        self._order: List[str] = []
        self._info: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt")
                names = list(h.keys())
                infos = {}
                for k in names:
                    sl = h.get_slice(k)
                    dt = sl.get_dtype()
                    if dt not in SAFETENSORS_DTYPES:
                        raise NPSError(f"{f}: tensor {k!r} has unsupported dtype {dt}")
                    infos[k] = (tuple(int(s) for s in sl.get_shape()), SAFETENSORS_DTYPES[dt])
            except NPSError:
                raise
            except Exception as exc:  # SafetensorError, OSError, ...
                raise NPSError(f"{f}: not a readable safetensors file (truncated or corrupt?): "
                               f"{_one_line(exc)}") from None
            self._handles[f] = h
            for k in names:
                if weight_map is not None and weight_map.get(k) != f:
                    continue  # not this shard's tensor according to the index
                if k in self._where:
                    raise NPSError(f"{f}: tensor {k!r} also appears in {self._where[k]}")
                self._where[k] = f
                self._info[k] = infos[k]
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._where:
                    raise NPSError(f"{f}: tensor {k!r} is listed in the index but missing from "
                                   "this shard")
            self._order = list(weight_map)
        else:
            self._order = list(self._where)
        # safetensors sorts names; keep the index order when there is one, else a stable sort
        # by file position so the order is that of the file.
        if weight_map is None:
            pos = {}
            for f in self.files:
                for i, k in enumerate(self._handles[f].keys()):
                    pos[k] = i
            self._order.sort(key=lambda k: (self.files.index(self._where[k]), pos[k]))

    def keys(self) -> List[str]:
        return list(self._order)

    def shape(self, name: str) -> Tuple[int, ...]:
        try:
            return self._info[name][0]
        except KeyError:
            raise self._missing(name) from None

    def dtype(self, name: str) -> torch.dtype:
        try:
            return self._info[name][1]
        except KeyError:
            raise self._missing(name) from None

    def file_of(self, name: str) -> Path:
        return self._where.get(name, self.path)

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise self._missing(name)
        try:
            return self._handles[f].get_tensor(name)
        except Exception as exc:
            raise NPSError(f"{f}: cannot read tensor {name!r}: {_one_line(exc)}") from None


class TorchCheckpoint(Checkpoint):
    """Pickled state dicts read with ``torch.load(weights_only=True)`` (memory-mapped when the
    file is in torch's zip format)."""

    def __init__(self, path: Path, folder: Path | None, config: dict | None,
                 files: List[Path], weight_map: Dict[str, Path] | None = None) -> None:
        super().__init__(path, folder, config)
        self.files = list(files)
        self._tensors: Dict[str, torch.Tensor] = {}
        self._where: Dict[str, Path] = {}
        for f in self.files:
            sd = _torch_load(f)
            for k, t in sd.items():
                if weight_map is not None and weight_map.get(k) != f:
                    continue
                if k in self._tensors:
                    raise NPSError(f"{f}: tensor {k!r} also appears in {self._where[k]}")
                self._tensors[k] = t
                self._where[k] = f
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._tensors:
                    raise NPSError(f"{f}: tensor {k!r} is listed in the index but missing from "
                                   "this shard")
            self._tensors = {k: self._tensors[k] for k in weight_map}

    def keys(self) -> List[str]:
        return list(self._tensors)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def file_of(self, name: str) -> Path:
        return self._where.get(name, self.path)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise self._missing(name) from None

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def _torch_load(f: Path) -> Dict[str, torch.Tensor]:
    """Load a pickled state dict safely: weights only, CPU, mmap when the format allows."""
    obj = None
    errors = []
    for mmap in (True, False):
        try:
            obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as exc:  # UnpicklingError (unsafe pickle), RuntimeError (legacy format)
            errors.append(exc)
    if obj is None:
        msg = _one_line(errors[-1])
        if any("weights_only" in str(e) or "Unsupported global" in str(e) for e in errors):
            raise NPSError(f"{f}: refused: the pickle contains objects other than tensors "
                           "(it could run code); only plain state dicts are loaded") from None
        raise NPSError(f"{f}: not a readable PyTorch checkpoint: {msg}") from None
    sd = obj
    if isinstance(sd, dict) and not _all_tensors(sd):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(sd.get(key), dict) and _all_tensors(sd[key]):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not _all_tensors(sd):
        raise NPSError(f"{f}: not a state dict (expected a mapping of names to tensors)")
    return dict(sd)


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def read_model_config(folder: Path) -> dict | None:
    """A model folder's ``config.json`` as a dict (None when absent); one NPSError line when it
    is not a JSON object. The one reader of it (loading checkpoints and building models)."""
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except Exception as exc:
        raise NPSError(f"{p}: not valid JSON: {_one_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise NPSError(f"{p}: expected a JSON object")
    return cfg


def _read_index(index: Path) -> Dict[str, Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        wm = data["weight_map"]
        if not isinstance(wm, dict) or not wm:
            raise ValueError("empty or invalid weight_map")
    except Exception as exc:
        raise NPSError(f"{index}: not a valid shard index: {_one_line(exc)}") from None
    out = {}
    for k, fname in wm.items():
        if not isinstance(fname, str) or Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise NPSError(f"{index}: invalid shard file name {fname!r}")
        out[str(k)] = index.parent / fname
    missing = sorted({str(f) for f in out.values() if not f.is_file()})
    if missing:
        raise NPSError(f"{missing[0]}: shard listed in {index.name} is missing"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out


def _unique(paths) -> List[Path]:
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def open_checkpoint(path) -> Checkpoint:
    """Open a model folder or a weight file for lazy reading (see the module docstring)."""
    if isinstance(path, Checkpoint):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise NPSError(f"{p}: no such file or folder")
    p = p.absolute()
    if p.is_dir():
        config = read_model_config(p)
        if (p / SAFE_INDEX).is_file():
            wm = _read_index(p / SAFE_INDEX)
            return SafetensorsCheckpoint(p, p, config, _unique(wm.values()), wm)
        if (p / SAFE_SINGLE).is_file():
            return SafetensorsCheckpoint(p, p, config, [p / SAFE_SINGLE])
        if (p / BIN_INDEX).is_file():
            wm = _read_index(p / BIN_INDEX)
            return TorchCheckpoint(p, p, config, _unique(wm.values()), wm)
        if (p / BIN_SINGLE).is_file():
            return TorchCheckpoint(p, p, config, [p / BIN_SINGLE])
        # a folder with exactly one weight file of another name
        st = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if len(st) == 1:
            return SafetensorsCheckpoint(p, p, config, st)
        pk = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
        if not st and len(pk) == 1:
            return TorchCheckpoint(p, p, config, pk)
        if len(st) > 1 or len(pk) > 1:
            raise NPSError(f"{p}: several weight files and no {SAFE_INDEX}; "
                           "pass the file to use")
        raise NPSError(f"{p}: folder holds no model weights ({SAFE_SINGLE}, {SAFE_INDEX} "
                       f"or {BIN_SINGLE})")
    if p.suffix == ".safetensors":
        return SafetensorsCheckpoint(p, None, None, [p])
    if p.name.endswith(".safetensors.index.json"):
        wm = _read_index(p)
        return SafetensorsCheckpoint(p, p.parent, read_model_config(p.parent), _unique(wm.values()), wm)
    if p.suffix in PICKLE_SUFFIXES:
        return TorchCheckpoint(p, None, None, [p])
    raise NPSError(f"{p}: unknown weight file type (expected .safetensors, .bin, .pt or .pth)")
