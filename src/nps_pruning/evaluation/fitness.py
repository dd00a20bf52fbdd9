"""What a classification evaluator's score means (``--fitness``).

* ``accuracy`` — fraction of rows whose argmax is the label (the paper; steps of 1/N);
* ``loglik`` — mean log-probability of the label (smooth: every row moves the score a little,
  so a small calibration set ranks near-equal candidates less by chance);
* ``agreement`` — label-free: exp(−mean KL(p_ft ‖ p_candidate)) over the rows, where p_ft is the
  fine-tuned model's own output distribution (recorded once by ``set_reference``). 1 means the
  candidate predicts exactly what the fine-tuned model predicts; needs only inputs, no labels.

Each is higher-is-better, so the search maximizes any of them alike.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..errors import NPSError

FITNESSES = ("accuracy", "loglik", "agreement")


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
            logp = torch.log_softmax(logits.float(), dim=-1)
            self.total += float(logp.gather(1, labels.view(-1, 1)).sum())
        else:
            logp = torch.log_softmax(logits.float(), dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
            self.total += float(kl.clamp_min(0.0).sum())

    def value(self) -> float:
        mean = self.total / max(1, self.rows)
        if self.fitness == "agreement":
            return math.exp(-mean)
        return mean


def reference_log_probs(batches_logits: List[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.log_softmax(l.float(), dim=-1).detach() for l in batches_logits]
