"""The LLM suites' pieces (benchmarks/nps_bench/llm_suite.py) on a tiny random Llama: the
next-line rows, the training examples' label masks, full and LoRA fine-tuning into folders that
nps reads, the transfer's relative source score, the search-memory step, and the suites' grid."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import WORDS

transformers = pytest.importorskip("transformers")
llm_suite = pytest.importorskip("nps_bench.llm_suite")


def _tiny_llama(root):
    from test_lm_eval import _llm_tokenizer
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base", tok


def _mc_rows(n=24):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ctx = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist())
        rows.append({"context": ctx, "choices": ["good", "bad"], "label": i % 2})
    return rows


def test_next_line_rows_pair_the_true_next_line_with_another_speechs_line():
    speeches = [[f"s{i} line {j}" for j in range(2 + i % 4)] for i in range(30)]
    rows = llm_suite._next_line_rows(speeches, seed=5)
    assert rows == llm_suite._next_line_rows(speeches, seed=5)          # seeded
    assert len(rows) == len(speeches)
    labels = set()
    for i, (lines, r) in enumerate(zip(speeches, rows)):
        ctx = r["context"].rstrip("\n").split("\n")
        true = r["choices"][r["label"]]
        j = lines.index(true)
        assert 1 <= j < len(lines) and ctx == lines[max(0, j - 2):j]
        wrong = r["choices"][1 - r["label"]]
        assert wrong.split()[0] != f"s{i}"                                # from another speech
        labels.add(r["label"])
    assert labels == {0, 1}


def test_training_examples_mask_everything_but_the_answer(tmp_path):
    _, tok = _tiny_llama(tmp_path)
    rows = [{"context": "good movie fun", "choices": ["good", "bad"], "label": 1}]
    (ids, lab), = llm_suite._examples(tok, "mc", rows, 64)
    ctx = tok("good movie fun")["input_ids"]
    ans = tok("bad", add_special_tokens=False)["input_ids"]
    assert ids == ctx + ans and lab == [-100] * len(ctx) + ans
    (ids, lab), = llm_suite._examples(tok, "mc", rows, 3)               # a long context keeps its end
    assert ids == ctx[-2:] + ans
    (ids, lab), = llm_suite._examples(tok, "lm", ["good movie fun bad"], 3)
    assert ids == lab == tok("good movie fun bad")["input_ids"][:3]


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_writes_a_folder_whose_task_vector_is_the_trained_update(tmp_path, lora):
    from nps_pruning.apps.session import Session
    base, _ = _tiny_llama(tmp_path)
    s = llm_suite.LMSettings(steps=6, batch_size=4, lr=5e-3, lora_rank=4 if lora else 0, lora_alpha=8)
    out = llm_suite.finetune_lm(base, "mc", _mc_rows(), s, tmp_path / "ft", progress=False)
    if lora:
        assert (tmp_path / "ft" / "adapter_config.json").is_file()
        assert (tmp_path / "ft" / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "ft" / "model.safetensors").exists()
    assert (tmp_path / "ft" / "tokenizer.json").is_file()
    sess = Session.load(str(base), str(tmp_path / "ft"), name="t")
    trained = {k: v.detach() for k, v in out["model"].state_dict().items()}
    pre = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    got = sess.task_vector.layout.unflatten(sess.task_vector.values)        # τ per tensor
    moved = 0
    for k, v in got.items():
        torch.testing.assert_close(v, trained[k] - pre[k], rtol=1e-5, atol=1e-6)
        moved += int(v.abs().max() > 0)
    assert moved > 0
    if lora:      # LoRA moves only the adapted projections
        assert all(any(t in k for t in llm_suite.LORA_TARGETS) for k, v in got.items() if v.abs().max() > 0)


@pytest.mark.parametrize("lora", [False, True])
def test_lm_finetunes_rebuild_bit_for_bit(tmp_path, lora):
    """The llm / llm-lora suites' fine-tune (llm_suite.finetune_lm: seeded, ordered batches, fixed
    threads) run twice on the same inputs writes the same tensors (the digest the step keys hold)."""
    from nps_bench.suites import weights_digest
    base, _ = _tiny_llama(tmp_path)
    s = llm_suite.LMSettings(steps=4, batch_size=4, lr=5e-3, lora_rank=4 if lora else 0, lora_alpha=8)
    digests = []
    for run in ("a", "b"):
        llm_suite.finetune_lm(base, "mc", _mc_rows(), s, tmp_path / run, progress=False)
        digests.append(weights_digest(tmp_path / run))
    assert digests[0] == digests[1] and len(digests[0]) == 64
    pre = weights_digest(base)
    assert digests[0] != pre


def test_relative_source_divides_by_the_reference():
    from nps_bench.exp_transfer import RelativeSource

    class Ev:
        num_rows = 3

        def __call__(self, model):
            return 0.25
    r = RelativeSource(Ev(), 0.5)
    assert r(None) == 0.5 and r.last_raw == 0.25 and r.num_rows == 3


def test_search_memory_measures_the_search_process(tmp_path):
    from nps_bench.exp_pruning import search_memory
    base, tok = _tiny_llama(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05)
    m.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _mc_rows(12)))
    task = {"base": str(base), "finetuned": str(tmp_path / "ft"), "eval_calib": f"multiple-choice:{tmp_path / 'c.jsonl'}",
            "max_length": 32}
    out = search_memory(task, calib_size=8, batch_size=4)
    from safetensors.torch import load_file
    n = sum(p.numel() for p in load_file(str(tmp_path / "ft" / "model.safetensors")).values())   # lm_head tied
    assert out["model_bytes"] == out["tau_bytes"] == 4 * n
    assert out["peak_rss_bytes"] > 50 * 2**20       # a python process with torch, measured
    assert 50 * 2**20 < out["search_peak_rss_bytes"] <= out["peak_rss_bytes"]
    bad = {**task, "eval_calib": f"multiple-choice:{tmp_path / 'missing.jsonl'}"}
    with pytest.raises(RuntimeError, match="nps prune failed"):
        search_memory(bad, calib_size=8, batch_size=4)


def test_every_suite_grid_searches_the_keeps_that_fusion_and_transfer_reuse():
    from nps_bench.config import BenchConfig
    cfg = BenchConfig()
    assert {"llm", "llm-lora"} <= set(cfg.suites)
    for s in cfg.suites:
        c = cfg.for_suite(s)
        assert c.fusion_keep in c.nps_keep_ratios, s
        if s in ("text", "llm", "llm-lora"):
            assert c.transfer_keep in c.nps_keep_ratios, s
    c = cfg.for_suite("llm")
    assert c.calib_size("llm") == 64 and c.test_rows("llm") == 150 and c.keep_ratios == (0.02, 0.05, 0.1)
    assert "ties" in c.fusion_methods and set(c.fusion_methods) <= set(cfg.fusion_methods)
    assert c.lambda_generations == 0 and c.coding_keeps == ()


def test_the_llm_transfer_job_scores_prose_relative_to_the_pretrained_model(tmp_path):
    """run_transfer_job on an LLM suite: the source is pydoc prose by perplexity:, divided by the
    pre-trained model's score (so λ = 0 scores exactly 1), the target the task's evaluator."""
    from nps_bench.config import LLM_GRID, BenchConfig
    from nps_bench.exp_transfer import run_transfer_job
    base, tok = _tiny_llama(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = tmp_path / "root" / "llm" / "rt-sentiment" / "k"
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    for part in ("calib", "test"):
        llm_suite.write_jsonl(d / f"{part}.jsonl", _mc_rows(12))
    task = {"name": "rt-sentiment", "kind": "lm", "dir": str(d), "base": str(base), "finetuned": str(d / "model"),
            "eval_calib": f"multiple-choice:{d / 'calib.jsonl'}", "eval_test": f"multiple-choice:{d / 'test.jsonl'}",
            "max_length": 32, "key": "k"}
    cfg = BenchConfig.quick(suites=("llm",), suite_grids={"llm": {**LLM_GRID, "transfer_lambdas": (0.5, 1.0)}})
    pruning = {"task": "rt-sentiment", "pruning": [{"method": "nps", "variant": "focused", "keep": 0.05,
                                                     "weights": [1.0] * cfg.bands}]}
    out = run_transfer_job(task, [task], cfg.to_dict(), str(tmp_path / "cache"), pruning, "llm")
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"pre-trained", "fine-tuned", "dare", "magnitude", "nps"}
    assert rows["pre-trained"]["source"] == 1.0 and rows["pre-trained"]["lambda"] == 0.0
    assert rows["fine-tuned"]["lambda"] == 1.0 and rows["dare"]["lambda"] in (0.5, 1.0)
    assert rows["nps"]["source_per_task"]["pydoc exp(-NLL)"] > 0
    assert rows["fine-tuned"]["source_rows"] == 32 - 10       # the rows λ was not chosen on (quick: 32 in all)
    assert (tmp_path / "root" / "llm" / "source-pydoc-32.jsonl").is_file()
