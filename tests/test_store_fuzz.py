"""Property test of the store reader (issue 10): random and adversarial manifests (wrong types,
hostile part paths and side-file names, bad sizes and hashes, missing keys), each with its
self-checksum recomputed as anyone can. The reader either loads the store and restores exactly
the stored models, or raises NPSError with a one-line message; it never opens a file outside
the store and never writes anything."""
from __future__ import annotations

import builtins
import hashlib
import io
import itertools
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from nps_pruning.store import StoreTask, read_store, restore_task, write_store  # noqa: E402
from nps_pruning.store.types import _manifest_sha256  # noqa: E402
from nps_pruning.errors import NPSError  # noqa: E402
from nps_pruning.task_vector import Layout  # noqa: E402

SECRET = b"the secret outside the store " * 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "secret.txt").write_bytes(SECRET)
    layout = Layout(("a.weight", "b.bias"), ((6, 5), (7,)), (torch.float32, torch.float16))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(layout.numel, generator=g)
    base[30:] = base[30:].half().float()
    tasks = []
    for i, coding in enumerate(("packed", "entropy")):
        tau = torch.randn(layout.numel, generator=g)
        tau[torch.rand(layout.numel, generator=g) > 0.3] = 0
        tasks.append(StoreTask(f"t{i}", tau, task_specific={"head.weight": torch.randn(2, 3)},
                               buffers={"ids": torch.arange(4)},
                               side_files={"config.json": b'{"a": %d}' % i, "vocab.txt": b"x\ny\n"}))
    stores = {}
    for coding in ("packed", "entropy"):
        write_store(root / f"good-{coding}", base, layout, tasks, mask_coding=coding)
        stores[coding] = root / f"good-{coding}"
    expected = {i: restore_task(stores["packed"], t.name) for i, t in enumerate(tasks)}
    return {"root": root, "stores": stores, "expected": expected, "counter": itertools.count()}


def _paths(obj, prefix=()):
    """Every (key path) inside a JSON value, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


HOSTILE = ["../../secret.txt", "../secret.txt", "@ABS@", "/etc/passwd", "", ".", "..",
           "a/../../b", "tasks/000/../../../secret.txt", "tasks\\000", "x\x00y", "model.safetensors",
           ".nps-output", "manifest.json", "tasks/000/mask.safetensors", "pretrained.safetensors",
           "~/x", "tasks//000", "model.safetensors.index.json", "sub/pytorch_model.bin"]
hostile_str = st.sampled_from(HOSTILE)
values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), hostile_str,
                   st.lists(st.integers(-3, 10**6), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
kinds = st.sampled_from(["set", "delete", "rename_side", "retarget", "resize", "rehash"])


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _mutate(manifest: dict, data, store: Path, root: Path) -> None:
    kind = data.draw(kinds)
    tasks = manifest.get("tasks")
    if kind in ("rename_side", "retarget", "resize", "rehash"):
        parts = [(t, p) for t in tasks for p in (*t["parts"].values(), *t["side_files"].values())]
        task, part = parts[data.draw(st.integers(0, len(parts) - 1))]
        if kind == "rename_side":
            old = data.draw(st.sampled_from(sorted(task["side_files"])))
            task["side_files"][data.draw(hostile_str).replace("@ABS@", str(root / "x"))] = \
                task["side_files"].pop(old)
        elif kind == "retarget":       # a hostile path, with the size and hash of what it names
            name = data.draw(hostile_str).replace("@ABS@", str(root / "secret.txt"))
            target = root / "secret.txt"
            if not ("secret" in name or name == "@ABS@"):
                target = store / name if "\0" not in name else target
            blob = target.read_bytes() if target.is_file() else SECRET
            part.update(file=name, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        elif kind == "resize":
            part["bytes"] = part["bytes"] + data.draw(st.sampled_from([-1, 1, -10**9, 10**12]))
        else:
            part["sha256"] = data.draw(st.sampled_from(["0" * 64, "z" * 64, "", "A" * 64]))
        return
    paths = [p for p in _paths(manifest) if p and p[0] != "manifest_sha256"]
    path = paths[data.draw(st.integers(0, len(paths) - 1))]
    parent = _get(manifest, path[:-1])
    if kind == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        value = data.draw(values)
        parent[path[-1]] = value.replace("@ABS@", str(root / "secret.txt")) if isinstance(value, str) \
            else value


def _tree(folder: Path):
    out = {}
    for d, dirs, files in os.walk(folder):
        for f in files + dirs:
            p = Path(d) / f
            out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() and not p.is_symlink()
                                               else None)
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_store_reader_loads_correctly_or_fails_cleanly(world, data):
    root = world["root"]
    coding = data.draw(st.sampled_from(["packed", "entropy"]))
    case = root / f"case-{next(world['counter'])}"
    store = case / "store"
    shutil.copytree(world["stores"][coding], store)
    manifest = json.loads((store / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        try:
            _mutate(manifest, data, store, root)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            pass                        # an earlier mutation removed what this one edits
    if data.draw(st.integers(0, 9)):       # mostly: the self-checksum recomputed
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    before, outside = _tree(store), sorted(os.listdir(root))

    opened = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    loaded = []
    with mock.patch.object(builtins, "open", spy), mock.patch.object(io, "open", spy):
        try:
            s = read_store(store)
            s.verify()
            for i, entry in enumerate(manifest["tasks"]):
                loaded.append((i, entry, restore_task(store, entry["name"])))
        except NPSError as err:
            msg = str(err)
            assert msg and "\n" not in msg, msg
            loaded = None
    store_r = os.path.realpath(store)
    for path in opened:
        assert path == store_r or path.startswith(store_r + os.sep), f"opened {path} outside the store"
    assert _tree(store) == before and sorted(os.listdir(root)) == outside
    assert (root / "secret.txt").read_bytes() == SECRET
    if loaded is not None:             # it loaded: then it restores exactly what was stored
        for i, entry, got in loaded:
            folders = {part["file"].split("/")[1] for part in entry["parts"].values()}
            if len(folders) != 1:       # parts of one task mixed with another's (checksums hold)
                continue
            want = world["expected"][int(folders.pop())]
            assert torch.equal(got.theta_flat, want.theta_flat)
            assert all(torch.equal(got.task_specific[k], v) for k, v in want.task_specific.items())
            stored = {b for w in world["expected"].values() for b in w.side_files.values()}
            assert set(got.side_files.values()) <= stored          # never bytes from outside
            assert all(n not in ("model.safetensors",) and not n.startswith("/")
                       for n in got.side_files)
    shutil.rmtree(case)
