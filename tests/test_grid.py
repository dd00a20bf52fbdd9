"""The one λ-grid search (search/grid.py) and its call sites in apps/merge.py and apps/transfer.py:
plain functions and stub sessions only (no models)."""
import math

import pytest
import torch

from nps_pruning.apps.settings import MergeSettings
from nps_pruning.errors import NPSError
from nps_pruning.search import GridChoice, grid_search


def test_best_value_and_every_score_in_grid_order():
    choice = grid_search([0.5, 1.0, 1.5], lambda lam: -(lam - 1.1) ** 2)
    assert isinstance(choice, GridChoice)
    assert (choice.value, choice.index) == (1.0, 1)
    assert choice.score == pytest.approx(-0.01)
    assert choice.scores == pytest.approx([-0.36, -0.01, -0.16])
    assert choice.extra is None


def test_ties_go_to_the_first_value_in_grid_order():
    assert grid_search([3.0, 1.0, 2.0], lambda lam: 7).value == 3.0
    choice = grid_search([0.2, 0.4, 0.6, 0.8], lambda lam: {0.2: 1, 0.4: 5, 0.6: 5, 0.8: 2}[lam])
    assert (choice.value, choice.index) == (0.4, 1)
    # duplicates are scored (and reported) once per occurrence; the first one wins
    choice = grid_search([1.0, 1.0], lambda lam: 1.0)
    assert choice.index == 0 and choice.scores == [1.0, 1.0]


def test_the_best_values_extra_is_kept_and_only_it():
    seen = []

    def score(lam):
        extra = object()
        seen.append(extra)
        return {1: 0.1, 2: 0.9, 3: 0.5}[lam], extra

    choice = grid_search([1, 2, 3], score)
    assert choice.value == 2 and choice.extra is seen[1]
    assert choice.scores == [0.1, 0.9, 0.5]


def test_nan_scores_never_win_over_a_number():
    # a NaN never replaces an earlier best ...
    nan_later = {1: 0.3, 2: math.nan, 3: 0.2}
    assert grid_search([1, 2, 3], nan_later.get).value == 1
    # ... and a NaN at the front is replaced by the first number (max() would keep the NaN)
    nan_first = {1: math.nan, 2: 0.9, 3: 0.5}
    choice = grid_search([1, 2, 3], nan_first.get)
    assert choice.value == 2 and choice.score == 0.9
    assert math.isnan(choice.scores[0]) and choice.scores[1:] == [0.9, 0.5]
    # all NaN: the first value
    all_nan = grid_search([1, 2], lambda v: math.nan)
    assert all_nan.value == 1 and math.isnan(all_nan.score)


def test_a_failing_score_stops_the_search():
    calls = []

    def score(lam):
        calls.append(lam)
        if lam == 2:
            raise RuntimeError("evaluator crashed")
        return 1.0

    with pytest.raises(RuntimeError, match="evaluator crashed"):
        grid_search([1, 2, 3], score)
    assert calls == [1, 2]


def test_empty_grid_is_a_clear_error():
    with pytest.raises(NPSError, match=r"^lambda_grid: the grid is empty; give at least one value"):
        grid_search([], lambda lam: 1.0, what="lambda_grid")
    with pytest.raises(NPSError, match="grid is empty"):
        grid_search(iter(()), lambda lam: 1.0)


# --- the call sites ---------------------------------------------------------------------------
class _Session:
    """Scores θ_pre + scale·τ by a fixed function of (scale · τ[0]); the model is the last θ."""

    def __init__(self, fn):
        self.fn, self.model = fn, None

    def score(self, evaluator, tau, scale=1.0):
        self.model = float(scale * tau[0])
        return float(self.fn(self.model))


def test_merge_with_lambda_grid_keeps_the_first_best_and_its_merged_tau(monkeypatch):
    from nps_pruning.apps import merge as merge_mod
    from nps_pruning.core import merge as core_merge
    built = []

    def toy_merger(taus, lam, keep_ratio, seed):
        built.append(lam)
        return lam * taus.sum(0)

    monkeypatch.setitem(core_merge.MERGERS, "toy", toy_merger)
    taus = torch.tensor([[1.0], [1.0]])                      # merged τ[0] = 2λ
    sessions = [_Session(lambda x: -abs(x - 2.0)), _Session(lambda x: -abs(x - 2.0))]
    settings = MergeSettings(lambda_grid=[0.5, 1.5, 0.5, 1.0], keep_ratio=1.0, seed=0)
    # 2λ = 1 and 3 are equally far from 2: λ = 0.5 (the first) wins over λ = 1.5; λ = 1 is exact
    merged, lam, grid = merge_mod.merge_with_lambda_grid("toy", taus, sessions, [None, None],
                                                         settings=settings)
    assert lam == 1.0 and float(merged[0]) == 2.0 and built == [0.5, 1.5, 0.5, 1.0]
    assert grid == [{"lambda": 0.5, "score": -1.0}, {"lambda": 1.5, "score": -1.0},
                    {"lambda": 0.5, "score": -1.0}, {"lambda": 1.0, "score": 0.0}]
    settings = settings.replace(lambda_grid=[1.5, 0.5])
    merged, lam, grid = merge_mod.merge_with_lambda_grid("toy", taus, sessions, [None, None],
                                                         settings=settings)
    assert lam == 1.5 and float(merged[0]) == 3.0


def test_merge_with_lambda_grid_merges_once_when_the_merger_scales_with_lambda(monkeypatch):
    """A merger that says it scales with λ is built once, at λ = 1; the grid's scores, the λ
    chosen and the merged τ are those of building it at every λ."""
    from nps_pruning.apps import merge as merge_mod
    from nps_pruning.core import merge as core_merge
    built = []

    def toy_merger(taus, lam, keep_ratio, seed):
        built.append(lam)
        return lam * taus.sum(0)
    toy_merger.scales_with_lambda = True

    monkeypatch.setitem(core_merge.MERGERS, "toy", toy_merger)
    taus = torch.tensor([[1.0], [1.0]])
    sessions = [_Session(lambda x: -abs(x - 2.0)), _Session(lambda x: -abs(x - 2.0))]
    settings = MergeSettings(lambda_grid=[0.5, 1.5, 0.5, 1.0], keep_ratio=1.0, seed=0)
    merged, lam, grid = merge_mod.merge_with_lambda_grid("toy", taus, sessions, [None, None],
                                                         settings=settings)
    assert built == [1.0] and lam == 1.0 and float(merged[0]) == 2.0
    assert grid == [{"lambda": 0.5, "score": -1.0}, {"lambda": 1.5, "score": -1.0},
                    {"lambda": 0.5, "score": -1.0}, {"lambda": 1.0, "score": 0.0}]


def test_nps_merge_lambdas_grid_picks_the_first_best_common_lambda():
    from nps_pruning.apps.merge import nps_merge_lambdas
    pruned = torch.tensor([[1.0], [1.0]])
    sessions = [_Session(lambda x: -abs(x - 1.0)), _Session(lambda x: -abs(x - 1.0))]
    settings = MergeSettings(lambda_grid=[2.0, 0.5, 1.5, 1.0], normalize="none", lambda_generations=0)
    lambdas, grid, result = nps_merge_lambdas(sessions, [None, None], pruned, settings=settings,
                                              progress=False)
    # the "none" normalization sums λ·τ̂_i: merged τ[0] = 2λ; 0.5 is exact
    assert lambdas == [0.5, 0.5] and result is None
    assert [g["lambda"] for g in grid] == [2.0, 0.5, 1.5, 1.0]
    assert [g["score"] for g in grid] == [-3.0, 0.0, -2.0, -1.0]


def test_transfer_choose_lambda_ties_go_to_the_smaller_lambda():
    from nps_pruning.apps.transfer import choose_lambda, h_score
    session = _Session(lambda x: 0.5)                        # source score: constant
    # target: equal for λ = 0.4 and λ = 1.2 (given out of order), lower elsewhere
    target = lambda model: {0.4: 0.8, 0.8: 0.1, 1.2: 0.8}[round(model, 6)]
    choice = choose_lambda(session, torch.tensor([1.0]), None, target, [1.2, 0.8, 0.4])
    assert [g["lambda"] for g in choice["grid"]] == [0.4, 0.8, 1.2]
    assert choice["best"] is choice["grid"][0]
    assert choice["best"] == {"lambda": 0.4, "source": 0.5, "target": 0.8, "h_score": h_score(0.5, 0.8)}
