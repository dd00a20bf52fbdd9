"""bench.wins: the summary statistics and the rendered section, on hand-made rows."""
import math

from nps_bench.wins import END, START, render, summarize, write_section


def _rows(ft, mag, dare, nps):
    rows = [{"method": "fine-tuned", "keep": 1.0, "test": ft, "test_rows": 1000}]
    for r, (m, d, n) in zip((0.02, 0.05), zip(mag, dare, nps)):
        rows += [{"method": "magnitude", "keep": r, "test": m}, {"method": "dare", "keep": r, "test": d},
                 {"method": "nps-default", "keep": r, "test": n, "examples_scored": 100, "search_s": 5.0,
                  "params": [1.0] * 8 + [0.5, 0.25, 0.0]}]
    return rows


def test_summary_mean_and_standard_error_closed_form():
    data = {"a": _rows(0.8, (0.7, 0.75), (0.78, 0.79), (0.81, 0.8)),
            "b": _rows(0.6, (0.5, 0.55), (0.58, 0.59), (0.6, 0.61))}
    s = summarize(data)
    mean, se, n = s["nps-default"][0.02]
    assert n == 2 and math.isclose(mean, (0.81 + 0.6) / 2)
    want = math.sqrt(0.81 * 0.19 / 1000 + 0.6 * 0.4 / 1000) / 2
    assert math.isclose(se, want)


def test_render_verdicts_and_markers(tmp_path):
    data = {"a": _rows(0.8, (0.7, 0.75), (0.78, 0.79), (0.81, 0.8))}
    results = {"config": {"test_rows": 1000, "generations": 6, "popsize": 8, "bands": 8, "seed": 0},
               "commit": "abc", "suites": {"text": {"model": "m", "tasks": data}}}
    md = render(results, tmp_path)
    assert md.startswith(START) and md.endswith(END)
    assert "r = 0.02: default 0.8100 vs dare 0.7800" in md and "target met" in md
    assert (tmp_path / "wins-text.png").stat().st_size > 0
    doc = tmp_path / "B.md"
    doc.write_text("# title\n\nintro\n\n## old\ntext\n")
    write_section(doc, md)
    write_section(doc, md)           # idempotent: replaced between the markers
    text = doc.read_text()
    assert text.count(START) == 1 and text.index(START) < text.index("## old")


def test_search_cost_section_and_settings():
    """The search-cost table: examples scored relative to the plain 30-generation search and the
    target verdict; the variants' SearchSettings overrides reach the search."""
    from nps_bench.wins import VARIANTS, WinsConfig, _settings
    rows = _rows(0.8, (0.7, 0.75), (0.78, 0.79), (0.81, 0.8))
    rows += [{"method": "nps-plain30", "keep": 0.05, "test": 0.8, "examples_scored": 1000, "search_s": 50.0},
             {"method": "nps-race", "keep": 0.05, "test": 0.79, "examples_scored": 60, "search_s": 3.0}]
    results = {"config": {"test_rows": 1000, "generations": 6, "popsize": 8, "bands": 8, "seed": 0},
               "commit": "abc", "suites": {"text": {"model": "m", "tasks": {"a": rows}}}}
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        md = render(results, Path(d))
        assert (Path(d) / "cost-text.png").stat().st_size > 0
    assert "#### Search cost" in md
    assert "| 1,000 | 1.00× |" in md and "| 100 | 0.10× |" in md and "| 60 | 0.06× |" in md
    assert "target (within 1 SE at ≤ 0.2×) met" in md          # default 0.80 = plain 0.80 at 0.1×
    st = _settings({"name": "a"}, WinsConfig(), 0.05, VARIANTS["race"][1], None)
    assert st.search.race == "halving" and st.search.patience == 3 and st.search.generations == 6
    st = _settings({"name": "a"}, WinsConfig(), 0.05, VARIANTS["plain30"][1], None)
    assert st.search.generations == 30 and st.holdout == 0.0 and st.search.race is None


def test_llm_suites_cap_the_calibration_rows_and_say_so(tmp_path):
    """The LLM suites run every method on a seeded subsample of the calibration rows (and smaller
    batches); the section says so; the other suites keep every row."""
    from nps_bench.wins import VARIANTS, WinsConfig, _settings
    cfg = WinsConfig()
    assert cfg.suite_calib_size == {"llm": 64, "llm-lora": 64} and "text" not in cfg.suite_calib_size
    st = _settings({"name": "a"}, cfg, 0.05, VARIANTS["default"][1], 64, 16)
    assert st.calib_size == 64 and st.batch_size == 16
    assert _settings({"name": "a"}, cfg, 0.05, VARIANTS["default"][1], None).batch_size == cfg.batch_size
    data = {"a": _rows(0.8, (0.7, 0.75), (0.78, 0.79), (0.81, 0.8))}
    results = {"config": {"test_rows": 1000, "generations": 6, "popsize": 8, "bands": 8, "seed": 0},
               "commit": "abc", "suites": {"llm": {"model": "m", "tasks": data, "calib_cap": 64},
                                           "text": {"model": "t", "tasks": data}}}
    md = render(results, tmp_path)
    assert md.count("seeded 64 of the task's calibration rows") == 1
    assert md.index("### text suite") < md.index("### llm suite")


def test_selection_rules_pick_by_holdout_pooled_or_search_score():
    from nps_bench.wins import holdout_split, select_finalist
    rescored = [{"search_score": -0.448, "holdout_score": -0.339},    # magnitude: best held-out
                {"search_score": -0.410, "holdout_score": -0.425},    # DARE
                {"search_score": -0.4102, "holdout_score": -0.3972},  # best pooled
                {"search_score": -0.4094, "holdout_score": -0.4195}]  # best search score
    assert select_finalist(rescored, "holdout", 48, 16) == 0
    assert select_finalist(rescored, "pooled", 48, 16) == 2     # 48·s + 16·h largest
    assert select_finalist(rescored, "search", 48, 16) == 3
    # ties: the held-out rule prefers the better search score, then the earlier candidate
    tie = [{"search_score": -1.0, "holdout_score": -0.5}, {"search_score": -0.9, "holdout_score": -0.5}]
    assert select_finalist(tie, "holdout", 3, 1) == 1
    assert select_finalist(tie * 1, "pooled", 1, 0) == 1
    import pytest
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_finalist(tie, "best", 3, 1)
    # as Session.search_evaluators splits: round((1 − h)·n) search rows, the rest held out
    assert holdout_split(500, None, 0.25) == (375, 125)
    assert holdout_split(500, 64, 0.25, 1) == (48, 16)
    assert holdout_split(10, 64, 0.25, 1) == (8, 2)
    # below the minimum of held-out rows (32 by default): no hold-out, every row searched
    assert holdout_split(500, 64, 0.25) == (64, 0) and holdout_split(10, 64, 0.25) == (10, 0)
    assert holdout_split(128, None, 0.25) == (96, 32) and holdout_split(125, None, 0.25) == (125, 0)
    assert holdout_split(150, None, 0.25) == (112, 38) and holdout_split(150, None, 0.0) == (150, 0)


def test_the_holdout_minimum_enters_exactly_the_keys_it_changes(tmp_path):
    from nps_bench.wins import WinsConfig, _settings, holdout_key
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(150)))
    task = {"name": "a", "eval_calib": f"text-classification:{csv}"}
    st = _settings(task, WinsConfig(), 0.05, None, None)
    assert st.holdout == 0.25 and holdout_key(task, st) == {}          # 38 held out: as before
    st64 = _settings(task, WinsConfig(), 0.05, None, 64)
    assert holdout_key(task, st64) == {"holdout_min_rows": 32}          # 16 would be held out
    paper = _settings(task, WinsConfig(), 0.05, {"holdout": 0.0}, 64)
    assert holdout_key(task, paper) == {}                                # no hold-out asked


def test_render_shows_the_selection_rows():
    import tempfile
    from pathlib import Path
    rows = _rows(0.8, (0.7, 0.75), (0.78, 0.79), (0.81, 0.8))
    rows += [{"method": "nps-default-select-pooled", "keep": 0.05, "test": 0.82},
             {"method": "nps-default-select-search", "keep": 0.05, "test": 0.79}]
    results = {"config": {"test_rows": 1000, "generations": 6, "popsize": 8, "bands": 8, "seed": 0},
               "commit": "abc", "suites": {"vision": {"model": "m", "tasks": {"a": rows}}}}
    with tempfile.TemporaryDirectory() as d:
        md = render(results, Path(d))
    assert "finalist chosen on all calibration rows (search + held-out, pooled) |  | 0.8200 ±" in md
    assert "the shipped choice is the best score on the 25% held-out" in md
