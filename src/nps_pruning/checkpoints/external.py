"""Inputs that are not model folders: GGUF files and PEFT LoRA adapters.

:func:`resolve_input` turns either into an ordinary Hugging Face model folder (config, tokenizer,
safetensors), written once into a content-addressed cache (``$NPS_INPUT_CACHE``, default
``~/.cache/nps-pruning/inputs/<sha256>``) and reused after; everything else passes through. Every
command then reads that folder like any other, so the outputs are ordinary folders too.

* **GGUF** (``*.gguf``, a llama.cpp file; needs the ``gguf`` package): dequantized by
  ``transformers`` (``from_pretrained(..., gguf_file=...)``, float32), for the architectures its GGUF
  loader maps (llama, mistral, qwen2, gemma, phi3, ... ) and the tensor types the ``gguf`` package
  dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K .. Q6_K). The
  tokenizer (and its chat template) is converted as well.
* **LoRA** (a folder with ``adapter_config.json`` and ``adapter_model.safetensors``): the fine-tuned
  model is the base plus each adapted layer's merged low-rank update, as PEFT defines it:
  ΔW = B·A·s with s = lora_alpha / r (lora_alpha / √r under ``use_rslora``; ``rank_pattern`` /
  ``alpha_pattern`` per module), transposed for ``fan_in_fan_out`` layers and for embeddings
  (``lora_embedding_A/B``); other adapter tensors (``modules_to_save``, trained biases) replace the
  base's. The base is PRETRAINED when given, else ``base_model_name_or_path`` if that is a local
  folder. DoRA and convolution LoRA are refused with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import NPSError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def input_cache_dir() -> Path:
    env = os.environ.get("NPS_INPUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nps-pruning" / "inputs"


def _sha256(paths, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def is_lora_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def resolve_input(path, *, base=None, cache_dir=None) -> str:
    """``path`` itself, or for a GGUF file / LoRA adapter folder the model folder it converts to
    (``base``: the pre-trained model a LoRA adapter applies to)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(gguf_to_folder(p, cache_dir=cache_dir))
    if is_lora_folder(p):
        return str(lora_to_folder(p, base=base, cache_dir=cache_dir))
    return str(path)


def _done(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# -- GGUF -----------------------------------------------------------------------------------------
def gguf_to_folder(path: Path, *, cache_dir=None) -> Path:
    path = Path(path).absolute()
    out = Path(cache_dir or input_cache_dir()) / f"gguf-{_sha256([path])}"
    if _done(out):
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise NPSError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    import transformers
    from .save import save_tensors
    from ..atomic import staging_dir, swap_in_dir
    kw = {"gguf_file": path.name}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise NPSError(f"{path}: transformers cannot read this GGUF file ({type(exc).__name__}: {msg})") from exc
    config = model.config                  # read from the same file (the model is not used after)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)     # tied to the input embedding: saved once
    with staging_dir(out) as tmp:
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
            tok.save_pretrained(str(tmp))
        except Exception:                      # a GGUF file without tokenizer metadata: weights only
            pass
        save_tensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in state.items()},
                     metadata={"format": "pt"})
        swap_in_dir(tmp, out)
    return out


# -- LoRA ------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():       # PEFT: the key matches the module name's end
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_deltas(adapter: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Base tensor name -> the merged update ΔW (float32) of every adapted layer, and for the
    adapter's other tensors name -> the replacement value (marked by a ``"="`` prefix)."""
    if config.get("use_dora"):
        raise NPSError("DoRA adapters (use_dora) are not supported: only plain LoRA updates merge linearly")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise NPSError(f"adapter peft_type {peft_type!r} is not supported (only LORA)")
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    out: Dict[str, torch.Tensor] = {}
    pairs: Dict[str, dict] = {}
    for key, t in adapter.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name) or \
            re.match(r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in name:
            raise NPSError(f"adapter tensor {key!r}: unknown LoRA part")
        else:
            name = name.replace(".modules_to_save.default", "").replace(".base_layer", "")
            out["=" + name] = t
    for module, parts in pairs.items():
        r = int(_pattern_value(config.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha0))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if "lora_A" in parts and "lora_B" in parts:
            a, b = parts["lora_A"].float(), parts["lora_B"].float()
            if a.dim() != 2 or b.dim() != 2:
                raise NPSError(f"adapter module {module!r}: convolution LoRA is not supported")
            delta = (b @ a) * scale
            out[module + ".weight"] = delta.T if fan_in_fan_out else delta
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            a, b = parts["lora_embedding_A"].float(), parts["lora_embedding_B"].float()
            out[module + ".weight"] = (b @ a).T * scale
        else:
            raise NPSError(f"adapter module {module!r}: has only {', '.join(parts)} (need A and B)")
    return out


def _lora_base(path: Path, config: dict, base) -> Path:
    if base is not None:
        return Path(base)
    named = config.get("base_model_name_or_path")
    if named and Path(named).expanduser().exists():
        return Path(named).expanduser()
    raise NPSError(f"{path}: a LoRA adapter needs its base model: pass PRETRAINED "
                   f"(adapter_config.json names {named!r}, which is not a local folder)")


def lora_to_folder(path: Path, *, base=None, cache_dir=None) -> Path:
    from safetensors.torch import load_file
    from .load import open_checkpoint
    from .save import save_model_folder
    path = Path(path).absolute()
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NPSError(f"{path}: a LoRA adapter folder needs {ADAPTER_WEIGHTS}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise NPSError(f"{path / ADAPTER_CONFIG}: not readable JSON ({exc})") from None
    base_ckpt = open_checkpoint(_lora_base(path, config, base))
    # the adapter folder's tokenizer (when it has one) wins over the base's: it is the one trained with
    tokenizer = sorted(f for f in path.iterdir() if f.name in TOKENIZER_FILES and f.is_file())
    key = _sha256([path / ADAPTER_CONFIG, weights, *base_ckpt.files, *tokenizer])
    out = Path(cache_dir or input_cache_dir()) / f"lora-{key}"
    if _done(out):
        return out
    deltas = lora_deltas(load_file(str(weights)), config)
    state = {}
    for name in base_ckpt.keys():
        t = base_ckpt.get(name)
        if "=" + name in deltas:             # a saved module (modules_to_save, embedding base layer)
            t = deltas.pop("=" + name).to(t.dtype)
        if name in deltas:
            d = deltas.pop(name)
            if tuple(d.shape) != tuple(t.shape):
                raise NPSError(f"{path}: the update of {name!r} is {tuple(d.shape)}, the base tensor "
                               f"{tuple(t.shape)}")
            t = (t.float() + d).to(t.dtype)
        state[name] = t
    if deltas:
        left = sorted(k.lstrip("=") for k in deltas)
        raise NPSError(f"{path}: adapter tensors for layers the base does not have: {', '.join(left[:3])}")
    return save_model_folder(out, state, like=base_ckpt, extra_files=tokenizer)


def resolve_options(opts):
    """``opts`` (a command's options) with its PRETRAINED / FINETUNED / MODEL inputs resolved
    (:func:`resolve_input`; a LoRA adapter's base is PRETRAINED when the command has one)."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(opts)}
    changes = {}
    base = getattr(opts, "pretrained", None) if "pretrained" in names else None
    if base:
        base = changes["pretrained"] = resolve_input(base)
    for field in ("finetuned", "model"):
        value = getattr(opts, field, None) if field in names else None
        if isinstance(value, (list, tuple)):
            changes[field] = type(value)(resolve_input(v, base=base) for v in value)
            if "names" in names and not opts.names and list(changes[field]) != list(value):
                # tasks keep the names of the inputs given (an adapter folder, a .gguf file), not
                # of the converted folders in the input cache
                changes["names"] = [Path(v).stem if Path(v).is_file() else Path(v).resolve().name for v in value]
        elif value:
            changes[field] = resolve_input(value, base=base)
    changes = {k: v for k, v in changes.items() if v != getattr(opts, k)}
    return dataclasses.replace(opts, **changes) if changes else opts
