"""The store's ``seeded`` mask coding: the mask range-coded in the pruner's own random order."""
import json

import pytest
import torch

from nps_pruning.core.prepared import Domain, changed_domain, prune_in_domain
from nps_pruning.core.rank_sample import (RankKeys, exponential_order, log_exponentials, log_ranks,
                                          rank_sample)
from nps_pruning.core.sparsify import PRUNERS, random_order
from nps_pruning.errors import NPSError
from nps_pruning.store import StoreTask, read_store, restore_task, store_info, write_store
from nps_pruning.store.mask_coding import decode_seeded, encode_seeded
from nps_pruning.store.types import _manifest_sha256
from nps_pruning.task_vector import Layout

D = 1 << 21                                  # 32 chunks: a chunk's worth of code is 1/32 bit an entry


def _tau(num, seed=0):
    return torch.randn(num, generator=torch.Generator().manual_seed(seed))


def _store(tmp_path, name, layout, tau_hat, **task):
    store = tmp_path / name
    write_store(store, torch.zeros(layout.numel), layout, [StoreTask("t", tau_hat, **task)],
                mask_coding="seeded")
    assert torch.equal(restore_task(store, "t").theta_flat, tau_hat)      # bit for bit
    return store, read_store(store).entry("t"), store_info(store)["tasks"][0]["mask_bits_per_entry"]


def _entropy_bits(tmp_path, layout, tau_hat):
    store = tmp_path / "plain"
    write_store(store, torch.zeros(layout.numel), layout, [StoreTask("t", tau_hat)], mask_coding="entropy")
    return store_info(store)["tasks"][0]["mask_bits_per_entry"]


def test_orders_are_the_pruners_own_draws():
    assert torch.equal(random_order(1000, 5).long(), torch.randperm(1000, generator=torch.Generator().manual_seed(5)))
    dare = PRUNERS["dare"](_tau(1000), 0.1, seed=5)
    assert set(torch.nonzero(dare).squeeze(1).tolist()) == set(random_order(1000, 5)[:100].tolist())
    order = exponential_order(1000, 5)
    log_e = log_exponentials(1000, 5)
    assert torch.all(log_e[order][1:] >= log_e[order][:-1])          # E ascending along the order
    assert sorted(order.tolist()) == list(range(1000))


def test_a_dare_mask_costs_only_its_chunk_counts(tmp_path):
    layout = Layout(("w",), ((1024, D // 1024),), (torch.float32,))
    tau_hat = PRUNERS["dare"](_tau(D), 0.02, seed=11)
    _, entry, bits = _store(tmp_path, "dare", layout, tau_hat, mask_seed=11)
    assert entry["mask_order"] == "permutation" and entry["mask_seed"] == 11
    assert entry["mask_domain"] == [[0, D]]
    plain = _entropy_bits(tmp_path, layout, tau_hat)
    assert plain > 0.13 and bits < 0.04, (plain, bits)             # H(0.02) = 0.141


def test_a_rank_weighted_sample_is_coded_in_its_exponentials_order(tmp_path):
    layout = Layout(("w",), ((1024, D // 1024),), (torch.float32,))
    tau = _tau(D)
    m = D // 20
    idx, vals = rank_sample(tau, RankKeys(log_exponentials(D, 3), log_ranks(tau)),
                            torch.zeros(D, dtype=torch.bool), m, 2.0, 0.0, 3, n_taken=0)
    tau_hat = torch.zeros(D)
    tau_hat[idx] = vals
    _, entry, bits = _store(tmp_path, "rank", layout, tau_hat, mask_seed=3)
    assert entry["mask_order"] == "exponential"
    plain = _entropy_bits(tmp_path, layout, tau_hat)
    assert bits < 0.5 * plain, (plain, bits)


def test_a_magnitude_mask_or_no_seed_stays_flat(tmp_path):
    layout = Layout(("w",), ((100, 500),), (torch.float32,))
    tau = _tau(layout.numel)
    top = PRUNERS["magnitude"](tau, 0.05)
    store, entry, _ = _store(tmp_path, "mag", layout, top, mask_seed=1)
    assert entry["mask_order"] == "flat" and "mask_seed" not in entry and "mask_domain" not in entry
    dare = PRUNERS["dare"](tau, 0.05, seed=1)
    _, entry, _ = _store(tmp_path, "noseed", layout, dare)
    assert entry["mask_order"] == "flat"


def test_the_domain_leaves_untouched_tensors_out_of_the_order(tmp_path):
    layout = Layout(("a", "frozen", "b"), ((300, 100), (200, 100), (300, 100)), (torch.float32,) * 3)
    tau = _tau(layout.numel)
    tau[30000:50000] = 0.0                                          # "frozen": no update
    spans = [(s, e) for _, s, e, _ in layout.spans()]
    domain = changed_domain(tau, spans)
    assert domain.spans == ((0, 30000), (50000, 80000))
    tau_hat = prune_in_domain(PRUNERS["dare"], tau, 0.1, domain, seed=4)
    _, entry, bits = _store(tmp_path, "dom", layout, tau_hat, mask_seed=4, mask_domain=domain.spans)
    assert entry["mask_order"] == "permutation" and entry["mask_domain"] == [[0, 30000], [50000, 80000]]
    # the same mask against the whole vector's permutation is no prefix of it
    _, whole, _ = _store(tmp_path, "whole", layout, tau_hat, mask_seed=4, mask_domain=Domain.whole(80000).spans)
    assert whole["mask_order"] != "permutation"


def test_encode_and_decode_by_hand():
    import numpy as np
    mask = np.zeros(70000, dtype=bool)
    mask[random_order(70000, 9)[:700].long().numpy()] = True
    order, arrays = encode_seeded(mask, 9, [(0, 70000)])
    assert order == "permutation"
    assert np.array_equal(decode_seeded(arrays, 70000, order, 9, [(0, 70000)]), mask)
    assert not np.array_equal(decode_seeded(arrays, 70000, order, 8, [(0, 70000)]), mask)
    with pytest.raises(ValueError, match="needs its seed"):
        decode_seeded(arrays, 70000, order, None, [(0, 70000)])


def test_a_wrong_seed_in_the_manifest_is_caught_after_decoding(tmp_path):
    layout = Layout(("w",), ((100, 1000),), (torch.float32,))
    tau_hat = PRUNERS["dare"](_tau(layout.numel), 0.05, seed=2)
    store, _, _ = _store(tmp_path, "s", layout, tau_hat, mask_seed=2)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["tasks"][0]["mask_seed"] = 3
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NPSError, match="does not decode to the recorded one.*drawn by torch"):
        restore_task(store, "t")
    manifest["tasks"][0]["mask_domain"] = [[0, 60000], [50000, 100000]]       # overlapping
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NPSError, match="mask_domain"):
        read_store(store)


@pytest.mark.parametrize("task, match", [({"mask_seed": -1}, "mask seed"), ({"mask_seed": 1.5}, "mask seed"),
                                         ({"mask_seed": 1, "mask_domain": [(0, 10), (5, 20)]}, "mask domain"),
                                         ({"mask_seed": 1, "mask_domain": [(0, 10**9)]}, "mask domain"),
                                         ({"mask_seed": 1, "mask_domain": [(0,)]}, "mask domain")])
def test_bad_seeds_and_domains_write_nothing(tmp_path, task, match):
    layout = Layout(("w",), ((100, 100),), (torch.float32,))
    with pytest.raises(NPSError, match=match):
        write_store(tmp_path / "s", torch.zeros(10000), layout,
                    [StoreTask("t", PRUNERS["dare"](_tau(10000), 0.1, seed=1), **task)], mask_coding="seeded")
    assert not (tmp_path / "s").exists()
