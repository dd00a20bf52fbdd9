"""Loading a model to score, and binding its weights to one flat buffer.

:func:`load_model` builds an ``nn.Module`` (eval mode, float32) from a ``transformers`` model
folder, or from a bare state dict with a user ``--model-factory``. :func:`bind_flat` then makes
every prunable tensor of that model a view into one flat float32 vector laid out as a
:class:`~nps_pruning.task_vector.Layout`: the search writes θ_pre + τ̂(w) into that vector and
calls the evaluator, hundreds of times, with no reload and no state-dict copy per candidate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..checkpoints import open_checkpoint
from ..checkpoints.load import read_model_config
from ..errors import NPSError
from ..task_vector import Layout
from .python_eval import resolve_python

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# -- outputs -----------------------------------------------------------------------------------
def logits_of(output) -> torch.Tensor:
    """The logits of a forward's output: a tensor, an object with ``.logits`` (transformers), a
    mapping with ``"logits"``, or a tuple/list whose first element is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise NPSError(f"the model returned {type(output).__name__}, expected logits (a tensor or an "
                   "object with .logits)")


# -- loading -----------------------------------------------------------------------------------
def load_state_dict_any(path) -> Dict[str, torch.Tensor]:
    """The full state dict of a checkpoint (file or folder, sharded or not).

    Read through :func:`nps_pruning.checkpoints.open_checkpoint`.
    """
    path = Path(path)
    if not path.exists():
        raise NPSError(f"{path}: no such file or folder")
    return dict(open_checkpoint(path).state_dict())


def _transformers_model(folder: Path, config: dict) -> torch.nn.Module:
    import transformers
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForSequenceClassification
    try:
        return cls.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise NPSError(f"{folder}: cannot load as {cls.__name__} ({type(exc).__name__}: {msg})") from exc


def _factory_model(path: Path, model_factory: str) -> torch.nn.Module:
    fn = resolve_python(model_factory)
    state_dict = load_state_dict_any(path)
    try:
        model = fn(state_dict)
    except NPSError:
        raise
    except Exception as exc:
        raise NPSError(f"{model_factory}: raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise NPSError(f"{model_factory}: returned {type(model).__name__}, expected a torch.nn.Module")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise NPSError(f"{path}: weights do not fit the model from {model_factory}: {first}") from exc
    return model


def load_model(path, *, model_factory: Optional[str] = None, device="cpu") -> torch.nn.Module:
    """An ``nn.Module`` in eval mode with float32 weights, on ``device``.

    * a ``transformers`` folder (``config.json``): the class named in ``architectures[0]``
      (fallback ``AutoModelForSequenceClassification``), ``from_pretrained(folder)``;
    * otherwise (a bare ``.safetensors``/``.bin`` state dict, or a folder without config) —
      or whenever ``model_factory`` is given — ``model_factory`` = ``python:MODULE:FUNCTION``:
      FUNCTION(state_dict) returns the module, whose weights are then loaded strictly.
    """
    path = Path(path)
    if not path.exists():
        raise NPSError(f"{path}: no such file or folder")
    config = read_model_config(path) if path.is_dir() else None
    if model_factory:
        model = _factory_model(path, model_factory)
    elif config is not None:
        model = _transformers_model(path, config)
    else:
        raise NPSError(f"{path}: not a transformers model folder (no config.json); pass "
                       "--model-factory python:MODULE:FUNCTION to build the model from its state dict")
    model = model.float().to(device)
    model.eval()
    return model


# -- binding -----------------------------------------------------------------------------------
def _live_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Name -> the module's own tensor object (parameters and buffers, tied names included)."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        if t is not None:
            out.setdefault(name, t)
    return out


def _load_renamings(model: torch.nn.Module) -> list:
    """transformers ≥ 5 renames some checkpoint keys on load (Dinov2's
    ``attention.attention.query`` is the module ``attention.q_proj``) and writes the old names
    back on save: the pure renames of its conversion mapping for ``model`` (empty for other
    models and older transformers). Conversions that split or merge tensors are not renames and
    are left out: such tensors cannot be bound and fail with the usual error."""
    cached = getattr(model, "_nps_renamings", None)
    if cached is not None:
        return cached
    out: list = []
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
        if isinstance(model, PreTrainedModel):
            out = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except Exception:       # older transformers, or a model it cannot map: no renames
        out = []
    try:
        object.__setattr__(model, "_nps_renamings", out)
    except Exception:
        pass
    return out


def _renamed(name: str, model: torch.nn.Module) -> Optional[str]:
    new = name
    for t in _load_renamings(model):
        try:
            new, _ = t.rename_source_key(new)
        except Exception:
            continue
    return new if new != name else None


def _resolve_name(name: str, live: Mapping[str, torch.Tensor], model: torch.nn.Module,
                  base_names: Optional[Mapping[str, str]]) -> Optional[str]:
    """The model's name for layout tensor ``name``: ``base_names`` first, then the name itself,
    then the ``transformers`` base-model prefix added or removed (``bert.x`` <-> ``x``), then
    each of those through the load-time renames of transformers ≥ 5 (:func:`_load_renamings`)."""
    candidates = []
    if base_names and name in base_names:
        candidates.append(base_names[name])
    candidates.append(name)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        else:
            candidates.append(f"{prefix}.{name}")
    for c in candidates:
        if c in live:
            return c
    for c in candidates:
        r = _renamed(c, model)
        if r is not None and r in live:
            return r
    return None


def _extent(t: torch.Tensor) -> Tuple[int, int, int]:
    """(storage pointer, first byte, end byte) that ``t`` touches."""
    es = t.element_size()
    start = t.storage_offset() * es
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.untyped_storage().data_ptr(), start, start + span * es


def bind_flat(model: torch.nn.Module, layout: Layout,
              base_names: Optional[Mapping[str, str]] = None) -> torch.Tensor:
    """Make each layout tensor of ``model`` a view into ONE new flat float32 buffer and return it.

    The buffer is contiguous, in layout order and offsets, and starts with the model's current
    values; writing into it (e.g. ``build_candidate(..., out=flat)``) changes the model in place.
    ``layout.names`` are the model's state-dict names; ``base_names`` (layout name -> model name)
    or the ``transformers`` base-model prefix map them where the model names them differently.
    Tied weights: if two layout names are one tensor, the layout must hold only one of them (the
    other name then follows automatically, being the same tensor).
    """
    live = _live_tensors(model)
    bound: List[Tuple[str, str, torch.Tensor, int, int, Tuple[int, ...]]] = []
    for name, start, stop, shape in layout.spans():
        mname = _resolve_name(name, live, model, base_names)
        if mname is None:
            raise NPSError(f"tensor {name}: in the layout but not in the model "
                           f"({type(model).__name__})")
        t = live[mname]
        if not t.is_floating_point():
            raise NPSError(f"tensor {name}: model tensor {mname} is {t.dtype}, not floating point")
        if tuple(t.shape) != tuple(shape):
            raise NPSError(f"tensor {name}: model shape {tuple(t.shape)} does not match the layout's "
                           f"{tuple(shape)}")
        bound.append((name, mname, t, start, stop, tuple(shape)))

    # two layout names on one storage (tied weights) cannot be two slices of the buffer
    extents = sorted((_extent(t) + (name,)) for name, _, t, _, _, _ in bound if t.numel() > 0)
    for (p1, s1, e1, n1), (p2, s2, e2, n2) in zip(extents, extents[1:]):
        if p1 == p2 and s2 < e1:
            raise NPSError(f"tensors {n1} and {n2} share storage (tied weights): the layout "
                           "must hold only one of them")

    devices = {t.device for _, _, t, _, _, _ in bound}
    if len(devices) > 1:
        raise NPSError(f"model tensors are on several devices ({', '.join(map(str, devices))}); "
                       "cannot bind them to one buffer")
    device = devices.pop() if devices else torch.device("cpu")
    flat = torch.empty(layout.numel, dtype=torch.float32, device=device)
    with torch.no_grad():
        for _, _, t, start, stop, shape in bound:
            view = flat[start:stop].view(shape)
            view.copy_(t.detach())
            t.data = view
    return flat
