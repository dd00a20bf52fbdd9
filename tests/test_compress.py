"""The compression store (SPEC §2 "Compression"): bit-identical restore, mask cost, failures."""
import json
import os
from pathlib import Path

import pytest
import torch

from nps_pruning.store import (StoreTask, read_store, restore_task, store_info,
                                       write_store)
from nps_pruning.errors import NPSError
from nps_pruning.task_vector import Layout

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_layout():
    return Layout(("enc.weight", "enc.bias", "half.weight"), ((60, 50), (50,), (40, 25)),
                  (torch.float32, torch.float32, torch.float16))


def pruned(num, keep_ratio, seed):
    """A τ̂ with exactly round(r·D) nonzero entries (magnitude top-k of a random τ)."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(num, generator=g) * 1e-2
    k = round(keep_ratio * num)
    out = torch.zeros(num)
    idx = torch.topk(tau.abs(), k).indices
    out[idx] = tau[idx]
    return out


def make_tasks(num, keep_ratio=0.1):
    return [
        StoreTask("sst2", pruned(num, keep_ratio, 1),
                  task_specific={"classifier.weight": torch.randn(2, 50), "classifier.bias": torch.randn(2)},
                  buffers={"bert.embeddings.position_ids": torch.arange(64).unsqueeze(0)},
                  side_files={"config.json": b'{"num_labels": 2}', "vocab.txt": b"[PAD]\nhello\n"},
                  meta={"keep_ratio": keep_ratio}),
        StoreTask("news", pruned(num, keep_ratio, 2),
                  task_specific={"classifier.weight": torch.randn(5, 50)}),
    ]


def base_for(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(layout.numel, generator=g)
    # the fp16 tensor of θ_pre really is fp16 (as a loaded checkpoint's would be)
    start = layout.offsets[2]
    base[start:] = base[start:].half().float()
    return base


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("coding", ["packed", "entropy"])
@pytest.mark.parametrize("values_dtype", ["fp32", "fp16", "bf16"])
def test_restore_is_bit_identical_to_the_pruned_model(tmp_path, values_dtype, coding):
    layout = make_layout()
    base, tasks = base_for(layout), make_tasks(layout.numel)
    store = tmp_path / "store"
    write_store(store, base, layout, tasks, values_dtype=values_dtype, mask_coding=coding)
    assert leftovers(tmp_path) == []
    for task in tasks:
        theta, task_specific, buffers, side = restore_task(store, task.name)
        expected = base + task.pruned_values.to(DTYPES[values_dtype]).float()
        assert theta.dtype == torch.float32 and torch.equal(theta, expected)
        assert task_specific.keys() == task.task_specific.keys()
        assert all(torch.equal(task_specific[k], v) for k, v in task.task_specific.items())
        assert all(torch.equal(buffers[k], v) and buffers[k].dtype == v.dtype
                   for k, v in task.buffers.items())
        assert side == task.side_files
    if values_dtype != "fp32":   # the precision really changed something
        assert not torch.equal(theta, base + tasks[-1].pruned_values)
    assert read_store(store).layout == layout


def test_external_pretrained_is_required_and_checked(tmp_path):
    layout = make_layout()
    base, tasks = base_for(layout), make_tasks(layout.numel)
    store = tmp_path / "store"
    write_store(store, base, layout, tasks, embed_pretrained=False, pretrained_ref="models/base")
    assert not (store / "pretrained.safetensors").exists()
    with pytest.raises(NPSError, match="does not embed.*models/base"):
        restore_task(store, "sst2")
    theta = restore_task(store, "sst2", base_flat=base).theta_flat
    assert torch.equal(theta, base + tasks[0].pruned_values)
    wrong = base.clone()
    wrong[17] = torch.nextafter(wrong[17], torch.tensor(10.0))   # one ulp off
    with pytest.raises(NPSError, match="wrong pre-trained model"):
        restore_task(store, "sst2", base_flat=wrong)
    with pytest.raises(NPSError, match="wrong pre-trained model"):
        restore_task(store, "sst2", base_flat=base[:-1])


def test_entropy_mask_costs_far_less_than_a_bit_at_five_percent(tmp_path):
    layout = Layout(("w",), ((400, 500),), (torch.float32,))           # D = 200,000
    num = layout.numel
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(num, generator=g)
    tau_hat = torch.where(torch.rand(num, generator=g) < 0.05, tau, torch.zeros(num))
    tasks = [StoreTask("t", tau_hat)]
    bits = {}
    for coding in ("packed", "entropy"):
        store = tmp_path / coding
        write_store(store, torch.zeros(num), layout, tasks, mask_coding=coding)
        bits[coding] = store_info(store)["tasks"][0]["mask_bits_per_entry"]
        assert torch.equal(restore_task(store, "t").theta_flat, tau_hat)
    assert 1.0 <= bits["packed"] < 1.01
    assert bits["entropy"] < 0.35, bits           # H(0.05) = 0.286


def test_info_numbers_by_hand(tmp_path):
    layout = make_layout()
    num = layout.numel                                  # 3000 + 50 + 1000 = 4050
    base, tasks = base_for(layout), make_tasks(num, keep_ratio=0.1)
    store = tmp_path / "store"
    manifest = write_store(store, base, layout, tasks, values_dtype="fp16")
    info = store_info(store)
    assert info["num_entries"] == num == 4050
    assert info["total_bytes"] == sum(os.path.getsize(os.path.join(d, f))
                                      for d, _, files in os.walk(store) for f in files)
    k = round(0.1 * num)                                # 405
    r = k / num
    for entry, task in zip(info["tasks"], manifest["tasks"]):
        parts = {n: os.path.getsize(store / p["file"]) for n, p in task["parts"].items()}
        side = sum(os.path.getsize(store / p["file"]) for p in task["side_files"].values())
        assert entry["kept"] == k and entry["keep_ratio"] == r
        assert entry["mask_bytes"] == parts["mask"] and entry["values_bytes"] == parts["values"]
        assert entry["bytes"] == sum(parts.values()) + side
        assert 0 < parts["values"] - 2 * k < 200        # fp16 values + a safetensors header
        assert 0 < parts["mask"] - (num + 7) // 8 < 200  # packed bits + header
        assert entry["bits_per_entry"] == 8 * (parts["mask"] + parts["values"]) / num
        assert entry["mask_bits_per_entry"] == 8 * parts["mask"] / num
        assert entry["values_bits_per_entry"] == 8 * parts["values"] / num
        assert entry["side_bits_per_entry"] == 8 * (entry["bytes"] - parts["mask"] - parts["values"]) / num
        assert entry["side_bits_per_entry"] > 0            # its head and side files
        assert info["bits_per_entry"][entry["name"]] == entry["bits_per_entry"]
    assert info["paper_formula_bits"] == 32 * num + 2 * (32 * r + 1) * num
    assert json.loads(json.dumps(info)) == info         # `nps info --json` can print it
    read_store(store).verify()                          # every checksum and mask holds


# -- failures: clear NPSError, nothing written -----------------------------------------------------
@pytest.fixture
def good_store(tmp_path):
    layout = make_layout()
    store = tmp_path / "store"
    write_store(store, base_for(layout), layout, make_tasks(layout.numel), mask_coding="entropy")
    return store


def _part(store, task_index, part):
    manifest = json.loads((store / "manifest.json").read_text())
    return store / manifest["tasks"][task_index]["parts"][part]["file"]


def test_corrupted_part_is_named(good_store):
    path = _part(good_store, 0, "values")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(NPSError, match=r"values\.safetensors: checksum mismatch.*'sst2'"):
        restore_task(good_store, "sst2")
    restore_task(good_store, "news")                    # the other task is still fine
    with pytest.raises(NPSError, match="checksum mismatch"):
        read_store(good_store).verify()


def test_truncated_part_is_named(good_store):
    path = _part(good_store, 1, "mask")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(NPSError, match=r"mask\.safetensors: truncated.*'news'"):
        read_store(good_store)


def test_missing_part_means_partial_store(good_store):
    _part(good_store, 0, "task_specific").unlink()
    with pytest.raises(NPSError, match="missing.*partial"):
        restore_task(good_store, "news")
    (good_store / "manifest.json").unlink()
    with pytest.raises(NPSError, match="manifest.json: missing"):
        store_info(good_store)


def test_edited_manifest_is_corrupted(good_store):
    path = good_store / "manifest.json"
    path.write_text(path.read_text().replace('"kept": 405', '"kept": 404', 1))
    with pytest.raises(NPSError, match="manifest.json: checksum mismatch"):
        read_store(good_store)
    path.write_text("{not json")
    with pytest.raises(NPSError, match="manifest.json: unreadable or corrupted"):
        read_store(good_store)


def test_unknown_task_lists_the_known_ones(good_store):
    with pytest.raises(NPSError, match=r"unknown task 'mnist' \(known: sst2, news\)"):
        restore_task(good_store, "mnist")


def test_refuses_a_foreign_folder_and_replaces_its_own_store(tmp_path, good_store):
    layout = make_layout()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(NPSError, match="photos: exists"):
        write_store(foreign, base_for(layout), layout, make_tasks(layout.numel))
    assert sorted(os.listdir(foreign)) == ["cat.jpg"] and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    write_store(tmp_path / "empty", base_for(layout), layout, make_tasks(layout.numel))
    write_store(good_store, base_for(layout), layout, [StoreTask("only", pruned(layout.numel, 0.2, 9))])
    assert read_store(good_store).tasks == ["only"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["overflow", "duplicate", "length", "dtype", "coding"])
def test_bad_inputs_write_nothing(tmp_path, bad):
    layout = make_layout()
    base, tasks, kwargs = base_for(layout), make_tasks(layout.numel), {}
    if bad == "overflow":
        tasks[0].pruned_values[0] = 1e6
        kwargs["values_dtype"] = "fp16"
    elif bad == "duplicate":
        tasks[1].name = tasks[0].name
    elif bad == "length":
        tasks[1].pruned_values = tasks[1].pruned_values[:-1]
    elif bad == "dtype":
        kwargs["values_dtype"] = "int8"
    else:
        kwargs["mask_coding"] = "zip"
    with pytest.raises(NPSError):
        write_store(tmp_path / "store", base, layout, tasks, **kwargs)
    assert os.listdir(tmp_path) == []


def test_side_file_names_must_stay_inside_the_folder(tmp_path):
    layout = make_layout()
    tasks = make_tasks(layout.numel)
    tasks[0].side_files = {"tokenizer/vocab.txt": b"ok", "../evil": b"x"}
    with pytest.raises(NPSError, match="'../evil'"):
        write_store(tmp_path / "store", base_for(layout), layout, tasks)
    tasks[0].side_files = {"tokenizer/vocab.txt": b"ok"}
    write_store(tmp_path / "store", base_for(layout), layout, tasks)
    assert restore_task(tmp_path / "store", "sst2").side_files == {"tokenizer/vocab.txt": b"ok"}


def test_mask_is_checked_end_to_end_after_decoding(good_store):
    """A mask file rewritten with valid checksums still has to decode to the recorded mask."""
    import hashlib

    import numpy as np
    import safetensors.numpy

    from nps_pruning.store.types import _manifest_sha256
    path = _part(good_store, 0, "mask")
    arrays = safetensors.numpy.load(path.read_bytes())
    arrays["chunk_counts"] = arrays["chunk_counts"].copy()
    arrays["code"] = np.roll(arrays["code"], 1)
    data = safetensors.numpy.save(arrays)
    path.write_bytes(data)
    manifest = json.loads((good_store / "manifest.json").read_text())
    manifest["tasks"][0]["parts"]["mask"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (good_store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NPSError, match=r"mask\.safetensors: .*'sst2'"):
        restore_task(good_store, "sst2")
