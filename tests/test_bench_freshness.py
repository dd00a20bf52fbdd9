"""Issue 31, item 4: BENCHMARKS.md says how fresh its numbers are, and never rots into "current".

The freshness block is judged by the code alone (numbers versions and the shipped default's
settings), so it is a function of the repository: the committed document must equal it (a bump
or a default change shows in the same commit), stale steps are counted per part of the document,
and the README's fusion rows built from stale steps are marked."""
from __future__ import annotations

import json

from nps_bench import code_versions as cv
from nps_bench import freshness
from nps_bench.cache import ResultCache
from nps_bench.paths import repo_root


def test_the_committed_freshness_block_is_what_the_repository_gives():
    res = repo_root() / "benchmarks" / "results"
    md = (repo_root() / "BENCHMARKS.md").read_text()
    got = md[md.index(freshness.START):md.index(freshness.END) + len(freshness.END)]
    assert got == freshness.render(res / "steps", res), (
        "BENCHMARKS.md's freshness block is out of date: run `python -m nps_bench.freshness`")


def test_stale_steps_are_counted_per_part_by_the_code_alone(tmp_path, monkeypatch):
    steps, results = tmp_path / "steps", tmp_path / "results"
    results.mkdir()
    (results / "text.json").write_text(json.dumps(
        {"suite": {"tasks": [{"name": "rt-plot", "weights": "w" * 64}]}}))
    cache = ResultCache(steps)
    cache.step("text", "rt-plot", "wins-dare-r0.05", {"weights": "w" * 64}, lambda: {"test": 0.5})
    # another checkpoint: stale for bench-status on a machine, current for the code
    cache.step("text", "rt-plot", "wins-magnitude-r0.05", {"weights": "x" * 64}, lambda: {"test": 0.4})
    cache.step("text", "_fusion", "ties", {"tasks": []}, lambda: {"test": 0.6})
    v = cv.versions()
    monkeypatch.setattr(cv, "_VERSIONS", {**v, "search": v["search"] + 1})
    cache.step("text", "rt-plot", "abl-old-cli-r0.05", {"weights": "w" * 64}, lambda: {"test": 0.7})
    monkeypatch.setattr(cv, "_VERSIONS", v)                 # today's code: search went back one
    got = freshness.counts("text", steps, results)
    assert got["NPS that wins, the lossless frontier"] == {"current": 2}
    assert got["Fusion"] == {"current": 1}
    assert got["What the search is worth"] == {f"search v{v['search'] + 1} -> v{v['search']}": 1}
    block = freshness.render(steps, results, suites=("text", "vit"))
    assert block.startswith(freshness.START) and block.endswith(freshness.END)
    assert "| text | What the search is worth | 0 of 1 | search v" in block
    assert "| text | Fusion | 1 of 1 |  |" in block
    assert "| vit | – | no step files" in block


def test_readme_fusion_rows_of_stale_steps_are_marked():
    from nps_bench.readme_table import STALE_MARK, _fusion_lines
    fusion = {"fusion": {"fusion": {"ties": {"test_mean": 0.6}, "fine-tuned": {"test_mean": 0.8}}}}
    rows = _fusion_lines({"text": fusion, "vision": fusion},
                         {"text": ["Fusion", "What the search is worth"], "vision": []})
    assert any(line.startswith(f"| text {STALE_MARK} |") for line in rows)
    assert any(line.startswith("| vision |") for line in rows)
    assert rows[-1].startswith(f"{STALE_MARK} stale or unknown") and "text: Fusion." in rows[-1]
    assert not any(STALE_MARK in line for line in _fusion_lines({"text": fusion}, {"text": []}))
