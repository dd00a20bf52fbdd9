"""Issue 38 item 2 (a merge holds a full model per task): the tasks of a merge whose models differ
only in their prunable weights (causal LMs from LoRA adapters or full fine-tunes) score on one
model and share one θ_pre, with the very same outputs as one model per task; a task with a head of
its own keeps its own model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import make_tiny_bert  # noqa: E402
from nps_pruning.apps.merge import share_base, share_models  # noqa: E402
from nps_pruning.apps.session import Session  # noqa: E402
from nps_pruning.cli import main  # noqa: E402


def _second_adapter(adapter, out):
    """A copy of ``adapter`` with its B matrices scaled by −0.5 (another task's update)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(adapter, out)
    w = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: (-0.5 * v if "lora_B" in k else v) for k, v in w.items()}, str(out / "adapter_model.safetensors"))
    return out


def test_sessions_share_one_model_only_where_the_models_differ_in_tau_alone(tmp_path, monkeypatch):
    from test_llm_sized_inputs import _tiny_llama_and_lora
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = _tiny_llama_and_lora(tmp_path)
    a2 = _second_adapter(adapter, tmp_path / "adapter2")
    llm = [Session.load(str(base), str(a), need_model=False) for a in (adapter, a2, adapter)]
    share_base(llm)
    share_models(llm)
    assert llm[1].model is llm[0].model and llm[2].model is llm[0].model
    assert llm[1].base_flat is llm[0].base_flat and llm[2].base_flat is llm[0].base_flat
    # classification fine-tunes whose heads differ: each keeps its own model
    b, ft = make_tiny_bert(tmp_path / "bert")
    ft2 = tmp_path / "bert" / "ft2"
    shutil.copytree(ft, ft2)
    from safetensors.torch import load_file, save_file
    w = load_file(str(ft2 / "model.safetensors"))
    w["classifier.weight"] = w["classifier.weight"] + 1.0
    save_file(w, str(ft2 / "model.safetensors"), metadata={"format": "pt"})
    bert = [Session.load(str(b), str(f), need_model=False) for f in (ft, ft2, ft)]
    share_models(bert)
    assert bert[1].model is not bert[0].model and bert[2].model is bert[0].model


@pytest.mark.parametrize("method", ["ties", "nps"])
def test_a_merge_on_one_shared_model_writes_what_one_model_per_task_writes(tmp_path, monkeypatch, method):
    from test_llm_sized_inputs import _tiny_llama_and_lora
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = _tiny_llama_and_lora(tmp_path)
    a2 = _second_adapter(adapter, tmp_path / "adapter2")
    data = tmp_path / "calib.jsonl"
    words = ["good", "bad", "fine", "love", "dull", "fun", "plot", "film"]
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 5 + j) % 8] for j in range(6))}) + "\n"
                            for i in range(16)))
    spec = f"perplexity:{data}"
    argv = ["merge", str(base), str(adapter), str(a2), "--method", method, "--eval", spec, spec,
            "--names", "a", "b", "--quiet"]
    if method == "nps":
        argv += ["--keep", "0.2", "--bands", "3", "--generations", "1", "--popsize", "4"]
    assert main(argv + ["-o", str(tmp_path / "shared")]) == 0
    monkeypatch.setattr(Session, "can_share_model", lambda self, other: False)
    assert main(argv + ["-o", str(tmp_path / "own")]) == 0
    from safetensors.torch import load_file
    files = sorted(p.relative_to(tmp_path / "own") for p in (tmp_path / "own").rglob("*.safetensors"))
    assert len(files) >= 3      # the merged τ and one model per task
    for f in files:
        x, y = load_file(str(tmp_path / "shared" / f)), load_file(str(tmp_path / "own" / f))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), f
    rx, ry = (json.loads((tmp_path / o / "report.json").read_text()) for o in ("shared", "own"))
    # ties: its λ grid; nps: the merges --combine best tried, with their scores and λ
    for key in ("calibration", "lambdas", "lambda_grid" if method == "ties" else "combine"):
        assert key in rx and rx[key] == ry[key], key


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_ties_holds_its_trim_as_masks_with_the_same_result_bit_for_bit(monkeypatch, chunk):
    """TIES' global trim kept as one byte an entry per task (no (N, D) float copy), summed column
    slice by column slice: bit for bit the trimmed-matrix formula, ties in |τ| and zeros included."""
    from nps_pruning.core import merge as M
    monkeypatch.setattr(M, "COLUMN_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    for n, d, dtype in ((3, 101, torch.float32), (5, 64, torch.float64), (2, 40, torch.float32)):
        taus = torch.randn(n, d, generator=g, dtype=dtype)
        taus[:, ::5] = taus[0, ::5].abs()                 # equal magnitudes across tasks
        taus[1, ::7] = -taus[1, ::7].round()              # exact ties and zeros, both signs
        taus[0, 3] = -0.0
        for keep in (0.05, 0.2, 0.5, 1.0):
            trimmed = M.trim_top_k(taus, keep)
            want = 0.7 * M.disjoint_mean(trimmed, M.elect_sign(trimmed))
            got = M.MERGERS["ties"](taus, lam=0.7, keep_ratio=keep)
            bits = torch.int64 if dtype == torch.float64 else torch.int32
            assert got.dtype == want.dtype and torch.equal(got.view(bits), want.view(bits)), (n, d, keep)
            assert torch.equal(M.ties_global(taus, keep).mul_(0.7), want)


@pytest.mark.parametrize("method", ["ties", "task-arithmetic", "average"])
def test_16_bit_task_vectors_merge_as_their_float32_values_do(method):
    """The mergers that take 16-bit τ compute in float32 slice by slice: bit for bit the merge of
    the same values held in float32, with a float32 result."""
    from nps_pruning.core import merge as M
    g = torch.Generator().manual_seed(4)
    taus = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    got = M.merge(method, taus, lam=0.8, keep_ratio=0.2)
    want = M.merge(method, taus.float(), lam=0.8, keep_ratio=0.2)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
    if method == "ties":
        with pytest.raises(ValueError, match="global trim"):
            M.merge("ties", taus, lam=0.8, keep_ratio=0.2, trim="layer", shapes=[(1000,)])


def test_a_merge_with_a_16_bit_tau_dtype_is_the_merge_of_the_rounded_task_vectors(tmp_path, monkeypatch, capsys):
    from test_llm_sized_inputs import _tiny_llama_and_lora
    from safetensors.torch import load_file
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    base, adapter, _ = _tiny_llama_and_lora(tmp_path)
    a2 = _second_adapter(adapter, tmp_path / "adapter2")
    argv = ["merge", str(base), str(adapter), str(a2), "--method", "ties", "--lambda", "1.0",
            "--names", "a", "b", "--quiet"]
    assert main(argv + ["-o", str(tmp_path / "f32")]) == 0
    assert main(argv + ["-o", str(tmp_path / "b16"), "--tau-dtype", "bfloat16"]) == 0
    x = load_file(str(tmp_path / "f32" / "merged_task_vector.safetensors"))
    y = load_file(str(tmp_path / "b16" / "merged_task_vector.safetensors"))
    assert set(x) == set(y)
    for k in x:     # the same merge of τ rounded once to bfloat16 (8 significant bits)
        torch.testing.assert_close(y[k], x[k], rtol=2 ** -7, atol=1e-6)
    assert main(["merge", str(base), str(adapter), str(a2), "--method", "tsv-m", "--lambda", "1.0",
                 "--tau-dtype", "bfloat16", "-o", str(tmp_path / "t")]) == 2
    assert "merges hold 16-bit task vectors for --method average, task-arithmetic, ties" in capsys.readouterr().err


def test_state_dict_in_place_is_the_state_dict_bit_for_bit():
    from nps_pruning.task_vector import Layout, TaskVector
    g = torch.Generator().manual_seed(6)
    layout = Layout(("a", "b"), ((3, 4), (5,)), (torch.float32, torch.bfloat16))
    tv = TaskVector(layout, torch.randn(17, generator=g), task_specific={"head": torch.ones(2)},
                    buffers={"ids": torch.arange(3)})
    base = torch.randn(17, generator=g)
    for scale in (1.0, 0.37):
        want = tv.state_dict(base, scale)
        b = base.clone()
        got = tv.state_dict(b, scale, in_place=True)
        assert set(got) == set(want) == {"a", "b", "head", "ids"}
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(b, tv.apply_to(base, scale))        # θ was computed into the base
    with pytest.raises(ValueError, match="layout"):
        tv.state_dict(torch.zeros(3), in_place=True)


def test_topk_mask_selects_as_kthvalue_did_without_its_index_tensor():
    """The k-th largest by numpy's in-place partition (one copy of the scores, no int64 index per
    entry): the very mask torch.kthvalue's threshold gives, ties by flat index, float32 and 64."""
    from nps_pruning.core.mask import _kth_smallest, topk_mask
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5000, generator=g, dtype=dtype).abs()
        x[::3] = x[1]                                  # many ties at one value
        x[::11] = 0.0
        for k in (1, 17, 1666, 1667, 2500, 4999):
            j = x.numel() - k + 1
            v = torch.kthvalue(x, j).values
            assert _kth_smallest(x, j).item() == v.item()
            want = x > v
            need = k - int(want.sum())
            if need > 0:
                want[torch.nonzero(x == v).squeeze(1)[:need]] = True
            got = topk_mask(x, k)
            assert torch.equal(got, want) and int(got.sum()) == k
