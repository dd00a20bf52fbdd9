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

import contextlib
import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import NPSError
from ..paths import regular_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


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


# converted folder -> where it came from (what report.json's "inputs" says)
CONVERSIONS: Dict[str, dict] = {}


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,100})?$")


def hub_snapshot(spec: str) -> Path:
    """The local snapshot folder of a Hugging Face Hub id ``org/name`` or ``org/name@revision``,
    through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and token as the ecosystem does);
    anything it cannot resolve is one NPSError line."""
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NPSError(f"{spec}: a Hub model id needs the huggingface_hub package") from None
    try:
        with _quiet_transformers():
            return Path(snapshot_download(repo, revision=revision or None))
    except Exception as exc:      # offline and not cached, unknown repo, no network, ...
        msg = " ".join(str(exc).split())[:200]
        raise NPSError(f"{spec}: not a local path, and the Hub id cannot be resolved "
                       f"({type(exc).__name__}: {msg})") from None


def resolve_input(path, *, base=None, cache_dir=None) -> str:
    """``path`` itself, or for a GGUF file / LoRA adapter folder the model folder it converts to
    (``base``: the pre-trained model a LoRA adapter applies to), or for a Hugging Face Hub id
    (``org/name[@revision]``, when no local path of that name exists) its snapshot folder."""
    p = Path(path).expanduser()
    if not p.exists() and HUB_ID.match(str(path)):
        snap = hub_snapshot(str(path))
        out = resolve_input(snap, base=base, cache_dir=cache_dir)
        CONVERSIONS[out] = {**CONVERSIONS.get(out, {}), "hub_id": str(path), "snapshot": str(snap)}
        CONVERSIONS[out].setdefault("kind", "hub")
        return out
    if p.is_file() and p.suffix.lower() == ".gguf":
        out = str(gguf_to_folder(p, cache_dir=cache_dir))
        CONVERSIONS[out] = {"kind": "gguf", "file": str(p.absolute())}
        return out
    if is_lora_folder(p):
        used = []
        out = str(lora_to_folder(p, base=base, cache_dir=cache_dir, used_base=used))
        CONVERSIONS[out] = {"kind": "lora", "adapter": str(p.absolute()), "base": used[0]}
        return out
    return str(path)


def input_sources(opts) -> Dict[str, dict]:
    """For the report: each input of ``opts`` that is a converted GGUF file or LoRA adapter,
    with what it was converted from (a LoRA adapter: the base model folder that was used)."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(opts):
        if f.name not in ("pretrained", "finetuned", "model"):
            continue
        values = getattr(opts, f.name)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is not None and str(v) in CONVERSIONS:
                out[str(v)] = CONVERSIONS[str(v)]
    return out


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
        with _quiet_transformers():   # its load report and progress bars: our check says it in one line
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), dtype=torch.float32, output_loading_info=True, **kw)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise NPSError(f"{path}: transformers cannot read this GGUF file ({type(exc).__name__}: {msg})") from exc
    config = model.config                  # read from the same file (the model is not used after)
    _check_gguf_complete(path, model, info)
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


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as tlog
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # the GGUF reader's own tqdm bar
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _gguf_tensor_count(path: Path) -> int:
    import gguf
    try:
        return len(gguf.GGUFReader(str(path)).tensors)
    except Exception as exc:
        raise NPSError(f"{path}: cannot read the GGUF tensor table ({type(exc).__name__})") from None


def _check_gguf_complete(path: Path, model, info: dict) -> None:
    """Refuse a conversion in which a weight was not in the file (transformers would initialise it
    at random and go on), a tensor of the file went unused, or a shape did not match: a model
    that is not the file's is never cached nor scored."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(k for k in info.get("missing_keys") or ()
                     if not (tied and k == "lm_head.weight"))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) of the model are not in the file "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    for what in ("unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(what) or ())
        if keys:
            problems.append(f"{what.replace('_', ' ')}: {', '.join(keys[:3])}")
    if not problems:
        state = model.state_dict()
        loaded = len(state) - (1 if tied and "lm_head.weight" in state else 0)
        in_file = _gguf_tensor_count(path)
        if in_file > loaded:
            problems.append(f"the file holds {in_file} tensors, of which the converted model "
                            f"uses {loaded} (unrecognised tensor names)")
    if problems:
        raise NPSError(f"{path}: not a complete {type(model).__name__} ({'; '.join(problems)}); "
                       "nothing was converted")


# -- LoRA ------------------------------------------------------------------------------------------
PATTERN_MAX_CHARS = 200        # a rank_pattern / alpha_pattern key longer than this is refused
PATTERN_TIMEOUT_S = 1.0        # ... and one whose match takes longer (catastrophic backtracking)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first key that matches the end of the module name. Keys are regular
    expressions from the adapter file: an invalid, overlong or pathologically slow one is an
    NPSError, never a hang (``regex`` with a timeout)."""
    import regex
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
    from safetensors.torch import load_file
    from .load import open_checkpoint
    from .save import save_model_folder
    path = Path(path).absolute()
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NPSError(f"{path}: a LoRA adapter folder needs {ADAPTER_WEIGHTS}")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise NPSError(f"{path / ADAPTER_CONFIG}: not readable JSON ({_one_line(exc)})") from None
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
    key = _sha256([path / ADAPTER_CONFIG, weights, *base_ckpt.files, *tokenizer])
    out = Path(cache_dir or input_cache_dir()) / f"lora-{key}"
    if _done(out):
        return out
    try:
        adapter = load_file(str(weights))
    except Exception as exc:                  # a truncated or corrupt file
        raise NPSError(f"{weights}: not a readable safetensors file ({_one_line(exc)})") from None
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
