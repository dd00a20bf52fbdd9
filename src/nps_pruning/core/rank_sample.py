"""The hybrid space's rank-weighted random part (β > 0): an exact-count sample that prefers large
entries, rescaled to be unbiased.

Entry j of τ has the magnitude rank u_j = (D − q_j) / D ∈ (0, 1], q_j its place in the project's
one order (|τ| descending, ties by flat index: q = 0 for the largest, u = 1) and the weight
w_j = u_j^β. Among the free
entries (those the magnitude part did not take) the m = k_rand with the smallest keys
E_j / w_j are kept — E_j a standard exponential, one per entry, drawn once per index and seed
(common random numbers: every candidate of a search sees the same E) — ordered by
(key, flat index). That is sampling without replacement with probabilities ∝ w_j ("bottom-k" /
PPSWOR). A kept entry carries τ_j · 2^h / π_j with π_j = 1 − exp(−t·w_j), t the (m+1)-th smallest
key among the free entries (π_j = 1 when all free entries are kept): its inclusion probability
given the others, so the sum over the kept entries estimates the sum over the free ones without
bias (Horvitz–Thompson, conditioned on t as in bottom-k sampling).

β = 0 would be a uniform sample; the hybrid space keeps DARE's own permutation for it instead
(:mod:`.hybrid`: β = 0 is DARE bit for bit). β = 1 is close to DELLA's MAGPRUNE at small r, large
β tends to magnitude top-k. Memory: log E and log u as float32, 8 bytes an entry, computed on the
first β > 0 candidate of an index and kept with it; per candidate one D-long float32 key and a
k-th-value selection among about 1.3·m candidates.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

SAMPLE = 1 << 16          # keys sampled to bound the threshold before the exact selection


def _e_seed(seed: int) -> int:
    """The exponentials' stream: apart from the permutation's (``manual_seed(seed)``)."""
    return int(seed) + (1 << 32)


def _uniforms(D: int, seed: int) -> torch.Tensor:
    """U_j − 2^−25 (float32, (D,)): torch.rand on the CPU from the exponentials' stream."""
    return torch.rand(D, generator=torch.Generator().manual_seed(_e_seed(seed)))


def exponential_order(D: int, seed: int) -> torch.Tensor:
    """0 .. D − 1 by E_j ascending (U_j descending, ties by index): the order in which a
    rank-weighted sample of ``seed`` keeps its entries most densely (the store's ``seeded`` mask
    coding; the uniforms are sorted, not their logarithms, so the order is exact on any CPU)."""
    return torch.sort(_uniforms(D, seed), descending=True, stable=True).indices


def log_exponentials(D: int, seed: int) -> torch.Tensor:
    """log E_j (float32, (D,)): E_j = −log U_j, U_j = torch.rand (CPU, seeded) + 2^−25 ∈ (0, 1)."""
    u = _uniforms(D, seed)
    u.add_(2.0 ** -25)
    return u.log_().neg_().log_()


def log_ranks(values: torch.Tensor) -> torch.Tensor:
    """log u_j (float32, (D,), on ``values``' device): u_j = (D − q_j) / D, q_j entry j's place in
    |τ| descending, ties by flat index (one stable sort; |τ| compared in float32, as the bands)."""
    D = values.numel()
    order = torch.sort(values.detach().float().abs(), descending=True, stable=True).indices
    out = torch.empty(D, dtype=torch.float32, device=values.device)
    out[order] = torch.arange(D, 0, -1, dtype=torch.float64, device=values.device).div_(D).log_().float()
    return out


def _keys(log_e: torch.Tensor, log_u: torch.Tensor, beta: float, taken: torch.Tensor) -> torch.Tensor:
    """log(E_j / w_j) = log E_j − β·log u_j (float32); +inf on the entries already taken."""
    key = torch.add(log_e, log_u, alpha=-float(beta))
    return key.masked_fill_(taken, math.inf)


def select(key: torch.Tensor, m: int, n_free: int, seed: int = 0) -> Tuple[torch.Tensor, float]:
    """(positions of the m smallest keys by (key, flat index), ascending; the (m+1)-th smallest key,
    or −inf when m = n_free). A bound from a sample of keys cuts the selection to a few
    candidates (all keys when the sample's bound holds too few); among them the threshold is a
    k-th value (a selection, not a sort), the keys below it are kept and the ties at it by
    flat index."""
    D = key.numel()
    if m >= n_free:
        return torch.nonzero(key < math.inf).squeeze(1), -math.inf
    bound = float(torch.finfo(key.dtype).max)  # keys ≤ bound: the free ones, or those a sample bounds
    if D > 4 * SAMPLE:
        pick = torch.randint(0, D, (SAMPLE,), generator=torch.Generator().manual_seed(int(seed)))
        sk = key[pick.to(key.device)]
        sk = sk[sk < math.inf]
        q = 1.3 * (m + 1) / n_free + 8.0 / math.sqrt(SAMPLE)
        if q < 1.0 and sk.numel():
            bound = float(torch.quantile(sk.double(), q))
    cand = torch.nonzero(key <= bound).squeeze(1)
    if cand.numel() < m + 1:                  # the sample's bound held too few: every free key
        cand = torch.nonzero(key < math.inf).squeeze(1)
    ck = key[cand]
    t = ck.kthvalue(m + 1).values                       # the (m+1)-th smallest key: no sort
    take = ck < t                                       # at most m of them
    ties = torch.nonzero(ck == t).squeeze(1)            # cand ascending: ties by flat index
    take[ties[: m - int(take.sum())]] = True
    return cand[take], float(t)


def rank_sample(values: torch.Tensor, log_e: torch.Tensor, log_u: torch.Tensor, taken: torch.Tensor,
                m: int, beta: float, h: float, seed: int = 0, *,
                n_taken: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(idx int64 ascending, vals float32): the m kept free entries of the module docstring and
    τ_j · 2^h / π_j (computed in float64, rounded once). ``taken``: bool (D,), the magnitude part,
    holding ``n_taken`` entries (the caller's count: no pass over it here)."""
    if m <= 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device), torch.zeros(
            0, dtype=torch.float32, device=values.device)
    n_free = values.numel() - int(n_taken)
    key = _keys(log_e, log_u, beta, taken)
    idx, t = select(key, m, n_free, seed)
    del key
    v = values[idx].double()
    if t == -math.inf:
        return idx, (v * (2.0 ** h)).float()
    pi = torch.expm1(-torch.exp(t + float(beta) * log_u[idx].double())).neg_()
    return idx, (v * (2.0 ** h) / pi).float()


def rank_sample_reference(values: torch.Tensor, taken: torch.Tensor, m: int, beta: float, h: float,
                          seed: int) -> torch.Tensor:
    """τ's rank-weighted part, plainly (dense float32 (D,), zero elsewhere; O(D²) ranks: tests)."""
    D = values.numel()
    a = values.detach().float().abs()
    j = torch.arange(D)
    q = (a[None, :] > a[:, None]).sum(1) + ((a[None, :] == a[:, None]) & (j[None, :] < j[:, None])).sum(1)
    u = (D - q).double() / D
    log_u = u.log().float()
    log_e = log_exponentials(D, seed)
    key = (log_e - float(beta) * log_u)
    free = [j for j in range(D) if not bool(taken[j])]
    order = sorted(free, key=lambda j: (float(key[j]), j))
    out = torch.zeros(D, dtype=torch.float32)
    kept = order[:m]
    for j in kept:
        if m >= len(free):
            out[j] = float(values[j].double() * 2.0 ** h)
        else:
            t = float(key[order[m]])
            pi = -math.expm1(-math.exp(t + float(beta) * float(log_u[j].double())))
            out[j] = float(values[j].double() * 2.0 ** h / pi)
    return out


__all__ = ["exponential_order", "log_exponentials", "log_ranks", "rank_sample", "rank_sample_reference", "select"]
