"""Issue 35: the lossless frontier's r99 / r95 (log-linear interpolation between grid points),
its table and the no-regret verdict, rendered from bench-wins-shaped results."""
from __future__ import annotations

import math

import pytest

from nps_bench.frontier import FRONTIER_KEEPS, crossing, render


def test_crossing_interpolates_in_log_r_and_says_when_it_cannot():
    pts = [(0.001, 0.80), (0.01, 0.98), (0.1, 1.00)]
    r, how = crossing(pts, 0.99)                      # half way from 0.98 to 1.00: sqrt(0.01 * 0.1)
    assert r == pytest.approx(math.sqrt(0.01 * 0.1)) and how == f"{r:.2g}"
    r95, _ = crossing(pts, 0.95)                      # 15/18 of the way from 0.001 to 0.01 in log r
    assert r95 == pytest.approx(10 ** (-3 + 15 / 18))
    assert crossing(pts, 0.5) == (0.001, "≤ 0.001")
    assert crossing(pts, 1.01) == (None, "> 0.1")
    # the first crossing from small r up, whatever the order given
    assert crossing([(0.1, 0.995), (0.01, 0.999), (0.001, 0.5)], 0.99)[0] < 0.01
    assert crossing([(0.02, 0.99)], 0.99) == (0.02, "≤ 0.02")


def _rows(ft, curves, n=1000):
    rows = [{"method": "fine-tuned", "keep": 1.0, "test": ft, "test_rows": n}]
    for m, by_r in curves.items():
        rows += [{"method": m, "keep": r, "test": v} for r, v in by_r.items()]
    return rows


def test_render_gives_r99_r95_and_the_no_regret_verdict():
    grid = (0.0005, 0.005, 0.05)
    tasks = {t: _rows(0.80, {"magnitude": dict(zip(grid, (0.40, 0.70, 0.80))),
                            "dare": dict(zip(grid, (0.60, 0.796, 0.80))),
                            "nps-default": dict(zip(grid, (0.75, 0.80, 0.80)))})
             for t in ("a", "b")}
    md = render({"suites": {"text": {"model": "m", "tasks": tasks}}}, None)
    line = {l.split(" |")[0]: l for l in md.splitlines() if l.startswith("| ")}
    assert line["| DARE"].split(" | ")[1] == crossing([(0.0005, 0.75), (0.005, 0.995), (0.05, 1.0)], 0.99)[1]
    nps = [(0.0005, 0.9375), (0.005, 1.0), (0.05, 1.0)]
    assert line["| **NPS (default)**"].split(" | ")[1:3] == [crossing(nps, 0.99)[1], crossing(nps, 0.95)[1]]
    assert line["| magnitude top-k"].split(" | ")[1] == crossing([(0.005, 0.875), (0.05, 1.0)], 0.99)[1]
    assert "No regret: met at every r." in md            # 0.75 vs DARE's 0.60 at the smallest r
    worse = {t: _rows(0.80, {"dare": {0.001: 0.70}, "nps-default": {0.001: 0.60}}) for t in ("a", "b")}
    md2 = render({"suites": {"text": {"model": "m", "tasks": worse}}}, None)
    assert "No regret: NOT met at r = 0.001." in md2
    # a suite not run on the frontier grid (no r < 0.01) is left out
    coarse = {t: _rows(0.80, {"dare": {0.05: 0.80}}) for t in ("a",)}
    assert "No suite has been run" in render({"suites": {"vision": {"tasks": coarse}}}, None)
    assert min(FRONTIER_KEEPS) == 0.0005 and max(FRONTIER_KEEPS) == 0.2


def test_llm_memory_section_judges_each_run_against_its_target():
    from nps_bench.exp_llm_memory import END, START, render
    gib = 2 ** 30
    runs = {"prune-nps": {"peak_rss_bytes": 3 * gib, "model_bytes": gib, "ratio": 3.0},
            "merge-ties": {"peak_rss_bytes": 4 * gib, "model_bytes": gib, "ratio": 4.0}}
    md = render({"suites": {"llm": {"tasks": ["a", "b", "c"], "runs": runs, "commit": "c1", "date": "d"}}})
    assert md.startswith(START) and md.endswith(END)
    rows = [l for l in md.splitlines() if l.startswith("| `nps")]
    assert rows[0].startswith("| `nps prune --method nps` | 3.00 GiB | 1.00 GiB | 3.0× | ≤ 4× | met |")
    assert rows[1].startswith("| `nps merge --method ties` | 4.00 GiB | 1.00 GiB | 4.0× | ≤ 3× | NOT met |")


def test_rows_of_older_code_are_marked_stale_in_the_frontier(monkeypatch):
    from nps_bench import code_versions as cv
    v = cv.versions()
    old = {g: n for g, n in v.items()}
    old["search"] = v["search"] - 1
    tasks = {t: _rows(0.80, {"dare": {0.001: 0.70, 0.01: 0.80},
                             "nps-default": {0.001: 0.75, 0.01: 0.80}}) for t in ("a", "b")}
    for rows in tasks.values():
        for r in rows:
            if r["method"] == "nps-default":
                r.update({"_step": f"wins-nps-default-r{r['keep']:g}", "_code": dict(old)})
            elif r["method"] == "dare":
                r.update({"_step": f"wins-dare-r{r['keep']:g}", "_code": dict(old)})
    md = render({"suites": {"text": {"model": "m", "tasks": tasks}}}, None)
    line = {l.split(" |")[0]: l for l in md.splitlines() if l.startswith("| ")}
    assert "‡" in line["| **NPS (default)**"] and "‡" not in line["| DARE"]   # DARE runs no search
    assert f"**NPS (default)** at every r: search v{old['search']} -> v{v['search']}" in md
