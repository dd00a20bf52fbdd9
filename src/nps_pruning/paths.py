"""Path confinement: every name that comes from a user or a file and becomes a path goes through here.

* :func:`safe_child` — one path component (a task name, a folder name) joined onto a root;
* :func:`safe_relpath` — a relative POSIX path inside a root (a store part, a side file);
* :func:`regular_files` — the regular files of an input folder, links and special files skipped
  with a warning (what nps copies into outputs and stores).

Each refuses, with one :class:`NPSError` line naming what it checked: empty names, NUL, ``\\``,
absolute paths, ``.``/``..`` components, ``/`` where one component is expected, hidden (``.``)
names, reserved names (files nps writes itself) and anything that resolves outside the root
(through a symlink on the way).
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

from .errors import NPSError

MAX_NAME = 255


def warn(message: str) -> None:
    """One line on stderr (library code never prints anything else)."""
    print(f"nps: warning: {message}", file=sys.stderr)


def write_error(err: OSError, target, note: str = "nothing was written") -> Exception:
    """An OSError met while writing ``target`` as one NPSError line (disk full, quota, read-only,
    permission); other errors are returned unchanged, to be re-raised as they are."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        why = "no space left on device"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = err.strerror or "not writable"
    else:
        return err
    return NPSError(f"{target}: cannot write ({why}); {note}")


def _why_bad_component(part: str) -> Optional[str]:
    if part in ("", ".", ".."):
        return "an empty, '.' or '..' component"
    if part.startswith("."):
        return "a hidden name (starting with '.')"
    if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return f"a component longer than {MAX_NAME} bytes"
    return None


def _why_bad(name, *, single: bool) -> Optional[str]:
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if "\0" in name or any(ord(c) < 32 for c in name):
        return "contains NUL or a control character"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        # DEL, C1 controls, bidirectional overrides (U+202E shows 'exe.txt' as 'txt.exe'),
        # zero-width characters: a name must read as what it is
        return "contains a control, format or bidirectional-override character"
    if "\\" in name:
        return "contains '\\'"
    if name.startswith("/") or os.path.isabs(name):
        return "an absolute path"
    parts = name.split("/")
    if single and len(parts) > 1:
        return "contains '/' (one name expected, not a path)"
    for part in parts:
        why = _why_bad_component(part)
        if why:
            return why
    return None


def _inside(path: Path, root: Path, what: str, name: str) -> Path:
    root_r = root.resolve()
    target = (root / name).resolve()
    if target != root_r and root_r not in target.parents:
        raise NPSError(f"{what} {name!r}: resolves outside {root} (through a symbolic link)")
    return path


def safe_child(root, name, *, what: str = "name", reserved: Iterable[str] = ()) -> Path:
    """``root / name`` for one path component ``name``; refuses anything else (see module doc).
    ``reserved`` are names nps writes itself in ``root`` (compared case-insensitively)."""
    why = _why_bad(name, single=True)
    if why is None and name.casefold() in {r.casefold() for r in reserved}:
        why = "reserved: nps writes a file of that name there"
    if why:
        raise NPSError(f"{what} {name!r}: {why}")
    root = Path(root)
    return _inside(root / name, root, what, name)


def safe_relpath(root, rel, *, what: str = "path") -> Path:
    """``root / rel`` for a relative POSIX path that stays inside ``root``."""
    why = _why_bad(rel, single=False)
    if why:
        raise NPSError(f"{what} {rel!r}: {why}")
    root = Path(root)
    return _inside(root / rel, root, what, rel)


def check_name(name, *, what: str = "name", reserved: Iterable[str] = ()) -> str:
    """Validate ``name`` as :func:`safe_child` does, without a root (returns it)."""
    why = _why_bad(name, single=True)
    if why is None and name.casefold() in {r.casefold() for r in reserved}:
        why = "reserved: nps writes a file of that name in the output"
    if why:
        raise NPSError(f"{what} {name!r}: {why}")
    return name


# -- reading input folders ----------------------------------------------------------------------
def _hub_blob(link: Path, top: Path) -> bool:
    """A link of a Hugging Face cache snapshot (``<repo>/snapshots/<rev>/f -> ../../blobs/<h>``)
    is how the hub stores a model's own files: followed, when it lands in that repo's blobs/."""
    top_r = top.resolve()
    if top_r.parent.name != "snapshots":
        return False
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return target.parent == top_r.parent.parent / "blobs" and target.is_file()


def regular_files(folder, *, recursive: bool = False, skip=None,
                  top: Optional[Path] = None) -> Iterator[Tuple[str, Path]]:
    """(relative POSIX name, path) of the regular files in ``folder``, sorted; hidden entries
    and names for which ``skip(name)`` is true are left out silently; symbolic links (except a
    Hugging Face cache's own blob links), dangling links and special files are left out with a
    warning on stderr. Sub-folders are walked when ``recursive``."""
    folder = Path(folder)
    top = folder if top is None else top
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        raise NPSError(f"{folder}: cannot list the folder ({err.strerror})") from None
    for entry in entries:
        if entry.name.startswith(".") or (skip is not None and skip(entry.name)):
            continue
        path = Path(entry.path)
        rel = path.relative_to(top).as_posix()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            if _hub_blob(path, top):
                yield rel, path
                continue
            try:
                dest = os.readlink(path)
            except OSError:
                dest = "?"
            dangling = not path.exists()
            warn(f"{path}: skipped a {'dangling ' if dangling else ''}symbolic link (-> {dest}); "
                 "only regular files inside the model folder are copied")
        elif stat.S_ISDIR(st.st_mode):
            if recursive:
                yield from regular_files(path, recursive=True, skip=skip, top=top)
        elif stat.S_ISREG(st.st_mode):
            yield rel, path
        else:
            warn(f"{path}: skipped, not a regular file")

