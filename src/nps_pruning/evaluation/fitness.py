"""What a classification evaluator's score means (``--fitness``).

* ``accuracy`` — fraction of rows whose argmax is the label (the paper; steps of 1/N);
* ``loglik`` — mean log-probability of the label (smooth: every row moves the score a little,
  so a small calibration set ranks near-equal candidates less by chance);
* ``loglik-t`` — the mean log-probability of the label at the temperature that maximizes it over
  the rows scored (one scalar, fitted per candidate: logits × β*, β* ≥ 0; β = 0 is the uniform
  guess, so the score is never below −log C). Unlike ``loglik`` it does not punish a candidate
  for being confidently wrong on some rows while it ranks more rows right (a heavily pruned model
  near chance, where ``loglik`` prefers the timid candidate and accuracy the better one); the
  temperature does not change any argmax, so the model scored is the model shipped;
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

FITNESSES = ("accuracy", "loglik", "agreement", "loglik-t")
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
        self._parts: List[Tuple[torch.Tensor, torch.Tensor]] = []     # loglik-t: (logits, labels)
        self._values: Optional[torch.Tensor] = None                   # loglik-t: fitted, until the next add

    def add(self, logits: torch.Tensor, labels: Optional[torch.Tensor],
            ref_logp: Optional[torch.Tensor]) -> torch.Tensor:
        """Add one batch; returns its per-row values (see :func:`score_from_rows`). For
        ``loglik-t`` the values depend on every row (the fitted temperature): NaN here, the
        values are :meth:`row_values` once every batch is in."""
        n = int(logits.shape[0])
        self.rows += n
        if self.fitness == "loglik-t":
            self._parts.append((logits.detach().double().cpu(), labels.detach().view(-1).cpu()))
            self._values = None
            return torch.full((n,), float("nan"), dtype=torch.float64)
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

    def row_values(self) -> torch.Tensor:
        """``loglik-t``: every row's log-probability of its label at the temperature fitted on
        all the rows added (in the order they were added)."""
        if not self._parts:
            return torch.zeros(0, dtype=torch.float64)
        if self._values is None:          # one fit serves value() and the per-row values alike
            z = torch.cat([l for l, _ in self._parts])
            y = torch.cat([t for _, t in self._parts])
            self._values = tempered_loglik(z, y)
        return self._values

    def value(self) -> float:
        if self.fitness == "loglik-t":
            return float(self.row_values().mean()) if self.rows else 0.0
        mean = self.total / max(1, self.rows)
        if self.fitness == "agreement":
            return math.exp(-mean)
        return mean


def fit_inverse_temperature(z: torch.Tensor, y: torch.Tensor, iters: int = 60) -> float:
    """β* = argmax over β ≥ 0 of the mean log softmax(β·z)[y] (rows of finite logits ``z``,
    float64). The mean is concave in β (−log-sum-exp of linear functions plus a linear term), so a
    golden-section search on log β over [1e-4, 1e3], plus the end point β = 0, finds it."""
    if z.shape[0] == 0:
        return 1.0

    def f(beta: float) -> float:
        zz = z * beta
        return float((zz.gather(1, y.view(-1, 1)).squeeze(1) - torch.logsumexp(zz, dim=1)).mean())

    lo, hi = math.log(1e-4), math.log(1e3)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(math.exp(a)), f(math.exp(b))
    for _ in range(iters):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(math.exp(b))
    beta = math.exp((lo + hi) / 2.0)
    return beta if f(beta) >= f(0.0) else 0.0


def tempered_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row log-probability of the label at the fitted temperature (:func:`fit_inverse_temperature`
    on the rows with finite logits); a row with a non-finite logit counts the floor."""
    z = logits.double()
    y = labels.view(-1).long()
    ok = torch.isfinite(z).all(dim=-1)
    out = torch.full((z.shape[0],), LOG_FLOOR, dtype=torch.float64)
    if bool(ok.any()):
        zo, yo = z[ok], y[ok]
        beta = fit_inverse_temperature(zo, yo)
        lp = torch.log_softmax(zo * beta, dim=-1).gather(1, yo.view(-1, 1)).squeeze(1)
        out[ok] = _floor(lp)
    return out


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
        if self.fitness == "loglik-t":        # the values depend on every row scored
            order = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in batches]) \
                if len(batches) else np.zeros(0, dtype=np.int64)
            values[order] = acc.row_values().numpy()
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
