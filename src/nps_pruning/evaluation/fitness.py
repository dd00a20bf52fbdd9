"""What a classification evaluator's score means (``--fitness``).

* ``accuracy`` — fraction of rows whose argmax is the label (the paper; steps of 1/N);
* ``loglik`` — mean log-probability of the label (smooth: every row moves the score a little,
  so a small calibration set ranks near-equal candidates less by chance);
* ``agreement`` — label-free: exp(−mean KL(p_ft ‖ p_candidate)) over the rows, where p_ft is the
  fine-tuned model's own output distribution (recorded once by ``set_reference``). 1 means the
  candidate predicts exactly what the fine-tuned model predicts; needs only inputs, no labels.

Each is higher-is-better, so the search maximizes any of them alike. A row's log-likelihood is
floored at log(1e-9) (and its KL capped at −log(1e-9)), and non-finite outputs count as that floor:
an extreme candidate whose activations overflow (a rescaled dense task vector through BatchNorm,
say) then scores as the worst possible model instead of failing with NaN.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import NPSError

FITNESSES = ("accuracy", "loglik", "agreement")
LOG_FLOOR = math.log(1e-9)      # the worst a row's log-likelihood counts (≈ −20.7)


def check_fitness(fitness: str, source: str = "") -> str:
    if fitness not in FITNESSES:
        raise NPSError(f"{source + ': ' if source else ''}unknown fitness {fitness!r} "
                       f"(choose from {', '.join(FITNESSES)})")
    return fitness


class FitnessAccumulator:
    """Sums one batch at a time; ``value()`` is the score of the rows seen."""

    def __init__(self, fitness: str):
        self.fitness = fitness
        self.total = 0.0
        self.rows = 0

    def add(self, logits: torch.Tensor, labels: Optional[torch.Tensor],
            ref_logp: Optional[torch.Tensor]) -> torch.Tensor:
        """Add one batch; returns its per-row values (see :func:`score_from_rows`)."""
        n = int(logits.shape[0])
        self.rows += n
        if self.fitness == "accuracy":
            hit = logits.argmax(dim=-1) == labels
            self.total += int(hit.sum())
            return hit.double()
        if self.fitness == "loglik":
            ll = _floor(_row_logp(logits).gather(1, labels.view(-1, 1)).squeeze(1))
            self.total += float(ll.sum())
            return ll.double()
        logp = _row_logp(logits)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
        kl = torch.nan_to_num(kl, nan=-LOG_FLOOR, posinf=-LOG_FLOOR).clamp(0.0, -LOG_FLOOR)
        self.total += float(kl.sum())
        return -kl.double()

    def value(self) -> float:
        mean = self.total / max(1, self.rows)
        if self.fitness == "agreement":
            return math.exp(-mean)
        return mean


def _row_logp(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax per row; a row with any non-finite logit gets the floor for every class."""
    x = logits.float()
    bad = ~torch.isfinite(x).all(dim=-1)
    logp = torch.log_softmax(torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x), dim=-1)
    return torch.where(bad.unsqueeze(-1), torch.full_like(logp, LOG_FLOOR), logp)


def _floor(ll: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(ll, nan=LOG_FLOOR, neginf=LOG_FLOOR).clamp_min(LOG_FLOOR)


def score_from_rows(fitness: Optional[str], values) -> float:
    """The score of rows from their per-row values (what ``FitnessScored.score_rows`` returns):
    1/0 per row for accuracy, the floored log-likelihood for loglik, −KL for agreement; the score
    is their mean (exp of the mean for agreement). Equal to the evaluator's own score up to float
    rounding (the evaluator sums in float32 per batch); used to rank candidates on partial rows."""
    mean = float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else 0.0
    return math.exp(mean) if fitness == "agreement" else mean


def reference_log_probs(batches_logits: List[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.log_softmax(l.float(), dim=-1).detach() for l in batches_logits]


class FitnessScored:
    """The scoring shared by the classification evaluators: a subclass sets ``path``, ``fitness``
    and ``reference = None`` and yields ``(logits, labels)`` per batch from ``_logits(model)``."""

    def set_reference(self, model: torch.nn.Module) -> None:
        """Record ``model``'s output distributions (the fine-tuned model's, before a search) for
        ``fitness="agreement"``."""
        self.reference = reference_log_probs([l for l, _ in self._logits(model)])

    def __call__(self, model: torch.nn.Module) -> float:
        if self.fitness == "agreement" and self.reference is None:
            raise NPSError(f"{self.path}: fitness 'agreement' needs the fine-tuned model's "
                           "predictions first (set_reference)")
        acc = FitnessAccumulator(self.fitness)
        for b, (logits, labels) in enumerate(self._logits(model)):
            acc.add(logits, labels, self.reference[b] if self.reference is not None else None)
        return acc.value()

    # -- scoring some of the rows (racing, search/race.py) ----------------------------------
    def score_rows(self, model: torch.nn.Module, rows=None) -> Tuple[float, np.ndarray]:
        """(score, per-row values) of the rows at positions ``rows`` (0 .. num_rows-1 of this
        evaluator's selected rows; None: all), values in the order of ``rows``.

        All the rows (in any order) are forwarded in the very batches of ``__call__`` and summed
        the same way, so the score is ``self(model)`` bit for bit. Fewer rows are forwarded in
        batches of their own (sorted by length for text), and the score is that of those rows
        (:func:`score_from_rows` of the values, up to float rounding). Per-row values: see
        :func:`score_from_rows`."""
        if self.fitness == "agreement" and self.reference is None:
            raise NPSError(f"{self.path}: fitness 'agreement' needs the fine-tuned model's "
                           "predictions first (set_reference)")
        n = int(self.num_rows)
        pos = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise NPSError(f"{self.path}: row positions must be in 0..{n - 1}")
        if len(np.unique(pos)) != len(pos):
            raise NPSError(f"{self.path}: row positions must not repeat")
        everything = len(pos) == n
        acc = FitnessAccumulator(self.fitness)
        values = np.empty(n, dtype=np.float64)
        batches = self._batch_positions() if everything else self._subset_positions(np.sort(pos))
        for b, (part, (logits, labels)) in enumerate(zip(batches, self._logits_of(model, batches,
                                                                                  everything))):
            ref = None
            if self.reference is not None:
                ref = (self.reference[b] if everything
                       else self._reference_rows()[torch.as_tensor(part)])
            values[part] = acc.add(logits, labels, ref).cpu().numpy()
        return acc.value(), values[pos]

    def _logits_of(self, model, batches, everything: bool):
        return self._logits(model) if everything else self._subset_logits(model, batches)

    def _reference_rows(self) -> torch.Tensor:
        """The reference log-probabilities by row position (for subsets of the rows)."""
        cached = getattr(self, "_ref_rows", None)
        if cached is None or cached[0] is not self.reference:
            parts = self._batch_positions()
            first = self.reference[0]
            table = torch.empty((int(self.num_rows),) + tuple(first.shape[1:]), dtype=first.dtype,
                                device=first.device)
            for part, ref in zip(parts, self.reference):
                table[torch.as_tensor(part, device=first.device)] = ref
            cached = self._ref_rows = (self.reference, table)
        return cached[1]
