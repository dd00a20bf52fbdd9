"""Task vectors from two checkpoints (SPEC §1) and their algebra, checked by hand computation."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nps_pruning.checkpoints import load_task_vector, open_checkpoint, save_model_folder, save_tensors
from nps_pruning.errors import NPSError
from nps_pruning.task_vector import Layout, TaskVector, stack_values


def raw(folder: Path) -> dict:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def rewrite(src: Path, dst: Path, tensors: dict, config: dict | None = None) -> Path:
    """A copy of model folder ``src`` with its weights replaced by ``tensors``."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    save_tensors(dst / "model.safetensors", tensors, {"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- building -----------------------------------------------------------------------------------
def test_task_vector_is_ft_minus_base(tiny_bert):
    base, ft = tiny_bert
    hashes = {p: tree_hash(p) for p in (base, ft)}
    b, f = raw(base), raw(ft)
    base_flat, tv = load_task_vector(base, ft)
    assert tv.name == "ft"
    assert base_flat.dtype == tv.values.dtype == torch.float32
    shared = [k for k in f if k.startswith("bert.")]
    # layout: fine-tuned names, fine-tuned order, every shared tensor, nothing else
    assert list(tv.layout.names) == [k for k in open_checkpoint(ft).keys() if k in shared]
    assert set(tv.layout.names) == set(shared)
    assert tv.base_names == {k: k[len("bert."):] for k in shared}
    assert tv.num_entries == sum(b[k[5:]].numel() for k in shared) == base_flat.numel()
    assert tv.num_entries == sum(t.numel() for t in b.values())  # every base tensor is shared
    for k, tau in tv.items():
        assert torch.equal(tau, f[k] - b[k[5:]]), k
    for k, theta in tv.layout.unflatten(base_flat).items():
        assert torch.equal(theta, b[k[5:]]), k
    # the new head is task-specific, verbatim
    assert set(tv.task_specific) == {"classifier.weight", "classifier.bias"}
    for k, t in tv.task_specific.items():
        assert torch.equal(t, f[k]) and t.dtype == f[k].dtype
    assert tv.buffers == {}
    assert tv.count_nonzero() > 0.99 * tv.num_entries  # the fixture perturbed every weight
    for p, h in hashes.items():
        assert tree_hash(p) == h


def test_checkpoint_objects_bare_files_and_name(tiny_bert, tmp_path):
    base, ft = tiny_bert
    bare = save_tensors(tmp_path / "task_x.safetensors", raw(ft))
    base_ck = open_checkpoint(base)
    base_flat, tv = load_task_vector(base_ck, bare)
    assert tv.name == "task_x"
    ref_flat, ref = load_task_vector(base, ft, name="mine")
    assert ref.name == "mine"
    assert tv.layout == ref.layout
    assert torch.equal(tv.values, ref.values) and torch.equal(base_flat, ref_flat)


def test_buffers_bf16_and_reverse_prefix(tiny_bert, tmp_path):
    base, ft = tiny_bert
    b, f = raw(base), raw(ft)
    f2 = dict(f)
    f2["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    f2["bert.counter"] = torch.tensor(7)
    f2["bert.mask"] = torch.tensor([True, False])
    f2["bert.encoder.layer.0.output.dense.weight"] = f["bert.encoder.layer.0.output.dense.weight"].bfloat16()
    ft2 = rewrite(ft, tmp_path / "ft2", f2)
    _, tv = load_task_vector(base, ft2)
    assert set(tv.buffers) == {"bert.embeddings.position_ids", "bert.counter", "bert.mask"}
    assert all(torch.equal(tv.buffers[k], f2[k]) and tv.buffers[k].dtype == f2[k].dtype
               for k in tv.buffers)
    k = "bert.encoder.layer.0.output.dense.weight"
    assert tv.layout.dtypes[tv.layout.names.index(k)] == torch.bfloat16
    tau = dict(tv.items())[k]
    assert torch.equal(tau, f2[k].float() - b["encoder.layer.0.output.dense.weight"])
    # reverse case: a prefixed "pre-trained" model and a bare fine-tuned encoder
    pre = rewrite(ft, tmp_path / "prefixed_base", f)
    enc = rewrite(base, tmp_path / "bare_ft", {k[5:]: v + 1 for k, v in f.items() if k.startswith("bert.")})
    _, tv2 = load_task_vector(pre, enc)
    assert tv2.base_names == {k: "bert." + k for k in tv2.layout.names}
    assert torch.allclose(tv2.values, torch.ones_like(tv2.values))
    assert tv2.task_specific == {}


# -- algebra ------------------------------------------------------------------------------------
def test_algebra_against_hand_computation(tiny_bert):
    base, ft = tiny_bert
    b, f = raw(base), raw(ft)
    base_flat, tv = load_task_vector(base, ft)
    v = tv.values.clone()
    other = tv.with_values(torch.linspace(-1, 1, tv.num_entries), name="o")
    assert other.name == "o" and other.task_specific is tv.task_specific
    assert torch.equal((tv + other).values, v + other.values)
    assert torch.equal((tv - other).values, v - other.values)
    assert torch.equal((2.5 * tv).values, v * 2.5)
    assert torch.equal((tv * 0.5).values, v * 0.5)
    assert torch.equal((-tv).values, -v)
    assert torch.equal((tv / 4).values, v / 4)
    assert torch.equal(sum([tv, other, tv]).values, v + other.values + v)
    assert torch.equal(stack_values([tv, other]), torch.stack([v, other.values]))
    assert torch.equal(tv.values, v)  # nothing mutated in place
    assert torch.equal(tv.apply_to(base_flat, 0.3), base_flat + 0.3 * v)
    # the state dict of θ_pre + λτ, tensor by tensor, by hand
    sd = tv.state_dict(base_flat, scale=0.5)
    assert set(sd) == set(f)
    for k in tv.layout.names:
        assert torch.allclose(sd[k], b[k[5:]] + 0.5 * (f[k] - b[k[5:]]), atol=1e-7, rtol=0), k
        assert sd[k].dtype == f[k].dtype and tuple(sd[k].shape) == tuple(f[k].shape)
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.equal(sd[k], f[k])
    # λ = 1 gives the fine-tuned model back (up to float32 rounding of (f - b) + b)
    full = tv.state_dict(base_flat)
    for k in f:
        assert torch.allclose(full[k], f[k], atol=1e-6, rtol=0), k


def test_pruned_model_saves_and_loads_in_transformers(tiny_bert, tmp_path):
    """θ_pre + masked τ written with save_model_folder (tensors are views of one flat buffer)."""
    from transformers import AutoModelForSequenceClassification
    base, ft = tiny_bert
    base_flat, tv = load_task_vector(base, ft)
    keep = torch.zeros_like(tv.values, dtype=torch.bool)
    keep[::7] = True
    pruned = tv.with_values(tv.values * keep)
    sd = pruned.state_dict(base_flat)
    out = save_model_folder(tmp_path / "pruned", sd, like=open_checkpoint(ft), inputs=[base])
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    msd = model.state_dict()
    expect = tv.layout.unflatten(base_flat + tv.values * keep)
    for k, t in expect.items():
        assert torch.equal(msd[k], t), k
    assert torch.equal(msd["classifier.weight"], tv.task_specific["classifier.weight"])
    _, back = load_task_vector(base, out)
    assert torch.allclose(back.values, tv.values * keep, atol=1e-6, rtol=0)
    assert int((back.values.abs() > 1e-6).sum()) == int(keep[tv.values != 0].sum())


# -- bad inputs ---------------------------------------------------------------------------------
def test_shape_mismatch_names_tensor_and_both_shapes(tiny_bert, tmp_path):
    base, ft = tiny_bert
    f = raw(ft)
    k = "bert.embeddings.word_embeddings.weight"
    f[k] = torch.randn(40, 16)  # a resized vocabulary
    ft2 = rewrite(ft, tmp_path / "resized", f)
    with pytest.raises(NPSError) as err:
        load_task_vector(base, ft2)
    msg = str(err.value)
    assert "\n" not in msg
    assert k in msg and "(40, 16)" in msg and "(28, 16)" in msg
    base_flat, tv = load_task_vector(base, ft2, allow_shape_mismatch=True)
    assert k not in tv.layout.names
    assert torch.equal(tv.task_specific[k], f[k])
    assert tv.num_entries == base_flat.numel() == sum(
        t.numel() for n, t in raw(base).items() if n != "embeddings.word_embeddings.weight")


@pytest.mark.parametrize("which,value", [("ft", float("nan")), ("base", float("inf")),
                                         ("head", float("nan"))])
def test_non_finite_values_are_refused(tiny_bert, tmp_path, which, value):
    base, ft = tiny_bert
    if which == "base":
        t = raw(base)
        name = "encoder.layer.1.attention.self.key.bias"
        t[name][3] = value
        bad = rewrite(base, tmp_path / "badbase", t)
        args, file = (bad, ft), bad / "model.safetensors"
    else:
        t = raw(ft)
        name = "classifier.weight" if which == "head" else "bert.pooler.dense.weight"
        t[name][0, 1] = value
        bad = rewrite(ft, tmp_path / "badft", t)
        args, file = (base, bad), bad / "model.safetensors"
    with pytest.raises(NPSError) as err:
        load_task_vector(*args)
    msg = str(err.value)
    assert name in msg and str(file) in msg and "\n" not in msg
    assert ("NaN" if value != value else "Inf") in msg
    load_task_vector(*args, check_finite=False)  # opt-out works


def test_different_architectures_are_refused(tiny_bert, tmp_path):
    base, ft = tiny_bert
    cfg = json.loads((ft / "config.json").read_text())
    cfg["model_type"] = "roberta"
    other = rewrite(ft, tmp_path / "roberta", raw(ft), cfg)
    with pytest.raises(NPSError, match="model_type"):
        load_task_vector(base, other)
    # no tensor in common (configs silent)
    a = save_tensors(tmp_path / "a.safetensors", {"conv.weight": torch.ones(3, 3)})
    c = save_tensors(tmp_path / "c.safetensors", {"fc.weight": torch.ones(3, 3)})
    with pytest.raises(NPSError, match="no tensor in common"):
        load_task_vector(a, c)
    with pytest.raises(NPSError, match="no tensor in common"):
        load_task_vector(base, a)


def test_layout_flatten_roundtrip():
    ts = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([7.0, 8.0]).half()}
    layout = Layout.from_tensors(ts)
    flat = layout.flatten(ts)
    assert torch.equal(flat, torch.tensor([0, 1, 2, 3, 4, 5, 7, 8.0]))
    back = layout.unflatten(flat, cast=True)
    assert back["b"].dtype == torch.float16 and torch.equal(back["w"], ts["w"])
    tv = TaskVector(layout, flat)
    with pytest.raises(NPSError):
        tv + TaskVector(Layout.from_tensors({"w": ts["w"]}), torch.zeros(6))


def test_batchnorm_running_stats_kept_whole_by_default(tmp_path):
    """running_mean/running_var are the fine-tuned model's, verbatim and task-specific, unless
    running_stats="prune" makes them prunable; weights and the integer counter as before."""
    g = torch.Generator().manual_seed(0)
    pre = {"bn.weight": torch.rand(4, generator=g), "bn.bias": torch.rand(4, generator=g),
           "bn.running_mean": torch.rand(4, generator=g), "bn.running_var": torch.rand(4, generator=g) + 0.5,
           "bn.num_batches_tracked": torch.tensor(3)}
    ft = {k: (v + 0.25 if v.is_floating_point() else v + 1) for k, v in pre.items()}
    save_tensors(tmp_path / "pre.safetensors", pre)
    save_tensors(tmp_path / "ft.safetensors", ft)
    base_flat, tv = load_task_vector(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors")
    assert set(tv.layout.names) == {"bn.weight", "bn.bias"}
    assert set(tv.task_specific) == {"bn.running_mean", "bn.running_var"}
    assert all(torch.equal(tv.task_specific[k], ft[k]) for k in tv.task_specific)
    assert set(tv.buffers) == {"bn.num_batches_tracked"}
    # the written state dict of a zero task vector keeps the fine-tuned statistics
    sd = tv.with_values(torch.zeros_like(tv.values)).state_dict(base_flat)
    assert torch.equal(sd["bn.running_var"], ft["bn.running_var"])
    assert torch.equal(sd["bn.weight"], pre["bn.weight"])
    _, tv2 = load_task_vector(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors",
                              running_stats="prune")
    assert set(tv2.layout.names) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert tv2.task_specific == {}
    with pytest.raises(ValueError, match="running_stats"):
        load_task_vector(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors", running_stats="x")


def test_all_finite_finds_every_non_finite_entry_and_no_false_one():
    """all_finite (min and max) agrees with isfinite(t).all(): a NaN, +inf, -inf or +inf and -inf
    together anywhere (in a tensor long enough for vectorized and threaded reductions), in any
    float dtype, and never flags finite values however large."""
    import nps_pruning.dtypes as dt
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.randn(100_003).to(dtype)
        assert dt.all_finite(t)
        big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
        assert dt.all_finite(big) and dt.all_finite(-big)
        for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
            for at in (0, 6, 7, 65_537, 100_002):
                u = t.clone()
                u[at:at + len(bad)] = torch.tensor(bad[:100_003 - at], dtype=dtype)
                assert not dt.all_finite(u) and not bool(torch.isfinite(u).all())
    assert dt.all_finite(torch.empty(0)) and dt.all_finite(torch.arange(5))
