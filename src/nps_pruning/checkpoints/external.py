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
  folder. DoRA and convolution LoRA are refused with a clear error. (The LoRA code is in
  :mod:`.lora`.)
* **Hub ids** (``org/name[@revision]`` with no local path of that name): the snapshot folder
  ``huggingface_hub`` resolves (its cache, ``HF_HUB_OFFLINE``, tokens).
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Dict

import torch

from ..atomic import staging_dir, swap_in_dir
from ..errors import NPSError
from .input_cache import ADAPTER_CONFIG, content_sha256, converted, input_cache_dir
from .lora import lora_to_folder
from .save import save_tensors


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


# -- GGUF -----------------------------------------------------------------------------------------
def gguf_to_folder(path: Path, *, cache_dir=None) -> Path:
    path = Path(path).absolute()
    out = Path(cache_dir or input_cache_dir()) / f"gguf-{content_sha256([path])}"
    if converted(out):
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise NPSError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    import transformers
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
