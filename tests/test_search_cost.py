"""Cheaper searches (issue 16): --patience, --race halving, row scoring by the evaluators, and
the processes executor's split of threads. Synthetic scorers first; the tiny text model last."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nps_pruning.apps.settings import PruneSettings
from nps_pruning.errors import NPSError
from nps_pruning.core.space import make_space
from nps_pruning.search import SearchSettings, make_executor, run_search
from nps_pruning.search.executors import threads_per_worker
from nps_pruning.search.race import race_order, race_schedule, survivors, told_scores

TARGET = np.array([1.6, 0.3, 1.2, 0.7])


def _settings(**kw):
    base = dict(generations=8, seed=3, popsize=8, upper=2.0, space="magnitude")
    base.update(kw)
    return SearchSettings(**base)


def _key(cands):
    return [(c["gen"], c["idx"], tuple(c["weights"]), c["score"], c["status"],
             c.get("partial_score"), c.get("rows_scored"), c.get("eliminated_at"),
             c.get("examples")) for c in cands]


class PerRow:
    """A synthetic calibration set of ``rows`` rows: row r of candidate w has the value
    −||w − target||² + e_r + noise·h_r(w), with e_r a per-row offset common to every candidate and
    h_r(w) a candidate's own seeded noise (mean ~0). Its full score is the mean over all rows."""

    def __init__(self, rows: int = 96, noise: float = 0.5, spread: float = 1.0):
        self.rows, self.noise = rows, noise
        self.offsets = np.random.default_rng(7).normal(0.0, spread, rows)
        self.full_calls = self.row_calls = 0

    def values(self, w) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        seed = int.from_bytes(hashlib.sha256(w.tobytes()).digest()[:8], "little")
        h = np.random.default_rng(seed).normal(0.0, 1.0, self.rows)
        return -float(np.sum((w - TARGET) ** 2)) + self.offsets + self.noise * h

    def __call__(self, w):
        self.full_calls += 1
        return float(np.mean(self.values(w))), {"build_s": 0.0, "eval_s": 0.0,
                                                "examples": self.rows}

    def score_rows(self, w, rows):
        self.row_calls += 1
        rows = np.asarray(rows)
        return self.values(w)[rows], {"build_s": 0.0, "eval_s": 0.0, "examples": len(rows)}

    @property
    def num_rows(self):
        return self.rows


def _examples(result) -> int:
    return sum(int(c.get("examples") or 0) for c in result.candidates)


# -- patience ------------------------------------------------------------------------------------
def _expected_stop(cands, generations, patience):
    """Where a run with ``patience`` stops, read from an uninterrupted run's candidates."""
    best, best_gen = -math.inf, None
    for g in range(generations + 1):
        for c in cands:
            if c["gen"] == g and c["status"] == "ok" and c["score"] > best:
                best, best_gen = c["score"], g
        if g >= 1 and g - best_gen >= patience:
            return g, best_gen
    return None, best_gen


def test_patience_stops_where_the_full_run_says_and_is_its_prefix(tmp_path):
    scorer = PerRow(noise=0.0)
    full = run_search(scorer, 4, _settings(generations=40), progress=False)
    stop, best_gen = _expected_stop(full.candidates, 40, 3)
    assert stop is not None and stop < 40
    r = run_search(PerRow(noise=0.0), 4, _settings(generations=40, patience=3),
                   log_path=tmp_path / "p.jsonl", progress=False)
    assert r.stopped_at == stop and r.stopped_early.startswith("patience")
    assert f"generation {best_gen}" in r.stopped_early
    assert _key(r.candidates) == _key([c for c in full.candidates if c["gen"] <= stop])
    assert r.best_score == max(c["score"] for c in r.candidates if c["status"] == "ok")
    assert r.to_dict()["stopped_at"] == stop and len(r.generations) == stop + 1
    # resume-safe: a resumed run (whole log, or a log cut in the middle) stops at the same place
    again = PerRow(noise=0.0)
    r2 = run_search(again, 4, _settings(generations=40, patience=3), log_path=tmp_path / "p.jsonl",
                    resume=True, progress=False)
    assert again.full_calls == 0 and r2.stopped_at == stop and _key(r2.candidates) == _key(r.candidates)
    lines = (tmp_path / "p.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "p.jsonl").write_text("".join(lines[: len(lines) // 2]))
    r3 = run_search(PerRow(noise=0.0), 4, _settings(generations=40, patience=3),
                    log_path=tmp_path / "p.jsonl", resume=True, progress=False)
    assert r3.stopped_at == stop and _key(r3.candidates) == _key(r.candidates)


def test_patience_on_a_flat_score_stops_after_n_generations():
    r = run_search(lambda w: 0.25, 3, _settings(generations=20, patience=2), progress=False)
    assert r.stopped_at == 2 and r.best_score == 0.25 and r.candidates[0]["gen"] == 0
    assert max(c["gen"] for c in r.candidates) == 2


def _expected_gain_stop(cands, generations, patience, min_gain, min_generations):
    """Where a run with --min-gain/--min-generations stops, read from an uninterrupted run: the
    counted gains are the generations after which the best exceeds the last counted best by
    more than min_gain (generation 0's best counted first)."""
    best = max(c["score"] for c in cands if c["gen"] == 0 and c["status"] == "ok")
    ref, last = best, 0
    for g in range(1, generations + 1):
        best = max([best] + [c["score"] for c in cands if c["gen"] == g and c["status"] == "ok"])
        if best > ref + min_gain:
            ref, last = best, g
        if min_generations <= g < generations and g - last >= patience:
            return g, last
    return None, last


@pytest.mark.parametrize("min_gain,min_generations", [(0.05, 0), (0.5, 0), (0.05, 9), (0.0, 0)])
def test_patience_with_min_gain_and_floor_stops_where_the_full_run_says(tmp_path, min_gain,
                                                                         min_generations):
    full = run_search(PerRow(noise=0.0), 4, _settings(generations=40), progress=False)
    stop, last = _expected_gain_stop(full.candidates, 40, 3, min_gain, min_generations)
    assert stop is not None and stop >= min_generations
    st = _settings(generations=40, patience=3, min_gain=min_gain, min_generations=min_generations)
    r = run_search(PerRow(noise=0.0), 4, st, log_path=tmp_path / "g.jsonl", progress=False)
    assert r.stopped_at == stop and f"generation {last}" in r.stopped_early
    assert _key(r.candidates) == _key([c for c in full.candidates if c["gen"] <= stop])
    assert r.settings["min_gain"] == min_gain
    # min_gain = 0 counts every strict gain: the plain --patience stop
    if min_gain == 0.0 and min_generations == 0:
        assert stop == _expected_stop(full.candidates, 40, 3)[0]
    # resume-safe: a log cut in the middle stops at the same place
    lines = (tmp_path / "g.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "g.jsonl").write_text("".join(lines[: len(lines) // 2]))
    r2 = run_search(PerRow(noise=0.0), 4, st, log_path=tmp_path / "g.jsonl", resume=True,
                    progress=False)
    assert r2.stopped_at == stop and _key(r2.candidates) == _key(r.candidates)


def test_min_gain_runs_longer_than_plain_patience_only_while_gains_are_large():
    # a larger threshold counts fewer gains: the run stops no later than with a smaller one
    full = run_search(PerRow(noise=0.0), 4, _settings(generations=40), progress=False)
    stops = [_expected_gain_stop(full.candidates, 40, 3, g, 0)[0] for g in (0.0, 0.05, 0.5, 5.0)]
    assert stops == sorted(stops, reverse=True) and stops[-1] == 3 and stops[0] > stops[-1]
    # the floor: a flat score runs min_generations, not patience, generations
    r = run_search(lambda w: 0.25, 3, _settings(generations=20, patience=2, min_gain=0.01,
                                                 min_generations=7), progress=False)
    assert r.stopped_at == 7 and max(c["gen"] for c in r.candidates) == 7


def test_off_settings_leave_header_and_result_as_before(tmp_path):
    r = run_search(PerRow(), 4, _settings(generations=3), log_path=tmp_path / "a.jsonl",
                   progress=False)
    header = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    for key in ("patience", "race", "race_min_rows", "race_eta", "race_z", "min_gain",
                "min_generations"):
        assert key not in header["settings"] and key not in r.settings
    assert "stopped_at" not in r.to_dict() and r.stopped_early is None
    assert all(set(c) <= {"gen", "idx", "weights", "score", "status", "error", "build_s",
                          "eval_s", "examples", "start"} for c in r.candidates)
    assert all("eliminated" not in g for g in r.generations)


@pytest.mark.parametrize("bad", [dict(patience=0), dict(race="quarters"), dict(race_eta=1.0),
                                 dict(race_min_rows=1), dict(race_z=-1.0), dict(min_gain=-0.1),
                                 dict(min_gain=float("nan")), dict(min_generations=-1)])
def test_bad_cost_settings_are_refused(bad):
    with pytest.raises(NPSError):
        _settings(**bad).validate()


# -- racing --------------------------------------------------------------------------------------
def test_race_schedule_order_and_rule():
    assert race_schedule(96, 16, 3.0) == [16, 48]
    assert race_schedule(128, 16, 2.0) == [16, 32, 64]
    assert race_schedule(16, 16, 3.0) == [] and race_schedule(10, 16, 3.0) == []
    a = race_order(3, 5, 50)
    assert sorted(a.tolist()) == list(range(50)) and np.array_equal(a, race_order(3, 5, 50))
    assert not np.array_equal(a, race_order(3, 6, 50))
    # top 1/eta kept; a close second kept by the paired bound; a clearly worse one dropped
    base = np.linspace(-1, 1, 20)
    vals = {0: base + 1.0, 1: base + 0.999 + 0.01 * np.sin(np.arange(20)), 2: base + 0.2,
            3: base, 4: base - 0.5}
    assert survivors(vals, eta=5.0, z=2.0) == [0, 1]
    assert survivors(vals, eta=5.0, z=0.0) == [0]
    assert survivors(vals, eta=2.0, z=0.0) == [0, 1, 2]
    # told values: finalists their score; eliminated below everyone who outlasted them
    recs = [{"status": "ok", "score": 0.5}, {"status": "eliminated", "partial_score": 0.9,
                                             "eliminated_at": 48},
            {"status": "eliminated", "partial_score": 0.1, "eliminated_at": 16},
            {"status": "eliminated", "partial_score": 0.7, "eliminated_at": 16},
            {"status": "failed", "score": None}]
    assert told_scores(recs, -5.0) == [0.5, 0.5, 0.1, 0.5, -5.0]


def test_race_keeps_the_true_best_and_scores_fewer_rows():
    settings = dict(generations=10, popsize=10)
    # racing (z = 2) scores at least a fifth fewer rows, summed over five seeds: for one seed the
    # saving depends on the CMA-ES trajectory (0.75-0.83 of the rows over seeds 3-7 with cmaes 0.13)
    full_rows = raced_rows = 0
    for seed in (3, 4, 5, 6, 7):
        full_rows += _examples(run_search(PerRow(), 4, _settings(seed=seed, **settings), progress=False))
        r = run_search(PerRow(), 4, _settings(seed=seed, race="halving", **settings), progress=False)
        raced_rows += _examples(r)
        assert _examples(r) < 0.9 * 96 * len(r.candidates)
    assert raced_rows < 0.8 * full_rows
    scorer = PerRow()
    raced = run_search(scorer, 4, _settings(race="halving", **settings), progress=False)
    # with z = 0 only the top 1/eta go on: exactly 10·16 + 4·32 rows, then 2 finalists · 96 rows
    # (a finalist is re-scored on every row by the ordinary full call), per generation
    tight = run_search(PerRow(), 4, _settings(race="halving", race_z=0.0, **settings),
                       progress=False)
    assert _examples(tight) == 96 + 10 * (10 * 16 + 4 * 32 + 2 * 96)
    assert raced.generations[1]["eliminated"] > 0
    oracle = PerRow()
    for g in range(1, 11):
        recs = [c for c in raced.candidates if c["gen"] == g]
        true = [oracle(c["weights"])[0] for c in recs]          # every candidate's full score
        best = int(np.argmax(true))
        assert recs[best]["status"] == "ok" and recs[best]["score"] == true[best]
        for c in recs:
            assert c["rows_scored"] == (96 if c["status"] == "ok" else c["eliminated_at"])
            if c["status"] == "eliminated":
                assert c["score"] is None and c["eliminated_at"] in (16, 48)
                assert c["partial_score"] == pytest.approx(
                    np.mean(oracle.values(c["weights"])[race_order(3, g, 96)[:c["rows_scored"]]]))
    # the reported best is a full-calibration score, and the best of the finalists
    ok = [c for c in raced.candidates if c["status"] == "ok"]
    assert raced.best_score == max(c["score"] for c in ok) == oracle(raced.best_weights)[0]
    assert sum(1 for c in raced.candidates if c["status"] == "failed") == 0
    assert raced.generations[1]["examples"] == sum(
        c["examples"] for c in raced.candidates if c["gen"] == 1)


def test_race_same_seed_same_result_and_resume(tmp_path):
    s = _settings(generations=6, race="halving", race_min_rows=8, race_eta=2.0)
    a = run_search(PerRow(), 4, s, log_path=tmp_path / "a.jsonl", progress=False)
    b = run_search(PerRow(), 4, s, progress=False)
    assert _key(a.candidates) == _key(b.candidates) and list(a.best_weights) == list(b.best_weights)
    c = run_search(PerRow(), 4, _settings(generations=6, race="halving", race_min_rows=8,
                                          race_eta=2.0, seed=4), progress=False)
    assert _key(c.candidates) != _key(a.candidates)
    # resume from a log cut inside a generation: that generation is raced again, same result
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    whole = 1 + sum(1 for c in a.candidates if c["gen"] <= 2)
    (tmp_path / "a.jsonl").write_text("".join(lines[:whole + 3]))   # gens 0-2, 3 records of gen 3
    again = PerRow()
    r = run_search(again, 4, s, log_path=tmp_path / "a.jsonl", resume=True, progress=False)
    assert _key(r.candidates) == _key(a.candidates) and r.best_score == a.best_score
    assert r.reused == whole - 1 and again.full_calls > 0
    idle = PerRow()
    r2 = run_search(idle, 4, s, log_path=tmp_path / "a.jsonl", resume=True, progress=False)
    assert idle.full_calls == idle.row_calls == 0 and _key(r2.candidates) == _key(a.candidates)


def test_race_without_stages_is_the_plain_search():
    plain = run_search(PerRow(rows=12), 4, _settings(generations=4), progress=False)
    raced = run_search(PerRow(rows=12), 4, _settings(generations=4, race="halving"),
                       progress=False)
    assert [c["score"] for c in raced.candidates] == [c["score"] for c in plain.candidates]
    assert [c["weights"] for c in raced.candidates] == [c["weights"] for c in plain.candidates]


def test_race_needs_a_row_scorer():
    with pytest.raises(NPSError, match="scores rows"):
        run_search(lambda w: 0.0, 2, _settings(race="halving"), progress=False)


def test_race_with_the_processes_executor_matches_serial():
    s = _settings(generations=3, race="halving", race_min_rows=8)
    serial = run_search(PerRow(), 4, s, progress=False)
    ex = make_executor("processes", workers=2)
    try:
        par = run_search(PerRow(), 4, s, executor=ex, progress=False)
    finally:
        ex.close()
    assert _key(par.candidates) == _key(serial.candidates)


def test_processes_executor_splits_the_cores():
    assert threads_per_worker(4, cores=16) == 4
    assert threads_per_worker(3, cores=16) == 5
    assert threads_per_worker(32, cores=16) == 1
    ex = make_executor("processes", workers=2)
    try:
        assert ex.threads == threads_per_worker(2)
        out = ex.map(_torch_threads, [np.zeros(1), np.zeros(1)])
    finally:
        ex.close()
    assert [o[0] for o in out] == [ex.threads, ex.threads]


def _torch_threads(w):
    return float(torch.get_num_threads())


# -- evaluators score rows ----------------------------------------------------------------------
@pytest.mark.parametrize("fitness", ["accuracy", "loglik", "agreement"])
def test_text_evaluator_rows_equal_the_full_score(tiny_bert, text_csv, fitness):
    from nps_pruning.evaluation import load_model, make_evaluator
    _, ft = tiny_bert
    model = load_model(ft)
    ev = make_evaluator(f"text-classification:{text_csv}", model_path=ft, fitness=fitness,
                        batch_size=8)
    if fitness == "agreement":
        ev.set_reference(model)
    with torch.no_grad():
        for p in model.bert.encoder.parameters():
            p.mul_(1.3)
    full = ev(model)
    score, values = ev.score_rows(model)
    perm = np.random.default_rng(0).permutation(ev.num_rows)
    score_p, values_p = ev.score_rows(model, perm)
    assert score == full and score_p == full                      # bit for bit
    assert np.array_equal(values_p, values[perm]) and len(values) == ev.num_rows
    from nps_pruning.evaluation.fitness import score_from_rows
    assert score_from_rows(fitness, values) == pytest.approx(full, rel=1e-6, abs=1e-7)
    part = perm[:13]
    score_s, values_s = ev.score_rows(model, part)
    np.testing.assert_allclose(values_s, values[part], rtol=1e-5, atol=1e-6)
    assert score_s == pytest.approx(score_from_rows(fitness, values_s), rel=1e-6, abs=1e-7)
    with pytest.raises(NPSError, match="repeat"):
        ev.score_rows(model, [0, 0])


def test_image_evaluator_rows_equal_the_full_score(tmp_path):
    from nps_pruning.evaluation import make_evaluator
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=g.integers(0, 255, (30, 1, 4, 4), dtype=np.uint8),
             labels=g.integers(0, 3, 30))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    for fitness in ("accuracy", "loglik"):
        ev = make_evaluator(f"image-classification:{tmp_path / 'd.npz'}", fitness=fitness,
                            batch_size=7)
        full = ev(model)
        score, values = ev.score_rows(model, np.arange(30)[::-1])
        assert score == full
        _, sub = ev.score_rows(model, [3, 17, 29])
        np.testing.assert_allclose(sub, values[::-1][[3, 17, 29]], rtol=1e-6, atol=1e-7)


def test_candidate_scorer_races_on_tiny_bert(tiny_bert, tmp_path):
    from conftest import write_text_csv
    from nps_pruning.search import CandidateScorer
    base, ft = tiny_bert
    data = write_text_csv(tmp_path / "calib.csv", rows=48)
    scorer = CandidateScorer(base, ft, f"text-classification:{data}",
                             PruneSettings(keep_ratio=0.1, bands=4, space="magnitude", fitness="loglik",
                                           batch_size=16))
    s = _settings(generations=3, popsize=6, race="halving", race_min_rows=8)
    raced = run_search(scorer, 4, s, progress=False, calib_rows=48)
    assert scorer.num_rows == 48                                  # known once built
    plain = run_search(scorer, 4, _settings(generations=3, popsize=6), progress=False)
    assert _examples(raced) < _examples(plain)
    assert any(c["status"] == "eliminated" for c in raced.candidates)
    assert raced.best_score == scorer(raced.best_weights)[0]      # a full-calibration score
    assert plain.candidates[0]["score"] == raced.candidates[0]["score"]
    py = CandidateScorer(base, ft, "python:mod:fn", PruneSettings(keep_ratio=0.1, bands=4, space="magnitude"))
    with pytest.raises(NPSError, match="scores rows"):
        run_search(py, 4, s, progress=False, calib_rows=10)


def test_cli_options_parse_and_validate():
    from nps_pruning.cli.options import PruneOptions, build
    o = build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o", "race": "halving",
                             "patience": "4", "race_eta": "2"})
    assert (o.race, o.patience, o.race_eta, o.race_min_rows) == ("halving", 4, 2.0, 16)
    from nps_pruning.cli.settings import search_settings
    st = search_settings(o)
    assert (st.race, st.patience, st.race_eta) == ("halving", 4, 2.0)
    assert "race" in st.to_dict()
    shipped = search_settings(build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o"}))
    assert shipped.to_dict()["race"] == "auto" and shipped.to_dict()["patience"] == 3
    plain = search_settings(build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o",
                                                 "race": "off", "patience": 0}))
    assert "race" not in plain.to_dict() and "patience" not in plain.to_dict()
    for bad in ({"race": "fast"}, {"patience": -1}, {"race_eta": 1}):
        with pytest.raises(NPSError):
            build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o", **bad})


# -- loglik-t: the label's log-likelihood at the fitted temperature ------------------------------
def test_loglik_t_fits_the_temperature_and_ranks_like_accuracy_where_loglik_does_not():
    from nps_pruning.evaluation.fitness import (FitnessAccumulator, fit_inverse_temperature,
                                                tempered_loglik)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (40,), generator=g)
    z[torch.arange(40), y] += 2.0
    beta = fit_inverse_temperature(z, y)
    grid = torch.linspace(0.0, 5.0, 50001, dtype=torch.float64)
    mean_ll = torch.stack([(torch.log_softmax(z * b, 1).gather(1, y.view(-1, 1))).mean() for b in grid])
    assert beta == pytest.approx(float(grid[int(mean_ll.argmax())]), abs=2e-4)    # the maximum
    v = tempered_loglik(z, y)
    assert float(v.mean()) == pytest.approx(float(mean_ll.max()), abs=1e-9)
    assert float(v.mean()) >= float(torch.log_softmax(z, 1).gather(1, y.view(-1, 1)).mean())
    # invariant to the logits' scale; never below the uniform guess (β = 0 when every argmax is wrong)
    assert float(tempered_loglik(z * 7.0, y).mean()) == pytest.approx(float(v.mean()), abs=1e-9)
    wrong = torch.zeros(6, 3, dtype=torch.float64)
    wrong[torch.arange(6), (torch.arange(6) + 1) % 3] = 4.0
    assert fit_inverse_temperature(wrong, torch.arange(6) % 3) == 0.0
    assert torch.allclose(tempered_loglik(wrong, torch.arange(6) % 3), torch.full((6,), -math.log(3), dtype=torch.float64))
    # the case it is for: A gets 7 of 10 rows right but is confidently wrong on 3, B is timid and
    # gets 4 right; loglik prefers B, accuracy and loglik-t prefer A
    lab = torch.zeros(10, dtype=torch.long)
    a = torch.zeros(10, 2, dtype=torch.float64)
    a[:7, 0], a[7:, 1] = 6.0, 6.0
    b = torch.zeros(10, 2, dtype=torch.float64)
    b[:4, 0], b[4:, 1] = 0.1, 0.1
    def score(fitness, logits):
        acc = FitnessAccumulator(fitness)
        acc.add(logits[:6], lab[:6], None)
        acc.add(logits[6:], lab[6:], None)
        return acc.value()
    assert score("loglik", b) > score("loglik", a)
    assert score("accuracy", a) > score("accuracy", b) and score("loglik-t", a) > score("loglik-t", b)
    nonfinite = a.clone()
    nonfinite[0, 1] = float("nan")
    from nps_pruning.evaluation.fitness import LOG_FLOOR
    assert float(tempered_loglik(nonfinite, lab)[0]) == LOG_FLOOR


def test_loglik_t_on_an_evaluator_scores_rows_consistently(tiny_bert, text_csv, tmp_path):
    from nps_pruning.evaluation import load_model, make_evaluator
    from nps_pruning.evaluation.fitness import score_from_rows
    _, ft = tiny_bert
    model = load_model(ft)
    ev = make_evaluator(f"text-classification:{text_csv}", model_path=ft, fitness="loglik-t", batch_size=8)
    full = ev(model)
    score, values = ev.score_rows(model)
    perm = np.random.default_rng(0).permutation(ev.num_rows)
    score_p, values_p = ev.score_rows(model, perm)
    assert score == full and score_p == full and np.array_equal(values_p, values[perm])
    assert score_from_rows("loglik-t", values) == pytest.approx(full, rel=1e-9, abs=1e-12)
    plain = make_evaluator(f"text-classification:{text_csv}", model_path=ft, fitness="loglik", batch_size=8)
    assert full >= plain(model) - 1e-6             # β = 1 is one of the temperatures it tries
    part = perm[:13]                       # a subset is scored at its own temperature
    score_s, values_s = ev.score_rows(model, part)
    assert score_s == pytest.approx(float(np.mean(values_s)), rel=1e-9, abs=1e-12)
    with pytest.raises(NPSError, match="loglik-t is not defined for perplexity"):
        (tmp_path / "lm.txt").write_text("hello world\n")
        make_evaluator(f"perplexity:{tmp_path / 'lm.txt'}", model_path=ft, fitness="loglik-t")


def test_patience_gap_lets_a_search_below_the_fine_tuned_model_run_on(tmp_path):
    """--patience-gap G with the fine-tuned model's score R: patience stops a search whose best is
    at least R − G exactly where plain patience does, and none that is still below (it runs every
    generation: the same candidates as a run without patience); no reference: plain patience."""
    full = run_search(PerRow(noise=0.0), 4, _settings(generations=40), progress=False)
    stop, last = _expected_gain_stop(full.candidates, 40, 3, 0.05, 0)
    best_at_stop = max(c["score"] for c in full.candidates if c["gen"] <= stop and c["status"] == "ok")
    st = _settings(generations=40, patience=3, min_gain=0.05, patience_gap=0.5)
    # recovered: the reference is within the gap of the best when patience would stop
    r = run_search(PerRow(noise=0.0), 4, st, progress=False, reference_score=best_at_stop + 0.4)
    assert r.stopped_at == stop and "within 0.5 of the fine-tuned model's" in r.stopped_early
    assert _key(r.candidates) == _key([c for c in full.candidates if c["gen"] <= stop])
    # far below the fine-tuned model at every generation: no early stop at all
    far = max(c["score"] for c in full.candidates) + 10.0
    r2 = run_search(PerRow(noise=0.0), 4, st, progress=False, reference_score=far)
    assert r2.stopped_early is None and _key(r2.candidates) == _key(full.candidates)
    # no reference (a caller that scored none): plain patience
    r3 = run_search(PerRow(noise=0.0), 4, st, progress=False)
    assert r3.stopped_at == stop
    assert r.settings["patience_gap"] == 0.5
    assert "patience_gap" not in _settings(generations=3).to_dict()      # off: header as before
    with pytest.raises(NPSError, match="patience_gap"):
        _settings(patience=3, patience_gap=-1.0).validate()


def test_race_gap_races_only_near_the_fine_tuned_model(tmp_path):
    """--race-gap G with the fine-tuned model's score R: a generation is raced only once the best
    score before it is >= R − G. Below that it is the unraced search's generation (same candidates,
    every row); from the generation after the best first reaches R − G it is raced; always near
    R: the plain raced search; never near: the unraced one."""
    plain = _settings(generations=8, race="halving", race_min_rows=8, race_z=0.0)
    unraced = run_search(PerRow(), 4, _settings(generations=8), progress=False)
    raced = run_search(PerRow(), 4, plain, progress=False)
    best = {g: max(c["score"] for c in unraced.candidates if c["gen"] <= g and c["status"] == "ok")
            for g in range(9)}
    k = next(g for g in range(2, 8) if best[g] > best[g - 1])    # the best first reaches best[k] at k
    st = _settings(generations=8, race="halving", race_min_rows=8, race_z=0.0, race_gap=0.25)
    gap = run_search(PerRow(), 4, st, progress=False, reference_score=best[k] + 0.25)
    before = [c for c in gap.candidates if c["gen"] <= k]
    assert _key(before) == _key([c for c in unraced.candidates if c["gen"] <= k])
    assert all(c["status"] == "ok" and c["examples"] == 96 for c in before)
    after = [c for c in gap.candidates if c["gen"] > k]
    assert any(c["status"] == "eliminated" for c in after)           # raced from generation k + 1
    # a raced finalist: its partial stages' rows and then every row
    assert all(c["status"] == "eliminated" or c["examples"] > 96 for c in after)
    near = run_search(PerRow(), 4, st, progress=False, reference_score=-1e9 + 0.25)
    assert near.stopped_early is None and _key(near.candidates) == _key(raced.candidates)
    far = run_search(PerRow(), 4, st, progress=False, reference_score=1e9)
    assert _key(far.candidates) == _key(unraced.candidates)
    # no reference (a caller that scored none): races every generation
    assert _key(run_search(PerRow(), 4, st, progress=False).candidates) == _key(raced.candidates)
    assert gap.settings["race_gap"] == 0.25
    assert "race_gap" not in plain.to_dict() and "race_gap" not in _settings(race_gap=0.1).to_dict()
    with pytest.raises(NPSError, match="race_gap"):
        _settings(race="halving", race_gap=-1.0).validate()


def test_refine_gap_skips_the_rescale_refinement_near_the_fine_tuned_model():
    """--refine-gap G with the fine-tuned model's score R: generation 0 refines the rescale only
    while its best start point is below R − G; near R it scores the start points alone (the same
    records as the refined run's first ones), and with no reference it refines as before."""
    M = 3

    def scorer(p):
        p = np.asarray(p, dtype=np.float64)
        return -float(np.sum((p[:M] - 1.0) ** 2) + (p[M] - 1.3) ** 2 + np.sum(p[M + 1:] ** 2))
    st = _settings(generations=0, space="hybrid", refine_gap=0.1, popsize=None)
    far = run_search(scorer, M, st, progress=False, reference_score=10.0)
    n = len(make_space("hybrid", M, 0.0, 2.0, "linear").start_points())    # 8: then 4 refinements
    starts = far.candidates[:n]
    assert len(far.candidates) == n + 4
    best = max(c["score"] for c in starts)
    near = run_search(scorer, M, st, progress=False, reference_score=best + 0.1)
    assert _key(near.candidates) == _key(starts)
    assert _key(run_search(scorer, M, st, progress=False).candidates) == _key(far.candidates)
    assert near.settings["refine_gap"] == 0.1 and "refine_gap" not in _settings().to_dict()
    with pytest.raises(NPSError, match="refine_gap"):
        _settings(refine_gap=-0.5).validate()
