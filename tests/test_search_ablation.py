"""The search ablation (issue 32): a long search's candidates cut into the searches it contains
are those searches exactly (CMA-ES prefix, patience), the picks with and without the held-out
re-scoring, the kind of point returned; and the shipped default (`--race auto`, patience)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nps_bench.exp_search_ablation import (CUTS, VARIANTS, cut_candidates, cut_generation,
                                           holdout_pick, kind_of, render, search_pick,
                                           settings_params, _settings, AblationConfig, OLD_CLI)
from nps_pruning.apps.settings import PruneSettings
from nps_pruning.cli.settings import prune_settings
from nps_pruning.core.space import make_space
from nps_pruning.errors import NPSError
from nps_pruning.search import SHIPPED_SEARCH, SearchSettings, run_search, shipped_search

from test_search_cost import PerRow, _key


def _hybrid(**kw):
    return SearchSettings(**{"generations": 12, "seed": 1, "space": "hybrid", **kw})


def _space(keep=0.05):
    return make_space("hybrid", 4, 0.0, 4.0, keep_ratio=keep)


class Hybrid(PerRow):
    """PerRow over the hybrid space's 8 parameters (4 band weights + g, α, h, β)."""

    def values(self, w):
        w = np.asarray(w, dtype=np.float64)
        target = np.array([1.6, 0.3, 1.2, 0.7, 1.3, 0.2, 0.1, 0.5])
        import hashlib
        seed = int.from_bytes(hashlib.sha256(w.tobytes()).digest()[:8], "little")
        h = np.random.default_rng(seed).normal(0.0, 1.0, self.rows)
        return -float(np.sum((w - target) ** 2)) + self.offsets + self.noise * h


def test_a_cut_of_the_long_search_is_the_short_search():
    """The first G generations of a 12-generation search are the G-generation search, and the
    patience-3 cut is where a patience-3 search stops; generation 0 holds the start points and
    the refinement."""
    space = _space()
    full = run_search(Hybrid(noise=0.0), 4, _hybrid(), space=space, progress=False)
    labels = space.start_labels()
    for g in (0, 3, 6):
        short = run_search(Hybrid(noise=0.0), 4, _hybrid(generations=g), space=_space(), progress=False)
        assert _key(cut_candidates(full.candidates, f"g{g}" if g else "gen0", labels)) == _key(short.candidates)
    pat = run_search(Hybrid(noise=0.0), 4, _hybrid(patience=3), space=_space(), progress=False)
    stop = cut_generation(full.candidates, "patience3")
    assert (pat.stopped_at or 12) == stop and _key(cut_candidates(full.candidates, "patience3", labels)) == _key(pat.candidates)
    starts = cut_candidates(full.candidates, "starts", labels)
    assert [c["start"] for c in starts] == labels
    gen0 = cut_candidates(full.candidates, "gen0", labels)
    assert len(gen0) > len(starts) and {kind_of(c, labels) for c in gen0[len(starts):]} == {"refinement"}
    assert kind_of(full.candidates[-1], labels) == "cma-es" and kind_of(starts[1], labels) == "start:dare"
    assert cut_generation(full.candidates, "starts") is None and set(CUTS) >= {"starts", "gen0", "g30"}
    with pytest.raises(ValueError):
        cut_generation(full.candidates, "bogus")


def test_picks_with_and_without_the_held_out_rows():
    """The search pick is the best search score (earliest on ties); the held-out pick is the
    shipped rule over the shipped finalists (every generation-0 point, then the top distinct)."""
    c = [{"gen": 0, "idx": 0, "weights": [1.0], "score": 0.5, "status": "ok", "start": "magnitude"},
         {"gen": 0, "idx": 1, "weights": [2.0], "score": 0.7, "status": "ok", "start": "dare"},
         {"gen": 1, "idx": 0, "weights": [3.0], "score": 0.9, "status": "ok"},
         {"gen": 1, "idx": 1, "weights": [3.0], "score": 0.9, "status": "ok"},      # same point
         {"gen": 1, "idx": 2, "weights": [4.0], "score": 0.8, "status": "ok"},
         {"gen": 1, "idx": 3, "weights": [5.0], "score": 0.95, "status": "failed"}]
    assert search_pick(c) is c[2]
    held = {1.0: 0.6, 2.0: 0.9, 3.0: 0.4, 4.0: 0.9}
    seen = []

    def hs(rec):
        seen.append(rec["weights"][0])
        return held[rec["weights"][0]]
    pick, n = holdout_pick(c, 2, hs)
    assert n == 4 and seen == [1.0, 2.0, 3.0, 4.0]      # the duplicate is re-scored once
    assert pick is c[4]          # held-out tie at 0.9 with DARE: the better search score wins
    pick1, n1 = holdout_pick(c, 1, hs)
    assert n1 == 3 and pick1 is c[1]


def test_render_says_what_the_generations_add(tmp_path):
    cut = lambda t, e: {"generations": 0, "candidates": 1, "examples": e, "seconds": 1.0, "finalists": 2,
                        "examples_holdout": e + 10, "seconds_holdout": 2.0,
                        "holdout": {"test": t, "kind": "start:dare", "gen": 0, "calib": 0.0},
                        "search": {"test": t, "kind": "cma-es", "gen": 3, "calib": 0.0}}
    row = {"variant": "old-cli", "keep": 0.05, "test": 0.8,
           "cuts": {**{k: cut(0.7, 100) for k in CUTS}, "g30": cut(0.8, 1000)}}
    data = {"model": "m", "commit": "c", "date": "d", "checkpoints": {"a": "0" * 64},
            "test_rows": {"a": 1000}, "tasks": {"a": [row, {"variant": "race6", "keep": 0.05, "test": 0.79,
                                                             "kind": "cma-es", "examples_scored": 55,
                                                             "search_s": 3.0}]}}
    md = render({"suites": {"text": data}})
    assert "**(old CLI default)**" in md and "| 1,010 | 1.000× |" in md and "| 55 | 0.054× |" in md
    assert "r = 0.05: +0.1000" in md and "0 / 0 / 1 |" in md and "1 / 0 / 0 |" in md


def test_ablation_settings_pin_the_old_default_and_the_shipped_one_is_exact():
    t = {"name": "a", "max_length": 64}
    old = _settings(t, AblationConfig(), "text", 0.02, OLD_CLI)
    assert (old.search.generations, old.search.popsize, old.search.race, old.search.patience) == (30, None, None, None)
    assert old.holdout == PruneSettings().holdout and old.max_length == 64
    shipped = _settings(t, AblationConfig(), "text", 0.02, VARIANTS["shipped"][1])
    assert shipped == PruneSettings(keep_ratio=0.02, max_length=64)
    assert settings_params(shipped)["search"] == shipped_search().to_dict()
    llm = _settings(t, AblationConfig(), "llm", 0.05, None)
    assert (llm.calib_size, llm.batch_size) == (64, 16)


def test_the_shipped_default_is_what_nps_prune_runs():
    """PruneSettings(), the CLI's and the benchmark's default rows search shipped_search()."""
    from nps_bench.wins import VARIANTS as WV, WinsConfig, _settings as wins_settings
    from nps_pruning.cli.options import PruneOptions, build
    assert PruneSettings().search == shipped_search() == SearchSettings(**SHIPPED_SEARCH)
    opts = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o"})
    assert prune_settings(opts) == PruneSettings()
    assert PruneSettings().search.patience_gap == 0.02
    off = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "patience_gap": -1})
    assert prune_settings(off).search == shipped_search(patience_gap=None)   # < 0: plain patience
    assert prune_settings(off).search.to_dict() == {k: v for k, v in shipped_search().to_dict().items()
                                                    if k != "patience_gap"}
    assert PruneSettings().search.race_gap == 0.02
    every = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "race_gap": -1})
    assert prune_settings(every).search == shipped_search(race_gap=None)     # < 0: race every generation
    refine = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "refine_gap": -1})
    assert prune_settings(refine).search == shipped_search(refine_gap=None)  # < 0: always refine
    st = wins_settings({"name": "a", "max_length": 64}, WinsConfig(), 0.05, WV["default"][1], None)
    assert st == PruneSettings(keep_ratio=0.05, max_length=64)
    assert wins_settings({"name": "a"}, WinsConfig(), 0.1, WV["default-128"][1], 128) == \
        PruneSettings(keep_ratio=0.1, calib_size=128)


def test_race_auto_races_where_rows_are_scored_and_is_plain_elsewhere():
    raced = run_search(PerRow(rows=200), 4, SearchSettings(generations=3, seed=3, popsize=8, upper=2.0,
                                                         space="magnitude", race="auto"), progress=False)
    halving = run_search(PerRow(rows=200), 4, SearchSettings(generations=3, seed=3, popsize=8, upper=2.0,
                                                           space="magnitude", race="halving"), progress=False)
    assert _key(raced.candidates) == _key(halving.candidates)
    assert any(c["status"] == "eliminated" for c in raced.candidates)

    def plain_scorer(w):          # no score_rows (a python: evaluator): auto runs unraced
        return -float(np.sum((np.asarray(w) - 1.0) ** 2))
    auto = run_search(plain_scorer, 4, SearchSettings(generations=3, seed=3, race="auto",
                                                      space="magnitude"), progress=False)
    plain = run_search(plain_scorer, 4, SearchSettings(generations=3, seed=3, space="magnitude"), progress=False)
    assert [c["score"] for c in auto.candidates] == [c["score"] for c in plain.candidates]
    with pytest.raises(NPSError, match="scores rows"):
        run_search(plain_scorer, 4, SearchSettings(generations=1, race="halving", space="magnitude"),
                   progress=False)
    # fewer rows than two partial stages need (16 · 3² = 144): auto runs unraced
    few = dict(generations=3, seed=3, popsize=8, upper=2.0, space="magnitude")
    auto = run_search(PerRow(rows=143), 4, SearchSettings(race="auto", **few), progress=False)
    plain = run_search(PerRow(rows=143), 4, SearchSettings(**few), progress=False)
    assert _key(auto.candidates) == _key(plain.candidates)
    auto = run_search(PerRow(rows=144), 4, SearchSettings(race="auto", **few), progress=False)
    assert any(c["status"] == "eliminated" for c in auto.candidates)


def test_race_off_on_the_command_line():
    from nps_pruning.cli.options import PruneOptions, build
    opts = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "race": "off"})
    assert prune_settings(opts).search.race is None
    old = build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "race": "off",
                               "patience": 0, "generations": 30, "refine_gap": -1})
    # the old CLI default (racing's settings are unused, and absent from the log and report, without racing)
    assert prune_settings(old).search.to_dict() == SearchSettings().to_dict()
    with pytest.raises(NPSError):
        SearchSettings(race="off").validate()


# -- bf16 autocast of the search's forward passes ------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import make_tiny_bert, write_text_csv
    root = tmp_path_factory.mktemp("autocast")
    base, ft = make_tiny_bert(root)
    return {"base": base, "ft": ft, "calib": write_text_csv(root / "calib.csv", rows=40, seed=0)}


def test_autocast_bf16_scores_in_bf16_and_is_reproducible(pair, tmp_path):
    """--autocast bf16: the candidates' scores are the bf16 forward's (close to, not equal to,
    fp32's), the same seed gives the same result, the held-out re-scoring uses it too, and the
    CLI records it; a bad value is refused."""
    import torch
    from nps_pruning.apps.prune import Session, prune
    from nps_pruning.cli import main
    spec = f"text-classification:{pair['calib']}"
    # loglik: the tiny model is near chance, where the default loglik-t fits β* = 0 and scores
    # every candidate −log 2 in either precision
    st = PruneSettings(keep_ratio=0.1, bands=4, seed=2, holdout_min_rows=8,
                       fitness="loglik").replace(generations=1, popsize=4)
    s = Session.load(pair["base"], pair["ft"])
    fp32 = prune(s, "nps", settings=st, eval_spec=spec, progress=False)
    bf = [prune(Session.load(pair["base"], pair["ft"]), "nps", settings=dataclasses.replace(st, autocast="bf16"),
                eval_spec=spec, progress=False) for _ in range(2)]
    a = [c["score"] for c in fp32.search.candidates[:3]]
    b = [c["score"] for c in bf[0].search.candidates[:3]]
    assert a != b and np.allclose(a, b, atol=0.05)
    assert [c["score"] for c in bf[0].search.candidates] == [c["score"] for c in bf[1].search.candidates]
    assert bf[0].rescored == bf[1].rescored and bf[0].rescored != fp32.rescored
    assert torch.equal(bf[0].pruned, bf[1].pruned) and bf[0].pruned.dtype == fp32.pruned.dtype
    out = tmp_path / "o"
    assert main(["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--keep", "0.1", "--bands", "4",
                 "--generations", "1", "--popsize", "4", "--seed", "2", "--eval", spec, "--quiet",
                 "--autocast", "bf16", "--holdout-min-rows", "8", "--fitness", "loglik"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["autocast"] == "bf16"
    assert [c["score"] for c in rep["search"]["candidates"]] == [c["score"] for c in bf[0].search.candidates]
    with pytest.raises(NPSError, match="autocast"):
        PruneSettings(autocast="fp8")


def test_cli_timing_line_and_its_target():
    from nps_bench.exp_search_ablation import CLI_RUNS, timing_lines
    assert CLI_RUNS["shipped"] == [] and "--race" in CLI_RUNS["old-cli"]
    t = {"task": "a", "keep": 0.05, "commit": "c", "date": "d",
         "shipped": {"wall_s": 40.0, "search_s": 30.0, "rescore_s": 3.0, "examples_scored": 10000,
                     "threads": 2, "cpu": "x", "argv_flags": []},
         "old-cli": {"wall_s": 400.0, "search_s": 390.0, "rescore_s": 3.0, "examples_scored": 130000,
                     "threads": 2, "cpu": "x", "argv_flags": CLI_RUNS["old-cli"]}}
    line = timing_lines(t)[0]
    assert "**40 s**" in line and "0.077× the examples" in line and "0.10× the wall time" in line
    assert line.endswith("met.") and "NOT" not in line
    t["shipped"]["wall_s"] = 61.0
    assert "NOT met" in timing_lines(t)[0]
    assert timing_lines(None) == [] and timing_lines({"shipped": {}}) == []
    assert "one command after the other; commit c" in timing_lines(t)[0]
    # two timings from different runs say so (the target wants them side by side)
    t["shipped"]["_commit"], t["old-cli"]["_commit"] = "new1234", "old5678"
    assert "measured in two runs: with no flags at commit new1234" in timing_lines(t)[0]


def test_prune_passes_the_fine_tuned_models_score_for_the_patience_gap(pair):
    """prune passes the fine-tuned model's own score on the search rows as the reference: with a
    gap of 0 on a tiny model that the slim candidates do not recover, patience never stops it."""
    from nps_pruning.apps.prune import Session, prune
    from nps_pruning.apps.settings import PruneSettings
    spec = f"text-classification:{pair['calib']}"
    base = PruneSettings(keep_ratio=0.1, bands=2, space="magnitude", fitness="loglik", holdout=0.0)
    st = base.replace(generations=6, popsize=4, patience=1, min_generations=1, race=None,
                      patience_gap=None)
    s = Session.load(pair["base"], pair["ft"])
    ref = s.score(s.search_evaluators(spec, fitness="loglik")[0], s.task_vector.values)
    plain = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=st, eval_spec=spec, progress=False)
    gap = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=st.replace(patience_gap=0.0),
                eval_spec=spec, progress=False)
    assert plain.search.best_score < ref          # the slim search stays below the fine-tuned model
    assert plain.search.stopped_early is not None and max(c["gen"] for c in plain.search.candidates) < 6
    assert gap.search.stopped_early is None and max(c["gen"] for c in gap.search.candidates) == 6
    n = len(plain.search.candidates)
    assert _cands(gap.search.candidates[:n]) == _cands(plain.search.candidates)   # its prefix
    # --race-gap takes the same reference: a search below it by more than the gap is not raced
    rst = base.replace(generations=2, popsize=4, race="halving", race_min_rows=4, race_z=0.0,
                       patience=None, race_gap=None)
    raced = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=rst, eval_spec=spec, progress=False)
    below = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=rst.replace(race_gap=0.0),
                  eval_spec=spec, progress=False)
    assert any(c["status"] == "eliminated" for c in raced.search.candidates)
    assert all(c["status"] == "ok" for c in below.search.candidates)
    assert below.calibration["finetuned"] == ref


def test_prune_scores_the_fine_tuned_model_once(pair, monkeypatch):
    """With the patience gap on, the fine-tuned model's score on the search rows is both the gap's
    reference and the report's calibration["finetuned"]: computed once, the value a fresh score
    gives; with the gap off it is still reported."""
    from nps_pruning.apps.prune import Session, prune
    spec = f"text-classification:{pair['calib']}"
    st = PruneSettings(keep_ratio=0.1, bands=2, space="magnitude", fitness="loglik", holdout=0.0)
    st = st.replace(generations=2, popsize=4, patience=1, min_generations=1, race="halving",
                    race_min_rows=4, patience_gap=0.0)
    s = Session.load(pair["base"], pair["ft"])
    ref = s.score(s.search_evaluators(spec, fitness="loglik")[0], s.task_vector.values)
    tau_calls = []
    real = Session.score

    def counting(self, evaluator, tau, scale=1.0):
        if tau is self.task_vector.values:
            tau_calls.append(1)
        return real(self, evaluator, tau, scale)
    monkeypatch.setattr(Session, "score", counting)
    out = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=st, eval_spec=spec, progress=False)
    assert len(tau_calls) == 1 and out.calibration["finetuned"] == ref
    tau_calls.clear()
    off = prune(Session.load(pair["base"], pair["ft"]), "nps", settings=st.replace(patience_gap=None),
                eval_spec=spec, progress=False)
    assert len(tau_calls) == 1 and off.calibration["finetuned"] == ref


def _cands(cands):
    return [(c["gen"], tuple(c["weights"]), c["score"]) for c in cands]


def test_the_verdict_bounds_the_examples_on_text_only():
    """Issue 32: the shipped default within one SE of the old CLI default at every r on every
    suite, and on text also at most 0.1x its examples scored."""
    from nps_bench.exp_search_ablation import verdict
    rows = [{"id": "gen0/holdout", "by_keep": {0.02: (0.90, 0.01)}, "examples": 100},
            {"id": "g30/holdout", "by_keep": {0.02: (0.92, 0.01)}, "examples": 1000},
            {"id": "shipped", "by_keep": {0.02: (0.915, 0.01)}, "examples": 200}]
    assert verdict(rows, [0.02], "vit")[-1].endswith(": met.")
    assert verdict(rows, [0.02], "text")[-1].endswith("≤ 0.1× the examples): NOT met.")
    rows[2]["examples"] = 100
    assert verdict(rows, [0.02], "text")[-1].endswith("): met.")
    rows[2]["by_keep"] = {0.02: (0.905, 0.01)}                   # 1.5 SE below
    assert verdict(rows, [0.02], "vit")[-1].endswith("NOT met.")


def test_describe_search_names_every_gap_of_the_shipped_default():
    """The wins tables' words for the default row say where it races, stops and refines."""
    from nps_bench.wins import describe_search
    words = describe_search(shipped_search().to_dict())
    assert "only within 0.02 of the fine-tuned model's calibration score" in words
    assert "racing only within 0.02 of that score" in words
    assert "refines the rescale only further below it than 0.02" in words
    assert "within" not in describe_search(SearchSettings().to_dict())
