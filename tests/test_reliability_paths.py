"""Issue 10, paths and stores: nothing written or read outside the output/store, no input or user
file removed, stores confined, links in inputs not followed. Every bad input: exit 2, one
`nps: error:` line naming the file/option, nothing written, no input modified."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.cli import main


def run(argv) -> int:
    return main([str(a) for a in argv])


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nps: error:"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base, ft = make_tiny_bert(root)
    ft2 = root / "ft2"
    shutil.copytree(ft, ft2)
    return {"root": root, "base": base, "ft": ft, "ft2": ft2,
            "calib": write_text_csv(root / "calib.csv", rows=20)}


def snapshot(fam):
    return {k: tree_hash(fam[k]) for k in ("base", "ft", "ft2")}


MERGE = ["--method", "ties", "--keep", "0.2", "--lambda", "1", "--quiet"]


# -- HIGH 1: --names is one plain name, never a path; no collision with an output file -----------
@pytest.mark.parametrize("bad", ["../m01", "ABS", "a/b", "..", "", ".hidden", "report.json",
                                 "merged_task_vector.safetensors", "Report.JSON", "x\0y"])
def test_merge_names_are_confined(fam, tmp_path, capsys, bad):
    before = snapshot(fam)
    assert run(["merge", fam["base"], fam["ft"], fam["ft2"], "-o", tmp_path / "m01", *MERGE]) == 0
    m01 = tree_hash(tmp_path / "m01")
    victim = tmp_path / "abs_target"
    name = str(victim) if bad == "ABS" else bad
    code = main(["merge", str(fam["base"]), str(fam["ft"]), str(fam["ft2"]),
                 "-o", str(tmp_path / "m03"), *MERGE, "--names", name, "x"])
    assert code == 2
    line = error_line(capsys)   # NUL is refused by the option check, before the path check
    assert "--names" in line or "option 'names'" in line
    assert tree_hash(tmp_path / "m01") == m01 and not victim.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m01"]
    assert snapshot(fam) == before


def test_merge_default_name_colliding_with_an_output_file_is_refused(fam, tmp_path, capsys):
    named = tmp_path / "in" / "report.json"
    shutil.copytree(fam["ft"], named)
    assert run(["merge", fam["base"], named, fam["ft2"], "-o", tmp_path / "m", *MERGE]) == 2
    assert "report.json" in error_line(capsys) and not (tmp_path / "m").exists()
    assert run(["merge", fam["base"], named, fam["ft2"], "-o", tmp_path / "m", *MERGE,
                "--names", "a", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if not p.name.startswith(".")) == [
        "a", "b", "merged_task_vector.safetensors", "report.json"]


# -- HIGH 2: the work folder must be ours ------------------------------------------------------------
PRUNE = ["--method", "magnitude", "--keep", "0.1", "--quiet"]


def test_input_named_like_the_work_folder_is_not_deleted(fam, tmp_path, capsys):
    victim = tmp_path / "bad" / "victim.nps-run"
    shutil.copytree(fam["ft"], victim)
    before = tree_hash(victim)
    assert run(["prune", fam["base"], victim, "-o", tmp_path / "bad" / "victim", *PRUNE]) == 2
    assert "victim.nps-run" in error_line(capsys)
    assert tree_hash(victim) == before
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["victim.nps-run"]


def test_work_folder_holding_an_input_is_refused(fam, tmp_path, capsys):
    ft = tmp_path / "x.nps-run" / "ft"
    shutil.copytree(fam["ft"], ft)
    before = tree_hash(ft)
    assert run(["prune", fam["base"], ft, "-o", tmp_path / "x", *PRUNE]) == 2
    assert "input" in error_line(capsys) and tree_hash(ft) == before


@pytest.mark.parametrize("resume", [False, True])
def test_user_files_in_a_folder_named_like_the_work_folder_survive(fam, tmp_path, capsys, resume):
    wd = tmp_path / "out" / "foo.nps-run"
    wd.mkdir(parents=True)
    (wd / "thesis.tex").write_text("\\chapter{Results}")
    (wd / "search.jsonl").write_text("{}\n")
    args = ["prune", fam["base"], fam["ft"], "-o", tmp_path / "out" / "foo", *PRUNE]
    assert run(args + (["--resume"] if resume else [])) == 2
    line = error_line(capsys)
    assert "foo.nps-run" in line and "not made by nps" in line
    assert sorted(os.listdir(wd)) == ["search.jsonl", "thesis.tex"]
    assert not (tmp_path / "out" / "foo").exists()


def test_symlinked_work_folder_is_refused(fam, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    os.symlink(target, tmp_path / "o.nps-run")
    assert run(["prune", fam["base"], fam["ft"], "-o", tmp_path / "o", *PRUNE]) == 2
    assert "symbolic link" in error_line(capsys)
    assert os.listdir(target) == ["keep.txt"] and (tmp_path / "o.nps-run").is_symlink()


def test_our_own_stale_work_folder_is_replaced(fam, tmp_path):
    from nps_pruning.workdirs import OWNER, claim_work_dir
    wd = claim_work_dir(tmp_path / "o.nps-run", tmp_path / "o")
    (wd / "search.jsonl").write_text('{"old": 1}\n')
    assert (wd / OWNER).is_file()
    assert run(["prune", fam["base"], fam["ft"], "-o", tmp_path / "o", *PRUNE]) == 0
    assert not wd.exists() and (tmp_path / "o" / "model.safetensors").is_file()


# -- early refusal of an existing output (before any search) ----------------------------------------
COUNTING_EVAL = '''
import os
def score(model):
    open(os.environ["NPS_TEST_CALLS"], "a").write("x\\n")
    return 0.5
'''


@pytest.mark.parametrize("command", ["prune", "transfer", "merge", "compress"])
def test_existing_output_is_refused_before_the_search(fam, tmp_path, capsys, monkeypatch, command):
    ev = tmp_path / "ev.py"
    ev.write_text(COUNTING_EVAL)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("NPS_TEST_CALLS", str(calls))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    spec = f"python:{ev}:score"
    search = ["--method", "nps", "--keep", "0.1", "--bands", "2", "--generations", "1",
              "--popsize", "4", "--quiet"]
    args = {"prune": ["prune", fam["base"], fam["ft"], "--eval", spec],
            "transfer": ["transfer", fam["base"], fam["ft"], "--eval-source", spec,
                         "--eval-target", spec],
            "merge": ["merge", fam["base"], fam["ft"], fam["ft2"], "--eval", spec, spec,
                      "--lambda", "1"],
            "compress": ["compress", fam["base"], fam["ft"], fam["ft2"], "--eval", spec, spec]}
    assert run([*args[command], "-o", out, *search]) == 2
    assert "taken" in error_line(capsys)
    assert not calls.exists()                     # nothing was scored
    assert os.listdir(out) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ev.py", "taken"]


# -- 7: links in input folders -----------------------------------------------------------------------
@pytest.fixture
def linked_ft(fam, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    secret_dir = tmp_path / "secret_dir"
    secret_dir.mkdir()
    (secret_dir / "id_rsa").write_text("KEY")
    ft = tmp_path / "ftl"
    shutil.copytree(fam["ft"], ft)
    os.symlink(secret, ft / "notes.txt")
    os.symlink(secret_dir, ft / "linked_dir")
    os.symlink(tmp_path / "nowhere", ft / "dangling.json")
    sub = ft / "1_Pooling"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    os.symlink(secret, sub / "also_secret.txt")
    return ft


def test_prune_copies_only_regular_files(fam, linked_ft, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["prune", fam["base"], linked_ft, "-o", out, *PRUNE]) == 0
    err = capsys.readouterr().err
    for name in ("notes.txt", "linked_dir", "dangling.json", "also_secret.txt"):
        assert name in err and not (out / name).exists()
    assert "Traceback" not in err
    assert (out / "1_Pooling" / "config.json").read_text() == "{}"
    assert not (out / "1_Pooling" / "also_secret.txt").exists()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert "hunter2" not in "".join(p.read_text(errors="ignore") for p in out.rglob("*")
                                     if p.is_file() and p.suffix != ".safetensors")


def test_compress_stores_only_regular_files(fam, linked_ft, tmp_path, capsys):
    store = tmp_path / "store"
    assert run(["compress", fam["base"], linked_ft, fam["ft2"], "-o", store, *PRUNE]) == 0
    assert "notes.txt" in capsys.readouterr().err
    manifest = json.loads((store / "manifest.json").read_text())
    side = set(manifest["tasks"][0]["side_files"])
    assert "notes.txt" not in side and "dangling.json" not in side and "config.json" in side
    for p in store.rglob("*"):
        assert not p.is_symlink() and (not p.is_file() or b"hunter2" not in p.read_bytes())


def test_hub_cache_blob_links_are_followed(fam, tmp_path):
    """A Hugging Face cache snapshot is made of links into its repo's blobs/: those are the
    model's own files."""
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in fam["ft"].iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy2(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    out = tmp_path / "out"
    assert run(["prune", fam["base"], snap, "-o", out, *PRUNE]) == 0
    assert (out / "tokenizer.json").read_bytes() == (fam["ft"] / "tokenizer.json").read_bytes()
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()


# -- HIGH 3 and the store reader ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(fam, tmp_path_factory):
    s = tmp_path_factory.mktemp("stores") / "store"
    assert run(["compress", fam["base"], fam["ft"], fam["ft2"], "-o", s, *PRUNE]) == 0
    return s


def rewrite(store: Path, edit) -> Path:
    """A copy of ``store`` whose manifest ``edit`` changed, with its self-checksum recomputed."""
    from nps_pruning.store.types import _manifest_sha256
    copy = store.parent / f"edited-{os.urandom(4).hex()}" / "store"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def point_at(part: dict, target: Path, as_name: str) -> None:
    data = target.read_bytes()
    part.update(file=as_name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_store_parts_cannot_leave_the_store(store, tmp_path, capsys, how):
    secret = store.parent / "secret.txt"
    secret.write_text("top secret " * 50)

    def edit(m, copy):
        part = m["tasks"][0]["side_files"]["config.json"]
        if how == "dotdot":
            point_at(part, secret, "../../secret.txt")
        elif how == "absolute":
            point_at(part, secret, str(secret))
        else:
            os.symlink(secret, copy / "side" / "link")
            point_at(part, secret, "side/link")
    copy = rewrite(store, edit)
    before = tree_hash(copy.parent)
    out = tmp_path / "restored"
    assert run(["restore", copy, "ft", "-o", out]) == 2
    line = error_line(capsys)
    assert "manifest.json" in line or "link" in line
    assert run(["info", copy]) == 2
    line = error_line(capsys)
    assert str(len(secret.read_bytes())) not in line          # no size revealed
    assert not out.exists() and tree_hash(copy.parent) == before


def test_side_file_cannot_replace_the_restored_weights(store, tmp_path, capsys):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"not the weights")

    def edit(m, copy):
        shutil.copy2(evil, copy / "side" / "evil")
        part = {}
        point_at(part, copy / "side" / "evil", "side/evil")
        m["tasks"][0]["side_files"]["model.safetensors"] = part
    copy = rewrite(store, edit)
    out = tmp_path / "restored"
    assert run(["restore", copy, "ft", "-o", out]) == 2
    assert "model.safetensors" in error_line(capsys) and not out.exists()


@pytest.mark.parametrize("field,value", [
    (("tasks", 0, "parts"), []), (("tasks", 0, "parts", "mask", "bytes"), "12"),
    (("tasks", 0, "kept"), "405"), (("num_entries",), 1.5), (("layout", "dtypes", 0), "load"),
    (("tasks", 0, "side_files"), ["config.json"]), (("pretrained",), None),
    (("tasks",), {"a": 1}), (("layout", "shapes", 0), [-3]), (("tasks", 0, "kept"), True)])
def test_wrongly_typed_manifest_fields_give_one_error(store, tmp_path, capsys, field, value):
    def edit(m, copy):
        obj = m
        for key in field[:-1]:
            obj = obj[key]
        obj[field[-1]] = value
    copy = rewrite(store, edit)
    for argv in (["info", copy], ["restore", copy, "ft", "-o", tmp_path / "r"]):
        assert run(argv) == 2
        assert "manifest.json" in error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_info_verify_checks_hashes(store, capsys):
    def edit(m, copy):
        values = copy / m["tasks"][1]["parts"]["values"]["file"]
        data = bytearray(values.read_bytes())
        data[-1] ^= 0x10                                   # same size, other bytes
        values.write_bytes(bytes(data))
    copy = rewrite(store, edit)
    assert run(["info", copy]) == 0                        # sizes alone look fine
    capsys.readouterr()
    assert run(["info", copy, "--verify"]) == 2
    assert "checksum mismatch" in error_line(capsys)
    assert run(["info", store, "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True


# -- stale temporary folders -----------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_ours_are_cleaned_others_kept(fam, tmp_path):
    import socket

    from nps_pruning.workdirs import OWNER
    def fake(name, pid, marker=True):
        d = tmp_path / name
        d.mkdir()
        (d / "part").write_text("x")
        if marker:
            (d / OWNER).write_text(json.dumps({"tool": "nps-pruning", "kind": "temp", "pid": pid,
                                               "host": socket.gethostname(), "created": time.time()}))
        return d
    dead = fake(".store.tmp-dead", dead_pid())
    old = fake(".store.old-dead", dead_pid())
    alive = fake(".store.tmp-alive", 1)                      # init never dies
    foreign = fake(".store.tmp-users", dead_pid(), marker=False)
    other_out = fake(".other.tmp-dead", dead_pid())
    assert run(["compress", fam["base"], fam["ft"], fam["ft2"], "-o", tmp_path / "store", *PRUNE]) == 0
    assert not dead.exists() and not old.exists()
    assert alive.exists() and foreign.exists() and other_out.exists()
    assert run(["prune", fam["base"], fam["ft"], "-o", tmp_path / "other", *PRUNE]) == 0
    assert not other_out.exists()


# -- disk full ---------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["prune", "compress", "merge"])
def test_disk_full_is_one_line_and_leaves_nothing(fam, tmp_path, capsys, monkeypatch, command):
    import nps_pruning.store.write as store_write
    import nps_pruning.checkpoints.save as save
    before = snapshot(fam)
    if command == "compress":
        monkeypatch.setattr(store_write, "_write_part", _enospc)
    else:
        monkeypatch.setattr(save, "_write_safetensors", _enospc)
    out = tmp_path / "out"
    args = {"prune": ["prune", fam["base"], fam["ft"], *PRUNE],
            "compress": ["compress", fam["base"], fam["ft"], fam["ft2"], *PRUNE],
            "merge": ["merge", fam["base"], fam["ft"], fam["ft2"], *MERGE]}[command]
    assert run([*args, "-o", out]) == 2
    line = error_line(capsys)
    assert "no space left on device" in line and "out" in line
    assert os.listdir(tmp_path) == []
    assert snapshot(fam) == before
