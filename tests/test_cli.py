"""The `nps` command surface: help on every subcommand, YAML configs, option validation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nps_pruning.cli import build_parser, main
from nps_pruning.cli.options import COMMANDS, PruneOptions, build, load_yaml_config
from nps_pruning.errors import NPSError
from nps_pruning.search import shipped_search


@pytest.mark.parametrize("command", list(COMMANDS) + ["run"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nps " + command)


def test_top_level_help_lists_all_subcommands():
    text = build_parser().format_help()
    for command in list(COMMANDS) + ["run"]:
        assert command in text


def test_flags_and_yaml_give_the_same_options(tmp_path):
    args = build_parser().parse_args(["prune", "pre", "ft", "-o", "out", "--eval", "text-classification:c.csv",
                                      "--keep", "0.02", "--bands", "4", "--seed", "7", "--calib-size", "64"])
    from nps_pruning.cli.options import from_namespace
    from_flags = from_namespace(PruneOptions, args)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("command: prune\npretrained: pre\nfinetuned: ft\noutput: out\n"
                   "eval: text-classification:c.csv\nkeep: 0.02\nbands: 4\nseed: 7\ncalib-size: 64\n")
    command, from_yaml = load_yaml_config(cfg)
    assert command == "prune"
    assert from_yaml == from_flags
    assert from_flags.keep == 0.02 and from_flags.bands == 4 and from_flags.calib_size == 64
    assert from_flags.generations == shipped_search().generations  # default kept


def test_repeated_list_options():
    from nps_pruning.cli.options import MergeOptions, from_namespace
    args = build_parser().parse_args(["merge", "pre", "a", "b", "-o", "out", "--eval", "x", "--eval", "y",
                                      "--lambda", "0.5", "--method", "ties"])
    opts = from_namespace(MergeOptions, args)
    assert opts.finetuned == ["a", "b"] and opts.eval == ["x", "y"] and opts.lam == 0.5


@pytest.mark.parametrize("values, message", [
    ({"keep": 0.0}, "out of range"),
    ({"keep": 1.5}, "out of range"),
    ({"bands": 0}, "out of range"),
    ({"scheme": "svd"}, "must be one of"),
    ({"keep": "lots"}, "wrong type"),
    ({"bands": 2.5}, "wrong type"),
    ({"resume": "yes"}, "wrong type"),
    ({"kepp": 0.1}, "unknown option 'kepp'"),
])
def test_config_validation_errors(values, message):
    base = {"pretrained": "p", "finetuned": "f", "output": "o"}
    with pytest.raises(NPSError, match=message):
        build(PruneOptions, {**base, **values})


def test_missing_required_option():
    with pytest.raises(NPSError, match="'output' is required"):
        build(PruneOptions, {"pretrained": "p", "finetuned": "f"})


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: explode\n")
    with pytest.raises(NPSError, match="'command' must be one of"):
        load_yaml_config(bad)
    with pytest.raises(NPSError, match="config file not found"):
        load_yaml_config(tmp_path / "missing.yaml")
    bad.write_text("command: prune\n  - : [\n")
    with pytest.raises(NPSError, match="not valid YAML"):
        load_yaml_config(bad)


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nps_pruning.cli", "eval", str(tmp_path / "nope"),
                           "--eval", "text-classification:" + str(tmp_path / "x.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("nps: error:") and "nope" in lines[0]


def test_search_bounds_default_per_parametrisation():
    from nps_pruning.cli.settings import search_settings
    base = {"pretrained": "p", "finetuned": "f", "output": "o"}
    lin = search_settings(build(PruneOptions, {**base, "param": "linear"}))
    assert (lin.lower, lin.upper, lin.sigma0, lin.param) == (0.0, 4.0, 0.3, "linear")
    log = search_settings(build(PruneOptions, {**base, "param": "log"}))
    assert (log.lower, log.upper, log.sigma0, log.param) == (0.25, 8.0, 1.0, "log")
    custom = search_settings(build(PruneOptions, {**base, "param": "log", "upper": 4, "sigma0": 0.5}))
    assert (custom.lower, custom.upper, custom.sigma0) == (0.25, 4.0, 0.5)
    assert lin.subspace == "family"
    assert search_settings(build(PruneOptions, {**base, "subspace": "full"})).subspace == "full"
    with pytest.raises(NPSError, match="--param log needs --lower > 0"):
        search_settings(build(PruneOptions, {**base, "param": "log", "lower": 0}))
    with pytest.raises(NPSError, match="must be above"):
        search_settings(build(PruneOptions, {**base, "lower": 3, "upper": 2}))
