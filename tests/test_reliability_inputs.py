"""Issue 10, bad inputs and lying resumes: every item fails on the code before the fix.

* a search log identifies its run; ``--resume`` refuses another run's log, naming what differs;
* ``--executor processes`` workers die with a parent killed by ``kill -9``;
* a model folder without tokenizer files, a tokenizer larger than the model, 2-D images for a
  conv net: one ``nps: error:`` line, exit 2, nothing written;
* a YAML alias bomb is refused before it is expanded, never repr'd into a message;
* every float option refuses NaN/inf, seeds stay in the generators' range; a fuzz (hypothesis)
  of the option validation: every value either validates or raises a one-line NPSError;
* CSV with a UTF-8 BOM, a CSV field beyond Python's default limit; ``--json`` is strict JSON.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.cli import build_parser, main
from nps_pruning.cli.options import COMMANDS, PruneOptions, build, from_namespace, load_yaml_config
from nps_pruning.errors import NPSError

NPS = [sys.executable, "-m", "nps_pruning.cli"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    base, ft = make_tiny_bert(root)
    return {"root": root, "base": base, "ft": ft,
            "calib": write_text_csv(root / "calib.csv", rows=24, seed=0),
            "calib2": write_text_csv(root / "calib2.csv", rows=24, seed=7)}


def one_error_line(capsys, *names) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nps: error:"), err
    for name in names:
        assert str(name) in err[0], (name, err[0])
    return err[0]


# -- 4. --resume checks the run identity ---------------------------------------------------------
def _prune_args(pair, out, *extra):
    return ["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method", "nps",
            "--eval", f"text-classification:{pair['calib']}", "--bands", "2", "--generations", "1",
            "--popsize", "4", "--keep", "0.1", "--quiet",
            "--space", "magnitude", *extra]     # the paper's space: --kept-values original is valid


@pytest.fixture(scope="module")
def finished_log(pair):
    """The search log of a finished keep-0.1 run (the output keeps a copy of it)."""
    out = pair["root"] / "first"
    assert main(_prune_args(pair, out)) == 0
    return out / "search.jsonl"


def _plant(log: Path, out: Path) -> Path:
    """Put ``log`` where a killed run writing ``out`` would have left its log."""
    from nps_pruning.workdirs import claim_work_dir
    wd = out.with_name(out.name + ".nps-run")
    claim_work_dir(wd, out)                 # as the killed run made it: with its ownership marker
    shutil.copy2(log, wd / "search.jsonl")
    return wd / "search.jsonl"


def test_the_log_header_carries_the_run_identity(finished_log, pair):
    header = json.loads(finished_log.read_text().splitlines()[0])
    run = header["run"]
    assert run["keep"] == 0.1 and run["bands"] == 2 and run["scheme"] == "focused"
    assert run["method"] == "nps" and run["kept_values"] == "weighted"
    assert run["eval"]["kind"] == "text-classification"
    assert run["eval"]["file"].startswith("sha256:")
    assert set(run["finetuned"]) >= {"model.safetensors", "config.json"}
    assert all(v.startswith("sha256:") for v in run["pretrained"].values())
    assert str(pair["root"]) not in json.dumps(run)      # content, not paths


@pytest.mark.parametrize("change, expect", [
    (["--keep", "0.3"], "keep 0.1 in the log, 0.3 now"),
    (["--scheme", "uniform"], "scheme focused in the log, uniform now"),
    (["--kept-values", "original"], "kept_values weighted in the log, original now"),
    (["--calib-size", "10"], "calib_size absent in the log, 10 now"),
    (["--focus", "2"], "focus 3.0 in the log, 2.0 now"),
    (["--seed", "4"], "settings.seed 0 in the log, 4 now"),
])
def test_resume_refuses_a_log_of_other_settings(pair, finished_log, tmp_path, capsys, change, expect):
    out = tmp_path / "out"
    log = _plant(finished_log, out)
    before = log.read_bytes()
    assert main(_prune_args(pair, out, "--resume", *change)) == 2
    line = one_error_line(capsys, log, "cannot resume", expect)
    assert "another run" in line
    assert not out.exists() and log.read_bytes() == before           # nothing written


def test_resume_refuses_other_calibration_data_or_models(pair, finished_log, tmp_path, capsys):
    out = tmp_path / "out"
    log = _plant(finished_log, out)
    args = _prune_args(pair, out, "--resume")
    other_calib = args.index(f"text-classification:{pair['calib']}")
    args_calib = list(args)
    args_calib[other_calib] = f"text-classification:{pair['calib2']}"
    assert main(args_calib) == 2
    one_error_line(capsys, "cannot resume", "eval.file changed")

    # another fine-tuned model: same files, one weight changed
    ft2 = tmp_path / "ft2"
    shutil.copytree(pair["ft"], ft2)
    from safetensors.torch import load_file, save_file
    sd = load_file(ft2 / "model.safetensors")
    name = next(k for k in sd if k.endswith("query.weight"))
    sd[name] = sd[name] + 1e-3
    save_file(sd, str(ft2 / "model.safetensors"), metadata={"format": "pt"})
    args_ft = list(args)
    args_ft[2] = str(ft2)
    assert main(args_ft) == 2
    one_error_line(capsys, "cannot resume", "finetuned.model.safetensors changed")
    assert not out.exists()


def test_resume_of_the_same_run_still_replays_the_log(pair, finished_log, tmp_path):
    out = tmp_path / "moved" / "out"
    moved = tmp_path / "moved_models"                 # the same content elsewhere resumes
    shutil.copytree(pair["ft"], moved / "ft")
    _plant(finished_log, out)
    args = _prune_args(pair, out, "--resume")
    args[2] = str(moved / "ft")
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    first = json.loads((finished_log.parent / "report.json").read_text())
    assert report["search"]["best_weights"] == first["search"]["best_weights"]
    assert report["calibration"] == first["calibration"]


def test_resume_refuses_a_log_without_run_identity(pair, finished_log, tmp_path, capsys):
    out = tmp_path / "out"
    log = _plant(finished_log, out)
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    del header["run"]                                  # as the old code wrote it
    log.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    assert main(_prune_args(pair, out, "--resume")) == 2
    one_error_line(capsys, "cannot resume", "no run identity")


def test_run_search_refuses_another_run_id(tmp_path):
    from nps_pruning.search import SearchSettings, run_search
    log = tmp_path / "s.jsonl"
    s = lambda: SearchSettings(generations=1, popsize=4, seed=0, upper=2.0,   # noqa: E731
                                 space="magnitude")
    run_search(lambda w: float(-np.sum((w - 1.5) ** 2)), 3, s(), log_path=log, progress=False,
               run_id={"keep": 0.1, "finetuned": {"m.safetensors": "sha256:aa"}})
    with pytest.raises(NPSError, match=r"cannot resume.*finetuned.m.safetensors changed"):
        run_search(lambda w: 0.0, 3, s(), log_path=log, resume=True, progress=False,
                   run_id={"keep": 0.1, "finetuned": {"m.safetensors": "sha256:bb"}})
    again = run_search(lambda w: float(-np.sum((w - 1.5) ** 2)), 3, s(), log_path=log, resume=True,
                       progress=False, run_id={"keep": 0.1, "finetuned": {"m.safetensors": "sha256:aa"}})
    assert again.reused == len(again.candidates)


def test_large_files_are_fingerprinted_by_sampled_blocks(tmp_path, monkeypatch):
    from nps_pruning.search import identity
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 4 << 20)
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(8 << 20))
    a = identity.file_fingerprint(f)
    assert a.startswith("size:8388608,sampled-sha256:")
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert identity.file_fingerprint(f) != a


# -- 5. workers die with a parent killed by kill -9 ---------------------------------------------
SLOW_SCORER = '''
import os, time
class Slow:
    def __init__(self, folder):
        self.folder = folder
    def __call__(self, weights):
        open(os.path.join(self.folder, "worker-%d" % os.getpid()), "w").close()
        time.sleep(300)
        return 0.0
'''
PARENT = '''
import sys
import numpy as np
if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from slow_scorer import Slow
    from nps_pruning.search.executors import ProcessExecutor
    ex = ProcessExecutor(2)
    ex.map(Slow(sys.argv[1]), [np.ones(2), np.ones(2)])
'''
WATCHDOG_ONLY = '''
import os, sys, time
from nps_pruning.search.executors import die_with_parent
if __name__ == "__main__":
    child = os.fork()
    if child == 0:
        die_with_parent(os.getppid(), interval=0.1, pdeathsig=False)   # the thread alone
        open(os.path.join(sys.argv[1], "worker-%d" % os.getpid()), "w").close()
        time.sleep(300)
        os._exit(0)
    time.sleep(300)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return False
    return "Z" not in state.split(":", 1)[1].split()[0]       # a zombie is dead, awaiting its reaper


def _kill_parent_and_watch_workers(tmp_path: Path, script: str, workers: int) -> None:
    (tmp_path / "slow_scorer.py").write_text(SLOW_SCORER)
    (tmp_path / "parent.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path)],
                            env=SUB_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
            if len(pids) >= workers:
                break
            time.sleep(0.1)
        assert len(pids) >= workers, proc.stderr.read().decode() if proc.poll() is not None else pids
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)                    # the real thing: no cleanup runs
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "workers outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:                                      # never leave one behind on failure
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and kill -9 semantics")
def test_process_workers_die_with_a_killed_parent(tmp_path):
    _kill_parent_and_watch_workers(tmp_path, PARENT, workers=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and fork")
def test_the_watchdog_alone_ends_an_orphaned_worker(tmp_path):
    _kill_parent_and_watch_workers(tmp_path, WATCHDOG_ONLY, workers=1)


# -- 6. tokenizers that do not fit ---------------------------------------------------------------
def test_eval_refuses_a_model_folder_without_tokenizer_files(pair, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(pair["ft"] / name, bare / name)
    assert main(["eval", str(bare), "--eval", f"text-classification:{pair['calib']}", "--json"]) == 2
    one_error_line(capsys, bare, "no tokenizer files")
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_prune_refuses_a_finetuned_folder_without_tokenizer(pair, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(pair["ft"] / name, bare / name)
    out = tmp_path / "out"
    assert main(["prune", str(pair["base"]), str(bare), "-o", str(out), "--method", "magnitude",
                 "--eval", f"text-classification:{pair['calib']}", "--quiet"]) == 2
    one_error_line(capsys, bare, "no tokenizer files")
    assert not out.exists() and not out.with_name("out.nps-run").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(pair, tmp_path, capsys):
    from transformers import AutoTokenizer
    big = tmp_path / "big"
    shutil.copytree(pair["ft"], big)
    tok = AutoTokenizer.from_pretrained(str(big))
    rows = json.loads((big / "config.json").read_text())["vocab_size"]
    extra = [f"zz{i}" for i in range(rows + 5)]
    tok.add_tokens(extra)
    tok.save_pretrained(str(big))
    assert len(AutoTokenizer.from_pretrained(str(big))) > rows
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{w} good,1\n" for w in extra[-4:]))
    assert main(["eval", str(big), "--eval", f"text-classification:{data}"]) == 2
    one_error_line(capsys, data, "input embedding has", "do not match")


# -- 8. YAML alias bomb ---------------------------------------------------------------------------
BOMB = "command: prune\npretrained: p\nfinetuned: f\noutput: o\nkeep:\n" + "".join(
    f"  - &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}" if i else "lol"] * 9) + "]\n"
    for i in range(9))


@pytest.mark.timeout(120)
def test_yaml_alias_bomb_is_refused_quickly_and_small(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
    code = limit + "import sys; from nps_pruning.cli import main; sys.exit(main(['run', sys.argv[1]]))"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], env=SUB_ENV, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nps: error:") and str(cfg) in lines[0]
    assert "expands to more than" in lines[0] and len(lines[0]) < 400
    assert time.monotonic() - t0 < 60


def test_recursive_yaml_alias_and_huge_values_give_short_messages(tmp_path):
    cfg = tmp_path / "rec.yaml"
    cfg.write_text("command: prune\npretrained: p\nfinetuned: f\noutput: o\nkeep: &a [*a]\n")
    with pytest.raises(NPSError, match="recursive YAML alias"):
        load_yaml_config(cfg)
    shared = ["x" * 1000] * 10
    for _ in range(6):                                 # 10**6 strings if repr'd in full
        shared = [shared] * 10
    with pytest.raises(NPSError) as e:
        build(PruneOptions, {"pretrained": "p", "finetuned": "f", "output": "o", "keep": shared})
    assert "wrong type" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(NPSError, match="option names must be strings"):
        build(PruneOptions, {1: 2})


# -- low: float options, seeds -------------------------------------------------------------------
def _float_options():
    out = []
    for command, cls in COMMANDS.items():
        for f in dataclasses.fields(cls):
            if "float" in str(f.type):
                out.append((command, f))
    return out


FLOAT_OPTIONS = _float_options()
NON_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", float("nan"), float("inf"), -float("inf")]


def test_every_float_option_is_known():
    names = {f.name for _, f in FLOAT_OPTIONS}
    assert {"keep", "focus", "sigma0", "lower", "upper", "lam", "lambdas", "lambda_grid"} <= names


@pytest.mark.parametrize("command, field", FLOAT_OPTIONS, ids=[f"{c}-{f.name}" for c, f in FLOAT_OPTIONS])
def test_non_finite_float_options_are_refused(command, field):
    for bad in NON_FINITE:
        value = [1.0, bad] if field.metadata.get("many") else bad
        with pytest.raises(NPSError, match=f"option '{field.name}' must be a finite number"):
            build(COMMANDS[command], {field.name: value})


@pytest.mark.parametrize("argv, name", [
    (["prune", "p", "f", "-o", "OUT", "--keep", "nan"], "keep"),
    (["prune", "p", "f", "-o", "OUT", "--focus", "inf"], "focus"),
    (["prune", "p", "f", "-o", "OUT", "--sigma0", "nan"], "sigma0"),
    (["prune", "p", "f", "-o", "OUT", "--upper", "inf"], "upper"),
    (["merge", "p", "a", "b", "-o", "OUT", "--method", "ties", "--lambda", "nan"], "lam"),
    (["transfer", "p", "f", "-o", "OUT", "--eval-source", "x", "--eval-target", "y",
      "--lambdas", "0.5", "nan"], "lambdas"),
    (["prune", "p", "f", "-o", "OUT", "--seed", "-5"], "seed"),
    (["prune", "p", "f", "-o", "OUT", "--seed", str(2**32)], "seed"),
    (["eval", "m", "--eval", "x:y", "--seed", "-1"], "seed"),
    (["prune", "p", "f", "-o", "OUT", "--bands", "1e3"], "bands"),
    (["prune", "p", "f", "-o", "OUT", "--popsize", str(10**30)], "popsize"),
])
def test_bad_numbers_on_the_command_line(tmp_path, capsys, argv, name):
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    one_error_line(capsys, f"'{name}'")
    assert not out.exists()


def test_seed_range_bounds_are_inclusive():
    base = {"pretrained": "p", "finetuned": "f", "output": "o"}
    assert build(PruneOptions, {**base, "seed": 2**32 - 1}).seed == 2**32 - 1
    assert build(PruneOptions, {**base, "seed": 0}).seed == 0


def test_argparse_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "only-one-positional"])
    assert e.value.code == 2
    one_error_line(capsys, "finetuned")


# -- fuzz of the option validation ----------------------------------------------------------------
ADVERSARIAL = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["nan", "inf", "-1", "0", "1e999", "1e-320", "0x10", " 1 ", "", "\x00", "é",
                     "focused", "linear", "nps", "ties", "9" * 5000, "a" * 5000, "1_0"]),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _check_one_line(exc: NPSError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 600, msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_fuzz_option_values_validate_or_raise_one_line(command, data):
    cls = COMMANDS[command]
    fields = [f.name for f in dataclasses.fields(cls)]
    keys = data.draw(st.lists(st.one_of(st.sampled_from(fields), st.text(max_size=8)), max_size=4))
    values = {k: data.draw(ADVERSARIAL) for k in keys}
    try:
        opts = build(cls, values, source="fuzz")
    except NPSError as exc:
        _check_one_line(exc)
        return
    for f in dataclasses.fields(opts):                 # what validates is sane
        v = getattr(opts, f.name)
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, float):
                assert np.isfinite(item)
            if f.metadata.get("choices") and item is not None:
                assert item in f.metadata["choices"]


@settings(max_examples=200, deadline=None)
@given(flag_values=st.lists(st.tuples(
    st.sampled_from(["--keep", "--bands", "--focus", "--seed", "--sigma0", "--lower", "--upper",
                     "--popsize", "--generations", "--calib-size", "--batch-size", "--scheme",
                     "--workers", "--max-failures", "--tau-dtype", "--param"]),
    st.one_of(st.text(alphabet="0123456789.-+eEinfaINF x_", max_size=12),
              st.sampled_from(["nan", "inf", "-0", "1e308", "1e309", str(2**64), "-5"]))),
    max_size=4))
def test_fuzz_command_line_numbers(flag_values):
    argv = ["prune", "p", "f", "-o", "o"]
    for flag, value in flag_values:
        argv += [f"{flag}={value}"]
    try:
        ns = build_parser().parse_args(argv)
        opts = from_namespace(PruneOptions, ns)
    except NPSError as exc:
        _check_one_line(exc)
        return
    except SystemExit as exc:                           # argparse's own (one nps: error: line)
        assert exc.code == 2
        return
    assert 0 < opts.keep <= 1 and np.isfinite(opts.focus) and 0 <= opts.seed < 2**32


# -- low: CSV quirks, images, JSON ----------------------------------------------------------------
def test_csv_with_a_utf8_bom_reads_the_text_column(pair, tmp_path):
    from nps_pruning.evaluation.text import read_text_rows
    plain = read_text_rows(pair["calib"])
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + pair["calib"].read_bytes())
    assert read_text_rows(bom) == plain
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t, "label": int(l)}) + "\n"
                                             for t, l in zip(*plain)).encode())
    texts, labels = read_text_rows(jl)
    assert texts == plain[0] and [int(x) for x in labels] == [int(x) for x in plain[1]]


def test_csv_field_longer_than_the_default_limit(pair, tmp_path, capsys):
    long_csv = tmp_path / "long.csv"
    with open(long_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerow(["good " * 60_000, 1])            # 300 KB > csv's 128 KiB default
        w.writerow(["bad film", 0])
    limit = csv.field_size_limit()
    spec = f"text-classification:{long_csv}"
    # the tiny model has 64 positions: the default --max-length 128 is refused in one line
    assert main(["eval", str(pair["ft"]), "--eval", spec]) == 2
    one_error_line(capsys, long_csv, "at most 64 positions", "--max-length 64")
    assert main(["eval", str(pair["ft"]), "--eval", spec, "--max-length", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_rows"] == 2
    assert csv.field_size_limit() == limit           # the process-wide limit is restored


NET_PY = '''
import math
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

def build(state_dict):
    return Net()

def infinite(model):
    return math.inf
'''


@pytest.fixture
def net(tmp_path):
    from safetensors.torch import save_file
    mod = tmp_path / "netmod.py"
    mod.write_text(NET_PY)
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(0)
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in ns["Net"]().state_dict().items()}, str(weights))
    return mod, weights


def test_images_without_a_channel_axis(net, tmp_path, capsys):
    mod, weights = net
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=12)
    np.savez(tmp_path / "nhw.npz", images=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), labels=labels)
    np.savez(tmp_path / "flat.npz", images=rng.integers(0, 256, (12, 64), dtype=np.uint8), labels=labels)
    factory = ["--model-factory", f"python:{mod}:build"]
    # N×H×W: one channel, scored
    assert main(["eval", str(weights), "--eval", f"image-classification:{tmp_path / 'nhw.npz'}",
                 "--json", *factory]) == 0
    assert json.loads(capsys.readouterr().out)["num_rows"] == 12
    # N×D for a conv net: one clear line naming the file and the shape, not a torch traceback
    assert main(["eval", str(weights), "--eval", f"image-classification:{tmp_path / 'flat.npz'}",
                 *factory]) == 2
    one_error_line(capsys, tmp_path / "flat.npz", "(12, 64)", "cannot score")


def test_json_output_is_strict_json_for_an_infinite_score(net, pair, capsys):
    mod, _ = net
    assert main(["eval", str(pair["ft"]), "--eval", f"python:{mod}:infinite", "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"not JSON: {name}")
    result = json.loads(out, parse_constant=refuse)
    assert result["score"] is None
