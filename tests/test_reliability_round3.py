"""Issue 37 (reliability, third round): each test here fails on the code before its fix.

* HIGH 1: one unlabelled row among labelled ones (a short CSV row, a JSON ``null``, an
  unterminated quote) is one ``nps: error:`` line naming the row, never an all-zero labelling;
* HIGH 2: a LoRA adapter folder's symbolic links are not followed into the input cache or OUT;
* HIGH 3: a GGUF file with a tensor missing or renamed, or a tensor count of 0, is refused in one
  line and nothing is cached; a LoRA adapter with a targeted layer missing, A/B ranks that differ,
  a bad rank or alpha, a bad or pathological pattern, a truncated weights file: one line each;
* HIGH 4: ``--resume`` refuses an edited log (a score set to Infinity or to another number, a
  string or null score) and records of another run appended to it.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.cli import main
from nps_pruning.errors import NPSError


def one_error_line(capsys, *names) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nps: error:"), err
    for name in names:
        assert str(name) in err[0], (name, err[0])
    return err[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3")
    base, ft = make_tiny_bert(root)
    return {"root": root, "base": base, "ft": ft,
            "calib": write_text_csv(root / "calib.csv", rows=24, seed=0),
            "calib2": write_text_csv(root / "calib2.csv", rows=24, seed=7)}


# -- HIGH 1: partly labelled data -------------------------------------------------------------------
def _eval(pair, path, *extra):
    return main(["eval", str(pair["ft"]), "--eval", f"text-classification:{path}", "--json", *extra])


def test_a_fully_labelled_csv_still_scores(pair, capsys):
    assert _eval(pair, pair["calib"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["score"] <= 1.0


@pytest.mark.parametrize("tail", ["good movie\n", '"good movie,1\n', "bad film,\n"],
                         ids=["no-label-field", "unterminated-quote", "empty-label"])
def test_one_unlabelled_csv_row_is_an_error_naming_it(pair, tmp_path, capsys, tail):
    path = tmp_path / "data.csv"
    text = pair["calib"].read_text()
    path.write_text(text + tail)
    rows = sum(1 for _ in csv.DictReader(open(pair["calib"])))
    assert _eval(pair, path) == 2
    one_error_line(capsys, "data.csv", f"row {rows + 1} has no label")
    # the search is refused the same way (it would search against all-zero labels)
    out = tmp_path / "out"
    assert main(["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method", "nps",
                 "--eval", f"text-classification:{path}", "--generations", "1", "--popsize", "4",
                 "--bands", "2", "--keep", "0.1", "--quiet"]) == 2
    one_error_line(capsys, f"row {rows + 1} has no label")
    assert not out.exists()


def test_a_jsonl_null_label_is_an_error(pair, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "good movie", "label": 1}, {"text": "bad film", "label": 0},
            {"text": "great plot", "label": None}, {"text": "dull", "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _eval(pair, path) == 2
    one_error_line(capsys, "data.jsonl", "row 3 has no label")


def test_agreement_takes_an_unlabelled_file_but_not_a_mixed_one(pair, tmp_path, capsys):
    from nps_pruning.evaluation.text import labels_present
    assert labels_present([None, None], "agreement", "f") is False
    assert labels_present([1, "0"], "agreement", "f") is True
    assert labels_present([1, 0], "accuracy", "f") is True
    with pytest.raises(NPSError, match="row 1 has no label.*2 of 2.*needs labels"):
        labels_present(["", None], "accuracy", "f")
    with pytest.raises(NPSError, match="row 1 has no label"):
        labels_present([None, 1], "agreement", "f")
    path = tmp_path / "unlab.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("good movie", "bad film")))
    from nps_pruning.evaluation.text import TextClassificationEvaluator
    ev = TextClassificationEvaluator(path, model_path=pair["ft"], fitness="agreement")
    assert ev.num_rows == 2


# -- HIGH 2: LoRA adapter links ---------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from test_lm_eval import _llm_tokenizer
    root = tmp_path_factory.mktemp("r3lora")
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = 0.3 * torch.randn(p.shape, generator=g)
    pm.save_pretrained(root / "adapter")
    return root, base


def _copy_adapter(root: Path, dst: Path) -> Path:
    shutil.copytree(root / "adapter", dst)
    return dst


def test_a_linked_tokenizer_file_of_an_adapter_is_not_copied(lora, tmp_path, monkeypatch, capsys):
    root, _ = lora
    secret = tmp_path / "SECRET.txt"
    secret.write_text("the secret is 42\n")
    adapter = _copy_adapter(root, tmp_path / "adapter")
    os.symlink(secret, adapter / "tokenizer.json")
    os.symlink(secret, adapter / "vocab.json")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPS_INPUT_CACHE", str(cache))
    out = tmp_path / "out"
    assert main(["prune", str(root / "base"), str(adapter), "-o", str(out), "--method", "magnitude",
                 "--keep", "0.1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "symbolic link" in err and "tokenizer.json" in err
    for folder in (out, cache):
        for f in folder.rglob("*"):
            if f.is_file():
                assert b"the secret is 42" not in f.read_bytes(), f
    # the base's own tokenizer is what the output carries
    assert (out / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()


def test_a_relative_base_path_is_taken_from_the_adapter_folder(lora, tmp_path, monkeypatch):
    from nps_pruning.checkpoints.lora import lora_to_folder
    root, _ = lora
    home = tmp_path / "project"
    shutil.copytree(root / "base", home / "base")
    adapter = _copy_adapter(root, home / "adapters" / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../../base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    elsewhere = tmp_path / "elsewhere"        # ../../base from here is not a folder
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = lora_to_folder(adapter, cache_dir=tmp_path / "cache")
    assert load_file(str(out / "model.safetensors")).keys() == \
        load_file(str(root / "base" / "model.safetensors")).keys()


def _adapter_with(root, tmp_path, name, *, config=None, tensors=None):
    adapter = _copy_adapter(root, tmp_path / name)
    if config is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        text = json.dumps(config(cfg)) if callable(config) else config
        (adapter / "adapter_config.json").write_text(text)
    if tensors is not None:
        w = adapter / "adapter_model.safetensors"
        save_file(tensors(load_file(str(w))), str(w))
    return adapter


def _drop_one_layer(t):
    return {k: v for k, v in t.items() if "layers.1.self_attn.v_proj" not in k}


def _bad_inner_dim(t):
    k = next(k for k in t if "layers.0.self_attn.q_proj.lora_B" in k)
    return {**t, k: torch.zeros(t[k].shape[0], 3)}


@pytest.mark.parametrize("name, change, expect", [
    ("missing-layer", {"tensors": _drop_one_layer}, "layers.1.self_attn.v_proj.weight"),
    ("inner-dims", {"tensors": _bad_inner_dim}, "inner (rank) dimensions differ"),
    ("r-zero", {"config": lambda c: {**c, "r": 0}}, "rank r must be a positive integer"),
    ("r-negative", {"config": lambda c: {**c, "r": -4}}, "rank r must be a positive integer"),
    ("r-string", {"config": lambda c: {**c, "r": "abc"}}, "rank r must be a positive integer"),
    ("r-null", {"config": lambda c: {**c, "r": None}}, "rank r must be a positive integer"),
    ("alpha-string", {"config": lambda c: {**c, "lora_alpha": "x"}}, "lora_alpha must be a finite"),
    ("config-list", {"config": "[1, 2]"}, "not a JSON object"),
    ("config-deep", {"config": "[" * 50000 + "]" * 50000}, "not readable JSON"),
    ("bad-regex", {"config": lambda c: {**c, "rank_pattern": {"q_proj(": 2}}}, "not a valid regular"),
])
def test_bad_lora_adapters_are_one_error_line(lora, tmp_path, monkeypatch, capsys, name, change, expect):
    root, _ = lora
    adapter = _adapter_with(root, tmp_path, name, **change)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPS_INPUT_CACHE", str(cache))
    t0 = time.monotonic()
    assert main(["eval", str(adapter), "--eval", "perplexity:" + str(_text(tmp_path))]) == 2
    assert time.monotonic() - t0 < 60
    one_error_line(capsys, expect)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_pathological_pattern_is_refused_in_bounded_time(monkeypatch):
    import nps_pruning.checkpoints.lora as ext
    monkeypatch.setattr(ext, "PATTERN_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    with pytest.raises(NPSError, match="pathological"):
        ext._pattern_value({"(a|aa)+(a|aa)+(a|aa)+(a|aa)+b": 2}, "x." + "a" * 60, 8)
    assert time.monotonic() - t0 < 10
    with pytest.raises(NPSError, match="longer than"):
        ext._pattern_value({"a" * 500: 2}, "x.a", 8)
    assert ext._pattern_value({"q_proj|k_proj": 2}, "model.layers.0.self_attn.k_proj", 8) == 2
    assert ext._pattern_value({"layers.1.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8


def test_a_truncated_adapter_file_is_one_error_line(lora, tmp_path, monkeypatch, capsys):
    root, _ = lora
    adapter = _copy_adapter(root, tmp_path / "trunc")
    w = adapter / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    assert main(["eval", str(adapter), "--eval", "perplexity:" + str(_text(tmp_path))]) == 2
    one_error_line(capsys, "adapter_model.safetensors", "not a readable safetensors file")


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    if not path.exists():
        path.write_text("good movie the plot\n\nbad film very dull\n")
    return path


# -- HIGH 3: GGUF files with tensors missing ------------------------------------------------------
gguf = pytest.importorskip("gguf")


def _write_gguf(model, path, rename=None, extra=None):
    from test_external_inputs import gguf_tensors
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    for _, name, arr, _ in gguf_tensors(model):
        w.add_tensor(rename.get(name, name) if rename else name, arr)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parametrize("case", ["renamed", "zero-count", "extra"])
def test_a_gguf_file_with_tensors_missing_is_refused_and_not_cached(lora, tmp_path, monkeypatch,
                                                                      capsys, case):
    _, model = lora
    ok = _write_gguf(model, tmp_path / "ok.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPS_INPUT_CACHE", str(cache))
    from nps_pruning.checkpoints.external import resolve_input
    good = Path(resolve_input(ok))                     # the intact file converts
    assert set(load_file(str(good / "model.safetensors"))) == set(model.state_dict()) - {"lm_head.weight"}
    shutil.rmtree(cache)
    if case == "renamed":
        bad = _write_gguf(model, tmp_path / "bad.gguf", {"blk.1.attn_q.weight": "blk.1.attn_Z.weight"})
        expect = "model.layers.1.self_attn.q_proj.weight"
    elif case == "zero-count":
        data = bytearray(ok.read_bytes())
        assert data[:4] == b"GGUF"
        data[8:16] = struct.pack("<Q", 0)              # the header's tensor count
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(bytes(data))
        expect = "not in the file"
    else:                                              # a tensor transformers has no name for
        bad = _write_gguf(model, tmp_path / "bad.gguf",
                          extra={"blk.0.attn_Zed.weight": torch.ones(4, 4).numpy()})
        expect = "unrecognised tensor"
    assert main(["eval", str(bad), "--eval", "perplexity:" + str(_text(tmp_path))]) == 2
    one_error_line(capsys, "bad.gguf", expect)
    assert not cache.exists() or not any(cache.iterdir())


# -- HIGH 4: --resume trusts nothing in the log -----------------------------------------------------
def _prune_args(pair, out, calib="calib", *extra):
    return ["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method", "nps",
            "--eval", f"text-classification:{pair[calib]}", "--bands", "2", "--generations", "1",
            "--popsize", "4", "--keep", "0.1", "--quiet", "--space", "magnitude",
            # loglik: the tiny model is near chance, where the default loglik-t fits β* = 0 and
            # scores every candidate −log 2 on any rows; these tests need scores that differ
            "--fitness", "loglik", *extra]


@pytest.fixture(scope="module")
def logs(pair):
    """The search logs of two finished runs, on calib and on calib2."""
    out = {}
    for calib in ("calib", "calib2"):
        o = pair["root"] / f"done-{calib}"
        assert main(_prune_args(pair, o, calib)) == 0
        out[calib] = o / "search.jsonl"
    return out


def _plant(text: str, out: Path) -> Path:
    from nps_pruning.workdirs import claim_work_dir
    wd = out.with_name(out.name + ".nps-run")
    claim_work_dir(wd, out)                 # as a killed run made it: with its ownership marker
    (wd / "search.jsonl").write_text(text)
    return wd / "search.jsonl"


def test_an_untouched_log_resumes_to_the_same_result(pair, logs, tmp_path):
    out = tmp_path / "out"
    _plant(logs["calib"].read_text(), out)
    assert main(_prune_args(pair, out, "calib", "--resume")) == 0
    a = json.loads((out / "report.json").read_text())["search"]
    b = json.loads((logs["calib"].parent / "report.json").read_text())["search"]
    assert a["best_weights"] == b["best_weights"] and a["best_score"] == b["best_score"]


def _edit_score(value):
    def edit(lines):
        rec = json.loads(lines[2])
        rec["score"] = value
        lines[2] = json.dumps(rec)
        return lines
    return edit


@pytest.mark.parametrize("edit, expect", [
    (_edit_score(float("inf")), "score inf is not a finite number"),
    (_edit_score(0.999), "checksum chain breaks"),
    (_edit_score("0.9"), "is not a finite number"),
    (_edit_score(None), "is not a finite number"),
    (lambda lines: [lines[0], lines[1].replace('"chain"', '"chaim"')] + lines[2:], "no checksum"),
    (lambda lines: lines[:1] + ["[1, 2]"] + lines[1:], "not a JSON object"),
], ids=["infinity", "other-number", "string", "null", "no-chain", "not-object"])
def test_resume_refuses_an_edited_log(pair, logs, tmp_path, capsys, edit, expect):
    lines = logs["calib"].read_text().splitlines()
    out = tmp_path / "out"
    log = _plant("\n".join(edit(lines)) + "\n", out)
    before = log.read_bytes()
    assert main(_prune_args(pair, out, "calib", "--resume")) == 2
    one_error_line(capsys, "search.jsonl", expect)
    assert not out.exists() and log.read_bytes() == before


def test_resume_refuses_records_of_another_run_appended(pair, logs, tmp_path, capsys):
    """Generation 0 asks for the same weights whatever the data: records of a run on other
    calibration rows, pasted after this run's, would replay as this run's scores."""
    own = logs["calib"].read_text().splitlines()
    other = logs["calib2"].read_text().splitlines()
    gen0 = [l for l in other[1:] if json.loads(l)["gen"] == 0]
    assert gen0 and [json.loads(l)["score"] for l in gen0] != \
        [json.loads(l)["score"] for l in own[1:1 + len(gen0)]]
    out = tmp_path / "out"
    _plant("\n".join(own + gen0) + "\n", out)
    assert main(_prune_args(pair, out, "calib", "--resume")) == 2
    one_error_line(capsys, "checksum chain breaks")
    assert not out.exists()


# -- MEDIUM 5: one live run per output ------------------------------------------------------------
SLOW_EVAL = '''
import os, time, torch
_IDS = torch.tensor([[2, 5, 7, 9, 11, 13, 3], [2, 6, 8, 10, 12, 14, 3]])

def score(model):
    time.sleep(float(os.environ.get("NPS_TEST_DELAY", "0")))
    logits = model(input_ids=_IDS).logits
    return float(logits[:, 0].sum() - logits[:, 1].sum())
'''


def test_a_second_run_into_a_live_output_is_refused_and_the_first_finishes(pair, tmp_path, capsys):
    import subprocess
    import sys
    ev = tmp_path / "slow_eval.py"
    ev.write_text(SLOW_EVAL)
    out = tmp_path / "out"
    args = ["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method", "nps",
            "--space", "magnitude", "--bands", "2", "--generations", "3", "--popsize", "4",
            "--keep", "0.1", "--eval", f"python:{ev}:score", "--quiet"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "NPS_TEST_DELAY": "0.3", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "out.nps-run" / "search.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "nps_pruning.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (log.exists() and log.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        for extra in ([], ["--resume"]):           # a second run, and a --resume, while it runs
            assert main(args + extra) == 2
            one_error_line(capsys, "out.nps-run", f"pid {proc.pid}", "writing this output now")
            assert log.exists()
        assert main(["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method",
                     "magnitude", "--keep", "0.1", "--quiet"]) == 2
        one_error_line(capsys, "writing this output now")
        assert proc.wait(timeout=240) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    assert (out / "report.json").is_file() and not (tmp_path / "out.nps-run").exists()


def test_resume_with_a_method_that_does_not_search_leaves_the_log_alone(pair, logs, tmp_path, capsys):
    out = tmp_path / "out"
    log = _plant(logs["calib"].read_text(), out)
    before = log.read_bytes()
    assert main(["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method",
                 "magnitude", "--keep", "0.1", "--quiet", "--resume"]) == 2
    one_error_line(capsys, "--resume", "runs no search")
    assert log.read_bytes() == before and not out.exists()


def test_a_marker_of_a_dead_or_recycled_process_is_not_live():
    import socket
    from nps_pruning.workdirs import _proc_start, live_owner
    host = socket.gethostname()
    me = os.getpid()
    assert not live_owner({"host": host, "pid": me})                     # ourselves: not another run
    assert live_owner({"host": host, "pid": os.getppid(), "pid_start": _proc_start(os.getppid())})
    start = _proc_start(os.getppid())
    if start is not None:                                                 # a recycled pid
        assert not live_owner({"host": host, "pid": os.getppid(), "pid_start": start + 1})
    assert not live_owner({"host": host + "-elsewhere", "pid": os.getppid()})
    assert not live_owner({"host": host, "pid": 2 ** 22 + 12345})        # no such process


# -- MEDIUM 6: non-finite data and results ----------------------------------------------------------
from test_reliability_inputs import NET_PY  # noqa: E402  (the tiny conv net and its factory)


@pytest.mark.parametrize("what", ["pixels", "mean", "std"])
def test_non_finite_images_or_normalisation_are_refused(tmp_path, capsys, what):
    import numpy as np
    mod = tmp_path / "netmod.py"
    mod.write_text(NET_PY)
    ns: dict = {}
    exec(NET_PY, ns)
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in ns["Net"]().state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    images = rng.random((6, 8, 8)).astype(np.float32)
    arrays = {"images": images, "labels": rng.integers(0, 3, size=6), "mean": np.array([0.5]),
              "std": np.array([0.25])}
    if what == "pixels":
        images[4, 2, 3] = np.nan
    else:
        arrays[what] = np.array([np.inf])
    np.savez(tmp_path / "d.npz", **arrays)
    assert main(["eval", str(weights), "--eval", f"image-classification:{tmp_path / 'd.npz'}",
                 "--model-factory", f"python:{mod}:build"]) == 2
    one_error_line(capsys, "d.npz", "pixels" if what == "pixels" else f"{what} has a NaN or infinite")


def test_a_merge_or_transfer_whose_result_overflows_writes_nothing(pair, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(pair["base"]), str(pair["ft"]), str(pair["ft"]), "-o", str(out),
                 "--method", "task-arithmetic", "--lambda", "1e308", "--names", "a", "b",
                 "--quiet"]) == 2
    one_error_line(capsys, "merged model", "NaN or infinite", "nothing was written")
    assert not out.exists()
    out = tmp_path / "moved"
    assert main(["transfer", str(pair["base"]), str(pair["ft"]), "-o", str(out), "--method", "none",
                 "--eval-source", f"text-classification:{pair['calib']}",
                 "--eval-target", f"text-classification:{pair['calib2']}",
                 "--lambdas", "1e308", "--quiet"]) == 2
    one_error_line(capsys, "transferred model", "nothing was written")
    assert not out.exists()


def test_check_finite_model_counts_in_chunks():
    from nps_pruning.apps.merge import check_finite_model
    base = torch.ones(10)
    check_finite_model(base, torch.zeros(10), "m", chunk=3)
    tau = torch.zeros(10)
    tau[[0, 4, 9]] = torch.tensor([float("inf"), float("nan"), 3.0e38])
    with pytest.raises(NPSError, match="m: 2 of 10 prunable entries"):
        check_finite_model(base, tau, "m", chunk=3)


# -- MEDIUM 7: adapter base in report.json, popsize bound -----------------------------------------
def test_report_names_the_adapter_and_the_base_it_was_applied_to(lora, tmp_path, monkeypatch):
    root, _ = lora
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["prune", str(root / "base"), str(root / "adapter"), "-o", str(out), "--method",
                 "magnitude", "--keep", "0.1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    (conv, info), = report["inputs"].items()
    assert conv == report["settings"]["finetuned"]
    assert info == {"kind": "lora", "adapter": str((root / "adapter").absolute()),
                    "base": str((root / "base").absolute())}


def test_popsize_has_an_upper_bound(pair, tmp_path, capsys):
    assert main(_prune_args(pair, tmp_path / "o", "calib") + ["--popsize", str(10 ** 8)]) == 2
    one_error_line(capsys, "popsize", "4096")


# -- MEDIUM 9 / LOW: what used to be a traceback or a silent exit ---------------------------------
def test_former_tracebacks_are_one_error_line(pair, tmp_path, capsys):
    cases = []
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "good movie", "label": 10 ** 30}) + "\n")
    cases.append((["eval", str(pair["ft"]), "--eval", f"text-classification:{big}"], "below 2**31"))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "a", "label": 1, "x": ' + "[" * 50000 + "]" * 50000 + "}\n")
    cases.append((["eval", str(pair["ft"]), "--eval", f"text-classification:{deep}"], "nested too deeply"))
    ev = tmp_path / "ev.py"
    ev.write_text("import sys\ndef big(model):\n    return 10 ** 400\n"
                  "def leave(model):\n    sys.exit(0)\n")
    cases.append((["eval", str(pair["ft"]), "--eval", f"python:{ev}:big"], "too large for a float"))
    cases.append((["eval", str(pair["ft"]), "--eval", f"python:{ev}:leave"], "raised SystemExit"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"command: prune\npretrained: {pair['base']}\nfinetuned: {pair['ft']}\n"
                   f"output: {tmp_path / 'o'}\nmethod: magnitude\nkeep: 0.1\nseed: {'9' * 5000}\n")
    cases.append((["run", str(cfg)], "cannot be read"))
    dup = tmp_path / "dup.yaml"
    dup.write_text(f"command: prune\npretrained: {pair['base']}\npretrained: {pair['ft']}\n"
                   f"finetuned: {pair['ft']}\noutput: {tmp_path / 'o'}\nmethod: magnitude\n")
    cases.append((["run", str(dup)], "key 'pretrained' is given twice"))
    cases.append((["prune", str(pair["base"]), str(pair["ft"]), "-o", str(tmp_path / ("x" * 250)),
                   "--method", "magnitude", "--keep", "0.1", "--quiet"], "File name too long"))
    cases.append((["merge", str(pair["base"]), str(pair["ft"]), str(pair["ft"]), "-o",
                   str(tmp_path / "m"), "--lambda", "0.3", "--names", "a", "b\u202etxt.exe",
                   "--quiet"], "bidirectional"))
    cases.append((["merge", str(pair["base"]), str(pair["ft"]), str(pair["ft"]), "-o",
                   str(tmp_path / "m"), "--method", "task-arithmetic", "--lambda", "0.3",
                   "--names", "a", "n" * 245, "--quiet"], "File name too long"))
    for argv, expect in cases:
        assert main(argv) == 2, argv
        one_error_line(capsys, expect)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.tmp-*")) and not list(tmp_path.glob(".o.tmp-*"))


def test_an_os_error_mid_run_is_one_line(pair, tmp_path, capsys, monkeypatch):
    """A read-only folder, a full disk: the system's refusal in one line (root ignores modes, so
    the refusal is injected where the search makes its work folder, and where the output is
    written)."""
    import nps_pruning.checkpoints.save as save
    import nps_pruning.workdirs as workdirs

    def refuse_folder(folder, *a, **k):
        raise PermissionError(13, "Permission denied", str(folder))
    monkeypatch.setattr(workdirs, "write_owner", refuse_folder)
    out = tmp_path / "ro"
    assert main(_prune_args(pair, out, "calib")) == 2
    one_error_line(capsys, "ro.nps-run: Permission denied")
    monkeypatch.undo()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(out / "model.safetensors"))
    monkeypatch.setattr(save, "_write_safetensors", refuse)
    assert main(["prune", str(pair["base"]), str(pair["ft"]), "-o", str(out),
                 "--method", "magnitude", "--keep", "0.1", "--quiet"]) == 2
    one_error_line(capsys, "Permission denied", "nothing was written")
    assert not out.exists()
