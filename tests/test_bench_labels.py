"""The benchmark's labels: written by the experiments and parsed by the report from one module, and
the strings (part of the step names, hence of the result-cache paths) exactly as before."""
from __future__ import annotations

import hashlib

from nps_bench import labels
from nps_bench.cache import ResultCache
from nps_bench.config import BenchConfig
from nps_bench.exp_pruning import nps_variants


def test_variant_labels_of_the_default_grid():
    cfg = BenchConfig()
    got = [(label, scheme, upper, keep) for label, scheme, upper, keep, _ in nps_variants(cfg)]
    assert [g[0] for g in got] == (["focused"] * 5 + ["uniform"] * 5 + ["focused-upper2"] * 2
                                   + ["focused-log"] * 2 + ["focused-sigma0.1", "focused-sigma1", "focused-long"])
    assert got[0][3] == 0.05 and got[1][3] == 0.1     # the keeps other steps reuse run first
    assert labels.upper_variant(2.0) == "focused-upper2" and labels.sigma_variant(0.1) == "focused-sigma0.1"
    assert labels.grid_key("nps", "focused-log") == "nps:focused-log"
    assert labels.grid_key("magnitude", None) == "magnitude"


def test_merge_labels_round_trip():
    for norm in BenchConfig().normalizations:
        label = labels.merge_single_label(norm)
        assert label == f"NPS-merge ({norm}, single λ)"
        assert labels.is_merge_grid_label(label) and labels.parse_merge_single(label) == norm
    assert labels.parse_merge_single("NPS-merge") is None
    assert not labels.is_merge_grid_label("NPS-merge")


def test_cache_path_of_a_step_is_unchanged(tmp_path):
    """The step-name sanitising and the params hash (the step's settings and the numbers versions
    of the code groups it runs): a changed one would orphan every cached step."""
    from nps_bench.code_versions import versions
    p = ResultCache(tmp_path).path("text", "rt-sentiment", "prune-nps-focused-r0.05", {"keep": 0.05, "task": "x"})
    v = versions()
    code = ", ".join(f'"{g}": {v[g]}' for g in sorted(("bench", "eval", "prune", "search")))
    digest = hashlib.sha256(f'{{"_code": {{{code}}}, "keep": 0.05, "task": "x"}}'.encode()).hexdigest()[:16]
    assert p.relative_to(tmp_path).as_posix() == f"text/rt-sentiment/prune-nps-focused-r0.05-{digest}.json"
