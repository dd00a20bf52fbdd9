"""Seams of the library: CLI choices come from the registries, and the search has one set of defaults.

Adding a pruner is one function and one registry entry: a toy pruner registered here (after
``nps_pruning.cli.options`` was imported) is listed by ``nps prune --help``, accepted by YAML and flag
validation, and runs end to end. The CLI/YAML search defaults are ``shipped_search()``'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from nps_pruning.checkpoints.sparse import read_task_vector
from nps_pruning.cli import main
from nps_pruning.cli.options import (COMMANDS, MergeOptions, PruneOptions, SearchOptions, build,
                                     load_yaml_config)
from nps_pruning.cli.settings import search_settings
from nps_pruning.core.merge import MERGERS, NORMALIZATIONS, nps_combine, register_merger, register_normalization
from nps_pruning.core.sparsify import PRUNERS, register_pruner
from nps_pruning.errors import NPSError
from nps_pruning.search import PARAM_DEFAULTS, POPSIZE_MIN, SearchSettings
from nps_pruning.search.cmaes_search import POPSIZE_MAX

TOY_PRUNER = "toy-positive"
TOY_MERGER = "toy-half-sum"


def toy_prune(values: torch.Tensor, keep_ratio: float, *, seed: int = 0) -> torch.Tensor:
    """Keep the positive entries of τ, scaled by the keep ratio (elementwise, so the expected
    output of each tensor is this function applied to that tensor's τ)."""
    return torch.where(values > 0, values * keep_ratio, torch.zeros_like(values))


def toy_merge(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
              seed: int = 0) -> torch.Tensor:
    return 0.5 * lam * taus.sum(dim=0)


@contextlib.contextmanager
def registered(registry: dict, register, name: str, fn):
    """``register(name)(fn)`` for the duration of the block; removed afterwards (even on failure),
    so no other test sees the toy entry."""
    assert name not in registry
    register(name)(fn)
    try:
        yield name
    finally:
        registry.pop(name, None)


def help_text(command: str) -> str:
    """``nps COMMAND --help``, one line per option (argparse wraps at the terminal width, also
    inside hyphenated names)."""
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            main([command, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    assert e.value.code == 0
    return out.getvalue()


BASE = {"pretrained": "p", "finetuned": "f", "output": "o"}


def method_error(cls, **values) -> str:
    with pytest.raises(NPSError) as e:
        build(cls, {**BASE, **values}, source="cfg.yaml")
    return str(e.value)


# -- 1. choices come from the registries ----------------------------------------------------------
def test_a_registered_pruner_is_a_choice_everywhere(tmp_path):
    before = method_error(PruneOptions, method="no-such-pruner")
    assert before == ("cfg.yaml: option 'method' must be one of "
                      f"{', '.join(('nps', *PRUNERS))}, not 'no-such-pruner'")
    assert TOY_PRUNER not in help_text("prune")
    with registered(PRUNERS, register_pruner, TOY_PRUNER, toy_prune):
        for command in ("prune", "compress", "transfer"):
            assert re.search(r"\(nps\|[^)]*\b" + TOY_PRUNER + r"\b", help_text(command)), command
        assert build(PruneOptions, {**BASE, "method": TOY_PRUNER}).method == TOY_PRUNER
        cfg = tmp_path / "toy.yaml"
        cfg.write_text(f"command: prune\npretrained: p\nfinetuned: f\noutput: o\nmethod: {TOY_PRUNER}\n")
        assert load_yaml_config(cfg)[1].method == TOY_PRUNER
        # an unknown name is still refused, with the same message (now listing the toy too)
        assert method_error(PruneOptions, method="no-such-pruner") == (
            "cfg.yaml: option 'method' must be one of "
            f"{', '.join(('nps', *PRUNERS))}, not 'no-such-pruner'")
        assert TOY_PRUNER in method_error(PruneOptions, method="no-such-pruner")
    assert TOY_PRUNER not in PRUNERS
    assert method_error(PruneOptions, method=TOY_PRUNER) == (
        f"cfg.yaml: option 'method' must be one of {', '.join(('nps', *PRUNERS))}, not '{TOY_PRUNER}'")
    assert method_error(PruneOptions, method="no-such-pruner") == before


def _tau(base_sd, ft_sd, key):
    b = key[len("bert."):] if key.startswith("bert.") else key
    return ft_sd[key].float() - base_sd[b].float(), base_sd[b]


def test_a_registered_pruner_runs_end_to_end(tiny_bert, tmp_path):
    base, ft = tiny_bert
    out = tmp_path / "toy"
    with registered(PRUNERS, register_pruner, TOY_PRUNER, toy_prune):
        assert main(["prune", str(base), str(ft), "-o", str(out), "--method", TOY_PRUNER,
                     "--keep", "0.5", "--quiet"]) == 0
    base_sd, ft_sd = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    tvec, model = read_task_vector(out / "task_vector.safetensors"), load_file(out / "model.safetensors")
    assert len(tvec) > 5
    for key, written in tvec.items():
        tau, b = _tau(base_sd, ft_sd, key)
        expected = toy_prune(tau, 0.5)
        assert torch.equal(written, expected), key
        assert torch.allclose(model[key].float(), b.float() + expected, rtol=0, atol=1e-7), key
    assert sum(int((t != 0).sum()) for t in tvec.values()) < sum(t.numel() for t in tvec.values())


def test_a_registered_merger_is_a_choice_and_runs(tiny_bert, tmp_path):
    base, ft = tiny_bert
    assert TOY_MERGER not in help_text("merge")
    out = tmp_path / "merged"
    with registered(MERGERS, register_merger, TOY_MERGER, toy_merge):
        assert re.search(r"\(nps\|[^)]*\b" + TOY_MERGER + r"\b", help_text("merge"))
        assert build(MergeOptions, {**BASE, "finetuned": ["a", "b"], "method": TOY_MERGER}).method == TOY_MERGER
        assert main(["merge", str(base), str(ft), str(ft), "--names", "a", "b", "-o", str(out),
                     "--method", TOY_MERGER, "--lambda", "0.5", "--quiet"]) == 0
    assert "must be one of" in method_error(MergeOptions, finetuned=["a", "b"], method=TOY_MERGER)
    base_sd, ft_sd = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    merged = load_file(out / "merged_task_vector.safetensors")
    for key, written in merged.items():
        tau, _ = _tau(base_sd, ft_sd, key)
        assert torch.equal(written, toy_merge(torch.stack([tau, tau]), lam=0.5)), key


def test_a_registered_normalization_is_a_choice():
    opts = {**BASE, "finetuned": ["a", "b"]}
    with pytest.raises(NPSError, match="option 'normalize' must be one of mask-count, lambda-sum, none, "
                                       "not 'halve'"):
        build(MergeOptions, {**opts, "normalize": "halve"})
    with registered(NORMALIZATIONS, register_normalization, "halve", lambda total, pruned, lams: total / 2):
        assert build(MergeOptions, {**opts, "normalize": "halve"}).normalize == "halve"
        assert "mask-count|lambda-sum|none|halve" in help_text("merge")
        assert torch.equal(nps_combine(torch.tensor([[2.0, 0.0]]), [1.0], "halve"), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="normalize must be 'mask-count', 'lambda-sum' or 'none', got 'halve'"):
        nps_combine(torch.tensor([[2.0, 0.0]]), [1.0], "halve")


def test_every_registry_backed_option_lists_its_registry():
    from nps_pruning.store import VALUE_CODINGS
    from nps_pruning.store.mask_coding import MASK_CODINGS
    from nps_pruning.checkpoints.pair import TAU_DTYPES
    from nps_pruning.core.bands import SCHEMES
    from nps_pruning.core.space import SPACES
    from nps_pruning.evaluation.fitness import FITNESSES
    from nps_pruning.search.executors import EXECUTORS, make_executor
    fields = {(cls.__name__, f.name): f for cls in COMMANDS.values() for f in dataclasses.fields(cls)}

    def names(cls, name):
        return tuple(fields[(cls.__name__, name)].metadata["choices"])

    assert names(PruneOptions, "method") == ("nps", *PRUNERS)
    assert names(COMMANDS["transfer"], "method") == ("nps", *PRUNERS, "none")
    assert names(COMMANDS["compress"], "method") == ("nps", *PRUNERS)
    assert names(MergeOptions, "method") == ("nps", *MERGERS)
    assert names(MergeOptions, "normalize") == tuple(NORMALIZATIONS)
    assert names(COMMANDS["compress"], "values") == tuple(VALUE_CODINGS)
    assert names(COMMANDS["compress"], "mask") == tuple(MASK_CODINGS)
    assert names(PruneOptions, "tau_dtype") == tuple(TAU_DTYPES)
    assert names(PruneOptions, "executor") == tuple(EXECUTORS) == ("serial", "processes", "ray")
    assert names(PruneOptions, "param") == tuple(PARAM_DEFAULTS)
    # the default (or, for fitness, the effective default) first, then the registry's order
    assert names(PruneOptions, "scheme") == ("focused", *[s for s in SCHEMES if s != "focused"])
    assert names(PruneOptions, "space") == ("hybrid", *[s for s in SPACES if s != "hybrid"])
    assert names(PruneOptions, "fitness") == ("loglik-t", *[f for f in FITNESSES if f != "loglik-t"])
    with pytest.raises(NPSError, match=r"unknown executor 'gpu' \(choose serial, processes or ray\)"):
        make_executor("gpu")


# -- 2. one source of every default ----------------------------------------------------------------
SHARED = sorted({f.name for f in dataclasses.fields(SearchSettings)}
                & {f.name for f in dataclasses.fields(SearchOptions)})


def test_cli_and_yaml_search_defaults_are_search_settings(tmp_path):
    assert SHARED == ["generations", "lower", "max_failures", "min_gain", "min_generations", "param",
                      "patience", "patience_gap", "popsize", "race", "race_eta", "race_gap", "race_min_rows", "race_z", "refine_gap", "seed",
                      "sigma0", "space", "subspace", "upper"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("command: prune\npretrained: p\nfinetuned: f\noutput: o\n")
    from nps_pruning.search import shipped_search
    library = dataclasses.asdict(shipped_search())      # what `nps prune` runs with no flags
    for opts in (build(PruneOptions, BASE), load_yaml_config(cfg)[1],
                 build(MergeOptions, {**BASE, "finetuned": ["a", "b"]})):
        from_cli = dataclasses.asdict(search_settings(opts))
        assert {k: from_cli[k] for k in SHARED} == {k: library[k] for k in SHARED}
    # each option's own default: the library's, or None meaning "the parametrisation's"
    defaults = {f.name: f.default for f in dataclasses.fields(SearchOptions)}
    for name in SHARED:
        assert defaults[name] in (library[name], None), name
    def resolved_search_bounds(opts):          # (lower, upper, sigma0) the CLI resolves
        st = search_settings(opts)
        return st.lower, st.upper, st.sigma0
    assert resolved_search_bounds(build(PruneOptions, BASE)) == PARAM_DEFAULTS["linear"]
    log_opts = build(PruneOptions, {**BASE, "param": "log"})
    assert resolved_search_bounds(log_opts) == PARAM_DEFAULTS["log"]
    assert search_settings(log_opts) == shipped_search(**{k: v for k, v in dataclasses.asdict(
        SearchSettings.for_param("log")).items() if k in ("param", "lower", "upper", "sigma0")})
    # the CLI searched [0, 4] with σ0 0.3 in the hybrid space before this table existed
    assert (library["lower"], library["upper"], library["sigma0"], library["space"]) == (0.0, 4.0, 0.3, "hybrid")


def test_popsize_minimum_is_one_rule():
    popsize = next(f for f in dataclasses.fields(SearchOptions) if f.name == "popsize")
    assert popsize.metadata["lo"] == POPSIZE_MIN == 4
    with pytest.raises(NPSError, match="out of range"):
        build(PruneOptions, {**BASE, "popsize": POPSIZE_MIN - 1})
    with pytest.raises(NPSError, match=f"popsize must be in {POPSIZE_MIN}..{POPSIZE_MAX}"):
        SearchSettings(popsize=POPSIZE_MIN - 1).validate()
    SearchSettings(popsize=POPSIZE_MIN).validate()
    # and one upper bound (issue 37: --popsize 10**8 ran until killed)
    assert popsize.metadata["hi"] == POPSIZE_MAX
    with pytest.raises(NPSError, match="out of range"):
        build(PruneOptions, {**BASE, "popsize": POPSIZE_MAX + 1})
    with pytest.raises(NPSError, match=f"popsize must be in {POPSIZE_MIN}..{POPSIZE_MAX}"):
        SearchSettings(popsize=POPSIZE_MAX + 1).validate()
    SearchSettings(popsize=POPSIZE_MAX).validate()


def test_benchmark_search_settings_are_unchanged():
    """BenchConfig's values key the benchmark's result cache: its search bounds are the library's
    defaults, and those are the numbers every cached result was measured with."""
    from nps_bench.config import BenchConfig
    cfg = BenchConfig()
    assert (cfg.lower, cfg.upper, cfg.sigma0) == PARAM_DEFAULTS["linear"] == (0.0, 4.0, 0.3)
    assert (cfg.log_lower, cfg.log_upper, cfg.log_sigma0) == PARAM_DEFAULTS["log"] == (0.25, 8.0, 1.0)
    assert (cfg.bands, cfg.scheme, cfg.focus, cfg.generations, cfg.popsize, cfg.ablation_upper) == \
        (8, "focused", 3.0, 8, 8, 2.0)


def test_a_taken_name_cannot_be_registered_again():
    from nps_pruning.core.merge import MERGERS, NORMALIZATIONS, register_merger, register_normalization
    from nps_pruning.core.sparsify import PRUNERS, register_pruner
    for register, table, kind, name in ((register_pruner, PRUNERS, "pruner", "magnitude"),
                                        (register_merger, MERGERS, "merger", "ties"),
                                        (register_normalization, NORMALIZATIONS, "normalization", "none")):
        before = table[name]
        with pytest.raises(ValueError, match=f"{kind} '{name}' is already registered"):
            register(name)(lambda *a, **k: None)
        assert table[name] is before
