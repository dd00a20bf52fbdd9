"""Issue 38 (LLM-sized inputs), the parts built so far:

* item 3: outputs get a folder's and a file's ordinary modes (0777 / 0666 less the umask), not
  the 0700 / 0600 of ``mkdtemp`` / ``mkstemp``;
* item 4: ``--help`` lists every evaluator kind and says GGUF files and LoRA folders are
  accepted; ``nps eval ADAPTER --pretrained BASE`` names an adapter's base, and a ``.gguf`` file
  works as that base;
* item 4 (the rest): the LM evaluators score a batch whose logits exceed 1 GiB in slices of rows,
  with the same scores, and report.json records the largest logits a forward returned;
* item 5: a hold-out of fewer than ``--holdout-min-rows`` (32) rows is not made: the search uses
  every calibration row and its best score decides; report.json says so.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_bert
from nps_pruning.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_outputs_have_ordinary_modes(tmp_path):
    base, ft = make_tiny_bert(tmp_path)
    um = _umask()
    outs = {"prune": ["prune", base, ft, "-o", tmp_path / "p", "--method", "magnitude", "--keep", "0.1"],
            "merge": ["merge", base, ft, ft, "-o", tmp_path / "m", "--method", "task-arithmetic",
                      "--lambda", "0.3", "--names", "a", "b"],
            "compress": ["compress", base, ft, ft, "-o", tmp_path / "s", "--method", "magnitude",
                         "--keep", "0.1", "--names", "a", "b"]}
    for name, argv in outs.items():
        assert main([str(a) for a in argv] + ["--quiet"]) == 0, name
        out = Path(argv[argv.index("-o") + 1])
        for p in [out, *out.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            want = (0o777 if p.is_dir() else 0o666) & ~um
            assert mode == want, (name, p, oct(mode), oct(want))


def test_help_lists_every_evaluator_and_the_model_inputs(capsys):
    from nps_pruning.evaluation import SPEC_KINDS
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for kind in SPEC_KINDS:
        assert f"  {kind}:" in text, kind
    flat = " ".join(text.split())                     # argparse wraps the help text
    assert "GGUF file" in flat and "LoRA adapter folder" in flat and "--pretrained" in flat
    assert "Hub id org/name[@revision]" in flat


LM_EVAL = '''
import torch
_IDS = torch.tensor([[1, 5, 7, 9, 3], [2, 6, 8, 4, 3]])

def score(model):
    return float(model(input_ids=_IDS).logits[:, -1, :4].sum())
'''


def _tiny_llama_and_lora(tmp_path):
    """A tiny Llama base (folder with tokenizer), a rank-2 LoRA adapter on it (folders), and
    the PEFT model they were written from."""
    from test_lm_eval import _llm_tokenizer
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", pm


def test_eval_of_an_adapter_takes_its_base_from_pretrained_and_a_gguf_base_works(tmp_path, monkeypatch, capsys):
    from test_reliability_round3 import _write_gguf
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    _, _, pm = _tiny_llama_and_lora(tmp_path)
    _write_gguf(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "base.gguf")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "some-org/not-here"        # a hub name: never fetched
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    ev = tmp_path / "ev.py"
    ev.write_text(LM_EVAL)
    spec = f"python:{ev}:score"
    reference = float(pm.merge_and_unload()(input_ids=torch.tensor([[1, 5, 7, 9, 3], [2, 6, 8, 4, 3]]))
                      .logits[:, -1, :4].sum())

    assert main(["eval", str(tmp_path / "adapter"), "--eval", spec]) == 2
    assert "needs its base model" in capsys.readouterr().err
    scores = {}
    for base in ("base", "base.gguf"):
        assert main(["eval", str(tmp_path / "adapter"), "--pretrained", str(tmp_path / base),
                     "--eval", spec, "--json"]) == 0
        scores[base] = json.loads(capsys.readouterr().out)["score"]
    assert scores["base"] == scores["base.gguf"]          # the F32 GGUF holds the same weights
    assert scores["base"] == pytest.approx(reference, rel=1e-5, abs=1e-5)
    # --pretrained with a model that is not an adapter: one error line
    assert main(["eval", str(tmp_path / "base"), "--pretrained", str(tmp_path / "base"), "--eval", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an adapter folder" in err[0]


# -- item 3: the slim τ̂ is written sparse -------------------------------------------------------------
def test_sparse_task_vector_round_trips_bit_for_bit(tmp_path):
    from safetensors.torch import save_file
    from nps_pruning.checkpoints import read_task_vector, save_sparse_tensors
    from nps_pruning.errors import NPSError
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    a[a.abs() < 1.0] = 0.0
    a[0, 0], a[0, 1], a[0, 2] = -0.0, float("nan"), float("-inf")
    tensors = {"a.weight": a, "b.bias": torch.zeros(3), "c": torch.randn(9, generator=g).to(torch.bfloat16),
               "d.scalar": torch.tensor(2.5), "e.mask": torch.ones(2, 2)}     # a name ending in .mask
    save_sparse_tensors(tmp_path / "tv.safetensors", tensors, metadata={"method": "m"})
    back = read_task_vector(tmp_path / "tv.safetensors")
    assert set(back) == set(tensors)
    def bits(t):      # zeros of either sign are pruned entries and read back as +0.0
        t = t.reshape(-1).clone()
        t[t == 0] = 0.0
        return t.view(torch.uint8).tolist()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert back[k].reshape(-1).view(torch.uint8).tolist() == bits(t), k
    assert not torch.signbit(back["a.weight"][0, 0]) and torch.isnan(back["a.weight"][0, 1])
    # the docstring's snippet, without nps, reads the same
    import nps_pruning.checkpoints.sparse as sp
    snippet = sp.__doc__.split("::", 1)[1].split("\n\"\"\"")[0]
    snippet = "\n".join(l[4:] for l in snippet.splitlines()).replace("OUT/task_vector.safetensors",
                                                                     str(tmp_path / "tv.safetensors"))
    ns: dict = {}
    exec(snippet, ns)
    for k, t in tensors.items():
        assert ns["tau"][k].reshape(-1).view(torch.uint8).tolist() == bits(t), k
    # an older, dense file reads as it is; a corrupt sparse one is one NPSError
    save_file({"x": torch.ones(3)}, str(tmp_path / "dense.safetensors"))
    assert torch.equal(read_task_vector(tmp_path / "dense.safetensors")["x"], torch.ones(3))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "tv.safetensors").read_bytes()[:100])
    with pytest.raises(NPSError, match="not a readable task vector"):
        read_task_vector(tmp_path / "cut.safetensors")


def test_a_five_percent_prune_writes_tau_under_a_tenth_of_dense(tmp_path):
    from nps_pruning.checkpoints import read_task_vector
    from nps_pruning.checkpoints.save import save_tensors
    base, ft = make_tiny_bert(tmp_path, finetune_noise=0.05)
    out = tmp_path / "p"
    assert main(["prune", str(base), str(ft), "-o", str(out), "--method", "magnitude", "--keep", "0.05",
                 "--quiet"]) == 0
    tau = read_task_vector(out / "task_vector.safetensors")
    save_tensors(tmp_path / "dense.safetensors", tau)                       # what was written before
    def payload(path):       # the tensor bytes (a tiny model's file is mostly its JSON header)
        data = path.read_bytes()
        return len(data) - 8 - int.from_bytes(data[:8], "little")
    sparse, dense = payload(out / "task_vector.safetensors"), payload(tmp_path / "dense.safetensors")
    assert sparse < 0.10 * dense, (sparse, dense)          # 1/32 + 0.05 of it, plus padding
    report = json.loads((out / "report.json").read_text())
    assert sum(int(torch.count_nonzero(t)) for t in tau.values()) == report["model"]["kept"]


def test_a_store_keeps_identical_side_files_once(tmp_path):
    from nps_pruning.store import read_store
    from nps_pruning.store.types import _manifest_sha256
    from nps_pruning.errors import NPSError
    base, ft = make_tiny_bert(tmp_path)
    store = tmp_path / "s"
    assert main(["compress", str(base), str(ft), str(ft), str(ft), "-o", str(store), "--method",
                 "magnitude", "--keep", "0.1", "--names", "a", "b", "c", "--quiet"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    sides = [t["side_files"] for t in manifest["tasks"]]
    assert sides[0] and sides[0] == sides[1] == sides[2]           # the same parts, referenced thrice
    on_disk = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    assert len([p for p in on_disk if p.startswith("side/")]) == len(sides[0])
    assert not [p for p in on_disk if "/side/" in p]
    for name in ("a", "c"):
        out = tmp_path / f"r-{name}"
        assert main(["restore", str(store), name, "-o", str(out)]) == 0
        for fname in sides[0]:
            assert (out / fname).read_bytes() == (ft / fname).read_bytes(), fname
    # sharing is for side files with one size and checksum only
    bad = json.loads(json.dumps(manifest))
    fname = next(iter(bad["tasks"][1]["side_files"]))
    bad["tasks"][1]["side_files"][fname]["sha256"] = "0" * 64
    bad["manifest_sha256"] = _manifest_sha256(bad)
    (store / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(NPSError, match="two parts name the same file"):
        read_store(store)
    bad = json.loads(json.dumps(manifest))
    bad["tasks"][1]["parts"]["buffers"] = dict(bad["tasks"][0]["parts"]["buffers"])
    bad["manifest_sha256"] = _manifest_sha256(bad)
    (store / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(NPSError, match="two parts name the same file"):
        read_store(store)


# -- issue 34 item 4: every model folder nps writes has a model card --------------------------------
def test_every_written_model_folder_has_a_model_card(tmp_path):
    from huggingface_hub import ModelCard
    base, ft = make_tiny_bert(tmp_path)
    (ft / "README.md").write_text("---\nbase_model: someone/else\n---\n# the fine-tuned model's card\n")
    csv = tmp_path / "calib.csv"
    from conftest import write_text_csv
    write_text_csv(csv, rows=16)
    runs = [
        ("pruned", ["prune", base, ft, "-o", tmp_path / "p", "--method", "magnitude", "--keep", "0.1",
                    "--test", f"text-classification:{csv}"], [tmp_path / "p"]),
        ("merged", ["merge", base, ft, ft, "-o", tmp_path / "m", "--method", "ties", "--lambda", "0.5",
                    "--names", "a", "b"], [tmp_path / "m" / "a", tmp_path / "m" / "b"]),
        ("transferred", ["transfer", base, ft, "-o", tmp_path / "t", "--method", "magnitude", "--keep", "0.1",
                         "--eval-source", f"text-classification:{csv}",
                         "--eval-target", f"text-classification:{csv}", "--lambdas", "0.5", "1.0"],
         [tmp_path / "t"]),
        ("restored", None, [tmp_path / "r"]),
    ]
    assert main([str(a) for a in ["compress", base, ft, ft, "-o", tmp_path / "s", "--method", "magnitude",
                                  "--keep", "0.1", "--names", "a", "b", "--quiet"]]) == 0
    for kind, argv, folders in runs:
        if argv is None:
            assert main(["restore", str(tmp_path / "s"), "a", "-o", str(tmp_path / "r")]) == 0
        else:
            assert main([str(a) for a in argv] + ["--quiet"]) == 0, kind
        for folder in folders:
            card = ModelCard.load(folder / "README.md")
            assert card.data.library_name == "transformers", folder
            assert "nps-pruning" in card.data.tags and kind in card.data.tags, (folder, card.data.tags)
            assert card.data.base_model == "base", (folder, card.data.base_model)   # not the copied card's
            assert "the fine-tuned model's card" not in card.text
            assert type(transformers.AutoModel.from_pretrained(folder)).__name__.startswith("Bert")
    pruned = ModelCard.load(tmp_path / "p" / "README.md")
    assert "| finetuned |" in pruned.text and "| magnitude |" in pruned.text      # the test scores


# -- issue 34 item 3: Hugging Face Hub ids as inputs ------------------------------------------------
def _hub_cache(root: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    shutil.copytree(folder, d / "snapshots" / commit)
    return d / "snapshots" / commit


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc
    base, ft = make_tiny_bert(tmp_path / "local")
    hub = tmp_path / "hub"
    _hub_cache(hub, "tiny-org/tiny-base", base)
    _hub_cache(hub, "tiny-org/tiny-ft", ft, commit="b" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p"
    assert main(["prune", "tiny-org/tiny-base", "tiny-org/tiny-ft@" + "b" * 40, "-o", str(out),
                 "--method", "magnitude", "--keep", "0.1", "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert main(["prune", str(base), str(ft), "-o", str(ref), "--method", "magnitude", "--keep", "0.1",
                 "--quiet"]) == 0
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert {v.get("hub_id") for v in report["inputs"].values()} == {"tiny-org/tiny-base",
                                                                     "tiny-org/tiny-ft@" + "b" * 40}
    from huggingface_hub import ModelCard
    assert ModelCard.load(out / "README.md").data.base_model == "tiny-org/tiny-base"
    # a local folder of the same name wins over the Hub
    (tmp_path / "tiny-org").mkdir()
    shutil.copytree(ft, tmp_path / "tiny-org" / "tiny-ft")
    from nps_pruning.checkpoints.external import resolve_input
    assert resolve_input("tiny-org/tiny-ft") == "tiny-org/tiny-ft"
    # an id that cannot be resolved offline: one line
    capsys.readouterr()
    assert main(["eval", "tiny-org/nowhere", "--eval", "python:x.py:f"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny-org/nowhere: not a local path, and the Hub id cannot be resolved" in err[0]


# -- issue 38 item 2 (part): a merge holds θ_pre once and reports its peak memory -------------------
def test_merge_sessions_share_one_pretrained_copy(tmp_path):
    from nps_pruning.apps.merge import share_base
    from nps_pruning.apps.prune import Session
    base, ft = make_tiny_bert(tmp_path / "a")
    _, ft2 = make_tiny_bert(tmp_path / "b", seed=0, finetune_noise=0.03)       # same base (seed 0)
    other_base, other_ft = make_tiny_bert(tmp_path / "c", seed=5)
    s = [Session.load(str(base), str(ft), need_model=False)]
    s.append(Session.load(str(base), str(ft2), need_model=False))
    share_base(s)
    assert s[1].base_flat is s[0].base_flat
    s.append(Session.load(str(other_base), str(other_ft), need_model=False))
    share_base(s)                                                  # another base: never shared
    assert s[2].base_flat is not s[0].base_flat
    out = tmp_path / "m"
    assert main(["merge", str(base), str(ft), str(ft2), "-o", str(out), "--method", "task-arithmetic",
                 "--lambda", "0.4", "--names", "x", "y", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["memory"]["peak_rss_bytes"] > 0
    # the merge's (N, D) matrix of τ is filled row by row and each session's τ becomes its row
    from nps_pruning.apps.merge import stack_task_vectors
    pair = [Session.load(str(base), str(ft), need_model=False), Session.load(str(base), str(ft2), need_model=False)]
    before = [p.task_vector.values.clone() for p in pair]
    taus = stack_task_vectors(pair)
    assert all(torch.equal(taus[i], before[i]) and torch.equal(p.task_vector.values, before[i])
               for i, p in enumerate(pair))
    assert all(p.task_vector.values.data_ptr() == taus[i].data_ptr() for i, p in enumerate(pair))


# -- item 5: choosing on too few held-out rows ------------------------------------------------------
@pytest.mark.parametrize("rows,min_rows,held", [(40, None, 0), (40, 8, 10)])
def test_too_few_held_out_rows_choose_on_every_row_and_the_report_says_so(tmp_path, monkeypatch,
                                                                        rows, min_rows, held):
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = _tiny_llama_and_lora(tmp_path)
    words = ["good", "bad", "fine", "love", "dull", "fun", "plot", "film", "day", "night"]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 10] for j in range(6))}) + "\n"
                            for i in range(rows)))
    out = tmp_path / "o"
    argv = ["prune", str(base), str(adapter), "-o", str(out), "--keep", "0.1", "--bands", "3",
            "--generations", "1", "--popsize", "4", "--eval", f"perplexity:{data}", "--quiet"]
    assert main(argv + ([] if min_rows is None else ["--holdout-min-rows", str(min_rows)])) == 0
    rep = json.loads((out / "report.json").read_text())
    note = rep["search"]["holdout"]
    if held == 0:     # 25% of 40 = 10 < 32: every row searched, the best search score chosen
        assert note["chosen_by"] == "search score" and note["search_rows"] == rows
        assert "fewer than 32" in note["why"] and note["holdout_min_rows"] == 32
        assert rep["search"]["rescored"] == [] and "nps_holdout" not in rep["calibration"]
        assert rep["calibration"]["nps"] == max(c["score"] for c in rep["search"]["candidates"]
                                                if c["status"] == "ok")
    else:
        assert note == {"share": 0.25, "search_rows": rows - held, "held_out_rows": held,
                        "chosen_by": "held-out score"}
        assert len(rep["search"]["rescored"]) >= 3


# -- item 4: the LM evaluators' logits memory is bounded ---------------------------------------------
def test_lm_logits_are_scored_in_slices_within_the_budget_with_the_same_scores(tmp_path, monkeypatch):
    """A batch whose full logits exceed LOGITS_BUDGET_BYTES goes through the model in slices of
    rows that fit: the same scores (to float rounding) as one forward pass, a peak that the
    evaluator records and prune's report.json carries."""
    from nps_pruning.evaluation import lm_logits
    from nps_pruning.evaluation.lm import MultipleChoiceEvaluator, PerplexityEvaluator
    from nps_pruning.evaluation.lm_logits import rows_per_forward
    base, adapter, _ = _tiny_llama_and_lora(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    words = ["good", "bad", "fine", "love", "dull", "fun", "plot", "film", "day", "night"]
    ppl = tmp_path / "p.jsonl"
    ppl.write_text("".join(json.dumps({"text": " ".join(words[(i * 3 + j) % 10] for j in range(5 + i % 4))}) + "\n"
                           for i in range(12)))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": " ".join(words[(i + j) % 10] for j in range(4)),
                                      "choices": ["good film", "bad day night"], "label": i % 2}) + "\n"
                          for i in range(12)))
    evs = {"ppl": lambda: PerplexityEvaluator(ppl, model_path=base, batch_size=12, fitness="loglik"),
           "mc": lambda: MultipleChoiceEvaluator(mc, model_path=base, batch_size=12, fitness="loglik")}
    whole = {k: make() for k, make in evs.items()}
    ref = {k: ev(model) for k, ev in whole.items()}
    one_row = 16 * vocab * 4                        # a row of <= 16 positions
    assert rows_per_forward(model, 12, 16) == 12    # fits the default budget: one forward
    monkeypatch.setattr(lm_logits, "LOGITS_BUDGET_BYTES", 3 * one_row)
    assert rows_per_forward(model, 12, 16) == 3 and rows_per_forward(model, 12, 64) == 1
    for k, make in evs.items():
        ev = make()
        assert ev(model) == pytest.approx(ref[k], abs=1e-5), k
        assert 0 < ev.memory["peak_logits_bytes"] <= 3 * one_row < whole[k].memory["peak_logits_bytes"], k
    # prune's report.json records the evaluator's peak
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    assert main(["prune", str(base), str(adapter), "-o", str(out), "--keep", "0.1", "--bands", "3",
                 "--generations", "1", "--popsize", "4", "--eval", f"perplexity:{ppl}", "--quiet"]) == 0
    mem = json.loads((out / "report.json").read_text())["memory"]
    assert 0 < mem["eval_peak_logits_bytes"] <= 3 * one_row
