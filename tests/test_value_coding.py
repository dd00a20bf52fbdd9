"""Quantized value codings of the store (apps/value_coding.py): closed forms, bit-exact restore of
the model the store describes, entropy below the nominal bits, corrupted parts refused."""
import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy
import torch

from nps_pruning.store import read_store, restore_task, store_info, write_store
from nps_pruning.store.types import _manifest_sha256
from nps_pruning.store.value_coding import (QUANT_BITS, SIGN_LEVELS, decode_values, encode_values,
                                           group_sizes_of, lloyd, tune_level_scale)
from nps_pruning.errors import NPSError

from test_compress import base_for, make_layout, make_tasks

QUANTIZED = tuple(QUANT_BITS) + tuple(SIGN_LEVELS)


def test_lloyd_closed_form():
    # quantiles 0.25 / 0.75 of {1, 1, 2, 8} are 1 and 3.5; the edge 2.25 splits {1, 1, 2} | {8}:
    # levels 4/3 and 8, which are a fixed point (edge 4.67 splits the same way)
    levels, idx = lloyd(np.array([1.0, 1.0, 2.0, 8.0]), 2)
    assert levels.tolist() == [np.float32(4 / 3), 8.0] and idx.tolist() == [0, 0, 0, 1]


def test_four_values_are_exact_in_two_bits_and_sign_is_the_mean_magnitude():
    x = np.array([0.5, -1.0, 3.0, -1.0, 0.5, 7.0, 3.0], dtype=np.float32)
    arrays, dec = encode_values(x, [7], "q2")
    assert np.array_equal(dec, x) and np.array_equal(decode_values(arrays, "q2", [7]), x)
    arrays, dec = encode_values(np.array([1.0, -3.0, 2.0, -0.5, 4.0], dtype=np.float32), [3, 2], "sign")
    # per tensor: scale = mean |v| (the least-squares scale of a sign code)
    assert dec.tolist() == [2.0, -2.0, 2.0, -2.25, 2.25]
    assert np.array_equal(decode_values(arrays, "sign", [3, 2]), dec)


@pytest.mark.parametrize("coding", QUANTIZED)
def test_encode_decode_agree_and_error_shrinks_with_bits(coding):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) * np.repeat([0.01, 1.0, 30.0], [2000, 2000, 1000])).astype(np.float32)
    sizes = [2000, 0, 2000, 1000]                     # an empty tensor too
    arrays, dec = encode_values(x, sizes, coding)
    assert np.array_equal(decode_values(arrays, coding, sizes), dec)
    # per-tensor codebooks: the small tensor is not swamped by the large one
    rel = np.linalg.norm(dec[:2000] - x[:2000]) / np.linalg.norm(x[:2000])
    assert rel < {"sign": 0.8, "q2": 0.4, "sign-q2": 0.3, "q3": 0.25, "q4": 0.15, "q8": 0.04}[coding]   # q8: ~8 values per level here


def test_indices_are_entropy_coded():
    """A skewed codebook costs less than its nominal bits: 95% of one value, 5% spread."""
    rng = np.random.default_rng(1)
    x = np.where(rng.random(20000) < 0.95, 1.0, rng.uniform(2, 9, 20000)).astype(np.float32)
    arrays, _ = encode_values(x, [20000], "q4")
    bits = 8 * arrays["code"].nbytes / x.size
    assert bits < 0.9, bits                         # H ≈ 0.29 + 0.05·log2(15) ≈ 0.49 bits, not 4


def test_group_sizes_of_mask():
    mask = np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool)
    assert group_sizes_of(mask, [(0, 2), (2, 2), (2, 7)]) == [1, 0, 3]


@pytest.mark.parametrize("mask_coding", ["packed", "entropy"])
@pytest.mark.parametrize("coding", QUANTIZED)
def test_store_restores_the_described_model_bit_for_bit(tmp_path, coding, mask_coding):
    layout = make_layout()
    base, tasks = base_for(layout), make_tasks(layout.numel)
    store = tmp_path / "store"
    write_store(store, base, layout, tasks, values_dtype=coding, mask_coding=mask_coding)
    spans = [(a, b) for _, a, b, _ in layout.spans()]
    for task in tasks:
        mask = task.pruned_values != 0
        sizes = group_sizes_of(mask.numpy(), spans)
        _, dec = encode_values(task.pruned_values[mask].numpy(), sizes, coding)   # the reference
        expected = torch.zeros(layout.numel)
        expected[mask] = torch.from_numpy(dec)
        theta = restore_task(store, task.name).theta_flat
        assert torch.equal(theta, base + expected)
        assert not torch.equal(theta, base + task.pruned_values)          # it really is lossy
    info = store_info(store)
    nominal = QUANT_BITS.get(coding, 1 + np.log2(SIGN_LEVELS.get(coding, 1)))
    for t in info["tasks"]:
        assert t["value_dtype"] == coding
        # values part = kept · (≤ nominal bits) + per-tensor levels/counts + safetensors header
        overhead = 8 * (3 * (2 ** int(nominal) + 2) * 8 + 400)
        assert t["values_bytes"] * 8 <= t["kept"] * nominal + overhead
    read_store(store).verify()


def _rewrite_values(store, task_index, arrays):
    m = json.loads((store / "manifest.json").read_text())
    path = store / m["tasks"][task_index]["parts"]["values"]["file"]
    data = safetensors.numpy.save(arrays)
    path.write_bytes(data)
    m["tasks"][task_index]["parts"]["values"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["manifest_sha256"] = _manifest_sha256(m)
    (store / "manifest.json").write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("coding", QUANTIZED)
def test_corrupted_values_of_each_coding_are_refused(tmp_path, coding):
    layout = make_layout()
    store = tmp_path / "store"
    write_store(store, base_for(layout), layout, make_tasks(layout.numel), values_dtype=coding,
                mask_coding="entropy")
    m = json.loads((store / "manifest.json").read_text())
    path = store / m["tasks"][0]["parts"]["values"]["file"]
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-2] ^= 0x10
    path.write_bytes(bytes(bad))
    with pytest.raises(NPSError, match=r"values\.safetensors: checksum mismatch.*'sst2'"):
        restore_task(store, "sst2")
    path.write_bytes(good)
    arrays = safetensors.numpy.load(good)
    # valid checksums, wrong content: a changed level must not decode to the recorded values
    changed = {**arrays, "levels": arrays["levels"] * np.float32(1.5)}
    _rewrite_values(store, 0, changed)
    with pytest.raises(NPSError, match=r"values\.safetensors: the values do not decode to the recorded ones.*'sst2'"):
        restore_task(store, "sst2")
    # counts that do not match the mask
    counts = arrays["counts"].copy()
    counts[np.flatnonzero(counts)[0]] += 1
    _rewrite_values(store, 0, {**arrays, "counts": counts})
    with pytest.raises(NPSError, match=rf"bad {coding} values .*'sst2'.*coded values"):
        restore_task(store, "sst2")
    _rewrite_values(store, 0, {k: v for k, v in arrays.items() if k != "levels"})
    with pytest.raises(NPSError, match=r"lack the array 'levels'"):
        restore_task(store, "sst2")
    restore_task(store, "news")                    # the other task is still fine


def test_quantized_entry_needs_its_values_checksum(tmp_path):
    layout = make_layout()
    store = tmp_path / "store"
    write_store(store, base_for(layout), layout, make_tasks(layout.numel), values_dtype="q3")
    m = json.loads((store / "manifest.json").read_text())
    del m["tasks"][1]["values_sha256"]
    m["manifest_sha256"] = _manifest_sha256(m)
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NPSError, match=r"tasks\[1\]\.values_sha256 must be a sha256"):
        read_store(store)


def test_unknown_value_coding_is_refused(tmp_path):
    layout = make_layout()
    with pytest.raises(NPSError, match="value coding must be one of fp32, fp16, bf16, q2, q3, q4, q8, sign"):
        write_store(tmp_path / "s", base_for(layout), layout, make_tasks(layout.numel), values_dtype="q5")


def test_tuned_level_factors_find_a_known_optimum_and_never_lose_to_the_fit():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000).astype(np.float32)
    sizes = [1000, 2000]
    _, fit = encode_values(x, sizes, "q2")
    target = 1.5 * fit                        # the best factor is 1.5 for every level

    def score(dec):
        return -float(np.linalg.norm(dec - target))
    f, before, after = tune_level_scale(x, sizes, "q2", score, generations=40, popsize=8, seed=0)
    assert before == score(fit) and after > before
    assert np.allclose(f, 1.5, atol=0.1), f
    again = tune_level_scale(x, sizes, "q2", score, generations=40, popsize=8, seed=0)
    assert np.array_equal(again[0], f) and again[2] == after          # same seed, same result
    # scoring the fit itself: no factor beats the least-squares levels by much, none is worse
    f2, b2, a2 = tune_level_scale(x, sizes, "q2", lambda d: -float(np.linalg.norm(d - x)), generations=3)
    assert a2 >= b2
    # 0 generations: the fit, untouched
    f0, b0, a0 = tune_level_scale(x, sizes, "q2", score, generations=0)
    assert np.array_equal(f0, np.ones(4)) and a0 == b0


def test_store_with_tuned_levels_restores_them_and_checks_them(tmp_path):
    from nps_pruning.store import StoreTask
    layout = make_layout()
    base, tasks = base_for(layout), make_tasks(layout.numel)
    tasks[0] = StoreTask(tasks[0].name, tasks[0].pruned_values, level_scale=[0.5, 1.0, 1.0, 2.0])
    store = tmp_path / "store"
    write_store(store, base, layout, tasks, values_dtype="sign-q2")
    mask = tasks[0].pruned_values != 0
    sizes = group_sizes_of(mask.numpy(), [(a, b) for _, a, b, _ in layout.spans()])
    _, dec = encode_values(tasks[0].pruned_values[mask].numpy(), sizes, "sign-q2", [0.5, 1.0, 1.0, 2.0])
    _, fit = encode_values(tasks[0].pruned_values[mask].numpy(), sizes, "sign-q2")
    assert not np.array_equal(dec, fit)
    expected = torch.zeros(layout.numel)
    expected[mask] = torch.from_numpy(dec)
    assert torch.equal(restore_task(store, tasks[0].name).theta_flat, base + expected)
    assert json.loads((store / "manifest.json").read_text())["tasks"][0]["level_scale"] == [0.5, 1.0, 1.0, 2.0]
    for bad, coding, msg in (([1.0, 2.0], "sign-q2", "needs 4 finite positive"),
                             ([1.0, -1.0, 1.0, 1.0], "q2", "needs 4 finite positive"),
                             ([1.0] * 4, "fp16", "need a quantized value coding")):
        t = [StoreTask("a", tasks[0].pruned_values, level_scale=bad)]
        with pytest.raises(NPSError, match=msg):
            write_store(tmp_path / "bad", base, layout, t, values_dtype=coding)
        assert not (tmp_path / "bad").exists()
