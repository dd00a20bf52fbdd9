"""Ownership of the folders nps creates next to an output, so that it never removes anyone else's.

Every folder nps makes for itself carries one marker file, ``.nps-owner`` (JSON: tool, kind,
pid, host, time), written the moment the folder is created:

* the **work folder** ``OUT.nps-run`` (the search log that ``--resume`` reads; kind ``work``).
  An existing ``OUT.nps-run`` without the marker, a symbolic link, or one that is, holds or sits
  inside an input is refused with one error; it is never removed or reused. It is also the
  output's lock: while the process named in its marker is alive (same host, same process start
  time, another process), a second run into the same output — or a ``--resume`` of it — is
  refused in one line, and nothing of the live run is touched. A resumed run takes the marker over.
* **temporary folders** ``.OUT.tmp-*`` / ``.OUT.old-*`` (kind ``temp``), renamed into place on
  success. Those a killed run left behind are removed by the next write of the same output, but
  only when they carry the marker and their process is gone (same host), or they are older than
  :data:`STALE_AGE_S` (another host).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from .errors import NPSError
from .paths import warn

OWNER = ".nps-owner"
STALE_AGE_S = 7 * 24 * 3600
_TOOL = "nps-pruning"


def _proc_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks since boot, Linux ``/proc``), or None: with
    the pid it names a process, so a recycled pid is not taken for the run that wrote a marker."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
        return int(stat_line[stat_line.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def write_owner(folder: Path, kind: str, **extra) -> None:
    info = {"tool": _TOOL, "kind": kind, "pid": os.getpid(), "host": socket.gethostname(),
            "created": time.time(), "pid_start": _proc_start(os.getpid()), **extra}
    (Path(folder) / OWNER).write_text(json.dumps(info) + "\n")


def read_owner(folder, kind: str) -> Optional[dict]:
    """The marker of ``folder`` if it is a real folder (no link) carrying our marker of ``kind``."""
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
        marker = folder / OWNER
        if not stat.S_ISREG(os.lstat(marker).st_mode) or os.lstat(marker).st_size > 4096:
            return None
        info = json.loads(marker.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(info, dict) and info.get("tool") == _TOOL and info.get("kind") == kind:
        return info
    return None


def _pid_gone(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:            # EPERM: alive, someone else's
        return False
    return False


def live_owner(info: Optional[dict]) -> bool:
    """Whether the marker ``info`` names another process of this host that is still running."""
    if not info or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if pid == os.getpid() or not isinstance(pid, int) or isinstance(pid, bool) or _pid_gone(pid):
        return False
    started = info.get("pid_start")
    return started is None or _proc_start(pid) in (None, started)


def _is_stale(info: dict) -> bool:
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return False
    if info.get("host") == socket.gethostname() and _pid_gone(info.get("pid")):
        return True
    created = info.get("created")
    return isinstance(created, (int, float)) and time.time() - created > STALE_AGE_S


def clean_stale_temps(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders in ``parent`` that we own and that are
    stale (see module doc). Anything else is left alone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith((f".{name}.tmp-", f".{name}.old-")):
            continue
        info = read_owner(entry.path, "temp")
        if info is not None and _is_stale(info):
            shutil.rmtree(entry.path, ignore_errors=True)


def make_temp_dir(parent: Path, name: str, tag: str = "tmp") -> Path:
    """A fresh ``.NAME.<tag>-XXXX`` folder in ``parent``, marked as ours (after cleaning the
    stale ones of the same output)."""
    clean_stale_temps(parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{tag}-", dir=parent))
    try:
        # mkdtemp makes it 0700; it becomes the output: give it a folder's ordinary mode
        os.chmod(tmp, 0o777 & ~_umask())
        write_owner(tmp, "temp")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unmark(folder: Path) -> None:
    """Drop the marker of a temporary folder about to become an output."""
    with contextlib.suppress(FileNotFoundError):
        (Path(folder) / OWNER).unlink()


# -- the work folder ------------------------------------------------------------------------------
def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_work_dir(wd: Path, *, resume: bool, inputs: Iterable = ()) -> None:
    """Refuse a work folder that is not ours (see module doc); nothing is changed here."""
    wd_r = wd.resolve()
    for inp in inputs:
        p = Path(inp).expanduser().resolve()
        if _within(wd_r, p) or _within(p, wd_r):
            raise NPSError(f"{wd}: the work folder of this output is, holds or sits inside the "
                           f"input {p}; choose another output path")
    if wd.is_symlink():
        raise NPSError(f"{wd}: the work folder is a symbolic link; nps does not use or remove "
                       "it; remove it or choose another output path")
    info = read_owner(wd, "work") if wd.exists() else None
    if wd.exists() and info is None:
        raise NPSError(f"{wd}: exists but was not made by nps (no {OWNER} marker); nps neither "
                       "reuses nor removes it: move it away or choose another output path")
    if live_owner(info):
        raise NPSError(f"{wd}: another nps run (pid {info['pid']}) is writing this output now; "
                       "wait for it to end, or choose another output path")


def claim_work_dir(wd: Path, output) -> Path:
    """Create the work folder with its marker (or check an existing one is ours)."""
    if not (wd.exists() or wd.is_symlink()):
        wd.parent.mkdir(parents=True, exist_ok=True)
        try:
            wd.mkdir()
        except FileExistsError:            # another run made it a moment ago: checked below
            pass
        else:
            try:
                write_owner(wd, "work", output=str(Path(output).absolute()))
            except BaseException:          # no marker: remove the empty folder, or it blocks reruns
                with contextlib.suppress(OSError):
                    wd.rmdir()
                raise
            return wd
    check_work_dir(wd, resume=True)        # ours, and no other live run's
    write_owner(wd, "work", output=str(Path(output).absolute()))   # the resumed run owns it now
    return wd


def release_work_dir(wd: Path) -> None:
    """Remove a work folder we own: our search logs and the marker; the folder itself only if
    nothing else is left in it (else a warning says what stays)."""
    if read_owner(wd, "work") is None:
        return
    for entry in os.scandir(wd):
        if (entry.name.startswith("search") and entry.name.endswith(".jsonl")
                and entry.is_file(follow_symlinks=False)):
            os.unlink(entry.path)
    (wd / OWNER).unlink()
    try:
        wd.rmdir()
    except OSError:
        warn(f"{wd}: left in place: it holds files nps did not write "
             f"({', '.join(sorted(os.listdir(wd))[:3])})")
