"""The one atomic-write helper: content, no temporary file left, old file intact on failure."""
import errno
import os
import stat

import pytest

import nps_pruning.atomic as atomic
from nps_pruning.atomic import atomic_path, atomic_write_bytes, atomic_write_text, swap_in_dir
from nps_pruning.errors import NPSError


def _names(folder):
    return sorted(os.listdir(folder))


def test_writes_the_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    assert atomic_write_text(target, "τ = 1\n") == target
    assert target.read_bytes() == "τ = 1\n".encode("utf-8")
    atomic_write_bytes(target, b"\x00new")                  # replaces an existing file
    assert target.read_bytes() == b"\x00new"
    assert _names(tmp_path) == ["a.json"]


def test_mode_is_applied_less_the_umask(tmp_path):
    atomic_write_bytes(tmp_path / "private", b"x", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    atomic_write_bytes(tmp_path / "shared", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o666 & ~umask


def test_exception_mid_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.tmp-")
            tmp.write_bytes(b"half of the n")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.safetensors"]


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def no_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(OSError) as info:                    # not mapped without report_errors
        atomic_write_text(target, "new")
    assert not isinstance(info.value, NPSError) and info.value.errno == errno.EIO
    assert target.read_text() == "old" and _names(tmp_path) == ["report.json"]


def test_disk_full_is_one_npserror_line(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "_fsync_file", full)
    with pytest.raises(NPSError) as info:
        atomic_write_bytes(target, b"new", report_errors=True)
    message = str(info.value)
    assert "\n" not in message
    assert message == f"{target}: cannot write (no space left on device); nothing was written"
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["out.safetensors"]
    with pytest.raises(OSError) as raw:                     # without report_errors: as it is
        atomic_write_bytes(target, b"new")
    assert raw.value.errno == errno.ENOSPC and not isinstance(raw.value, NPSError)


def test_swap_in_dir_replaces_and_restores(tmp_path, monkeypatch):
    dest, new = tmp_path / "store", tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("new")
    swap_in_dir(new, dest)                                  # no old folder
    assert (dest / "f").read_text() == "new" and _names(tmp_path) == ["store"]
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "f").write_text("newer")
    swap_in_dir(newer, dest)                                # old one moved aside, then removed
    assert (dest / "f").read_text() == "newer" and _names(tmp_path) == ["store"]

    third = tmp_path / "third"
    third.mkdir()
    real_replace = os.replace

    def fail_on_third(src, dst):
        if os.fspath(src) == os.fspath(third):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", fail_on_third)
    with pytest.raises(OSError):
        swap_in_dir(third, dest)
    assert (dest / "f").read_text() == "newer"              # the old folder was put back
    assert _names(tmp_path) == ["store", "third"]


def test_staging_dir_is_removed_on_error_and_disk_full_is_one_line(tmp_path):
    dest = tmp_path / "sub" / "out"
    with pytest.raises(NPSError) as info:
        with atomic.staging_dir(dest) as tmp:
            assert tmp.parent == dest.parent and tmp.name.startswith(".out.tmp-")
            (tmp / "part").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"{dest}: cannot write (no space left on device); nothing was written"
    assert _names(dest.parent) == []
    with atomic.staging_dir(dest) as tmp:
        (tmp / "part").write_bytes(b"x")
        swap_in_dir(tmp, dest)
    assert _names(dest.parent) == ["out"] and (dest / "part").read_bytes() == b"x"
