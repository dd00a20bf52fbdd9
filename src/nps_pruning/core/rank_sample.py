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
first β > 0 candidate of an index and kept with it. A candidate reads only a prefix of the
exponentials: every key is at least its log E_j (β·(−log u_j) ≥ 0, and float32 rounding is
monotone), so once the entries with log E_j ≤ b hold m + 1 free keys ≤ b, the m + 1 smallest keys
are among them and no other entry can tie. Such a prefix holds about (β + 1)(m + 1) entries (a
uniform one: E does not depend on u); its entries are found once per size (powers of two) and kept
with their log E and log u, contiguous (at most D/2 entries over all sizes: 6 bytes an entry
more). Per candidate: a key and a k-th-value selection on the prefix, bit for bit the keys of the
whole vector; where the prefix would pass D/4 entries, one D-long key.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

SAMPLE = 1 << 16          # keys sampled to bound the threshold before the exact selection


def _e_seed(seed: int) -> int:
    """The exponentials' stream. Meant apart from the permutation's (``manual_seed(seed)``), but the
    CPU generator (mt19937) keeps a seed's low 32 bits, so it is the same stream: harmless, since a
    candidate uses one or the other (β = 0 the permutation, β > 0 the exponentials), never both;
    kept, as changing it changes every β > 0 candidate."""
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
    |τ| descending, ties by flat index (one sort; |τ| compared in float32, as the bands)."""
    D = values.numel()
    order = _magnitude_order(values.detach().float().abs())
    out = torch.empty(D, dtype=torch.float32, device=values.device)
    out[order] = torch.arange(D, 0, -1, dtype=torch.float64, device=values.device).div_(D).log_().float()
    return out


def _magnitude_order(a: torch.Tensor) -> torch.Tensor:
    """Positions by ``a`` (float32, ≥ 0) descending, ties by flat index: the stable sort's order. On
    the CPU below 2^31 entries, one unstable numpy sort of distinct int64 keys (the bits of
    0x7FFFFFFF − a, monotone in a ≥ 0, over the flat index): the same order, ~5× faster here."""
    D = a.numel()
    if a.device.type != "cpu" or D >= 2 ** 31:
        return torch.sort(a, descending=True, stable=True).indices
    key = a.view(torch.int32).to(torch.int64).neg_().add_(0x7FFFFFFF).bitwise_left_shift_(32)
    key.bitwise_or_(torch.arange(D, dtype=torch.int64))
    return torch.from_numpy(np.sort(key.numpy())).bitwise_and_(0xFFFFFFFF)


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
    sel, t = _take(key[cand], m)
    return cand[sel], t


class RankKeys:
    """log E and log u (float32, (D,)) of one task vector and seed, and the exponentials' prefixes:
    the entries with log E_j ≤ b, found once per size and kept with their log E and log u."""

    def __init__(self, log_e: torch.Tensor, log_u: torch.Tensor):
        self.log_e, self.log_u = log_e, log_u
        self._prefixes: Dict[int, tuple] = {}

    def prefix(self, size: int) -> tuple:
        """(positions ascending, log E and log u there, b): the entries with log E_j ≤ b, b a
        float32 value for which about ``size`` entries qualify (a power of two ≤ D/4: the sizes
        kept hold at most D/2 entries, 12 bytes each; int32 positions below 2^31 entries)."""
        if size not in self._prefixes:
            D = self.log_e.numel()
            b = float(np.float32(math.log(-math.log1p(-size / D))))   # P(E ≤ e) = 1 − exp(−e)
            pos = torch.nonzero(self.log_e <= b).squeeze(1)
            self._prefixes[size] = (pos.int() if D < 2 ** 31 else pos, self.log_e[pos],
                                    self.log_u[pos], b)
        return self._prefixes[size]


def _select_in_prefix(keys: RankKeys, taken: torch.Tensor, m: int, beta: float
                      ) -> Optional[Tuple[torch.Tensor, float]]:
    """select() of the whole vector's keys, from a prefix of the exponentials (module docstring);
    None where the prefix would pass D/4 entries. About 1/(β + 1) of a prefix's keys are ≤ b."""
    D = keys.log_e.numel()
    size = 1 << max(10, math.ceil(math.log2(1.2 * (beta + 1.0) * (m + 1) + 1024.0)))
    while size <= D // 4:
        pos, le, lu, b = keys.prefix(size)
        pos = pos.long()
        key = torch.add(le, lu, alpha=-float(beta))
        key.masked_fill_(taken[pos], math.inf)
        cand = torch.nonzero(key <= b).squeeze(1)
        if cand.numel() > m:             # the m + 1 smallest keys are here, all ≤ b < the rest
            sel, t = _take(key[cand], m)
            return pos[cand[sel]], t
        size *= 2
    return None


def _take(ck: torch.Tensor, m: int) -> Tuple[torch.Tensor, float]:
    """(which of the candidate keys ``ck`` (by flat index ascending, more than m of them, the m + 1
    smallest of all among them) are the m kept, ascending; the (m+1)-th smallest key)."""
    if ck.device.type == "cpu":                         # the (m+1)-th smallest key: no sort
        t = float(np.partition(ck.numpy(), m)[m])       # (numpy's selection: ~15× kthvalue here)
    else:
        t = float(ck.kthvalue(m + 1).values)
    take = ck < t                                       # at most m of them (t is a float32 value)
    ties = torch.nonzero(ck == t).squeeze(1)            # by flat index
    take[ties[: m - int(take.sum())]] = True
    return torch.nonzero(take).squeeze(1), t


def rank_sample(values: torch.Tensor, keys: RankKeys, taken: torch.Tensor,
                m: int, beta: float, h: float, seed: int = 0, *,
                n_taken: int, prefix: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(idx int64 ascending, vals float32): the m kept free entries of the module docstring and
    τ_j · 2^h / π_j (computed in float64, rounded once). ``taken``: bool (D,), the magnitude part,
    holding ``n_taken`` entries (the caller's count: no pass over it here). ``prefix=False`` keys
    the whole vector (the same result: tests)."""
    if m <= 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device), torch.zeros(
            0, dtype=torch.float32, device=values.device)
    n_free = values.numel() - int(n_taken)
    found = _select_in_prefix(keys, taken, m, beta) if prefix and m < n_free else None
    if found is None:
        key = _keys(keys.log_e, keys.log_u, beta, taken)
        found = select(key, m, n_free, seed)
        del key
    idx, t = found
    v = values[idx].double()
    if t == -math.inf:
        return idx, (v * (2.0 ** h)).float()
    pi = torch.expm1(-torch.exp(t + float(beta) * keys.log_u[idx].double())).neg_()
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


__all__ = ["RankKeys", "exponential_order", "log_exponentials", "log_ranks", "rank_sample", "rank_sample_reference", "select"]
