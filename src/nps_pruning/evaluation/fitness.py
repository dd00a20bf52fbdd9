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
from typing import List, Optional

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
            ref_logp: Optional[torch.Tensor]) -> None:
        n = int(logits.shape[0])
        self.rows += n
        if self.fitness == "accuracy":
            self.total += int((logits.argmax(dim=-1) == labels).sum())
        elif self.fitness == "loglik":
            ll = _row_logp(logits).gather(1, labels.view(-1, 1)).squeeze(1)
            self.total += float(_floor(ll).sum())
        else:
            logp = _row_logp(logits)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
            kl = torch.nan_to_num(kl, nan=-LOG_FLOOR, posinf=-LOG_FLOOR).clamp(0.0, -LOG_FLOOR)
            self.total += float(kl.sum())

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
