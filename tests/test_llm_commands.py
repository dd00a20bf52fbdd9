"""Every command on causal-LM inputs: a tiny random Llama's GGUF file as PRETRAINED and PEFT LoRA
adapters of it as FINETUNED go through `nps prune`, `merge`, `compress` (+ `restore`) and
`transfer`, and each output equals what the same command gives on the plain model folders."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS
from nps_pruning.cli import main as nps

peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def _write_f32_gguf(model, path):
    """The model as an F32 GGUF file (llama.cpp's names and q/k row order), no tokenizer."""
    from test_external_inputs import gguf_tensors
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    for _, name, arr, _ in gguf_tensors(model):
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def llm_inputs(tmp_path_factory):
    """root/base (folder + tokenizer), root/base.gguf (the same weights), root/a1, root/a2 (LoRA
    adapters with the tokenizer), evaluator files."""
    from test_lm_eval import _llm_tokenizer
    root = tmp_path_factory.mktemp("llmcmd")
    tok, vocab = _llm_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    _write_f32_gguf(base, root / "base.gguf")
    for i, name in enumerate(("a1", "a2")):
        m = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        pm = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]))
        g = torch.Generator().manual_seed(10 + i)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data = 0.3 * torch.randn(p.shape, generator=g)
        pm.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(2)
    rows = [{"context": " ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist()),
             "choices": ["good", "bad"], "label": i % 2} for i in range(10)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prose.txt").write_text("\n\n".join(" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(6))
                                                for i in range(6)))
    return root


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_prune_merge_compress_transfer_on_gguf_and_lora_inputs(llm_inputs, tmp_path, monkeypatch):
    root = llm_inputs
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    for pre in ("base", "base.gguf"):
        P = str(root / pre)
        out = tmp_path / pre
        assert nps(["prune", P, str(root / "a1"), "--method", "magnitude", "--keep", "0.2", "-o",
                    str(out / "prune"), "--quiet"]) == 0
        assert nps(["merge", P, str(root / "a1"), str(root / "a2"), "--method", "ties", "--lambda", "1.0",
                    "-o", str(out / "merge"), "--quiet"]) == 0
        assert nps(["compress", P, str(root / "a1"), str(root / "a2"), "--method", "magnitude", "--keep", "0.2",
                    "-o", str(out / "store"), "--quiet"]) == 0
        assert nps(["restore", str(out / "store"), "a1", "-o", str(out / "restored")]) == 0
        assert nps(["transfer", P, str(root / "a1"), "--method", "magnitude", "--keep", "0.2",
                    "--eval-source", f"perplexity:{root / 'prose.txt'}", "--eval-target", f"multiple-choice:{root / 'mc.jsonl'}",
                    "--lambdas", "0.5", "1.0", "-o", str(out / "transfer"), "--quiet"]) == 0
        for d in ("prune", "merge", "transfer"):
            folder = out / d
            if not (folder / "model.safetensors").is_file():       # merge: one folder per task head or a body
                folder = next(p.parent for p in folder.rglob("model.safetensors"))
            assert type(transformers.AutoModelForCausalLM.from_pretrained(folder)).__name__ == "LlamaForCausalLM"
    # the GGUF file holds the folder's weights exactly, so every output is the same bit for bit
    for d in ("prune", "restored", "transfer"):
        _same(tmp_path / "base" / d, tmp_path / "base.gguf" / d)
    # restore of task 1 = the magnitude-pruned LoRA update (the store's compression is lossless here)
    _same(tmp_path / "base" / "restored", tmp_path / "base" / "prune")
