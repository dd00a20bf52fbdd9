"""TSV-M, Iso-C and DELLA against closed forms worked out by hand on small matrices, and against
an independent reference (scipy's polar decomposition) where the hand form would be long."""
import numpy as np
import pytest
import scipy.linalg
import torch

from nps_pruning.core.merge import MERGERS, magprune, merge

# one 3x2 matrix then a bias of 3: D = 9
SHAPES = [(3, 2), (3,)]


def _flat(mat, bias):
    return torch.cat([torch.tensor(mat, dtype=torch.float64).reshape(-1),
                      torch.tensor(bias, dtype=torch.float64)])


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # A + B = [[3, 0], [0, 1], [0, 0]]: U Vᵀ = [[1, 0], [0, 1], [0, 0]], mean singular value 2
    taus = torch.stack([_flat([[2, 0], [0, 0], [0, 0]], [1, 2, 3]),
                        _flat([[1, 0], [0, 1], [0, 0]], [3, 0, -1])])
    got = MERGERS["iso-c"](taus, lam=0.5, shapes=SHAPES)
    want = 0.5 * _flat([[2, 0], [0, 2], [0, 0]], [2, 1, 1])     # λ·(σ̄ U Vᵀ, mean of the biases)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_tsv_m_with_orthogonal_task_subspaces_keeps_each_tasks_top_triplet():
    # N = 2, min(3, 2) // 2 = 1 triplet each: A's (3, e1, e1), B's (2, e2, e2); the stacked
    # singular vectors are already orthonormal, so the merge is e1·3·e1ᵀ + e2·2·e2ᵀ
    taus = torch.stack([_flat([[3, 0], [0, 1], [0, 0]], [1, 1, 1]),
                        _flat([[0, 0], [0, 2], [0, 0]], [0, 0, 4])])
    got = MERGERS["tsv-m"](taus, lam=1.0, shapes=SHAPES)
    want = _flat([[3, 0], [0, 2], [0, 0]], [0.5, 0.5, 2.5])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_tsv_m_decorrelates_overlapping_subspaces_like_a_polar_reference():
    g = np.random.default_rng(0)
    mats = [g.normal(size=(5, 4)) for _ in range(2)]
    taus = torch.stack([_flat(m, [0.0] * 5) for m in mats])
    got = MERGERS["tsv-m"](taus, lam=0.7, shapes=[(5, 4), (5,)])
    us, ss, vs = [], [], []
    for m in mats:                                      # k = 4 // 2 = 2 triplets per task
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :2]); ss.append(s[:2]); vs.append(vh[:2].T)
    u_perp = scipy.linalg.polar(np.hstack(us))[0]
    v_perp = scipy.linalg.polar(np.hstack(vs))[0]
    want = 0.7 * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T
    torch.testing.assert_close(got[:20].reshape(5, 4), torch.tensor(want), rtol=0, atol=1e-10)
    assert torch.equal(got[20:], torch.zeros(5, dtype=torch.float64))


def test_flatten_rule_conv_kernels_are_matrices_and_one_wide_tensors_are_averaged():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 3), (1, 6), (6, 1)]
    taus = torch.randn(3, 72 + 6 + 6, generator=g, dtype=torch.float64)
    got = MERGERS["iso-c"](taus, lam=1.0, shapes=shapes, matrices="flatten")
    total = taus[:, :72].sum(0).reshape(4, 18)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(got[:72], (s.mean() * u @ vh).reshape(-1))
    torch.testing.assert_close(got[72:], taus[:, 72:].mean(0))
    # TSV-M under this rule keeps at least one triplet of each task: 3 tasks, a 4x18 kernel
    tsv = MERGERS["tsv-m"](taus, lam=1.0, shapes=shapes, matrices="flatten")
    assert tsv[:72].abs().sum() > 0 and torch.equal(tsv[72:], taus[:, 72:].mean(0))


def test_published_rule_svd_merges_only_2d_tensors_with_each_methods_own_formula():
    """The default (both methods' published code): the 2-D tensors are the matrices, whatever
    their width; conv kernels and biases are averaged; a 1-wide matrix gets Iso-C's σ̄ U Vᵀ of the
    sum (the sum itself: one singular value) and TSV-M's ⌊1/N⌋ = 0 triplets (zero); a 3x2 matrix
    of 3 tasks keeps ⌊2/3⌋ = 0 triplets in TSV-M (zero), not one."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 3), (1, 6), (6, 1), (3, 2), (5,)]
    n = 72 + 6 + 6 + 6 + 5
    taus = torch.randn(3, n, generator=g, dtype=torch.float64)
    iso = MERGERS["iso-c"](taus, lam=1.0, shapes=shapes)
    assert torch.equal(iso, merge("iso-c", taus, lam=1.0, shapes=shapes, matrices="2d"))
    torch.testing.assert_close(iso[:72], taus[:, :72].mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso[72:84], taus[:, 72:84].sum(0), rtol=0, atol=1e-12)
    total = taus[:, 84:90].sum(0).reshape(3, 2)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(iso[84:90], (s.mean() * u @ vh).reshape(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso[90:], taus[:, 90:].mean(0), rtol=0, atol=1e-12)
    tsv = MERGERS["tsv-m"](taus, lam=1.0, shapes=shapes)
    torch.testing.assert_close(tsv[:72], taus[:, :72].mean(0), rtol=0, atol=1e-12)
    assert torch.equal(tsv[72:90], torch.zeros(18, dtype=torch.float64))
    torch.testing.assert_close(tsv[90:], taus[:, 90:].mean(0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="matrices must be one of 2d, flatten"):
        MERGERS["tsv-m"](taus, shapes=shapes, matrices="3d")


def test_svd_mergers_need_shapes_that_cover_the_vector():
    taus = torch.zeros(2, 9)
    with pytest.raises(ValueError, match="shapes"):
        MERGERS["tsv-m"](taus)
    with pytest.raises(ValueError, match="cover 6 entries"):
        MERGERS["iso-c"](taus, shapes=[(3, 2)])
    # merge() passes the shapes to the mergers that need them, and only to those
    taus = torch.randn(2, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(merge("iso-c", taus, lam=0.3, shapes=SHAPES),
                               MERGERS["iso-c"](taus, lam=0.3, shapes=SHAPES))
    assert torch.equal(merge("ties", taus, lam=0.3, keep_ratio=0.5, shapes=SHAPES),
                       MERGERS["ties"](taus, lam=0.3, keep_ratio=0.5))


def test_magprune_keeps_large_entries_more_often_and_is_unbiased():
    g = torch.Generator().manual_seed(3)
    d = 200_000
    row = torch.randn(1, d, generator=g, dtype=torch.float64)
    out = magprune(row, 0.3, seed=0, epsilon=0.2)
    order = torch.argsort(row[0].abs())
    kept = (out[0] != 0).double()
    low, high = kept[order[: d // 10]].mean().item(), kept[order[-d // 10:]].mean().item()
    # keep probability runs linearly from r − ε/2 = 0.2 (smallest) to r + ε/2 = 0.4 (largest)
    assert abs(low - 0.21) < 0.01 and abs(high - 0.39) < 0.01
    assert abs(kept.mean().item() - 0.3) < 0.005
    # kept entries are rescaled by 1/(keep probability): E[out] = τ; check one exact value
    j = int(order[-1])
    if out[0, j] != 0:
        torch.testing.assert_close(out[0, j], row[0, j] / 0.4)
    mean = torch.stack([magprune(row[:, :2000], 0.3, seed=s) for s in range(400)]).mean(0)
    assert (mean - row[:, :2000]).abs().mean() < 0.05 * row[:, :2000].abs().mean() + 0.02


def test_della_is_seeded_and_at_full_keep_is_ties_without_trim():
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(3, 500, generator=g)
    a = MERGERS["della"](taus, lam=1.2, keep_ratio=0.2, seed=4)
    assert torch.equal(a, MERGERS["della"](taus, lam=1.2, keep_ratio=0.2, seed=4))
    assert not torch.equal(a, MERGERS["della"](taus, lam=1.2, keep_ratio=0.2, seed=5))
    torch.testing.assert_close(MERGERS["della"](taus, lam=0.5, keep_ratio=1.0),
                               MERGERS["dare-ties"](taus, lam=0.5, keep_ratio=1.0))
    with pytest.raises(ValueError, match="keep_ratio"):
        magprune(taus, 0.0)
