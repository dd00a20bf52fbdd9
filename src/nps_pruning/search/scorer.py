"""CandidateScorer: band weights -> calibration score of the pruned model.

A picklable *recipe* (paths, eval spec, pruning settings). The heavy state (θ_pre, τ, bands, the
model with its parameters bound to one flat buffer, the evaluator) is built lazily on the first
call in each process, so worker processes and Ray actors receive only the recipe. Each call
writes θ_pre + τ̂(w) into the model's flat buffer in place (no reload) and evaluates it. A scorer
built from paths — or given ``base_flat=None`` (``Session.park_base``) — keeps no copy of θ_pre:
the model holds θ_pre, and each candidate is written at its k kept entries only and undone before
the next (:meth:`CandidateScorer.restore`), bit for bit the dense build.

Large models: ``tau_dtype="bfloat16"`` (or "float16") keeps τ in 16 bits, θ_pre is kept in the
checkpoint's own dtype when that is 16-bit (lossless), and the bands' ``sorted_abs`` in τ's dtype,
so the state is about τ + D bytes (band_of) + sorted_abs besides the model (which holds θ_pre).
``device="cuda"``: θ_pre, τ and ``band_of`` live on the device with the model (``sorted_abs``
stays in host memory, read by the per-candidate threshold search); timings synchronize the device.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ..checkpoints import load_task_vector
from ..core.prepared import layout_spans, prepare
from ..errors import NPSError
from ..evaluation import bind_flat, eval_kind, load_model, make_evaluator
from .cpu_linear import linear_mode


# the kept entries of the last candidates a scorer wrote, at most this many bytes (a raced
# candidate is written again at every stage: text r = 0.05 holds 13 MB an entry, 42 of 120 writes)
ENTRY_CACHE_BYTES = 256 * 2**20


@dataclass
class _State:
    base_flat: Any
    prep: Any                  # core.prepared.Prepared: τ, its domain, bands and hybrid index
    model: Any
    flat: Any
    evaluator: Any

    @property
    def bands(self):
        return self.prep.bands


class CandidateScorer:
    """Scores a candidate (a point of the search space): writes θ_pre + τ̂(point) into the model
    and runs the evaluator. Built from paths (the recipe, picklable: what worker processes
    receive; each loads the pair once and prepares τ) or over in-memory objects
    (:meth:`from_state`, the serial executor). ``settings`` is the run's
    :class:`~nps_pruning.apps.settings.PruneSettings` (keep ratio, bands, space, seed, calibration
    rows, batch size, ...; its ``fitness`` the one resolved for ``eval_spec``); the keywords are
    how the pair is loaded, as the run's :class:`~nps_pruning.apps.session.Session` was."""

    def __init__(self, pretrained_path, finetuned_path, eval_spec: str, settings, *,
                 model_factory: Optional[str] = None, device: str = "cpu", tau_dtype: str = "float32",
                 running_stats: str = "finetuned", allow_shape_mismatch: bool = False):
        self.pretrained_path = str(pretrained_path) if pretrained_path is not None else None
        self.finetuned_path = str(finetuned_path) if finetuned_path is not None else None
        self.eval_spec = eval_spec
        self.settings = settings
        self.autocast = settings.autocast if settings is not None else None   # "bf16": autocast forwards
        self.cpu_linear = settings.cpu_linear if settings is not None else "onednn"   # cpu_linear.py
        self.model_factory = model_factory
        self.device = device
        self.tau_dtype = str(tau_dtype).replace("torch.", "")
        self.running_stats = running_stats
        self.allow_shape_mismatch = bool(allow_shape_mismatch)
        self._state: Optional[_State] = None
        self._written = None           # (positions, θ_pre there) of the candidate in the model
        self._entry_cache: "OrderedDict[bytes, tuple]" = OrderedDict()   # weights -> entries
        self._picklable = True

    @classmethod
    def from_state(cls, base_flat, prepared, model, flat, evaluator,
                   autocast: Optional[str] = None, cpu_linear: str = "onednn") -> "CandidateScorer":
        """In-process scorer over already loaded objects (``prepared``: the
        :class:`~nps_pruning.core.prepared.Prepared` τ; not picklable: serial executor only)."""
        self = cls(None, None, getattr(evaluator, "name", "<evaluator>"), None)
        self.autocast = autocast
        self.cpu_linear = cpu_linear
        self._state = _State(base_flat, prepared, model, flat, evaluator)
        self._picklable = False
        return self

    # only the recipe travels
    def __getstate__(self):
        if not self._picklable:
            raise NPSError("a CandidateScorer built from in-memory state cannot be sent to worker "
                           "processes; use the serial executor or construct it from paths")
        state = dict(self.__dict__)
        state["_state"] = None
        state["_written"] = None
        state["_entry_cache"] = OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def num_rows(self) -> Optional[int]:
        """Calibration rows of the evaluator, once built here (None before)."""
        st = self._state
        return None if st is None else int(getattr(st.evaluator, "num_rows", 0) or 0) or None

    @property
    def supports_rows(self) -> bool:
        """Whether the evaluator can score some of the rows (racing): the classification ones."""
        if self._state is not None:
            return callable(getattr(self._state.evaluator, "score_rows", None))
        return eval_kind(self.eval_spec).scores_rows

    @property
    def state(self) -> _State:
        if self._state is None:
            self._state = self._build()
        return self._state

    def _build(self) -> _State:

        st = self.settings
        compact = self.tau_dtype != "float32"
        base_flat, tv = load_task_vector(self.pretrained_path, self.finetuned_path, dtype=self.tau_dtype,
                                         base_dtype="checkpoint" if compact else "float32",
                                         device=self.device, running_stats=self.running_stats,
                                         allow_shape_mismatch=self.allow_shape_mismatch)
        prep = prepare(tv.values, layout_spans(tv.layout), keep=st.keep_ratio, num_bands=st.bands,
                       scheme=st.scheme, focus=st.focus, space=st.space, seed=st.seed,
                       kept_values=st.kept_values)
        model = load_model(self.finetuned_path, model_factory=self.model_factory, device=self.device)
        flat = bind_flat(model, tv.layout)
        if flat.device != tv.values.device:
            raise NPSError(f"{self.finetuned_path}: the model was loaded on {flat.device} but the "
                           f"task vector on {tv.values.device}")
        evaluator = make_evaluator(self.eval_spec, model_path=self.finetuned_path,
                                   calib_size=st.calib_size, seed=st.seed, batch_size=st.batch_size,
                                   device=self.device, max_length=st.max_length,
                                   fitness=st.fitness or "accuracy")
        if hasattr(evaluator, "set_reference"):     # the model holds θ_ft now: its predictions
            with torch.no_grad():
                evaluator.set_reference(model)
        flat.copy_(base_flat)       # the model holds θ_pre from here on: no second copy of it
        return _State(None, prep, model, flat, evaluator)

    def restore(self) -> None:
        """Give the model θ_pre back at the entries the last candidate wrote (a model that holds
        θ_pre itself: ``base_flat`` None)."""
        written = self._written
        if written is not None and self._state is not None:
            idx, saved = written
            self._state.flat[idx] = saved
        self._written = None

    def _entries(self, st, w: np.ndarray):
        """The candidate's kept entries (positions, τ̂ values), remembered for the next few calls:
        a raced candidate is written again at each stage it reaches, and then for its full score.
        The most recent ones are kept up to :data:`ENTRY_CACHE_BYTES` in all."""
        key = w.tobytes()
        cache = self._entry_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key][:2]
        idx, vals = st.prep.entries(w)
        size = idx.element_size() * idx.numel() + vals.element_size() * vals.numel()
        if size <= ENTRY_CACHE_BYTES:
            while cache and size + sum(e[2] for e in cache.values()) > ENTRY_CACHE_BYTES:
                cache.popitem(last=False)
            cache[key] = (idx, vals, size)
        return idx, vals

    def _put_candidate(self, weights):
        """Write θ_pre + τ̂(w) into the model; returns (state, sync, build seconds). With no
        separate θ_pre (``base_flat`` None: the model holds θ_pre) only the k kept entries are
        written, and restored before the next candidate (:meth:`restore`); bit for bit the same
        weights as the dense build."""

        st = self.state
        dev = getattr(st.flat, "device", None)
        sync = (torch.cuda.synchronize if dev is not None and dev.type == "cuda"
                else (lambda *a: None))
        sync(dev)
        t0 = time.perf_counter()
        w = np.asarray(weights, dtype=np.float64)
        if st.base_flat is None:
            self.restore()
            idx, vals = self._entries(st, w)
            saved = st.flat[idx]
            st.flat[idx] = saved + vals
            self._written = (idx, saved)
        else:
            st.prep.build(w, base=st.base_flat, out=st.flat)
        sync(dev)
        return st, (lambda: sync(dev)), time.perf_counter() - t0

    def _forward_mode(self, st):
        """No gradients; on the CPU fp32 linear layers in oneDNN (``cpu_linear``, :mod:`.cpu_linear`);
        with ``autocast="bf16"`` also bf16 autocast on the model's device."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(linear_mode(self.cpu_linear, getattr(st.flat, "device", "cpu")))
        if self.autocast == "bf16":
            stack.enter_context(torch.autocast(device_type=st.flat.device.type, dtype=torch.bfloat16))
        return stack

    def __call__(self, weights) -> Tuple[float, dict]:
        st, sync, build_s = self._put_candidate(weights)
        t1 = time.perf_counter()
        with self._forward_mode(st):
            score = float(st.evaluator(st.model))
        sync()
        t2 = time.perf_counter()
        return score, {"build_s": build_s, "eval_s": t2 - t1,
                       "examples": int(getattr(st.evaluator, "num_rows", 0) or 0)}

    def score_rows(self, weights, rows) -> Tuple[np.ndarray, dict]:
        """Per-row values of the candidate on the calibration rows at positions ``rows`` (for
        racing; see ``FitnessScored.score_rows``); info as ``__call__``'s, with ``examples`` =
        the rows forwarded and ``fitness`` (how the values make a score)."""
        st = self.state
        if not callable(getattr(st.evaluator, "score_rows", None)):
            raise NPSError(f"{getattr(st.evaluator, 'name', 'this evaluator')}: racing (--race) "
                           "needs a text- or image-classification evaluator (it scores rows)")
        st, sync, build_s = self._put_candidate(weights)
        t1 = time.perf_counter()
        with self._forward_mode(st):
            _, values = st.evaluator.score_rows(st.model, rows)
        sync()
        t2 = time.perf_counter()
        return values, {"build_s": build_s, "eval_s": t2 - t1, "examples": int(len(values)),
                        "fitness": getattr(st.evaluator, "fitness", None)}
