"""Writing outputs atomically, never into an input.

* :func:`atomic_output_dir`: a temporary folder next to the target, renamed onto it on success
  and removed on any exception; refuses to write into (or over) an input, and only replaces an
  existing folder that is empty or carries our marker file ``.nps-output``.
* :func:`save_tensors`: one ``.safetensors`` file, written to a temporary name and
  ``os.replace``-d into place.
* :func:`save_model_folder`: a Hugging Face model folder (``model.safetensors`` or shards plus
  ``model.safetensors.index.json``) with the side files (config, tokenizer, ...) of ``like``.

The safetensors writer streams tensor by tensor (no copy of the whole state dict is built, and
tensors that share storage — views into one flat buffer, tied weights — are written as they are).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Mapping

import torch

from .. import __version__
from ..atomic import atomic_path, staging_dir, swap_in_dir
from ..dtypes import SAFETENSORS_CODES
from ..errors import NPSError
from ..paths import regular_files
from ..workdirs import read_owner, unmark
from .load import BIN_INDEX, SAFE_INDEX, Checkpoint, open_checkpoint

MARKER = ".nps-output"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                    ".gguf")
_WEIGHT_INDEXES = (SAFE_INDEX, BIN_INDEX, "tf_model.h5.index.json",
                   "flax_model.msgpack.index.json")


# -- input protection ---------------------------------------------------------------------------
def _input_paths(inputs) -> List[Path]:
    """Real paths of the inputs: each Checkpoint's folder (or file) and its weight files."""
    out: List[Path] = []
    for x in inputs or ():
        if x is None:
            continue
        if isinstance(x, Checkpoint):
            cands = [x.folder if x.folder is not None else x.path, *x.files]
        else:
            cands = [Path(x)]
        for c in cands:
            out.append(Path(c).expanduser().resolve())
    return out


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: Path, inputs) -> None:
    out_r = out.resolve()
    for inp in _input_paths(inputs):
        if _is_within(out_r, inp) or _is_within(inp, out_r):
            raise NPSError(f"{out}: output would overwrite or sit inside the input {inp}; "
                           "choose another output path")
        if not inp.is_dir() and out_r == inp:
            raise NPSError(f"{out}: output is the input file {inp}")


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise NPSError(f"{out}: exists and is not a folder written by nps; remove it or choose "
                       "another")
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return
    raise NPSError(f"{out}: exists; remove it or choose another")


def check_output_dir(out_dir, *, inputs=()) -> Path:
    """The checks :func:`atomic_output_dir` makes, run early (before a long search): the output
    is not an input and, if it exists, may be replaced."""
    out = Path(out_dir).expanduser().absolute()
    check_not_input(out, inputs)
    _check_replaceable(out)
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir, *, inputs=()):
    """Yield a temporary folder next to ``out_dir``; on success it becomes ``out_dir`` (with our
    marker file), on an exception it is removed and ``out_dir`` is left as it was. An OSError of
    a full disk (or a read-only / forbidden one) becomes one NPSError line."""
    out = Path(out_dir).expanduser().absolute()
    owner = read_owner(out, "temp")
    if owner is not None and owner.get("pid") == os.getpid():
        # a temporary folder of an enclosing atomic_output_dir of this process: that one makes
        # the result appear atomically (and removes it on error)
        check_not_input(out, inputs)
        yield out
        return
    check_output_dir(out, inputs=inputs)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        with staging_dir(out) as tmp:
            yield tmp
            unmark(tmp)
            (tmp / MARKER).write_text(json.dumps({"tool": "nps-pruning", "version": __version__})
                                      + "\n")
            _check_replaceable(out)  # it may have appeared meanwhile
            swap_in_dir(tmp, out)
    except BaseException:
        for d in created:  # parents we made, innermost first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


# -- safetensors writing ------------------------------------------------------------------------
def _prepare(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise NPSError(f"tensor name {k!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise NPSError(f"tensor {k}: not a tensor ({type(t).__name__})")
        if t.dtype not in SAFETENSORS_CODES:
            raise NPSError(f"tensor {k}: dtype {t.dtype} cannot be stored in safetensors")
        out[k] = t.detach().to("cpu").contiguous()
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_safetensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: dict | None) -> None:
    """Stream ``tensors`` into ``path`` in the safetensors format (little-endian host)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for k, t in tensors.items():
        n = _nbytes(t)
        header[k] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [pos, pos + n]}
        pos += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_tensors(path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None, *,
                 inputs=()) -> Path:
    """Write one ``.safetensors`` file atomically (temporary file, fsync, ``os.replace``)."""
    p = Path(path).expanduser().absolute()
    check_not_input(p, inputs)
    if p.is_dir():
        raise NPSError(f"{p}: is a folder; expected a .safetensors file path")
    ts = _prepare(tensors)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p, report_errors=True) as tmp:     # 0o666 less the umask, as any file
        _write_safetensors(tmp, ts, metadata)
    return p


# -- model folders ------------------------------------------------------------------------------
def is_weight_file(name: str) -> bool:
    if name in _WEIGHT_INDEXES or name.endswith(_WEIGHT_SUFFIXES):
        return True
    return name.endswith(".index.json") and name.startswith(
        ("model", "pytorch_model", "tf_model", "flax_model"))


def side_files(folder) -> Dict[str, bytes]:
    """The non-weight files at the top of a model folder (config, tokenizer, ...) as bytes: what a
    compression store keeps per task so that a restored folder loads like the original. Only
    regular files are read: links and special files are skipped with a warning."""
    return {name: path.read_bytes()
            for name, path in regular_files(folder, skip=is_weight_file) if "/" not in name}


def _copy_side_files(src: Path, dst: Path) -> List[str]:
    """Copy the regular files of ``src`` that are not weight files (config, tokenizer,
    generation config, sentence-transformers module folders, ...), sub-folders included. Hidden
    entries are skipped; symbolic links and special files are skipped with a warning (a link
    could point anywhere: its target is not part of the model)."""
    copied = []
    for rel, path in regular_files(src, recursive=True, skip=is_weight_file):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        shutil.copystat(path, target)
        copied.append(rel)
    return copied


def _shards(tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _weight_files(folder: Path) -> List[str]:
    """The safetensors weight files of a folder :func:`save_model_folder` wrote:
    ``model.safetensors``, or the index and its shards."""
    index = folder / SAFE_INDEX
    if not index.is_file():
        return ["model.safetensors"]
    return [SAFE_INDEX, *sorted(set(json.loads(index.read_text())["weight_map"].values()))]


def same_weight_files(a, b) -> bool:
    """Whether the folder ``b`` holds the weight files of ``a`` themselves (hard links of them,
    as ``save_model_folder(b, ..., weights_of=a)`` makes), not copies."""
    a, b = Path(a), Path(b)
    return all((b / n).is_file() and os.path.samefile(a / n, b / n) for n in _weight_files(a))


def _link_weights(src: Path, dst: Path) -> bool:
    """Hard-link the safetensors weights (:func:`_weight_files`) of the folder ``src`` (written by
    :func:`save_model_folder`) into ``dst``; False, with nothing left in ``dst``, when ``src``
    holds none or the filesystem refuses a link."""
    done = []
    try:
        for name in _weight_files(src):
            os.link(src / name, dst / name)
            done.append(dst / name)
    except (OSError, KeyError, ValueError):
        for f in done:
            f.unlink()
        return False
    return True


def save_model_folder(out_dir, state_dict: Mapping[str, torch.Tensor], *, like=None,
                      inputs: Iterable = (), max_shard_bytes: int = 5 * 2**30,
                      extra_files: Iterable = (), weights_of=None) -> Path:
    """Write a Hugging Face model folder atomically: weights in safetensors (sharded past
    ``max_shard_bytes``, with ``model.safetensors.index.json``), side files copied from ``like``
    (a :class:`Checkpoint` or a path), then ``extra_files`` (paths, copied by name over those).
    ``weights_of``: a folder this function wrote from a state dict equal to ``state_dict``
    (same names, dtypes and values: the caller's promise): its weight files are hard-linked
    instead of written again (no second copy on disk); written as usual where linking fails.
    Returns ``out_dir``."""
    if max_shard_bytes <= 0:
        raise NPSError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if like is not None and not isinstance(like, Checkpoint):
        like = open_checkpoint(like)
    all_inputs = [*(inputs or ()), *([like] if like is not None else [])]
    tensors = _prepare(state_dict)
    if not tensors:
        raise NPSError(f"{out_dir}: nothing to save (empty state dict)")
    out = Path(out_dir).expanduser().absolute()
    meta = {"format": "pt"}
    with atomic_output_dir(out, inputs=all_inputs) as tmp:
        if like is not None and like.folder is not None:
            _copy_side_files(like.folder, tmp)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        linked = weights_of is not None and _link_weights(Path(weights_of), tmp)
        shards = [] if linked else _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", tensors, meta)
        elif shards:
            n = len(shards)
            weight_map = {}
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                _write_safetensors(tmp / fname, {k: tensors[k] for k in names}, meta)
                weight_map.update({k: fname for k in names})
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out
