"""Value coding for the compression store (pure; no I/O): how a task's kept values are stored.

The kept values of a task are the nonzero entries of τ̂ in flat order, cut into *groups*, one per
tensor of the layout (a tensor's kept count follows from the mask). Codings:

* ``fp32`` | ``fp16`` | ``bf16``: the values themselves (the store's first codings, unchanged);
* ``q2`` | ``q3`` | ``q4`` | ``q8``: a codebook of 2^k float32 levels per tensor fitted by least
  squares (Lloyd's algorithm on that tensor's kept values, started from their quantiles), each
  value replaced by its nearest level; the level indices are range-coded (``constriction``) under
  the tensor's own index frequencies, so a skewed codebook costs less than k bits per value;
* ``sign``: BitDelta-style (without its distillation): one sign bit per kept value and one scale
  per tensor, the least-squares one (mean |v|);
* ``sign-q2``: sign + band: one sign bit per kept value (packed: signs are close to fair coins) and
  the index of one of 4 magnitude levels per tensor, fitted by least squares on |v| (the magnitude
  bands), range-coded (band indices are not uniform, so they have less than 2 bits of entropy).

The least-squares levels minimise ‖τ̂ − decoded‖, not the loss of the model; :func:`tune_level_scale`
then searches one factor per level index (shared by all tensors) with CMA-ES on calibration data,
started from the least-squares fit, which it scores first (so the result never scores below it).

Lossy codings describe the model θ_pre + decode(encode(τ̂)): :func:`encode_values` returns the
decoded values with the arrays, the writer records their sha256, and the reader checks it after
decoding, so a restore is bit for bit the model the store describes, or an error.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import constriction
import numpy as np

FLOAT_CODINGS = ("fp32", "fp16", "bf16")
QUANT_BITS = {"q2": 2, "q3": 3, "q4": 4, "q8": 8}
SIGN_LEVELS = {"sign": 1, "sign-q2": 4}          # magnitude levels per tensor after the sign bit
VALUE_CODINGS = FLOAT_CODINGS + tuple(QUANT_BITS) + tuple(SIGN_LEVELS)
LLOYD_ITERS = 25


def is_float_coding(coding: str) -> bool:
    return coding in FLOAT_CODINGS


def levels_of(coding: str) -> int:
    """Levels per tensor of a quantized coding (2^k, or the magnitude levels of a sign coding)."""
    if coding in QUANT_BITS:
        return 1 << QUANT_BITS[coding]
    if coding in SIGN_LEVELS:
        return SIGN_LEVELS[coding]
    raise ValueError(f"{coding!r} is not a quantized value coding (choose from {', '.join(VALUE_CODINGS)})")


def lloyd(x: np.ndarray, num_levels: int, iters: int = LLOYD_ITERS) -> Tuple[np.ndarray, np.ndarray]:
    """Least-squares scalar codebook of ``x`` (float64 math, deterministic): (levels float32
    (num_levels,), sorted; index of each entry's nearest level, int64). Started from the quantiles
    (i + 0.5)/L; each iteration moves every level to the mean of the entries nearest to it."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return np.zeros(num_levels, dtype=np.float32), np.zeros(0, dtype=np.int64)
    q = np.quantile(x, (np.arange(num_levels) + 0.5) / num_levels)
    for _ in range(iters):
        idx = _nearest(x, q)
        cnt = np.bincount(idx, minlength=num_levels)
        sums = np.bincount(idx, weights=x, minlength=num_levels)
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), q)
        new.sort()
        if np.array_equal(new, q):
            break
        q = new
    levels = q.astype(np.float32)
    return levels, _nearest(x, levels.astype(np.float64))


def _nearest(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``levels`` for each entry (ties to the lower level)."""
    if levels.size == 1:
        return np.zeros(x.size, dtype=np.int64)
    edges = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(edges, x, side="left").astype(np.int64)


def _categorical(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def _groups(group_sizes: Sequence[int]) -> List[Tuple[int, int]]:
    bounds = np.concatenate([[0], np.cumsum(np.asarray(group_sizes, dtype=np.int64))])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def encode_values(values: np.ndarray, group_sizes: Sequence[int], coding: str,
                  level_scale: Optional[Sequence[float]] = None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """(arrays to store, the float32 values they decode to) for a quantized ``coding``.
    ``group_sizes``: the kept count of each tensor, in layout order (sums to ``values.size``).
    ``level_scale``: one factor per level index (levels_of(coding) of them), multiplied into every
    tensor's fitted levels after the values are assigned to them (what :func:`tune_level_scale`
    searches); None = the least-squares levels."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    spans = _groups(group_sizes)
    if (spans[-1][1] if spans else 0) != values.size:
        raise ValueError("group sizes do not add up to the number of kept values")
    L = levels_of(coding)
    signed = coding in SIGN_LEVELS
    scale = None
    if level_scale is not None:
        scale = np.asarray(level_scale, dtype=np.float64)
        if scale.shape != (L,) or not np.isfinite(scale).all():
            raise ValueError(f"level_scale must hold {L} finite factors for {coding}")
    levels = np.zeros((len(spans), L), dtype=np.float32)
    counts = np.zeros((len(spans), L), dtype=np.uint32)
    decoded = np.empty_like(values)
    encoder = constriction.stream.queue.RangeEncoder()
    for g, (a, b) in enumerate(spans):
        if a == b:
            continue
        x = values[a:b]
        lv, idx = lloyd(np.abs(x) if signed else x, L)
        if scale is not None:
            lv = (lv.astype(np.float64) * scale).astype(np.float32)
        levels[g] = lv
        counts[g] = np.bincount(idx, minlength=L)
        decoded[a:b] = np.where(x < 0, -lv[idx], lv[idx]) if signed else lv[idx]
        if L > 1 and np.count_nonzero(counts[g]) > 1:       # one used level costs nothing
            encoder.encode(idx.astype(np.int32), _categorical(counts[g].astype(np.float64)))
    arrays = {"levels": levels.reshape(-1), "counts": counts.reshape(-1),
              "code": np.asarray(encoder.get_compressed(), dtype=np.uint32)}
    if signed:
        arrays["signs"] = np.packbits(values < 0, bitorder="little")
    return arrays, decoded


def decode_values(arrays: Mapping[str, np.ndarray], coding: str, group_sizes: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`encode_values`: the float32 kept values. ``ValueError`` when the arrays
    cannot be this coding's values for these group sizes."""
    L = levels_of(coding)
    signed = coding in SIGN_LEVELS
    spans = _groups(group_sizes)
    n = spans[-1][1] if spans else 0
    try:
        levels, counts, code = arrays["levels"], arrays["counts"], arrays["code"]
        signs = arrays["signs"] if signed else None
    except KeyError as err:
        raise ValueError(f"{coding} values lack the array {err}") from None
    if (levels.dtype != np.float32 or counts.dtype != np.uint32 or code.dtype != np.uint32
            or levels.size != len(spans) * L or counts.size != len(spans) * L):
        raise ValueError(f"{coding} values: levels/counts have the wrong type or size")
    if signed and (signs.dtype != np.uint8 or signs.size != (n + 7) // 8):
        raise ValueError(f"{coding} values: the sign bits have the wrong size")
    if not np.isfinite(levels).all():
        raise ValueError(f"{coding} values: non-finite levels")
    levels, counts = levels.reshape(len(spans), L), counts.reshape(len(spans), L).astype(np.int64)
    neg = np.unpackbits(signs, count=n, bitorder="little").astype(bool) if signed else None
    decoder = constriction.stream.queue.RangeDecoder(code) if code.size else None
    out = np.empty(n, dtype=np.float32)
    for g, (a, b) in enumerate(spans):
        if int(counts[g].sum()) != b - a:
            raise ValueError(f"{coding} values: tensor {g} has {int(counts[g].sum())} coded values, "
                             f"the mask keeps {b - a}")
        if a == b:
            continue
        used = np.flatnonzero(counts[g])
        if used.size == 1:
            idx = np.full(b - a, used[0], dtype=np.int64)
        else:
            if decoder is None:
                raise ValueError(f"{coding} values: no code")
            idx = decoder.decode(_categorical(counts[g].astype(np.float64)), b - a).astype(np.int64)
            if not np.array_equal(np.bincount(idx, minlength=L), counts[g]):
                raise ValueError(f"{coding} values: the code does not decode to its counts")
        v = levels[g][idx]
        out[a:b] = np.where(neg[a:b], -v, v) if signed else v
    return out


def group_sizes_of(mask: np.ndarray, spans: Sequence[Tuple[int, int]]) -> List[int]:
    """The kept count of each tensor span (start, stop) of a flat boolean mask."""
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return [int(csum[b] - csum[a]) for a, b in spans]


def tune_level_scale(values: np.ndarray, group_sizes: Sequence[int], coding: str,
                     score: "Callable[[np.ndarray], float]", *, generations: int = 4, popsize: int = 6,
                     seed: int = 0, log2_range: float = 1.0) -> Tuple[np.ndarray, float, float]:
    """CMA-ES over log2 of one factor per level index (in ±``log2_range``) maximising
    ``score(decoded values)`` (e.g. a model's calibration accuracy with them). Returns (the best
    factors, the least-squares fit's score, the best score); factors of ones when nothing beats
    the fit. Deterministic for a seed and a deterministic ``score``."""
    from cmaes import CMA
    L = levels_of(coding)
    ones = np.ones(L)
    base_score = float(score(encode_values(values, group_sizes, coding)[1]))
    best = (ones, base_score)
    if generations <= 0:
        return ones, base_score, base_score
    opt = CMA(mean=np.zeros(L), sigma=log2_range / 2, bounds=np.tile([-log2_range, log2_range], (L, 1)),
              seed=seed, population_size=max(2, popsize))
    for _ in range(generations):
        told = []
        for _ in range(opt.population_size):
            x = opt.ask()
            f = 2.0 ** x
            sc = float(score(encode_values(values, group_sizes, coding, level_scale=f)[1]))
            told.append((x, -sc))
            if sc > best[1]:
                best = (f, sc)
        opt.tell(told)
    return best[0], base_score, best[1]
