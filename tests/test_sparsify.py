"""Single-vector pruners: magnitude, ties-trim, dare, random."""
from __future__ import annotations

import pytest
import torch

from nps_pruning.core import PRUNERS, keep_count, register_pruner


def test_registry_names():
    assert {"magnitude", "ties-trim", "dare", "random"} <= set(PRUNERS)


def test_magnitude_exact_with_ties_by_index():
    v = torch.tensor([0.1, -3.0, 2.0, -2.0, 0.5, 2.0, 0.0, -1.0])
    # k = round(0.5 * 8) = 4: |-3| then the three 2.0s, ties by index (2, 3, 5)
    assert PRUNERS["magnitude"](v, 0.5).tolist() == [0, -3.0, 2.0, -2.0, 0, 2.0, 0, 0]
    # k = round(0.25 * 8) = 2: -3 and the first 2.0 (index 2)
    assert PRUNERS["magnitude"](v, 0.25).tolist() == [0, -3.0, 2.0, 0, 0, 0, 0, 0]
    assert PRUNERS["magnitude"](v, 1.0).tolist() == v.tolist()
    assert PRUNERS["magnitude"](v, 1e-6).tolist() == [0, -3.0, 0, 0, 0, 0, 0, 0]


def test_ties_trim_equals_magnitude():
    gen = torch.Generator().manual_seed(0)
    v = torch.round(torch.randn(500, generator=gen) * 3) / 3
    for r in (0.02, 0.2, 0.7):
        assert torch.equal(PRUNERS["ties-trim"](v, r), PRUNERS["magnitude"](v, r))


def test_dare_and_random_exact_counts_and_rescale():
    v = torch.arange(1, 101, dtype=torch.float32)     # no zeros
    for r in (0.01, 0.1, 0.33, 1.0):
        k = keep_count(100, r)
        d = PRUNERS["dare"](v, r, seed=7)
        rnd = PRUNERS["random"](v, r, seed=7)
        assert int(torch.count_nonzero(d)) == k and int(torch.count_nonzero(rnd)) == k
        kept = rnd != 0
        assert torch.equal(d != 0, kept)                          # same positions per seed
        assert torch.equal(rnd[kept], v[kept])                    # random: unscaled
        assert torch.allclose(d[kept], v[kept] * (100 / k))       # dare: scaled by D/k
    assert torch.equal(PRUNERS["dare"](v, 1.0, seed=3), v)        # r = 1: everything, scale 1


def test_dare_hand_example():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    gen = torch.Generator().manual_seed(11)
    idx = torch.randperm(4, generator=gen)[:2]
    expected = torch.zeros(4)
    expected[idx] = v[idx] * 2.0
    assert torch.equal(PRUNERS["dare"](v, 0.5, seed=11), expected)


def test_seeded_repeatability_and_seed_changes_result():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(1000, generator=gen)
    for name in ("dare", "random"):
        a = PRUNERS[name](v, 0.1, seed=5)
        assert torch.equal(a, PRUNERS[name](v, 0.1, seed=5))
        assert not torch.equal(a, PRUNERS[name](v, 0.1, seed=6))
    assert torch.equal(PRUNERS["magnitude"](v, 0.1, seed=1), PRUNERS["magnitude"](v, 0.1, seed=2))


def test_shape_and_dtype_preserved():
    v = torch.randn(4, 5).to(torch.float16)
    for name in ("magnitude", "ties-trim", "dare", "random"):
        out = PRUNERS[name](v, 0.3, seed=0)
        assert out.shape == v.shape and out.dtype == v.dtype
        assert int(torch.count_nonzero(out)) == keep_count(20, 0.3)


def test_bad_keep_ratio():
    v = torch.randn(10)
    for name in ("magnitude", "ties-trim", "dare", "random"):
        for r in (0.0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError):
                PRUNERS[name](v, r)
    with pytest.raises(ValueError):
        PRUNERS["magnitude"](torch.arange(5), 0.5)        # integer tensor


def test_register_pruner():
    name = "test-only-halve"

    @register_pruner(name)
    def halve(values, keep_ratio, *, seed=0):
        return values / 2

    try:
        assert PRUNERS[name] is halve
        with pytest.raises(ValueError):
            register_pruner(name)(halve)
    finally:
        PRUNERS.pop(name, None)


@pytest.mark.parametrize("D,seed", [(1, 0), (7, 3), (1000, 0), (100_003, 11)])
def test_dare_positions_are_int64_randperms_drawn_in_int32(D, seed):
    """The int32 draw is the very permutation int64 randperm gives (DARE's numbers unchanged)."""
    from nps_pruning.core.sparsify import _random_positions
    ref = torch.randperm(D, generator=torch.Generator().manual_seed(seed))
    got = _random_positions(D, max(1, D // 3), seed, "cpu")
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref[: max(1, D // 3)])
