"""Causal-LM evaluators (evaluation/lm.py): multiple-choice and perplexity scores against a
by-hand computation with the model itself, batching invariance, clear errors, and NPS on an LLM."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import WORDS
from nps_pruning.cli import main as nps
from nps_pruning.errors import NPSError
from nps_pruning.evaluation import make_evaluator

transformers = pytest.importorskip("transformers")


def _llm_tokenizer():
    """A word-level tokenizer that, like a causal LM's, adds no [CLS]/[SEP] around the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                               bos_token="[BOS]", eos_token="[EOS]")
    assert tok("good movie")["input_ids"] == [4 + WORDS.index("good"), 4 + WORDS.index("movie")]
    return tok, len(vocab)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """root/base and root/ft: a tiny LlamaForCausalLM (+ a small perturbation) with a tokenizer."""
    root = tmp_path_factory.mktemp("llm")
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True,
                                   pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    g = torch.Generator().manual_seed(2)
    single, multi = [], []
    for i in range(12):
        ctx = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (int(3 + i % 4),), generator=g).tolist())
        single.append({"context": ctx, "choices": ["good", "bad", "fun"], "label": i % 3})
        multi.append({"context": ctx, "choices": ["good movie", "bad", "fun fun fine"], "label": i % 3})
    (root / "mc1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in single))
    (root / "mc2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi))
    paras = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (int(4 + i),), generator=g).tolist())
             for i in range(7)]
    (root / "prose.txt").write_text("\n\n".join(paras) + "\n")
    return root, tok


def _model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _hand_choice_scores(model, tok, row):
    """Summed log p(choice tokens | context), one unpadded forward per choice."""
    ctx = tok(row["context"])["input_ids"]
    out = []
    for c in row["choices"]:
        ids = ctx + tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
    return out


@pytest.mark.parametrize("fname", ["mc1.jsonl", "mc2.jsonl"])
def test_multiple_choice_matches_the_hand_computation(llm, fname):
    root, tok = llm
    model = _model(root / "ft")
    rows = [json.loads(l) for l in (root / fname).read_text().splitlines()]
    hand = [_hand_choice_scores(model, tok, r) for r in rows]
    acc = np.mean([int(np.argmax(h)) == r["label"] for h, r in zip(hand, rows)])
    ll = np.mean([h[r["label"]] - math.log(sum(math.exp(x) for x in h)) for h, r in zip(hand, rows)])
    for bs in (1, 5):
        ev = make_evaluator(f"multiple-choice:{root / fname}", model_path=root / "ft", batch_size=bs)
        assert ev.single_token == (fname == "mc1.jsonl") and ev.num_rows == 12
        assert ev(model) == pytest.approx(acc, abs=1e-12)
        evl = make_evaluator(f"multiple-choice:{root / fname}", model_path=root / "ft", batch_size=bs,
                             fitness="loglik")
        assert evl(model) == pytest.approx(ll, abs=1e-4)
        # racing's per-row scoring agrees with the full score
        score, values = evl.score_rows(model, np.array([3, 0, 7]))
        assert score == pytest.approx(np.mean(values), abs=1e-6) and len(values) == 3   # float32 sums
        assert evl.score_rows(model)[0] == pytest.approx(evl(model), abs=1e-6)


def test_single_token_choices_project_only_the_last_position(llm):
    """The single-token path asks the LM head for each row's last real token alone (the logits
    of a 50k vocabulary at every position are most of an LLM search's memory); its choice
    scores equal those of the full logits, and a model without ``logits_to_keep`` still works."""
    from nps_pruning.evaluation.lm_logits import last_logits as _last_logits
    root, tok = llm
    model = _model(root / "ft")
    ev = make_evaluator(f"multiple-choice:{root / 'mc1.jsonl'}", model_path=root / "ft", batch_size=5,
                        fitness="loglik")
    assert ev.single_token
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        fast = ev(model)
    finally:
        hook.remove()
    assert seen and all(s[1] == 1 for s in seen), seen         # one position a row
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [4, 5, 6, 7]])
    mask = (ids != 0).long()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        got = _last_logits(model, ids, mask, "x")
    want = full[torch.arange(3), mask.sum(1) - 1]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)

    class NoKeep(torch.nn.Module):              # forward(input_ids, attention_mask) only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids=None, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)
    assert ev(NoKeep(model)) == pytest.approx(fast, abs=1e-6)


def test_multiple_choice_agreement_is_one_for_the_reference_model(llm):
    root, _ = llm
    ft, base = _model(root / "ft"), _model(root / "base")
    ev = make_evaluator(f"multiple-choice:{root / 'mc2.jsonl'}", model_path=root / "ft", fitness="agreement")
    with pytest.raises(NPSError, match="set_reference"):
        ev(ft)
    ev.set_reference(ft)
    assert ev(ft) == pytest.approx(1.0, abs=1e-6)
    assert ev(base) < 1.0


def test_perplexity_matches_the_hand_computation(llm):
    root, tok = llm
    model = _model(root / "ft")
    paras = [p for p in (root / "prose.txt").read_text().split("\n\n") if p.strip()]
    total, count = 0.0, 0
    for p in paras:
        ids = tok(p.strip())["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        total += sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    for bs in (1, 3):
        ev = make_evaluator(f"perplexity:{root / 'prose.txt'}", model_path=root / "ft", batch_size=bs)
        assert ev.num_rows == 7 and ev.num_tokens == count
        assert ev(model) == pytest.approx(math.exp(total / count), rel=1e-5)
        evl = make_evaluator(f"perplexity:{root / 'prose.txt'}", model_path=root / "ft", batch_size=bs,
                             fitness="loglik")
        assert evl(model) == pytest.approx(total / count, abs=1e-5)
    sub = make_evaluator(f"perplexity:{root / 'prose.txt'}", model_path=root / "ft", calib_size=3)
    assert sub.num_rows == 3


@pytest.mark.parametrize("case", ["width", "label", "column", "suffix", "agreement", "race", "empty"])
def test_lm_evaluators_refuse_bad_input_clearly(llm, tmp_path, case):
    root, _ = llm
    bad = tmp_path / "bad.jsonl"
    rows = {"width": [{"context": "a", "choices": ["good", "bad"], "label": 0},
                      {"context": "b", "choices": ["good", "bad", "fun"], "label": 0}],
            "label": [{"context": "a", "choices": ["good", "bad"], "label": 2}],
            "column": [{"context": "a", "label": 0}]}.get(case)
    if rows:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, match = {"width": (f"multiple-choice:{bad}", "same number"),
                   "label": (f"multiple-choice:{bad}", "not a choice index"),
                   "column": (f"multiple-choice:{bad}", "missing column 'choices'"),
                   "suffix": (f"multiple-choice:{root / 'prose.txt'}", "JSON Lines"),
                   "agreement": (f"perplexity:{root / 'prose.txt'}", "agreement is not defined"),
                   "race": (f"perplexity:{root / 'prose.txt'}", "racing"),
                   "empty": (f"perplexity:{tmp_path / 'e.txt'}", "no text")}[case]
    if case == "empty":
        (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(NPSError, match=match):
        ev = make_evaluator(spec, model_path=root / "ft",
                            fitness="agreement" if case == "agreement" else "accuracy")
        if case == "race":
            ev.score_rows(_model(root / "ft"), [0])


def test_nps_prunes_a_causal_lm_on_multiple_choice_and_eval_reads_perplexity(llm, tmp_path, capsys):
    root, _ = llm
    out = tmp_path / "pruned"
    assert nps(["prune", str(root / "base"), str(root / "ft"), "-o", str(out), "--method", "nps",
                "--eval", f"multiple-choice:{root / 'mc2.jsonl'}", "--keep", "0.2", "--bands", "2",
                "--generations", "1", "--popsize", "4", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["search"]["examples_scored"] > 0
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    capsys.readouterr()
    assert nps(["eval", str(out), "--eval", f"perplexity:{root / 'prose.txt'}", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert 0.0 < got["score"] <= 1.0


def test_generation_exact_match_against_unpadded_greedy_decoding(llm, tmp_path):
    """Half the answers are the model's own greedy output (decoded one prompt at a time, no
    padding), half are wrong: the batched, left-padded evaluator must score exactly 0.5."""
    root, tok = llm
    model = _model(root / "ft")
    prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 5)) for i in range(8)]
    rows = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
        text = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n")[0]
        rows.append({"prompt": p, "answer": ("  " + text.upper() + " ") if i % 2 == 0 else text + " zzz"})
    f = tmp_path / "gen.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from nps_pruning.evaluation.lm import GenerationEvaluator
    for bs in (1, 3):
        ev = GenerationEvaluator(f, model_path=root / "ft", batch_size=bs, max_new_tokens=4)
        assert ev(model) == 0.5
    with pytest.raises(NPSError, match="exact match"):
        make_evaluator(f"generation:{f}", model_path=root / "ft", fitness="loglik")
    from nps_pruning.apps.session import Session
    assert Session.search_fitness(f"generation:{f}") == "accuracy"


def _harness_task(tmp_path, rows):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def test_lm_eval_scores_the_in_memory_model(llm, tmp_path, capsys):
    """The harness scores the very model object: a hook that makes "bad" the likeliest token gives
    accuracy = the share of rows labelled "bad"; without it (zero hidden state, all choices tie)
    the harness's argmax takes choice 0."""
    pytest.importorskip("lm_eval")
    from nps_pruning.evaluation.lm_harness import LMEvalEvaluator
    root, tok = llm
    labels = [1, 1, 1, 1, 1, 1, 0, 2, 0]
    rows = [{"context": f"{WORDS[i]} {WORDS[i + 1]}", "choices": ["good", "bad", "fun"], "label": lab}
            for i, lab in enumerate(labels)]
    tasks = _harness_task(tmp_path, rows)
    model = _model(root / "ft")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    ev = LMEvalEvaluator("tiny_mc", model_path=root / "ft", include=tasks, batch_size=4)
    from nps_pruning.evaluation import lm_harness
    # the include folder alone was indexed (the built-in index costs ~30 s), and is reused
    assert (ev.include, False) in lm_harness._MANAGERS and (ev.include, True) not in lm_harness._MANAGERS
    assert LMEvalEvaluator("tiny_mc", model_path=root / "ft", include=tasks).task_manager is ev.task_manager
    assert ev(model) == pytest.approx(2 / 9)
    assert ev.num_rows == 9 and ev.last_results["tiny_mc"]["acc,none"] == pytest.approx(2 / 9)
    bad = tok.convert_tokens_to_ids("bad")

    def prefer_bad(module, inputs, output):
        output = output.clone()
        output[..., bad] += 10.0
        return output
    handle = model.lm_head.register_forward_hook(prefer_bad)
    try:
        assert ev(model) == pytest.approx(6 / 9)
    finally:
        handle.remove()
    limited = LMEvalEvaluator("tiny_mc", model_path=root / "ft", include=tasks, calib_size=3)
    # the first 3 documents are labelled 1 ("bad"); without the hook the tie goes to choice 0
    assert limited(model) == 0.0 and limited.num_rows == 3
    with pytest.raises(NPSError, match="unknown task"):
        LMEvalEvaluator("no_such_task_xyz", model_path=root / "ft", include=tasks)
    with pytest.raises(NPSError, match="own score"):
        from nps_pruning.apps.session import Session
        Session.search_fitness("lm-eval:tiny_mc", "loglik")
    capsys.readouterr()
    assert nps(["eval", str(root / "ft"), "--eval", "lm-eval:tiny_mc", "--lm-eval-include", str(tasks),
                "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["score"] <= 1.0


def test_lm_eval_missing_is_a_clear_error(llm, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_harness(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("no lm_eval")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_harness)
    root, _ = llm
    with pytest.raises(NPSError, match=r"nps-pruning\[lm-eval\]"):
        make_evaluator("lm-eval:tiny_mc", model_path=root / "ft")
