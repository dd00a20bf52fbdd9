"""Merge functions against closed-form results worked out by hand (SPEC §2 "Fusion", §3 TIES)."""
import pytest
import torch

from nps_pruning.core.merge import (MERGERS, dare_drop, nps_combine, register_merger,
                                    trim_top_k)

# N = 3 tasks, D = 6 entries. Column 0/3: sign conflicts; column 5 has no trimmed value at all;
# τ2 has a three-way magnitude tie (2, 2, 2 at entries 0, 3, 4) at the top-3 boundary.
TAUS = torch.tensor([
    [4.0, -1.0, 0.5, 2.0, -3.0, 1.0],
    [-2.0, 3.0, 1.0, -2.0, 2.0, 0.5],
    [1.0, -4.0, 2.0, 2.0, -1.0, -0.25],
])


def test_registry_has_every_baseline():
    assert set(MERGERS) >= {"average", "task-arithmetic", "ties", "dare-linear", "dare-ties"}


def test_average_is_the_mean_and_ignores_lambda():
    expected = torch.tensor([3 / 3, -2 / 3, 3.5 / 3, 2 / 3, -2 / 3, 1.25 / 3])
    torch.testing.assert_close(MERGERS["average"](TAUS, lam=7.0), expected, rtol=0, atol=1e-7)


def test_task_arithmetic_is_lambda_times_sum():
    expected = torch.tensor([1.5, -1.0, 1.75, 1.0, -1.0, 0.625])
    assert torch.equal(MERGERS["task-arithmetic"](TAUS, lam=0.5), expected)


def test_ties_trim_is_global_top_k_with_index_tie_break():
    trimmed = trim_top_k(TAUS, keep_ratio=0.5)           # k = 3 per task
    assert torch.equal(trimmed, torch.tensor([
        [4.0, 0.0, 0.0, 2.0, -3.0, 0.0],                 # 4, 3, 2
        [-2.0, 3.0, 0.0, -2.0, 0.0, 0.0],                # 3, then the tied 2s at the lowest indices
        [0.0, -4.0, 2.0, 2.0, 0.0, 0.0],                 # 4, 2, 2
    ]))


def test_ties_by_hand():
    # trimmed sums per entry: 2, -1, 2, 2, -3, 0 -> signs +, -, +, +, -, 0
    # agreeing (nonzero, same sign) values: {4}, {-4}, {2}, {2, 2}, {-3}, {} -> means 4, -4, 2, 2, -3, 0
    merged = MERGERS["ties"](TAUS, lam=0.5, keep_ratio=0.5)
    assert torch.equal(merged, torch.tensor([2.0, -2.0, 1.0, 1.0, -1.5, 0.0]))


def test_ties_exact_cancellation_merges_to_zero():
    taus = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])
    assert torch.equal(MERGERS["ties"](taus, keep_ratio=1.0), torch.tensor([0.0, 2.0]))


def test_ties_trim_matches_a_stable_sort_reference_with_many_ties():
    g = torch.Generator().manual_seed(0)
    taus = torch.randint(-5, 6, (3, 1000), generator=g).float()   # heavy ties
    for ratio in (0.01, 0.1, 0.37, 1.0):
        k = max(1, round(ratio * 1000))
        trimmed = trim_top_k(taus, ratio)
        for row, out in zip(taus, trimmed):
            order = torch.sort(-row.abs(), stable=True).indices[:k]
            expected = torch.zeros_like(row)
            expected[order] = row[order]
            assert torch.equal(out, expected)


def test_dare_keeps_exactly_k_random_entries_rescaled():
    dropped = dare_drop(TAUS, keep_ratio=0.5, seed=3)
    for row, out in zip(TAUS, dropped):
        kept = out != 0
        assert int(kept.sum()) == 3
        assert torch.equal(out[kept], row[kept] * 2.0)   # D / k = 6 / 3
    big = torch.ones(4, 500)
    dropped = dare_drop(big, keep_ratio=0.1, seed=0)
    assert (dropped != 0).sum(dim=1).tolist() == [50] * 4
    masks = [tuple(r.nonzero().squeeze(1).tolist()) for r in dropped]
    assert len(set(masks)) == 4                          # a different stream per task


def test_dare_is_seeded():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 400, generator=g)
    for name in ("dare-linear", "dare-ties"):
        a = MERGERS[name](taus, lam=1.3, keep_ratio=0.2, seed=5)
        b = MERGERS[name](taus, lam=1.3, keep_ratio=0.2, seed=5)
        c = MERGERS[name](taus, lam=1.3, keep_ratio=0.2, seed=6)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_at_full_keep_is_the_plain_merge():
    # nothing dropped, scale D/k = 1: dare-linear = task arithmetic
    assert torch.equal(MERGERS["dare-linear"](TAUS, lam=0.5, keep_ratio=1.0),
                       torch.tensor([1.5, -1.0, 1.75, 1.0, -1.0, 0.625]))
    # dare-ties without trim: sums 3, -2, 3.5, 2, -2, 1.25 -> all signs decided;
    # agreeing sets {4, 1}, {-1, -4}, {0.5, 1, 2}, {2, 2}, {-3, -1}, {1, 0.5}
    expected = torch.tensor([2.5, -2.5, 3.5 / 3, 2.0, -2.0, 0.75])
    torch.testing.assert_close(MERGERS["dare-ties"](TAUS, keep_ratio=1.0), expected,
                               rtol=0, atol=1e-7)


def test_dare_ties_elects_on_the_dropped_vectors():
    dropped = dare_drop(TAUS, keep_ratio=0.5, seed=2)
    expected = torch.zeros(6)
    for d in range(6):
        column = dropped[:, d]
        sign = torch.sign(column.sum())
        agree = [float(v) for v in column if v != 0 and torch.sign(v) == sign]
        expected[d] = sum(agree) / len(agree) if agree else 0.0
    torch.testing.assert_close(MERGERS["dare-ties"](TAUS, lam=2.0, keep_ratio=0.5, seed=2),
                               2.0 * expected, rtol=0, atol=1e-6)


PRUNED = torch.tensor([
    [2.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    [4.0, 0.0, 0.0, -1.0, 0.0, 0.0],
    [0.0, 0.0, 3.0, 2.0, 0.0, 1.0],
])
LAMBDAS = [1.0, 0.5, 2.0]      # weighted sums: 4, 0, 7, 3.5, 0, 2


def test_nps_combine_mask_count():
    # tasks kept per entry: 2, 0 (-> 1), 2, 2, 0 (-> 1), 1
    assert torch.equal(nps_combine(PRUNED, LAMBDAS, "mask-count"),
                       torch.tensor([2.0, 0.0, 3.5, 1.75, 0.0, 2.0]))


def test_nps_combine_lambda_sum():
    torch.testing.assert_close(nps_combine(PRUNED, LAMBDAS, "lambda-sum"),
                               torch.tensor([4 / 3.5, 0.0, 2.0, 1.0, 0.0, 2 / 3.5]),
                               rtol=0, atol=1e-7)


def test_nps_combine_none():
    assert torch.equal(nps_combine(PRUNED, LAMBDAS, "none"),
                       torch.tensor([4.0, 0.0, 7.0, 3.5, 0.0, 2.0]))


@pytest.mark.parametrize("call", [
    lambda: MERGERS["ties"](TAUS[0]),                               # not (N, D)
    lambda: MERGERS["ties"](TAUS, keep_ratio=0.0),
    lambda: MERGERS["dare-linear"](TAUS, keep_ratio=1.5),
    lambda: MERGERS["task-arithmetic"](TAUS, lam=float("nan")),
    lambda: MERGERS["average"](torch.tensor([[1.0, float("inf")]])),
    lambda: MERGERS["average"](torch.ones(2, 3, dtype=torch.int64)),
    lambda: MERGERS["average"](torch.ones(0, 3)),
    lambda: nps_combine(PRUNED, [1.0, 1.0]),                        # wrong number of lambdas
    lambda: nps_combine(PRUNED, LAMBDAS, normalize="mean"),
    lambda: nps_combine(PRUNED, [1.0, -1.0, 0.0], normalize="lambda-sum"),
])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_register_merger_refuses_duplicates():
    with pytest.raises(ValueError):
        register_merger("ties")(lambda taus, **kw: taus.sum(0))


def test_entrywise_merge_steps_in_column_slices_are_bit_identical(monkeypatch):
    """disjoint_mean (and the finiteness check) run in column slices: the same result, bit for bit,
    whatever the slice size."""
    import nps_pruning.core.merge as cm
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 1001, generator=g) * (torch.rand(3, 1001, generator=g) > 0.5)
    whole = cm.merge("ties", taus, lam=1.3, keep_ratio=0.3)
    sign = cm.elect_sign(taus)
    ref = cm.disjoint_mean(taus, sign)
    monkeypatch.setattr(cm, "COLUMN_CHUNK", 7)
    assert torch.equal(cm.disjoint_mean(taus, sign), ref)
    assert torch.equal(cm.merge("ties", taus, lam=1.3, keep_ratio=0.3), whole)
    bad = taus.clone()
    bad[2, 1000] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cm.merge("ties", bad)


def _lambda_cases():
    """(method, options, τ): every merger that says it scales with λ, on matrices and vectors,
    with its options, in float32 and (where it takes them) 16-bit task vectors."""
    from nps_pruning.core.merge import HALF_MERGERS, MERGE_OPTIONS, merger_options, scales_with_lambda
    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 5), (5,), (4, 3, 2), (7, 1)]
    D = sum(torch.Size(s).numel() for s in shapes)
    taus = torch.randn(3, D, generator=gen) * (torch.rand(3, D, generator=gen) < 0.7)
    for method in MERGERS:
        if not scales_with_lambda(method):
            continue
        opts = merger_options(method)
        variants = [{}] + [{name: v} for name in opts for v in MERGE_OPTIONS[name][1:]]
        for over in variants:
            yield method, over, taus, shapes
            if method in HALF_MERGERS and not over:
                yield method, over, taus.to(torch.bfloat16), shapes


def test_a_merger_that_scales_with_lambda_is_lambda_times_its_unit_merge_bit_for_bit():
    """What lets a λ grid merge once and scale (apps.merge.merge_with_lambda_grid): for every
    merger but ``average``, merge(λ) is exactly λ · merge(1), whatever its options and dtype."""
    from nps_pruning.core.merge import merge
    seen = set()
    for method, over, taus, shapes in _lambda_cases():
        seen.add(method)
        unit = merge(method, taus, lam=1.0, keep_ratio=0.3, seed=3, shapes=shapes, **over)
        for lam in (0.3, 0.8, 1.7, 2.5):
            got = merge(method, taus, lam=lam, keep_ratio=0.3, seed=3, shapes=shapes, **over)
            want = float(lam) * unit
            assert got.dtype == want.dtype
            assert torch.equal(got.float().view(torch.int32), want.float().view(torch.int32)), (method, over, lam)
    assert seen == set(MERGERS) - {"average"}


def test_the_lambda_grid_merges_once_and_gives_the_merge_at_the_chosen_lambda():
    from types import SimpleNamespace

    from nps_pruning.apps.merge import merge_with_lambda_grid
    from nps_pruning.apps.settings import MergeSettings
    from nps_pruning.core.merge import merge
    shapes = [(6, 5), (5,), (7, 1)]
    D = sum(torch.Size(s).numel() for s in shapes)
    taus = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    target = torch.randn(D, generator=torch.Generator().manual_seed(9))

    class Session:
        task_vector = SimpleNamespace(layout=SimpleNamespace(shapes=shapes))

        def score(self, ev, merged):
            return ev(merged)
    sessions = [Session() for _ in range(3)]
    evaluators = [lambda m: -float(((m - target) ** 2).sum())] * 3
    for method in ("tsv-m", "iso-c", "ties", "task-arithmetic"):
        grid = (0.2, 0.5, 0.9, 1.4)
        merged, lam, rows = merge_with_lambda_grid(method, taus, sessions, evaluators,
                                                   settings=MergeSettings(lambda_grid=grid, keep_ratio=0.4))
        each = [merge(method, taus, lam=g, keep_ratio=0.4, shapes=shapes) for g in grid]
        assert [r["score"] for r in rows] == [evaluators[0](m) for m in each]
        assert torch.equal(merged, each[grid.index(lam)])
