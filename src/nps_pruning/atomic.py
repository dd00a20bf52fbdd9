"""Atomic writes: a reader sees the old file (or folder) or the new one, never a part of one.

* :func:`atomic_path` — a temporary name next to the target for a writer that needs a file name
  (safetensors, matplotlib); when the block ends the file is fsync'd and ``os.replace``-d onto
  the target, on any exception it is removed and the target is left as it was;
* :func:`atomic_write_bytes` / :func:`atomic_write_text` — the same for data in memory;
* :func:`staging_dir` — a marked temporary folder next to an output folder, removed on any
  exception; :func:`swap_in_dir` renames the finished one onto the output, an existing output
  moved aside first (and put back if the rename fails).

Temporary files are named ``.NAME.tmp-PID-XXXXXXXX`` in the target's folder (so the rename
never crosses file systems). Appending logs (the JSONL search log) are not written here.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .paths import write_error
from .workdirs import make_temp_dir

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "staging_dir", "swap_in_dir"]


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, mode: int = 0o666, report_errors: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary file next to ``path`` (created with ``mode``, less the
    umask; 0o600 is what ``tempfile.mkstemp`` gives). With ``report_errors`` an OSError of a
    full disk (or a read-only / forbidden one) becomes one NPSError line naming ``path``; other
    errors, and all of them without it, are raised as they are."""
    target = Path(path)
    tmp = None
    try:
        tmp = _temp_name(target)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if report_errors and isinstance(err, OSError):
            raise write_error(err, target) from None
        raise


def atomic_write_bytes(path, data: bytes, **kwargs) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path` for the keywords)."""
    with atomic_path(path, **kwargs) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path, text: str, *, encoding: str = "utf-8", **kwargs) -> Path:
    """Write ``text`` to ``path`` atomically, in ``encoding`` (newlines as they are)."""
    return atomic_write_bytes(path, text.encode(encoding), **kwargs)


@contextlib.contextmanager
def staging_dir(dest) -> Iterator[Path]:
    """Yield a fresh marked ``.DEST.tmp-*`` folder next to ``dest`` (its parents made); the
    caller fills it and ends with :func:`swap_in_dir`. On any exception it is removed, and an
    OSError of a full disk (or a read-only / forbidden one) becomes one NPSError line naming
    ``dest``."""
    dest = Path(dest)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(dest.parent, dest.name)
        yield tmp
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(err, dest) from None
        raise


def swap_in_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``dest`` (same parent). An existing ``dest`` is
    first moved into a marked ``.DEST.old-*`` folder, removed once ``tmp`` is in place; should
    that second rename fail, the old ``dest`` is put back and the error raised."""
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.replace(tmp, dest)
        return
    trash = make_temp_dir(dest.parent, dest.name, "old")
    os.replace(dest, trash / "x")
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(trash / "x", dest)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
