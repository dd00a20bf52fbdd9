"""PEFT LoRA adapters as inputs (see :mod:`.external`): the fine-tuned model is the base plus each
adapted layer's merged low-rank update, as PEFT defines it (ΔW = B·A·s, s = lora_alpha / r, or
lora_alpha / √r under ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` per module; transposed for
``fan_in_fan_out`` layers and embeddings); other adapter tensors replace the base's. Every field of
the adapter's config and every tensor is checked: a bad rank or alpha, an invalid or pathological
pattern, A/B ranks that differ, a targeted layer without an update, a truncated file are one
NPSError line, and nothing is cached."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional

import regex
import torch
from safetensors.torch import load_file

from ..errors import NPSError
from ..paths import regular_files
from .input_cache import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, TOKENIZER_FILES, content_sha256,
                          converted, input_cache_dir, one_line)
from .load import open_checkpoint
from .save import save_model_folder

PATTERN_MAX_CHARS = 200        # a rank_pattern / alpha_pattern key longer than this is refused
PATTERN_TIMEOUT_S = 1.0        # ... and one whose match takes longer (catastrophic backtracking)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first key that matches the end of the module name. Keys are regular
    expressions from the adapter file: an invalid, overlong or pathologically slow one is an
    NPSError, never a hang (``regex`` with a timeout)."""
    for key, value in (patterns or {}).items():
        if len(key) > PATTERN_MAX_CHARS:
            raise NPSError(f"adapter pattern {key[:40]!r}...: longer than {PATTERN_MAX_CHARS} characters")
        try:
            hit = regex.match(rf"(.*\.)?(?:{key})$", module, timeout=PATTERN_TIMEOUT_S)
        except regex.error as exc:
            raise NPSError(f"adapter pattern {key!r} is not a valid regular expression ({exc})") from None
        except TimeoutError:
            raise NPSError(f"adapter pattern {key!r} takes over {PATTERN_TIMEOUT_S:g} s to match "
                           f"{module!r} (a pathological regular expression)") from None
        if hit:
            return value
    return default


def _rank(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1_000_000:
        raise NPSError(f"adapter {where}: LoRA rank r must be a positive integer, got {value!r:.40}")
    return value


def _alpha(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > 1e12:
        raise NPSError(f"adapter {where}: lora_alpha must be a finite number, got {value!r:.40}")
    return float(value)


def check_lora_config(config) -> dict:
    """The adapter_config.json object, its fields checked as PEFT would (r > 0, a finite alpha,
    patterns as objects): an NPSError naming the field otherwise."""
    if not isinstance(config, dict):
        raise NPSError(f"{ADAPTER_CONFIG} is not a JSON object (got a {type(config).__name__})")
    _rank(config.get("r", 8), "r")
    _alpha(config.get("lora_alpha", 8), "lora_alpha")
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise NPSError(f"adapter {field} must be an object of pattern -> value")
        for key, value in patterns.items():
            check(value, f"{field}[{key[:40]!r}]")
    return config


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise NPSError(f"adapter module {module!r}: convolution LoRA is not supported")
    if a.shape[0] != b.shape[1]:
        raise NPSError(f"adapter module {module!r}: A is {tuple(a.shape)} and B {tuple(b.shape)}: "
                       "their inner (rank) dimensions differ")


def lora_deltas(adapter: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Base tensor name -> the merged update ΔW (float32) of every adapted layer, and for the
    adapter's other tensors name -> the replacement value (marked by a ``"="`` prefix)."""
    if config.get("use_dora"):
        raise NPSError("DoRA adapters (use_dora) are not supported: only plain LoRA updates merge linearly")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise NPSError(f"adapter peft_type {peft_type!r} is not supported (only LORA)")
    config = check_lora_config(config)
    r0, alpha0 = config.get("r", 8), float(config.get("lora_alpha", 8))
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
            _check_pair(module, a, b)
            delta = (b @ a) * scale
            out[module + ".weight"] = delta.T if fan_in_fan_out else delta
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            a, b = parts["lora_embedding_A"].float(), parts["lora_embedding_B"].float()
            _check_pair(module, a, b)
            out[module + ".weight"] = (b @ a).T * scale
        else:
            raise NPSError(f"adapter module {module!r}: has only {', '.join(parts)} (need A and B)")
    return out


def _lora_base(path: Path, config: dict, base) -> Path:
    """PRETRAINED when given, else ``base_model_name_or_path`` when it names a local folder; a
    relative one is taken relative to the adapter folder (the same adapter means the same base
    whatever the current folder)."""
    if base is not None:
        return Path(base)
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named:
        p = Path(named).expanduser()
        p = p if p.is_absolute() else path / p
        if p.is_dir():
            return p
    raise NPSError(f"{path}: a LoRA adapter needs its base model: pass PRETRAINED "
                   f"(adapter_config.json names {str(named)[:200]!r}, which is not a local folder)")


def _missing_targets(config: dict, base_ckpt, adapted) -> list:
    """Base layers that ``target_modules`` (a plain list of names, as PEFT writes it) selects but
    the adapter has no update for: a truncated or edited adapter, which PEFT would load with a
    zero update. Target regexes and layer filters are not second-guessed ([] then)."""
    targets = config.get("target_modules")
    if (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
            or any(config.get(k) for k in ("layers_to_transform", "layers_pattern",
                                            "exclude_modules"))):
        return []
    missing = []
    for name in base_ckpt.keys():
        if not name.endswith(".weight") or len(base_ckpt.shape(name)) != 2:
            continue
        module = name[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in targets) and name not in adapted:
            missing.append(name)
    return missing


def lora_to_folder(path: Path, *, base=None, cache_dir=None, used_base: Optional[list] = None) -> Path:
    path = Path(path).absolute()
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NPSError(f"{path}: a LoRA adapter folder needs {ADAPTER_WEIGHTS}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise NPSError(f"{path / ADAPTER_CONFIG}: not readable JSON ({one_line(exc)})") from None
    try:
        check_lora_config(config)
    except NPSError as exc:
        raise NPSError(f"{path / ADAPTER_CONFIG}: {exc}") from None
    base_dir = _lora_base(path, config, base)
    if used_base is not None:
        used_base.append(str(Path(base_dir).absolute()))
    base_ckpt = open_checkpoint(base_dir)
    # the adapter folder's tokenizer (when it has one) wins over the base's: it is the one trained with
    # Only regular files (or a Hugging Face cache's own blob links) are taken, as for a model
    # folder: a symbolic link could point anywhere, and its target would be copied into the cache
    # and into every output (skipped with a warning).
    tokenizer = [p for _, p in regular_files(path, skip=lambda n: n not in TOKENIZER_FILES)]
    key = content_sha256([path / ADAPTER_CONFIG, weights, *base_ckpt.files, *tokenizer])
    out = Path(cache_dir or input_cache_dir()) / f"lora-{key}"
    if converted(out):
        return out
    try:
        adapter = load_file(str(weights))
    except Exception as exc:                  # a truncated or corrupt file
        raise NPSError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None
    deltas = lora_deltas(adapter, config)
    missing = _missing_targets(config, base_ckpt, deltas)
    if missing:
        raise NPSError(f"{path}: target_modules selects {len(missing)} layer(s) the adapter has no "
                       f"update for ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
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


