"""The hybrid search space (core/space.py): exact against its plain definition, magnitude top-k and
DARE as exact points, exact kept counts; the fitnesses; the held-out re-scoring through the CLI."""
import json

import numpy as np
import pytest
import torch

from nps_pruning.checkpoints.sparse import read_task_vector
from nps_pruning.core.bands import make_bands
from nps_pruning.core.mask import build_candidate, keep_count
from nps_pruning.core.entries import candidate_entries
from nps_pruning.core.space import (HybridSpace, MagnitudeSpace, build_hybrid, build_point,
                                    hybrid_plan, hybrid_reference, make_hybrid_index, make_space)
from nps_pruning.core.sparsify import dare_prune, magnitude_prune


def _cases():
    gen = torch.Generator().manual_seed(0)
    for D in (7, 50, 1000, 12345):
        for trial in range(8):
            v = torch.randn(D, generator=gen) * (torch.rand(D, generator=gen) < 0.8)
            if trial % 3 == 0:
                v = torch.round(v * 4) / 4          # heavy ties
            yield D, trial, v, 1 + trial % 8, (0.01, 0.05, 0.3, 1.0)[trial % 4], \
                ("focused", "uniform")[trial % 2]


def test_hybrid_build_equals_its_definition_and_keeps_exactly_k():
    for D, trial, v, M, r, scheme in _cases():
        bands = make_bands(v, M, scheme, r)
        idx = make_hybrid_index(v, seed=trial)
        rng = np.random.default_rng(trial)
        for _ in range(4):
            p = np.concatenate([rng.uniform(0, 3, M), [rng.uniform(-1, 2), rng.uniform(0, 1),
                                                       rng.uniform(-1, 1)]])
            got = build_hybrid(v, bands, idx, p, r)
            assert torch.equal(got, hybrid_reference(v, bands, p, r, seed=trial)), (D, trial)
            # the same point with β = 0 written out: the same candidate
            assert torch.equal(build_hybrid(v, bands, idx, np.append(p, 0.0), r), got)
            plan = hybrid_plan(v, bands, idx, p, r)
            # exactly k positions: the magnitude part and the random part are disjoint
            kept = plan.mag.clone()
            inv_perm = torch.empty(D, dtype=torch.int64)
            inv_perm[idx.perm.long()] = torch.arange(D)
            rand = (inv_perm <= plan.last_pos) & ~kept
            assert int(kept.sum()) == plan.k_mag and int(rand.sum()) == plan.k_rand
            # the magnitude part is band b's rank prefix [starts[b], cuts[b]) (ranks: |τ|
            # descending, ties by flat index)
            rank = torch.empty(D, dtype=torch.int64)
            rank[torch.sort(v.abs(), descending=True, stable=True).indices] = torch.arange(D)
            assert torch.equal(kept, rank < torch.tensor(plan.cuts)[bands.band_of.long()])
            assert plan.k_mag + plan.k_rand == keep_count(D, r)
            # with a base: base + τ̂, written into out
            base = torch.randn(D, generator=torch.Generator().manual_seed(1))
            out = torch.empty(D)
            build_hybrid(v, bands, idx, p, r, base=base, out=out)
            assert torch.equal(out, base + got)


def test_rank_weighted_random_part_equals_its_definition_and_keeps_exactly_k():
    """β > 0: the kept set is the plain definition's exactly (the m smallest E_j / u_j^β among the
    free entries, ties by flat index), the values τ_j·2^h/π_j to float32 rounding; the count is k."""
    for D, trial, v, M, r, scheme in _cases():
        if D > 1000:             # the plain definition counts ranks in O(D²)
            continue
        bands = make_bands(v, M, scheme, r)
        idx = make_hybrid_index(v, seed=trial)
        rng = np.random.default_rng(100 + trial)
        for beta in (0.5, 1.0, 2.0, 4.0):
            p = np.concatenate([rng.uniform(0, 3, M), [rng.uniform(-1, 2), rng.uniform(0, 1),
                                                       rng.uniform(-1, 1), beta]])
            got = build_hybrid(v, bands, idx, p, r)
            ref = hybrid_reference(v, bands, p, r, seed=trial)
            plan = hybrid_plan(v, bands, idx, p, r)
            assert torch.equal(got != 0, ref != 0), (D, trial, beta)
            assert torch.allclose(got, ref, rtol=2e-7, atol=0), (D, trial, beta)
            assert plan.k_mag + plan.k_rand == keep_count(D, r)
            if plan.k_rand:
                assert plan.rand_idx.numel() == plan.k_rand and not bool(plan.mag[plan.rand_idx].any())
                assert bool((plan.rand_idx[1:] > plan.rand_idx[:-1]).all())


def test_rank_weighted_sample_prefers_large_entries_and_is_unbiased():
    """Over seeds, the rescaled sample's sum estimates the free entries' sum (Horvitz–Thompson);
    a larger β keeps larger entries; the sample is the same on every call (common random numbers)."""
    D, r = 2000, 0.05
    v = torch.rand(D, generator=torch.Generator().manual_seed(0)) + 0.01
    bands = make_bands(v, 4, "focused", r)
    p = lambda beta: np.concatenate([np.ones(4), [0.0, 1.0, 0.0, beta]])
    sums, mean_abs = [], {}
    for seed in range(300):
        idx = make_hybrid_index(v, seed=seed)
        out = build_hybrid(v, bands, idx, p(2.0), r)
        assert int((out != 0).sum()) == keep_count(D, r)
        sums.append(float(out.sum()))
        if seed < 20:
            assert torch.equal(out, build_hybrid(v, bands, idx, p(2.0), r))
            for beta in (0.5, 2.0, 4.0):
                kept = build_hybrid(v, bands, idx, p(beta), r) != 0
                mean_abs.setdefault(beta, []).append(float(v[kept].mean()))
    total, se = float(v.sum()), float(np.std(sums) / np.sqrt(len(sums)))
    assert abs(np.mean(sums) - total) < 4 * se + 1e-3 * total, (np.mean(sums), total, se)
    assert np.mean(mean_abs[0.5]) < np.mean(mean_abs[2.0]) < np.mean(mean_abs[4.0])


def test_the_threshold_selection_is_the_full_sort_on_large_vectors():
    """select() bounds the threshold from a sample of keys: the same positions and threshold as a
    full sort by (key, flat index), with ties, taken (+inf) entries and every m."""
    import math
    from nps_pruning.core.rank_sample import select
    gen = torch.Generator().manual_seed(1)
    D = 300_000
    key = torch.round(torch.randn(D, generator=gen) * 50) / 50          # many ties
    key[torch.rand(D, generator=gen) < 0.3] = math.inf
    n_free = int((key < math.inf).sum())
    order = np.lexsort((np.arange(D), key.numpy()))
    for m in (1, 7, 500, 20_000, n_free - 1, n_free):
        pos, t = select(key, m, n_free, seed=m)
        assert torch.equal(pos, torch.from_numpy(np.sort(order[:m])).long()), m
        assert t == (float(key[order[m]]) if m < n_free else -math.inf)


def test_the_rank_weighted_part_from_a_prefix_of_the_exponentials_is_the_whole_vectors():
    """rank_sample keys only the entries with the smallest exponentials (growing the prefix when it
    holds too few free keys): the same positions and values, bit for bit, as keying all D entries;
    and prefixes are kept per size (not recomputed)."""
    from nps_pruning.core.rank_sample import RankKeys, log_exponentials, log_ranks, rank_sample
    gen = torch.Generator().manual_seed(3)
    D = 400_000
    v = torch.randn(D, generator=gen) * torch.rand(D, generator=gen)
    v[::7] = torch.round(v[::7] * 20) / 20                      # ties in |τ|
    keys = RankKeys(log_exponentials(D, 5), log_ranks(v))
    top = torch.zeros(D, dtype=torch.bool)
    top[torch.topk(v.abs(), 4000).indices] = True
    low_e = keys.log_e <= torch.quantile(keys.log_e[:100_000], 0.03)   # the first prefixes, taken
    used = 0
    for taken in (torch.zeros(D, dtype=torch.bool), top, top | low_e):
        n_taken = int(taken.sum())
        for beta in (0.3, 1.0, 2.5, 4.0):
            for m in (1, 100, 5000, 12_000):
                got = rank_sample(v, keys, taken, m, beta, 0.5, 7, n_taken=n_taken)
                ref = rank_sample(v, keys, taken, m, beta, 0.5, 7, n_taken=n_taken, prefix=False)
                assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (beta, m, n_taken)
                assert got[0].numel() == m and not bool(taken[got[0]].any())
                used = len(keys._prefixes)
    assert 1 <= used <= 8                                       # a few sizes, found once each


def test_a_key_has_the_same_bits_in_a_vector_lane_and_in_the_scalar_tail():
    """What the prefix path relies on: torch.add(log E, log u, alpha=−β) gives an entry the same
    float32 bits whether it is computed in a vector lane or in the kernel's scalar tail (each
    entry takes every position mod 64 across the shifted slices, and a gathered copy)."""
    gen = torch.Generator().manual_seed(8)
    le = torch.randn(4099, generator=gen) * 3
    lu = -torch.rand(4099, generator=gen) * 12
    for beta in (0.3, 1.0, 2.5, 3.999):
        full = torch.add(le, lu, alpha=-beta)
        for s in range(64):
            part = torch.add(le[s:].clone(), lu[s:].clone(), alpha=-beta)
            assert torch.equal(part.view(torch.int32), full[s:].view(torch.int32)), (beta, s)
        pick = torch.randperm(4099, generator=gen)[:1001].sort().values
        assert torch.equal(torch.add(le[pick], lu[pick], alpha=-beta), full[pick]), beta


def test_the_magnitude_order_of_the_rank_keys_is_the_stable_sorts():
    """log u's order (|τ| descending, ties by flat index) from one sort of int64 keys: the stable
    float sort's order exactly, with zeros, ties, subnormals and the largest finite values."""
    from nps_pruning.core.rank_sample import _magnitude_order
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(200_000, generator=gen).abs()
    a[::5] = 0.0
    a[1::7] = torch.round(a[1::7] * 8) / 8
    a[3::11] = 1e-42                                             # subnormal
    a[4::13] = torch.finfo(torch.float32).max
    a[6::17] = (-torch.zeros(1)).abs()
    ref = torch.sort(a, descending=True, stable=True).indices
    assert torch.equal(_magnitude_order(a), ref)


def test_candidate_entries_write_the_dense_candidate_in_place_and_restore_exactly():
    """base[idx] + vals at the kept entries, base elsewhere, is the dense candidate (both spaces,
    both kept-value modes, 16-bit τ and base); restoring the k saved values gives base back bit
    for bit — a scorer can hold θ_pre in the model itself instead of a second copy."""
    for D, trial, v, M, r, scheme in _cases():
        gen = torch.Generator().manual_seed(D + trial)
        base = torch.randn(D, generator=gen)
        if trial % 4 == 3:
            v, base = v.to(torch.bfloat16), base.to(torch.bfloat16)
        bands = make_bands(v, M, scheme, r)
        index = make_hybrid_index(v, seed=trial)
        rng = np.random.default_rng(trial)
        k = keep_count(D, r)
        for name, kept_values in (("magnitude", "weighted"), ("magnitude", "original"),
                                  ("hybrid", "weighted")):
            space = make_space(name, M, 0.0, 4.0, keep_ratio=r)
            p = rng.uniform(0, 3, M)
            if name == "hybrid":
                p = np.concatenate([p, [rng.uniform(-1, 2), rng.uniform(0, 1), rng.uniform(-1, 1),
                                        (0.0, 1.5)[trial % 2]]])
            dense = build_point(space, v, bands, index, p, r, base=base,
                                out=torch.empty(D, dtype=torch.float32), kept_values=kept_values)
            idx, vals = candidate_entries(space, v, bands, index, p, r, kept_values=kept_values)
            assert idx.dtype == torch.int64 and vals.dtype == torch.float32 and idx.numel() == k
            assert bool((idx[1:] > idx[:-1]).all())
            flat = base.float()                   # the model's weights: θ_pre
            saved = flat[idx].clone()
            flat[idx] = saved + vals
            assert torch.equal(flat, dense), (D, trial, name, kept_values)
            kept = torch.zeros(D, dtype=torch.bool)
            kept[idx] = True
            assert torch.equal(dense[~kept], base.float()[~kept])
            flat[idx] = saved
            assert torch.equal(flat.view(torch.int32), base.float().view(torch.int32))


def test_magnitude_and_dare_are_exact_points_of_the_hybrid_space():
    for D, trial, v, M, r, scheme in _cases():
        bands = make_bands(v, M, scheme, r)
        idx = make_hybrid_index(v, seed=trial)
        mag = np.concatenate([np.ones(M), [0.0, 0.0, 0.0]])
        dare = np.concatenate([np.ones(M), [0.0, 1.0, 0.0]])
        assert torch.equal(build_hybrid(v, bands, idx, mag, r), magnitude_prune(v, r))
        assert torch.equal(build_hybrid(v, bands, idx, dare, r), dare_prune(v, r, seed=trial))
        # α = 0: the paper's candidate for any band weights, scaled by 2^g
        w = np.linspace(0.5, 2.5, M)
        assert torch.equal(build_hybrid(v, bands, idx, np.concatenate([w, [0.0, 0.0, 0.3]]), r),
                           build_candidate(v, bands, w, r))
        assert torch.equal(build_hybrid(v, bands, idx, np.concatenate([w, [1.0, 0.0, 0.0]]), r),
                           build_candidate(v, bands, w * 2.0, r))


def test_hybrid_index_is_the_dare_permutation_in_int32_and_nothing_else():
    # the space's only D-long structure: DARE's permutation, drawn as int32 (same order as int64)
    for D, seed in ((1, 0), (1000, 3), (1 << 20, 7)):
        v = torch.randn(D)
        idx = make_hybrid_index(v, seed=seed)
        assert idx.perm.dtype == torch.int32 and idx.num_entries == D
        ref = torch.randperm(D, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(idx.perm.long(), ref)
        assert [f for f in vars(idx) if isinstance(getattr(idx, f), torch.Tensor)] == ["perm"]
        assert idx._rank_keys is None       # the rank-weighted part's keys: on a β > 0 candidate
    # the candidate does not change τ, the bands or the index
    v = torch.round(torch.randn(5000) * 3) / 3
    bands = make_bands(v, 4, "focused", 0.05)
    idx = make_hybrid_index(v, seed=1)
    before = (v.clone(), bands.band_of.clone(), bands.sorted_abs.clone(), idx.perm.clone())
    build_hybrid(v, bands, idx, np.array([1.0, 2.0, 0.5, 1.0, 0.3, 0.6, 0.2]), 0.05)
    for a, b in zip(before, (v, bands.band_of, bands.sorted_abs, idx.perm)):
        assert torch.equal(a, b)


def test_hybrid_random_part_is_an_unbiased_sample_of_the_rest():
    # α = 0.5 on a constant vector: half the kept entries are the top ranks (flat index order on
    # ties), the other half random, rescaled by (D − k_mag)/k_rand
    D, r = 1000, 0.1
    v = torch.ones(D)
    bands = make_bands(v, 4, "focused", r)
    idx = make_hybrid_index(v, seed=3)
    out = build_hybrid(v, bands, idx, np.concatenate([np.ones(4), [0.0, 0.5, 0.0]]), r)
    assert torch.equal(out[:50], torch.ones(50))
    rest = out[50:]
    assert int((rest != 0).sum()) == 50
    assert torch.allclose(rest[rest != 0], torch.full((50,), 950 / 50))


def test_spaces_bounds_starts_and_errors():
    mag = make_space("magnitude", 4, 0.0, 4.0)
    assert mag.dim == 4 and len(mag.start_points()) == 1
    hyb = make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.05)
    assert isinstance(hyb, HybridSpace) and hyb.dim == 8
    b = hyb.bounds()
    assert b.shape == (8, 2) and b[5].tolist() == [0.0, 1.0] and b[7].tolist() == [0.0, 4.0]
    assert b[4, 1] == pytest.approx(np.log2(20))         # g reaches 1/r
    assert hyb.start_labels() == ["magnitude", "dare", "hybrid-0.5", "magnitude-x2",
                                  "magnitude-x4", "magnitude-x8", "rank-power-1", "rank-power-2"]
    assert [p[4] for p in hyb.start_points()] == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    assert [p[7] for p in hyb.start_points()] == [0.0] * 6 + [1.0, 2.0]
    assert [p[5] for p in hyb.start_points()][-2:] == [1.0, 1.0]
    # rescales stay below 1/r: r = 0.2 -> ×2, ×4; r = 0.5 -> none
    assert make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.2).start_labels()[3:-2] == ["magnitude-x2",
                                                                                      "magnitude-x4"]
    assert make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.5).start_labels()[3:-2] == []
    # CMA-ES starts at the best start point
    assert hyb.mean0([0.5, 0.7, 0.6, 0.1, 0.1, 0.1, 0.2, 0.3])[5] == 1.0
    assert hyb.mean0([0.8, 0.7, None, 0.1, 0.1, 0.1, 0.2, 0.3])[5] == 0.0
    assert hyb.mean0([0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.2, 0.3])[4] == 2.0
    assert hyb.mean0([0.1, 0.1, 0.1, 0.1, 0.2, 0.1, 0.2, 0.9])[7] == 2.0
    log = make_space("hybrid", 2, 0.25, 8.0, param="log")
    assert log.to_params(np.array([1.0, -1.0, 0.5, 0.2, 0.1, 2.0])).tolist() == [2.0, 0.5, 0.5, 0.2, 0.1,
                                                                                2.0]
    with pytest.raises(ValueError, match="unknown search space"):
        make_space("nope", 4, 0.0, 4.0)
    v = torch.randn(100)
    bands = make_bands(v, 4, "focused", 0.1)
    idx = make_hybrid_index(v)
    with pytest.raises(ValueError, match="8 entries"):
        build_hybrid(v, bands, idx, np.ones(4), 0.1)
    with pytest.raises(ValueError, match="beta"):
        build_hybrid(v, bands, idx, np.array([1, 1, 1, 1, 0, 1.0, 0.0, -0.5]), 0.1)
    with pytest.raises(ValueError, match="alpha"):
        build_hybrid(v, bands, idx, np.array([1, 1, 1, 1, 0, 1.5, 0.0]), 0.1)
    with pytest.raises(ValueError, match="kept_values"):
        build_point(hyb, v, bands, idx, np.ones(7), 0.1, kept_values="original")
    with pytest.raises(ValueError, match="non-finite"):
        make_hybrid_index(torch.tensor([1.0, float("nan")]))
    assert isinstance(mag, MagnitudeSpace)


# -- fitnesses ------------------------------------------------------------------------------------
class _Fixed(torch.nn.Module):
    """A 'model' returning fixed logits for a batch of input_ids (one row per id)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None):
        return self.table[input_ids[:, 1] - 1000]


class _Tok:
    def __call__(self, texts, truncation=True, max_length=128, padding=False):
        ids = [[101, 1000 + int(t), 102] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1, 1, 1] for _ in ids]}

    def pad(self, feats, padding=True, return_tensors="pt"):
        return {k: torch.tensor([f[k] for f in feats]) for k in feats[0]}


def test_fitness_accuracy_loglik_agreement_closed_forms(tmp_path):
    from nps_pruning.evaluation.text import TextClassificationEvaluator
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n0,0\n1,1\n2,1\n")
    logits = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    model = _Fixed(logits)
    lp = torch.log_softmax(torch.tensor(logits), dim=-1)
    acc = TextClassificationEvaluator(csv, tokenizer=_Tok(), fitness="accuracy")(model)
    assert acc == pytest.approx(2 / 3)
    ll = TextClassificationEvaluator(csv, tokenizer=_Tok(), fitness="loglik")(model)
    assert ll == pytest.approx(float((lp[0, 0] + lp[1, 1] + lp[2, 1]) / 3), abs=1e-6)
    # agreement: exp(-mean KL(ref || candidate)); 1 against itself; label-free file
    nolab = tmp_path / "u.csv"
    nolab.write_text("text\n0\n1\n2\n")
    ev = TextClassificationEvaluator(nolab, tokenizer=_Tok(), fitness="agreement")
    ev.set_reference(model)
    assert ev(model) == pytest.approx(1.0)
    other = [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    q = torch.log_softmax(torch.tensor(other), dim=-1)
    kl = float((lp.exp() * (lp - q)).sum(-1).mean())
    assert ev(_Fixed(other)) == pytest.approx(np.exp(-kl), abs=1e-6)
    from nps_pruning.errors import NPSError
    with pytest.raises(NPSError, match="set_reference"):
        TextClassificationEvaluator(nolab, tokenizer=_Tok(), fitness="agreement")(model)
    with pytest.raises(NPSError, match="missing column 'label'"):
        TextClassificationEvaluator(nolab, tokenizer=_Tok(), fitness="loglik")
    with pytest.raises(NPSError, match="unknown fitness"):
        TextClassificationEvaluator(csv, tokenizer=_Tok(), fitness="f1")


def test_holdout_rows_are_disjoint_from_search_rows():
    from nps_pruning.evaluation.text import select_rows
    a, _ = select_rows(100, 60, 5, "all", "x")
    b, _ = select_rows(100, 60, 5, "rest", "x", rest_size=25)
    assert len(a) == 60 and len(b) == 25 and not set(a.tolist()) & set(b.tolist())
    c, _ = select_rows(100, 85, 5, "all", "x")
    assert set(a.tolist()) | set(b.tolist()) == set(c.tolist())   # search + held-out = the 85 drawn


# -- through the CLI ------------------------------------------------------------------------------
def test_default_prune_hybrid_holdout_and_label_free(tiny_bert, text_csv, tmp_path):
    from nps_pruning.cli import main
    base, ft = tiny_bert
    out = tmp_path / "o"
    assert main(["prune", str(base), str(ft), "-o", str(out), "--keep", "0.1", "--bands", "3",
                 "--generations", "2", "--popsize", "4", "--eval", f"text-classification:{text_csv}",
                 "--holdout-min-rows", "8", "--quiet"]) == 0     # 40 rows: 10 held out
    rep = json.loads((out / "report.json").read_text())
    s = rep["search"]
    assert s["space"] == "hybrid" and rep["search_settings"]["space"] == "hybrid"
    assert s["holdout"] == {"share": 0.25, "search_rows": 30, "held_out_rows": 10,
                            "chosen_by": "held-out score"}
    starts = [c for c in s["candidates"] if c["gen"] == 0]
    assert [c["start"] for c in starts][:6] == ["magnitude", "dare", "hybrid-0.5", "magnitude-x2",
                                                "magnitude-x4", "magnitude-x8"]
    assert [c["start"] for c in starts][6:8] == ["rank-power-1", "rank-power-2"]
    assert all(c["start"].startswith("magnitude-x") for c in starts[8:]) and len(starts) <= 12
    assert all(len(c["weights"]) == 7 for c in s["candidates"])
    # held-out re-scoring: start points + the best 5 distinct; the chosen has the best held-out score
    rs = s["rescored"]
    assert len(rs) >= 6 and [r["start"] for r in rs[:3]] == ["magnitude", "dare", "hybrid-0.5"]
    best = max(rs, key=lambda r: r["holdout_score"])
    assert rep["calibration"]["nps_holdout"] == best["holdout_score"]
    # each re-scored held-out score is that of the dense candidate θ_pre + τ̂ (the search wrote its
    # candidates into the model holding θ_pre, and must have undone the last one first)
    from nps_pruning.apps.session import Session
    from nps_pruning.core.bands import make_bands as mb
    st = rep["settings"]
    sess = Session.load(str(base), str(ft))
    _, hold = sess.search_evaluators(f"text-classification:{text_csv}", holdout=0.25, seed=0,
                                     holdout_min_rows=8,
                                     batch_size=st["batch_size"], max_length=st["max_length"])
    v = sess.task_vector.values
    bands = mb(v, 3, st["scheme"], 0.1, st["focus"], sorted_dtype=v.dtype)
    index, space = make_hybrid_index(v, st["seed"]), make_space("hybrid", 3, 0.0, 4.0, keep_ratio=0.1)
    for r in rs[:4]:
        dense = build_point(space, v, bands, index, np.asarray(r["weights"]), 0.1)
        assert sess.score(hold, dense) == pytest.approx(r["holdout_score"], abs=1e-6), r["start"]
    assert s["examples_scored"] == sum(c["examples"] for c in s["candidates"]) > 0
    # the written τ̂ is the chosen point, exactly k entries
    from safetensors.torch import load_file
    tv = read_task_vector(out / "task_vector.safetensors")
    assert sum(int(torch.count_nonzero(t)) for t in tv.values()) <= rep["model"]["kept"]
    # label-free: agreement on a file with only a text column
    nolab = tmp_path / "nolab.csv"
    rows = [l.split(",")[0] for l in text_csv.read_text().splitlines()[1:]]
    nolab.write_text("text\n" + "\n".join(rows) + "\n")
    out2 = tmp_path / "o2"
    assert main(["prune", str(base), str(ft), "-o", str(out2), "--keep", "0.1", "--bands", "3",
                 "--generations", "1", "--popsize", "4", "--fitness", "agreement",
                 "--eval", f"text-classification:{nolab}", "--quiet"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["calibration"]["finetuned"] == pytest.approx(1.0)
    assert 0.0 < rep2["calibration"]["nps"] <= 1.0


def test_fitness_floors_non_finite_outputs():
    from nps_pruning.evaluation.fitness import LOG_FLOOR, FitnessAccumulator
    logits = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [0.0, -1e6], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    acc = FitnessAccumulator("loglik")
    acc.add(logits, labels, None)
    want = (3 * LOG_FLOOR + float(torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0])) / 4
    assert np.isfinite(acc.value()) and acc.value() == pytest.approx(want)
    ref = torch.log_softmax(torch.tensor([[1.0, 0.0]] * 4), dim=-1)
    ag = FitnessAccumulator("agreement")
    ag.add(logits, None, ref)
    assert 0.0 < ag.value() < 1.0


def test_hybrid_refines_the_magnitude_rescale_in_generation_zero():
    hyb = make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.05)
    pts = hyb.start_points()
    # best of the grid at ×4 (g = 2): round 0 proposes g = 1.5 and 2.5, round 1 ±0.25 around the best
    scores = [0.1, 0.2, 0.2, 0.3, 0.5, 0.4, 0.1, 0.1]     # the rank-weighted starts: not on the line
    more, labels = hyb.refine(pts, scores, 0)
    assert [p[4] for p in more] == [1.5, 2.5] and labels == ["magnitude-x2.83", "magnitude-x5.66"]
    assert all(p[:4].tolist() == [1.0] * 4 and p[5] == 0.0 and p[6] == 0.0 for p in more)
    more2, _ = hyb.refine(pts + more, scores + [0.6, 0.45], 1)
    assert [p[4] for p in more2] == [1.25, 1.75]
    # failed points are ignored; nothing already scored or outside the box is proposed
    assert hyb.refine(pts, [None] * 8, 0) == ([], [])
    top = make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.2)      # g reaches log2(5) = 2.32
    tp = top.start_points()
    more3, _ = top.refine(tp, [0.1, 0.1, 0.1, 0.2, 0.9], 0)
    assert [p[4] for p in more3] == [1.5]
    assert make_space("magnitude", 4, 0.0, 4.0).refine(pts, scores, 0) == ([], [])
    # CMA-ES starts at the best of all scored generation-0 points
    assert hyb.mean0(scores + [0.6, 0.45], pts + more)[4] == 1.5


def test_search_scores_refined_points_and_resumes_them(tmp_path):
    from nps_pruning.search import SearchSettings, run_search
    hyb = make_space("hybrid", 2, 0.0, 4.0, keep_ratio=0.05)
    calls = []

    def scorer(w):   # the best rescale is g = 1.6; everything else costs
        calls.append(list(w))
        return -abs(w[2] - 1.6) - 0.1 * abs(w[3]) - 0.05 * float(np.abs(w[:2] - 1).sum())

    st = SearchSettings(generations=2, popsize=4, seed=1, space="hybrid", upper=4.0)
    res = run_search(scorer, 2, st, space=hyb, log_path=tmp_path / "log.jsonl", progress=False)
    gen0 = [c for c in res.candidates if c["gen"] == 0]
    gs = [c["weights"][2] for c in gen0]
    assert gs[:8] == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0] and gs[8:] == [1.5, 2.5, 1.25, 1.75]
    assert [c["idx"] for c in gen0] == list(range(12))
    assert gen0[8]["start"] == "magnitude-x2.83"
    n = len(calls)
    res2 = run_search(scorer, 2, st, space=hyb, log_path=tmp_path / "log.jsonl", progress=False,
                      resume=True)
    assert len(calls) == n and res2.reused == len(res.candidates)
    assert res2.best_weights.tolist() == res.best_weights.tolist()


def test_scorer_with_theta_pre_in_the_model_writes_each_dense_candidate_and_restores():
    """A scorer with no separate θ_pre (the search's case: Session.park_base) writes each
    candidate at its kept entries only; the model sees the dense candidate bit for bit, the
    previous one is undone first, and restore() leaves θ_pre exactly."""
    from nps_pruning.search.scorer import CandidateScorer
    gen = torch.Generator().manual_seed(5)
    D, M, r = 3000, 4, 0.05
    v = torch.randn(D, generator=gen) * (torch.rand(D, generator=gen) < 0.7)
    base = torch.randn(D, generator=gen)
    bands = make_bands(v, M, "focused", r)
    index = make_hybrid_index(v, seed=1)
    flat, seen = base.clone(), []
    evaluator = lambda model: (seen.append(flat.clone()), 0.5)[1]   # noqa: E731
    from nps_pruning.core.prepared import prepare
    prep = prepare(v, None, keep=r, num_bands=M, scheme="focused", space="hybrid", seed=1)
    assert torch.equal(prep.bands.band_of, bands.band_of) and torch.equal(prep.index.perm, index.perm)
    scorer = CandidateScorer.from_state(None, prep, object(), flat, evaluator)
    space = make_space("hybrid", M, 0.0, 4.0, keep_ratio=r)
    points = [np.r_[np.ones(M), 0.0, 0.0, 0.0], np.r_[np.linspace(0.5, 2, M), 1.0, 0.5, -0.5],
              np.r_[np.zeros(M), 0.0, 1.0, 0.0]]
    for p in points:
        assert scorer(p)[0] == 0.5
    for p, got in zip(points, seen):
        assert torch.equal(got, build_point(space, v, bands, index, p, r, base=base))
    scorer.restore()
    assert torch.equal(flat.view(torch.int32), base.view(torch.int32))


def test_scorer_remembers_the_last_candidates_entries_within_its_budget(monkeypatch):
    """A raced candidate is written again at each stage: its entries come from the scorer's cache
    (prep.entries not called again), the model sees bit for bit what a fresh build writes, and
    the cache keeps only the most recent candidates within ENTRY_CACHE_BYTES."""
    from nps_pruning.core.prepared import prepare
    from nps_pruning.search import scorer as scorer_mod
    gen = torch.Generator().manual_seed(6)
    D, M, r = 4000, 4, 0.05
    v = torch.randn(D, generator=gen)
    base = torch.randn(D, generator=gen)
    prep = prepare(v, None, keep=r, num_bands=M, scheme="focused", space="hybrid", seed=1)
    points = [np.r_[np.ones(M), 0.0, 0.0, 0.0], np.r_[np.linspace(0.5, 2, M), 1.0, 0.5, -0.5],
              np.r_[np.full(M, 1.5), 0.5, 1.0, 0.0]]
    flat, seen, built = base.clone(), [], []
    real = prep.entries

    def counted(w):
        built.append(tuple(w))
        return real(w)
    monkeypatch.setattr(prep, "entries", counted)
    evaluator = lambda model: (seen.append(flat.clone()), 0.5)[1]   # noqa: E731
    fresh = []
    for p in points:                                   # what each candidate writes, built fresh
        idx, vals = real(p)
        want = base.clone()
        want[idx] += vals
        fresh.append(want)
    scorer = scorer_mod.CandidateScorer.from_state(None, prep, object(), flat, evaluator)
    order = [0, 1, 2, 1, 0, 2, 2]
    for i in order:
        scorer(points[i])
    assert len(built) == 3                             # each built once
    for i, got in zip(order, seen):
        assert torch.equal(got.view(torch.int32), fresh[i].view(torch.int32))
    scorer.restore()
    assert torch.equal(flat.view(torch.int32), base.view(torch.int32))
    # a budget of two candidates' entries: the least recently written one is built again
    k = int(prep.entries(points[0])[0].numel())
    monkeypatch.setattr(scorer_mod, "ENTRY_CACHE_BYTES", 2 * k * (8 + 4))
    small = scorer_mod.CandidateScorer.from_state(None, prep, object(), flat, evaluator)
    built.clear()
    for i in [0, 1, 2, 1, 0]:
        small(points[i])
    assert built == [tuple(points[i]) for i in (0, 1, 2, 0)]
    assert len(small._entry_cache) == 2
    small.restore()
    assert torch.equal(flat.view(torch.int32), base.view(torch.int32))


# -- the search follows the best start's family (SearchSettings.subspace) ------------------------
class _HybridQuad:
    """score of a hybrid point (w_1..w_4, g, α, h, β): a quadratic bowl whose top is where the
    start ``top`` says (``mag``: w = 1.3, g = 0.4, α = 0; ``dare``: α = 1, h = 0.3)."""

    def __init__(self, top):
        self.top = top

    def __call__(self, p):
        p = np.asarray(p, dtype=float)
        if self.top == "mag":
            s = -np.sum((p[:4] - 1.3) ** 2) - (p[4] - 0.4) ** 2 - 4 * p[5]
        else:
            s = -(1 - p[5]) * 3 - (p[6] - 0.3) ** 2
        return float(s), {"build_s": 0.0, "eval_s": 0.0}


def _hyb_search(top, subspace, seed=0):
    from nps_pruning.search import SearchSettings, run_search
    st = SearchSettings(generations=5, seed=seed, subspace=subspace)
    space = make_space("hybrid", 4, st.lower, st.upper, keep_ratio=0.05)
    return run_search(_HybridQuad(top), 4, st, space=space, progress=False)


def test_a_magnitude_start_adds_a_stream_with_the_random_share_held_at_zero():
    hyb = make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.05)
    pts = hyb.start_points()
    assert hyb.family_stream(pts[3]).tolist() == [True] * 5 + [False] * 3
    assert hyb.family_stream(pts[6]) is None                            # rank-weighted: one stream
    assert hyb.family_stream(pts[1]) is None                            # DARE: one stream
    assert hyb.family_stream(pts[2]) is None                            # half and half
    assert make_space("magnitude", 4, 0.0, 4.0).family_stream(np.ones(4)) is None
    fam = _hyb_search("mag", "family")
    assert fam.cma_free == [0, 1, 2, 3, 4] and fam.to_dict()["cma_free"] == [0, 1, 2, 3, 4]
    assert fam.settings["subspace"] == "family"
    # the population of the whole space (4 + floor(3 ln 8) = 10): 5 over the whole space, then 5
    # on the magnitude line, which hold alpha, h and beta at 0 and move the rest
    assert all(g["num_candidates"] == 10 for g in fam.generations[1:])
    for gen in range(1, 6):
        cands = [c for c in fam.candidates if c["gen"] == gen]
        line = cands[5:]
        assert len(line) == 5 and all(c["weights"][5] == 0.0 and c["weights"][6] == 0.0
                                      and c["weights"][7] == 0.0 for c in line)
        assert len({tuple(c["weights"][:5]) for c in line}) == 5        # the free ones move
    assert any(c["weights"][5] > 0 for c in fam.candidates if c["gen"] > 0 and c["idx"] < 5)
    # "full": one stream of 10 over the whole space (the search before this setting)
    full = _hyb_search("mag", "full")
    assert full.cma_free is None and "subspace" not in full.settings
    assert all(g["num_candidates"] == 10 for g in full.generations[1:])
    # same seed, same result
    assert [c["weights"] for c in _hyb_search("mag", "family").candidates] == \
        [c["weights"] for c in fam.candidates]


def test_a_dare_start_searches_the_whole_space_as_before():
    fam, full = _hyb_search("dare", "family"), _hyb_search("dare", "full")
    assert fam.cma_free is None
    assert [c["weights"] for c in fam.candidates] == [c["weights"] for c in full.candidates]


def test_unknown_subspace_is_refused():
    from nps_pruning.errors import NPSError
    from nps_pruning.search import SearchSettings
    with pytest.raises(NPSError, match="unknown subspace"):
        SearchSettings(subspace="half").validate()


def test_a_family_search_resumes_where_it_stopped(tmp_path):
    from nps_pruning.search import SearchSettings, run_search
    st = SearchSettings(generations=4, seed=2)
    log = tmp_path / "log.jsonl"
    space = make_space("hybrid", 4, st.lower, st.upper, keep_ratio=0.05)
    full = run_search(_HybridQuad("mag"), 4, st, space=space, log_path=log, progress=False)
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:20]))
    resumed = run_search(_HybridQuad("mag"), 4, st, space=space, log_path=log, resume=True,
                         progress=False)
    assert [c["weights"] for c in resumed.candidates] == [c["weights"] for c in full.candidates]
    assert resumed.reused == 19 and resumed.cma_free == full.cma_free == [0, 1, 2, 3, 4]


def test_full_is_one_plain_cma_es_from_the_best_start():
    from cmaes import CMA
    full = _hyb_search("mag", "full")
    st_space = make_space("hybrid", 4, 0.0, 4.0, keep_ratio=0.05)
    gen0 = [c for c in full.candidates if c["gen"] == 0]
    mean0 = st_space.mean0([c["score"] for c in gen0], [np.asarray(c["weights"]) for c in gen0])
    opt = CMA(mean=mean0, sigma=0.3, bounds=st_space.bounds(), seed=0,
              cov=np.diag(st_space.step_scales() ** 2))
    for gen in range(1, 6):
        cands = [c for c in full.candidates if c["gen"] == gen]
        xs = [opt.ask() for _ in range(opt.population_size)]
        assert [list(x) for x in xs] == [c["weights"] for c in cands]
        opt.tell([(x, -c["score"]) for x, c in zip(xs, cands)])
