"""Masks that do not collide (core.collide), their use by the mergers, and the merge-aware
search's joint space (core.joint_space.JointSpace): closed forms on small tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nps_pruning.core.collide import allot, layer_trim, sequential_trim
from nps_pruning.core.merge import merge, nps_combine
from nps_pruning.core.joint_space import JointSpace, to_search
from nps_pruning.core.space import make_space

T = torch.tensor([[3.0, 0.0, -2.0, 1.0, 0.0, 0.5],
                  [-4.0, 1.0, 2.0, 0.0, 0.0, -0.5],
                  [1.0, -2.0, 0.0, 0.0, 7.0, 0.5]])


def test_allot_magnitude_keeps_the_largest_and_breaks_ties_to_the_lower_row():
    got = allot(T, "magnitude")
    want = torch.tensor([[0.0, 0.0, -2.0, 1.0, 0.0, 0.5],
                         [-4.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, -2.0, 0.0, 0.0, 7.0, 0.0]])
    assert torch.equal(got, want)
    assert int(((got != 0).sum(dim=0) > 1).sum()) == 0


def test_allot_order_keeps_the_first_nonzero_row():
    want = torch.tensor([[3.0, 0.0, -2.0, 1.0, 0.0, 0.5],
                         [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 7.0, 0.0]])
    assert torch.equal(allot(T, "order"), want)
    assert allot(T, "allow") is T


def test_allot_refuses_an_unknown_rule_and_bad_input():
    with pytest.raises(ValueError, match="collide rule"):
        allot(T, "random")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        allot(T[0], "magnitude")


def test_sequential_trim_gives_each_task_k_free_entries():
    taus = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5],
                         [5.0, -4.0, 0.1, 2.5, 0.2, 0.3],
                         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = sequential_trim(taus, 2 / 6)            # k = 2
    want = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 2.5, 0.0, 0.3],   # 5 and -4 are taken; next 2.5, 0.3
                         [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]])  # ties by index among free 2, 4
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="exceed"):
        sequential_trim(taus, 0.5)                 # 3 × 3 > 6


def test_layer_trim_keeps_each_tensors_own_top_k():
    taus = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4]])
    got = layer_trim(taus, 0.5, [(2, 2), (4,)])
    assert torch.equal(got, torch.tensor([[9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.4]]))
    # a global top-4 would have kept only the first tensor
    with pytest.raises(ValueError, match="cover"):
        layer_trim(taus, 0.5, [(2, 2)])
    with pytest.raises(ValueError, match="shapes"):
        layer_trim(taus, 0.5, None)


def test_ties_with_collide_is_the_disjoint_sum_by_hand():
    lam = 0.5
    trimmed = torch.tensor([[3.0, 0.0, -2.0, 0.0, 0.0, 0.0],   # TIES trim at r = 1/3: top 2
                            [-4.0, 0.0, 2.0, 0.0, 0.0, 0.0],
                            [0.0, -2.0, 0.0, 0.0, 7.0, 0.0]])
    alloted = allot(trimmed, "magnitude")       # one task per entry: sign election is moot
    got = merge("ties", T, lam=lam, keep_ratio=2 / 6, collide="magnitude")
    torch.testing.assert_close(got, lam * alloted.sum(dim=0), rtol=0, atol=0)
    assert torch.equal(got, lam * torch.tensor([-4.0, -2.0, -2.0, 0.0, 7.0, 0.0]))
    # and without it, plain TIES (the entry 0 conflict: elected −, mean of −4 alone)
    plain = merge("ties", T, lam=1.0, keep_ratio=2 / 6)
    assert torch.equal(plain, torch.tensor([-4.0, -2.0, 0.0, 0.0, 7.0, 0.0]))


def test_ties_layer_and_sequential_trims():
    shapes = [(3,), (3,)]
    got = merge("ties", T, lam=1.0, keep_ratio=1 / 3, trim="layer", shapes=shapes)
    trimmed = layer_trim(T, 1 / 3, shapes)
    assert torch.equal(trimmed, torch.tensor([[3.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                                              [-4.0, 0.0, 0.0, 0.0, 0.0, -0.5],
                                              [0.0, -2.0, 0.0, 0.0, 7.0, 0.0]]))
    # entry 0: 3 and −4 sum to −1, elected −, mean −4; entry 3: 1; entry 5: −0.5
    assert torch.equal(got, torch.tensor([-4.0, -2.0, 0.0, 1.0, 7.0, -0.5]))
    seq = merge("ties", T, lam=1.0, keep_ratio=1 / 3, trim="sequential")
    assert torch.equal(seq, sequential_trim(T, 1 / 3).sum(dim=0))


def test_merge_refuses_options_a_merger_does_not_take():
    with pytest.raises(ValueError, match="keeps every entry"):
        merge("task-arithmetic", T, collide="magnitude")
    with pytest.raises(ValueError, match="trim layer applies to method ties only"):
        merge("dare-ties", T, trim="layer")
    # one rule for the library and the CLI, which names its flags
    from nps_pruning.core.merge import option_problem
    assert option_problem("ties", "order", "layer") is None and option_problem("nps", "magnitude") is None
    assert option_problem("average", "order", flag=lambda n: f"--{n}").startswith(
        "--collide order: --method average keeps every entry")
    for method in ("dare-linear", "dare-ties", "della"):   # they take collide
        out = merge(method, T, keep_ratio=0.5, seed=1, collide="order")
        assert out.shape == (6,)


def test_dare_linear_collide_is_allot_of_the_dropped_rows():
    from nps_pruning.core.merge import dare_drop
    got = merge("dare-linear", T, lam=0.3, keep_ratio=0.5, seed=4, collide="magnitude")
    want = 0.3 * allot(dare_drop(T, 0.5, 4), "magnitude").sum(dim=0)
    assert torch.equal(got, want)


def test_nps_combine_with_collide():
    lam = [1.0, 2.0, 0.5]
    got = nps_combine(T, lam, "mask-count", collide="magnitude")
    a = allot(T, "magnitude")
    want = (torch.tensor(lam)[:, None] * a).sum(dim=0)     # one task per entry: count is 1
    assert torch.equal(got, want)


def test_joint_space_round_trips_and_starts_at_the_two_stage_point():
    lin = make_space("magnitude", 2, 0.0, 4.0, "linear", keep_ratio=0.1)
    hyb = make_space("hybrid", 2, 0.25, 8.0, "log", keep_ratio=0.1)
    p_lin = np.array([1.5, 0.5])
    p_hyb = np.array([2.0, 0.5, 1.0, 0.25, -0.5, 1.5])   # w = (2, 0.5), g, α, h, β
    np.testing.assert_allclose(hyb.to_params(to_search(hyb, p_hyb)), p_hyb, rtol=0, atol=1e-12)
    space = JointSpace([lin, hyb], [p_lin, p_hyb], [1.2, 0.8])
    assert space.dim == 2 + 6 + 2 and space.bounds().shape == (10, 2)
    x0 = space.start_points()[0]
    np.testing.assert_array_equal(space.mean0([None]), x0)
    params = space.to_params(x0)
    (a, b), lambdas = space.unpack(params)
    np.testing.assert_allclose(a, p_lin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, p_hyb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lambdas, [1.2, 0.8], rtol=0, atol=1e-12)
    # a λ coordinate u gives λ0 · 2^u
    x = x0.copy()
    x[-1] = 1.0
    np.testing.assert_allclose(space.unpack(space.to_params(x))[1], [1.2, 1.6], rtol=0, atol=1e-12)
    assert space.describe(params)["lambdas"] == pytest.approx([1.2, 0.8])
    with pytest.raises(ValueError, match="one space"):
        JointSpace([lin], [p_lin, p_hyb], [1.0])


def test_joint_space_reads_an_old_hybrid_point_without_beta_as_beta_zero():
    hyb = make_space("hybrid", 2, 0.25, 8.0, "log", keep_ratio=0.1)
    old = np.array([2.0, 0.5, 1.0, 0.25, -0.5])              # M + 3 entries: a report before β
    space = JointSpace([hyb], [old], [1.0])
    (b,), _ = space.unpack(space.to_params(space.start_points()[0]))
    np.testing.assert_allclose(b, [2.0, 0.5, 1.0, 0.25, -0.5, 0.0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="hybrid point has"):
        JointSpace([hyb], [old[:4]], [1.0])
