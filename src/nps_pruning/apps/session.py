"""A fine-tuned model loaded once for scoring (:class:`Session`): θ_pre, τ, and the model whose
prunable weights are views into one flat buffer; its evaluators on calibration and test data.

Every library entry point (:func:`~nps_pruning.apps.prune.prune`, merge, transfer, the benchmark)
works on sessions; nothing here reads a CLI option.
"""
from __future__ import annotations

import gc
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from ..checkpoints import load_task_vector
from ..checkpoints.external import resolve_input
from ..core.prepared import changed_domain, layout_spans, prepare
from ..errors import NPSError
from ..evaluation import bind_flat, count_rows, eval_kind, load_model, make_evaluator
from ..task_vector import TaskVector

# Below this many held-out rows the re-scoring is noisier than the search score it overrides (on
# the LLM suites' 64 calibration rows the 16 held out chose the start point with the worst search
# score): the search then uses every calibration row and its best score decides.
HOLDOUT_MIN_ROWS = 32


def holdout_split(total: int, calib_size: Optional[int], holdout: float,
                  min_rows: int = HOLDOUT_MIN_ROWS) -> Tuple[int, int]:
    """(search rows, held-out rows) of ``holdout`` = h of the calibration rows (``calib_size`` of
    ``total``, all when None): (n, 0), no hold-out, when h is 0 or fewer than ``min_rows`` rows
    would be held out."""
    n = total if calib_size is None else min(int(calib_size), total)
    h = float(holdout or 0.0)
    n_search = max(1, int(round((1.0 - h) * n)))
    if h <= 0 or n - n_search < max(1, int(min_rows)):
        return n, 0
    return n_search, n - n_search


def _config(folder: str) -> Optional[dict]:
    """A model folder's config.json without its path fields (None where there is none)."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        return None
    conf = json.loads(p.read_text())
    return {k: v for k, v in conf.items() if k not in ("_name_or_path", "transformers_version")}


@dataclass
class Session:
    """A fine-tuned model loaded once for scoring: θ_pre, τ, and a model whose prunable weights are
    views into ``flat`` (writing θ into ``flat`` changes the model in place). The load settings
    (device, τ dtype, model factory, running statistics, shape-mismatch handling) are kept: a
    scorer in another process loads the pair the same way."""

    pretrained: str
    finetuned: str
    base_flat: torch.Tensor
    task_vector: TaskVector
    model: Any = None
    flat: Optional[torch.Tensor] = None
    model_factory: Optional[str] = None
    device: str = "cpu"
    load_s: float = 0.0
    tau_dtype: str = "float32"
    running_stats: str = "finetuned"
    allow_shape_mismatch: bool = False

    @classmethod
    def load(cls, pretrained: str, finetuned: str, *, model_factory=None, allow_shape_mismatch=False,
             need_model=True, device="cpu", name=None, tau_dtype="float32",
             running_stats="finetuned") -> "Session":
        """Load θ_pre and τ (τ in ``tau_dtype``; θ_pre then kept in the checkpoint's own 16-bit
        dtype, which is lossless) on ``device``, and the model once if it will be scored."""
        t0 = time.perf_counter()
        pretrained = resolve_input(pretrained)          # GGUF / LoRA adapter -> a model folder
        finetuned = resolve_input(finetuned, base=pretrained)
        compact = tau_dtype != "float32"
        base_flat, tv = load_task_vector(pretrained, finetuned, allow_shape_mismatch=allow_shape_mismatch,
                                         name=name, dtype=tau_dtype, running_stats=running_stats,
                                         base_dtype="checkpoint" if compact else "float32",
                                         device=None if device == "cpu" else device)
        s = cls(str(pretrained), str(finetuned), base_flat, tv, model_factory=model_factory, device=device,
                tau_dtype=str(tau_dtype), running_stats=running_stats,
                allow_shape_mismatch=bool(allow_shape_mismatch))
        if need_model:
            s.ensure_model()
        s.load_s = time.perf_counter() - t0
        return s

    def ensure_model(self):
        if self.model is None:
            self.model = load_model(self.finetuned, model_factory=self.model_factory, device=self.device)
            self.flat = bind_flat(self.model, self.task_vector.layout)
            if self.device != "cpu":
                self.base_flat = self.base_flat.to(self.device)
                self.task_vector = self.task_vector.with_values(self.task_vector.values.to(self.device))
        return self.model

    def can_share_model(self, other: "Session") -> bool:
        """Whether this session can score on ``other``'s model: the same model factory, device,
        layout and model config, and the same tensors outside the layout (task-specific ones,
        buffers) value for value — the models then differ only in the weights every score writes."""
        a, b = self.task_vector, other.task_vector
        if (self.model_factory != other.model_factory or self.device != other.device
                or a.layout != b.layout or set(a.task_specific) != set(b.task_specific)
                or set(a.buffers) != set(b.buffers) or _config(self.finetuned) != _config(other.finetuned)):
            return False
        return all(torch.equal(a.task_specific[k], b.task_specific[k]) for k in a.task_specific) and \
            all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)

    def use_model_of(self, other: "Session") -> None:
        """Score on ``other``'s model (see :meth:`can_share_model`) instead of loading one."""
        other.ensure_model()
        self.model, self.flat = other.model, other.flat
        if self.device != "cpu":
            self.base_flat = self.base_flat.to(self.device)
            self.task_vector = self.task_vector.with_values(self.task_vector.values.to(self.device))

    def release_model(self) -> None:
        """Drop the scoring model and its flat buffer (θ_pre and τ stay): what a command does
        before it writes its outputs, so that writing never holds a second copy of the weights
        next to the model. :meth:`ensure_model` loads it again if it is needed."""
        self.model, self.flat = None, None
        gc.collect()

    def park_base(self) -> None:
        """Put θ_pre into the model's own weights and drop the separate copy of θ_pre: what a
        search does, writing each candidate only at its k kept entries and restoring them
        (:func:`~nps_pruning.core.entries.candidate_entries`), so that it holds the model, τ and
        the band structures and no second model-sized vector. :meth:`unpark_base` takes the copy
        back (the model must hold θ_pre again then)."""
        self.ensure_model()
        if self.base_flat is None:
            return
        self.flat.copy_(self.base_flat)
        self._base_dtype = self.base_flat.dtype
        self.base_flat = None
        gc.collect()

    def unpark_base(self) -> None:
        if self.base_flat is None:
            self.base_flat = self.flat.to(getattr(self, "_base_dtype", self.flat.dtype), copy=True)

    @property
    def domain(self):
        """The entries pruning may keep (:mod:`~nps_pruning.core.prepared`): every tensor whose τ
        is not identically zero (a tensor the fine-tune left unchanged is left out of D)."""
        values = self.task_vector.values
        cached = getattr(self, "_domain", None)      # (weak reference to τ, its domain): the cache
        if cached is None or cached[0]() is not values:    # never keeps a replaced τ alive
            self._domain = (weakref.ref(values), changed_domain(values, layout_spans(self.task_vector.layout)))
        return self._domain[1]

    def unchanged_tensors(self) -> list:
        """Names of the prunable tensors the fine-tune left unchanged (τ identically zero)."""
        dom = self.domain
        if dom.is_whole:
            return []
        return [n for n, s, e, _ in self.task_vector.layout.spans()
                if e > s and not any(a <= s < b for a, b in dom.spans)]

    def prepared(self, settings):
        """The :class:`~nps_pruning.core.prepared.Prepared` τ of a
        :class:`~.settings.PruneSettings` (its keep ratio, bands, space, seed, kept values)."""
        return prepare(self.task_vector.values, self.domain, keep=settings.keep_ratio,
                       num_bands=settings.bands, scheme=settings.scheme, focus=settings.focus,
                       space=settings.space, seed=settings.seed, kept_values=settings.kept_values)

    def set_task_values(self, tau: torch.Tensor, scale: float = 1.0) -> None:
        """Put θ_pre + scale·τ into the model (in place).

        Computed as ``θ_pre + (scale·τ)``, the same float arithmetic as the model that is written
        (``TaskVector.state_dict`` of ``scale·τ``), so the scores reported are those of the
        written weights bit for bit (``torch.add(..., alpha=scale)`` rounds differently)."""
        self.ensure_model()
        tau = tau.to(self.flat.device)
        torch.add(self.base_flat, tau if scale == 1.0 else tau * scale, out=self.flat)

    def score(self, evaluator, tau: torch.Tensor, scale: float = 1.0) -> float:
        self.set_task_values(tau, scale)
        return float(evaluator(self.model))

    def evaluator(self, spec: str, *, calib_size: Optional[int] = None, seed: int = 0,
                  batch_size: int = 64, max_length: int = 128, fitness: str = "accuracy",
                  subset: str = "all", rest_size: Optional[int] = None):
        """The evaluator ``spec`` for this model: every row, or a seeded subsample of
        ``calib_size`` rows (``subset="rest"``: ``rest_size`` of the rows that subsample left
        out). ``fitness="agreement"`` scores against this fine-tuned model's own predictions."""
        ev = make_evaluator(spec, model_path=self.finetuned, calib_size=calib_size,
                            seed=seed, batch_size=batch_size,
                            device=self.device, max_length=max_length, fitness=fitness,
                            subset=subset, rest_size=rest_size)
        if fitness == "agreement":       # the fine-tuned model's own predictions are the target
            self.set_task_values(self.task_vector.values)
            ev.set_reference(self.model)
        return ev

    @staticmethod
    def search_fitness(spec: str, fitness: Optional[str] = None) -> str:
        """The fitness a search uses on ``spec``: ``fitness``, by default loglik for the
        classification evaluators; a python: evaluator's own score ("accuracy" here)."""
        kind = eval_kind(spec)
        if kind.own_score and fitness not in (None, kind.fitness):
            raise NPSError(f"{spec}: fitness {fitness!r} applies to the classification and "
                           "language-model evaluators; python: and lm-eval: evaluators return "
                           "their own score")
        return fitness or kind.fitness

    def search_evaluators(self, spec: str, *, fitness: Optional[str] = None, holdout: float = 0.0,
                          calib_size: Optional[int] = None, seed: int = 0, batch_size: int = 64,
                          max_length: int = 128, holdout_min_rows: int = HOLDOUT_MIN_ROWS):
        """(search evaluator, held-out evaluator or None) on the calibration data: with
        ``holdout`` = h > 0, the first (1−h) of the seeded calibration rows drive the search
        and the other h re-score its best candidates (against the winner's curse); none when
        that would hold out fewer than ``holdout_min_rows`` rows (:func:`holdout_split`)."""
        kw = {"seed": seed, "batch_size": batch_size, "max_length": max_length,
              "fitness": self.search_fitness(spec, fitness)}
        h = float(holdout or 0.0)
        if h <= 0 or eval_kind(spec).own_score:
            return self.evaluator(spec, calib_size=calib_size, **kw), None
        n_search, n_hold = holdout_split(count_rows(spec), calib_size, h, holdout_min_rows)
        if n_hold < 1:
            return self.evaluator(spec, calib_size=n_search, **kw), None
        search = self.evaluator(spec, calib_size=n_search, **kw)
        hold = self.evaluator(spec, calib_size=n_search, subset="rest", rest_size=n_hold, **kw)
        return search, hold
