"""Issue 37: a bounded, seeded fuzz test of everything nps reads from a user's files.

Targets: text data (CSV, JSONL), image data (NPZ), a LoRA adapter (its config and tensors), a
GGUF file's header, a YAML config, and the search log that ``--resume`` replays. For every
generated input the command line must keep its contract:

* exit 0 with a correct result (JSONL: exactly when every row is valid; a resumed search: the
  same result as the uninterrupted run), or
* exit 2 with exactly one ``nps: error:`` line (warnings aside) — never a traceback;
* nothing written outside OUT (the inputs' folder is unchanged; a refused conversion caches
  nothing).

Hypothesis runs derandomized (the same examples every run, no example database) with small
example counts, so the whole file stays within about a minute on two cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import make_tiny_bert, write_text_csv  # noqa: E402
from nps_pruning.cli import main  # noqa: E402


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def snapshot(root: Path, skip=("out", "cache")) -> dict:
    """Every file under ``root`` (but OUT, its siblings and the input cache) with its sha256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and (rel.parts[0] in skip or rel.parts[0].startswith((".out", "out."))):
            continue
        for f in filenames:
            if not rel.parts and (f in skip or f.startswith((".out", "out."))):
                continue
            out[str(rel / f)] = hashlib.sha256((Path(dirpath) / f).read_bytes()).hexdigest()
    return out


def contract(argv, capsys, sandbox: Path):
    """Run nps; assert exit 0, or exit 2 with exactly one error line; nothing written outside
    OUT. Returns (exit code, stdout)."""
    before = snapshot(sandbox)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:            # argparse's own exit
        rc = exc.code
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("nps: warning")]
    assert rc in (0, 2), (rc, err[-2000:])
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("nps: error:"), err[-2000:]
    assert "Traceback" not in err
    assert snapshot(sandbox) == before, "a file outside OUT changed"
    return rc, out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzin")
    base, ft = make_tiny_bert(root)
    return {"root": root, "base": base, "ft": ft,
            "calib": write_text_csv(root / "calib.csv", rows=24, seed=0)}


# -- text data --------------------------------------------------------------------------------------
FIELD = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\t1') + ["0", "-", "\u00e9", "\x00"]),
                max_size=12)
LABEL = st.one_of(st.integers(-3, 4), st.just(10 ** 30), st.none(), st.booleans(),
                  st.sampled_from(["1", " 0 ", "x", "", "1.5", "2"]), st.sampled_from([0.0, 1.0, 1.5]),
                  st.just([1]), st.just({"a": 1}))
TEXT = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.just(["a"]))
ROW = st.fixed_dictionaries({"text": TEXT, "label": LABEL})


def _valid_label(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return 0 <= v < 2
    if isinstance(v, float):
        return v.is_integer() and 0 <= v < 2
    if isinstance(v, str):
        try:
            return 0 <= int(v.strip()) < 2
        except ValueError:
            return False
    return False


@fuzz(60)
@given(rows=st.lists(ROW, min_size=0, max_size=6), blank=st.booleans())
def test_fuzz_jsonl_rows(world, tmp_path_factory, capsys, rows, blank):
    sandbox = tmp_path_factory.mktemp("jl")
    path = sandbox / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    if blank:
        lines.insert(len(lines) // 2, "   ")
    path.write_text("\n".join(lines) + "\n")
    rc, out = contract(["eval", world["ft"], "--eval", f"text-classification:{path}", "--json"],
                       capsys, sandbox)
    ok = bool(rows) and all(isinstance(r["text"], str) and _valid_label(r["label"]) for r in rows)
    assert (rc == 0) == ok, (rows, rc)
    if rc == 0:
        res = json.loads(out)
        assert res["num_rows"] == len(rows) and 0.0 <= res["score"] <= 1.0


@fuzz(60)
@given(header=st.sampled_from(["text,label", "label,text", "text", "sentence,label",
                               "text,label,extra", "", "text\tlabel", '"text","label"']),
       rows=st.lists(st.lists(FIELD, min_size=0, max_size=3), max_size=5),
       suffix=st.sampled_from([".csv", ".tsv"]))
def test_fuzz_csv_files(world, tmp_path_factory, capsys, header, rows, suffix):
    sandbox = tmp_path_factory.mktemp("csv")
    path = sandbox / f"d{suffix}"
    sep = "\t" if suffix == ".tsv" else ","
    path.write_text("\n".join([header] + [sep.join(r) for r in rows]) + "\n")
    rc, out = contract(["eval", world["ft"], "--eval", f"text-classification:{path}", "--json"],
                       capsys, sandbox)
    if rc == 0:
        res = json.loads(out)
        assert res["num_rows"] >= 1 and 0.0 <= res["score"] <= 1.0


# -- image data -------------------------------------------------------------------------------------
from test_reliability_inputs import NET_PY  # noqa: E402  (the tiny conv net and its factory)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("net")
    (root / "netmod.py").write_text(NET_PY)
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ns["Net"]().state_dict().items()},
              str(root / "net.safetensors"))
    return root / "netmod.py", root / "net.safetensors"


@fuzz(60)
@given(n=st.integers(0, 5),
       shape=st.sampled_from([(8, 8), (1, 8, 8), (8, 8, 1), (64,), (), (2, 8, 8)]),
       dtype=st.sampled_from(["uint8", "float32", "float64", "int64", "bool"]),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
       labels=st.sampled_from(["ok", "float", "fraction", "negative", "bool", "short", "2d", "big",
                               "missing"]),
       mean=st.sampled_from([None, [0.5], [0.5, 0.5], [np.nan], [np.inf]]),
       std=st.sampled_from([None, [0.25], [0.0], [np.nan], [-1.0]]),
       garbage=st.booleans())
def test_fuzz_npz_files(net, tmp_path_factory, capsys, n, shape, dtype, poison, labels, mean, std,
                        garbage):
    mod, weights = net
    sandbox = tmp_path_factory.mktemp("npz")
    path = sandbox / "d.npz"
    rng = np.random.default_rng(n)
    if garbage:
        path.write_bytes(b"PK\x03\x04" + rng.bytes(64))
    else:
        images = (rng.random((n, *shape)) * 255).astype(dtype)
        if poison is not None and n and images.dtype.kind == "f" and images.size:
            images.reshape(-1)[0] = poison
        lab = {"ok": rng.integers(0, 3, n), "float": rng.integers(0, 3, n).astype(np.float32),
               "fraction": np.full(n, 0.5), "negative": -np.ones(n, dtype=np.int64),
               "bool": np.ones(n, dtype=bool), "short": np.zeros(max(n - 1, 0), dtype=np.int64),
               "2d": np.zeros((n, 2), dtype=np.int64), "big": np.full(n, 7, dtype=np.int64),
               "missing": None}[labels]
        arrays = {"images": images}
        if lab is not None:
            arrays["labels"] = lab
        if mean is not None:
            arrays["mean"] = np.array(mean)
        if std is not None:
            arrays["std"] = np.array(std)
        np.savez(path, **arrays)
    rc, out = contract(["eval", weights, "--eval", f"image-classification:{path}", "--json",
                        "--model-factory", f"python:{mod}:build"], capsys, sandbox)
    if rc == 0:
        res = json.loads(out)
        assert res["num_rows"] == n and 0.0 <= res["score"] <= 1.0


# -- LoRA adapters and GGUF files ------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from test_lm_eval import _llm_tokenizer
    root = tmp_path_factory.mktemp("fuzzllm")
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    pm.save_pretrained(root / "adapter")
    (root / "lm_eval.py").write_text(LM_EVAL)
    gguf = pytest.importorskip("gguf")
    from test_reliability_round3 import _write_gguf
    _write_gguf(model, root / "model.gguf")
    return root


LM_EVAL = '''
import torch
_IDS = torch.tensor([[1, 5, 7, 9, 3], [2, 6, 8, 4, 3]])

def score(model):
    return float(model(input_ids=_IDS).logits[:, -1, 0].sum())
'''


JSON_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.just(10 ** 40),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(0, 3), max_size=2), st.just({"q_proj": 2}),
                       st.just({"(": 1}), st.just({"q_proj|v_proj": "x"}))
CONFIG_KEYS = st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                               "use_rslora", "fan_in_fan_out", "use_dora", "peft_type",
                               "base_model_name_or_path", "layers_to_transform"])


@fuzz(60)
@given(changes=st.lists(st.tuples(CONFIG_KEYS, JSON_VALUE), max_size=3),
       tensor_op=st.sampled_from([None, "drop", "reshape", "int", "extra", "truncate"]),
       pick=st.integers(0, 100))
def test_fuzz_lora_adapters(llm, tmp_path_factory, capsys, monkeypatch, changes, tensor_op, pick):
    sandbox = tmp_path_factory.mktemp("lora")
    adapter = sandbox / "adapter"
    shutil.copytree(llm / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in changes:
        cfg[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))        # NaN/Infinity allowed
    w = adapter / "adapter_model.safetensors"
    tensors = load_file(str(w))
    name = sorted(tensors)[pick % len(tensors)]
    if tensor_op == "drop":
        del tensors[name]
    elif tensor_op == "reshape":
        tensors[name] = torch.zeros(3, 5)
    elif tensor_op == "int":
        tensors[name] = tensors[name].to(torch.int32)
    elif tensor_op == "extra":
        tensors["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 16)
    if tensor_op != "truncate":
        save_file(tensors, str(w))
    else:
        w.write_bytes(w.read_bytes()[: 40 + pick])
    cache = sandbox / "cache"
    monkeypatch.setenv("NPS_INPUT_CACHE", str(cache))
    rc, _ = contract(["eval", adapter, "--eval", f"python:{llm / 'lm_eval.py'}:score", "--json"],
                     capsys, sandbox)
    if rc == 2:
        assert not cache.exists() or not any(cache.iterdir()), "a refused conversion was cached"


@fuzz(80)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                      max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 1 << 20)))
def test_fuzz_gguf_headers(llm, tmp_path_factory, capsys, monkeypatch, edits, truncate):
    data = bytearray((llm / "model.gguf").read_bytes())
    import gguf
    header_end = int(gguf.GGUFReader(str(llm / "model.gguf")).data_offset)   # header, KV, tensor infos
    for pos, byte in edits:
        data[pos % header_end] = byte
    if truncate is not None:
        data = data[: truncate % len(data)]
    sandbox = tmp_path_factory.mktemp("gguf")
    path = sandbox / "m.gguf"
    path.write_bytes(bytes(data))
    cache = sandbox / "cache"
    monkeypatch.setenv("NPS_INPUT_CACHE", str(cache))
    rc, _ = contract(["eval", path, "--eval", f"python:{llm / 'lm_eval.py'}:score", "--json"],
                     capsys, sandbox)
    if rc == 2:
        assert not cache.exists() or not any(cache.iterdir()), "a refused conversion was cached"


# -- YAML configs -----------------------------------------------------------------------------------
YAML_KEYS = st.sampled_from(["keep", "seed", "method", "bands", "calib_size", "batch_size", "names",
                             "quiet", "scheme", "unknown_key", "eval", "max-length", "json", "tau_dtype"])
YAML_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 50), st.just("9" * 5000),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.sampled_from(["magnitude", "dare", "0.1", "[1, 2]", "{a: 1}", "!!python/none",
                                         "&a [*a]", "~"]))


@fuzz(60)
@given(command=st.sampled_from(["prune", "eval", "bogus"]),
       entries=st.lists(st.tuples(YAML_KEYS, YAML_SCALAR), max_size=4),
       raw=st.one_of(st.none(), st.text(max_size=40)))
def test_fuzz_yaml_configs(world, tmp_path_factory, capsys, command, entries, raw):
    sandbox = tmp_path_factory.mktemp("yaml")
    cfg = sandbox / "c.yaml"
    if raw is not None:
        text = raw
    else:
        lines = [f"command: {command}"]
        if command == "eval":
            lines.append(f"model: {world['ft']}")
            lines.append(f"eval: text-classification:{world['calib']}")
        else:
            lines += [f"pretrained: {world['base']}", f"finetuned: {world['ft']}",
                      f"output: {sandbox / 'out'}", "method: magnitude", "quiet: true"]
        for key, value in entries:
            lines.append(f"{key}: {value if isinstance(value, str) else json.dumps(value)}")
        text = "\n".join(lines) + "\n"
    cfg.write_text(text)
    rc, _ = contract(["run", cfg], capsys, sandbox)
    if rc == 0 and command == "prune" and raw is None:
        assert (sandbox / "out" / "model.safetensors").is_file()


# -- search-log replay ------------------------------------------------------------------------------
def _prune(world, out, *extra):
    return ["prune", world["base"], world["ft"], "-o", out, "--method", "nps", "--space", "magnitude",
            "--eval", f"text-classification:{world['calib']}", "--bands", "2", "--generations", "1",
            "--popsize", "4", "--keep", "0.1", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(world):
    out = world["root"] / "finished"
    assert main([str(a) for a in _prune(world, out)]) == 0
    return out


@fuzz(40)
@given(op=st.sampled_from(["set", "delete", "duplicate", "truncate", "swap", "insert", "none"]),
       line=st.integers(0, 100), key=st.sampled_from(["score", "weights", "gen", "idx", "status",
                                                      "chain", "examples", "type", "run"]),
       value=JSON_VALUE, cut=st.integers(0, 1 << 16))
def test_fuzz_search_log_replay(world, finished, tmp_path_factory, capsys, op, line, key, value, cut):
    from nps_pruning.workdirs import claim_work_dir
    text = (finished / "search.jsonl").read_text()
    lines = text.splitlines()
    i = line % len(lines)
    if op == "set":
        obj = json.loads(lines[i])
        obj[key] = value
        lines[i] = json.dumps(obj)
    elif op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "swap":
        j = (i + 1) % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "insert":
        lines.insert(i, json.dumps(value))
    new = "\n".join(lines) + "\n"
    if op == "truncate":
        new = text[: cut % len(text)]
    sandbox = tmp_path_factory.mktemp("log")
    out = sandbox / "out"
    wd = claim_work_dir(sandbox / "out.nps-run", out)
    (wd / "search.jsonl").write_text(new)
    rc, _ = contract(_prune(world, out, "--resume"), capsys, sandbox)
    if rc == 0:          # what it replayed was this run's: the result of the uninterrupted run
        got = json.loads((out / "report.json").read_text())["search"]
        ref = json.loads((finished / "report.json").read_text())["search"]
        assert got["best_weights"] == ref["best_weights"] and got["best_score"] == ref["best_score"]
    else:
        assert not out.exists()
