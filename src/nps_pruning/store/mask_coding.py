"""Mask coding for the compression store (pure; no I/O).

``packed``: one bit per prunable entry (numpy.packbits). ``entropy``: a range coder (the
``constriction`` library) with a Bernoulli model per chunk of 65,536 entries whose probability is
that chunk's own keep frequency; all-kept and all-pruned chunks cost nothing. At keep ratio 0.05 a
random mask costs about 0.30 bits per entry against its entropy H(0.05) = 0.286.

``seeded``: the mask read in a seeded order that the pruner's own random
draw follows, over the entries of a domain (the tensors the pruner could keep): the permutation
DARE keeps a prefix of (:func:`~nps_pruning.core.sparsify.random_order`), or the order of the
rank-weighted sample's exponentials (:func:`~nps_pruning.core.rank_sample.exponential_order`), or
the flat order, whichever codes smallest; in that order the leading run of kept entries is one
count and the rest is range-coded as ``entropy``. In its order a DARE mask is one run and costs a
few bytes; a hybrid mask of β = 0 is one run (the random part and the magnitude entries among it)
and the rest of the magnitude part; a rank-weighted sample's kept entries crowd into the order's
first chunks. The reader draws the order again from the seed; the store's
mask checksum tells a torch whose generator drew otherwise.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import constriction
import numpy as np
import torch

from ..core.prepared import Domain
from ..core.rank_sample import exponential_order
from ..core.sparsify import random_order

MASK_CODINGS = ("packed", "entropy", "seeded")
MASK_ORDERS = ("flat", "permutation", "exponential")      # the seeded coding's orders
ENTROPY_CHUNK = 1 << 16
Spans = Sequence[Tuple[int, int]]


def _bernoulli(count: int, size: int):
    return constriction.stream.model.Bernoulli(count / size, perfect=False)


def encode_mask(mask: np.ndarray, coding: str) -> Dict[str, np.ndarray]:
    """Arrays that encode a boolean mask: ``{"bits"}`` packed, or ``{"chunk_counts", "code"}``."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if coding == "packed":
        return {"bits": np.packbits(mask, bitorder="little")}
    if coding != "entropy":      # "seeded": encode_seeded
        raise ValueError(f"encode_mask codes 'packed' or 'entropy' masks, got {coding!r}")
    encoder = constriction.stream.queue.RangeEncoder()
    counts = []
    for start in range(0, mask.size, ENTROPY_CHUNK):
        chunk = mask[start:start + ENTROPY_CHUNK]
        count = int(chunk.sum())
        counts.append(count)
        if 0 < count < chunk.size:           # all-kept / all-pruned chunks cost nothing
            encoder.encode(chunk.astype(np.int32), _bernoulli(count, chunk.size))
    return {"chunk_counts": np.asarray(counts, dtype=np.uint32),
            "code": np.asarray(encoder.get_compressed(), dtype=np.uint32)}


def decode_mask(arrays: Mapping[str, np.ndarray], coding: str, num_entries: int) -> np.ndarray:
    """Inverse of :func:`encode_mask`; ``ValueError`` when the arrays cannot be a mask of that size."""
    if coding == "packed":
        bits = arrays["bits"]
        if bits.dtype != np.uint8 or bits.size != (num_entries + 7) // 8:
            raise ValueError("packed mask has the wrong size")
        return np.unpackbits(bits, count=num_entries, bitorder="little").astype(bool)
    if coding != "entropy":
        raise ValueError(f"unknown mask coding {coding!r}")
    counts, code = arrays["chunk_counts"], arrays["code"]
    if counts.size != -(-num_entries // ENTROPY_CHUNK):
        raise ValueError("entropy-coded mask has the wrong number of chunks")
    decoder = constriction.stream.queue.RangeDecoder(code) if code.size else None
    out = np.zeros(num_entries, dtype=bool)
    for index, count in enumerate(counts.tolist()):
        start = index * ENTROPY_CHUNK
        size = min(ENTROPY_CHUNK, num_entries - start)
        if count > size:
            raise ValueError("entropy-coded mask has an impossible chunk count")
        if count == size:
            out[start:start + size] = True
        elif count:
            if decoder is None:
                raise ValueError("entropy-coded mask has no code")
            chunk = decoder.decode(_bernoulli(count, size), size)
            if int(chunk.sum()) != count:
                raise ValueError("entropy-coded mask does not decode to its chunk counts")
            out[start:start + size] = chunk.astype(bool)
    return out


def coding_order(order: str, count: int, seed: int) -> Optional[np.ndarray]:
    """Positions 0 .. count − 1 in the order ``order`` reads a domain's mask (None: flat)."""
    if order == "flat":
        return None
    if order == "permutation":
        return random_order(count, seed).numpy()
    if order == "exponential":
        return exponential_order(count, seed).numpy()
    raise ValueError(f"mask order must be one of {MASK_ORDERS}, got {order!r}")


def spans_in_order(spans: Spans, num_entries: int) -> bool:
    """Whether (start, stop) spans are non-empty, ascending, disjoint and inside 0 .. num_entries."""
    end = 0
    for a, b in spans:
        if not end <= a < b <= num_entries:
            return False
        end = b
    return True


def _domain(spans: Spans, num_entries: int) -> Domain:
    return Domain(tuple((int(a), int(b)) for a, b in spans), int(num_entries))


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays.values())


def _encode_run(seq: np.ndarray) -> Dict[str, np.ndarray]:
    """``seq``'s leading run of kept entries as one count, the rest range-coded (a DARE mask in its
    permutation is all run; a hybrid one is the run, then the magnitude part's entries)."""
    lead = int(np.argmin(seq)) if not seq.all() else seq.size
    return {"run": np.asarray([lead], dtype=np.uint64), **encode_mask(seq[lead:], "entropy")}


def _decode_run(arrays: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    run = arrays["run"]
    if run.dtype != np.uint64 or run.size != 1 or int(run[0]) > count:
        raise ValueError("seeded mask has a bad run length")
    lead = int(run[0])
    return np.concatenate([np.ones(lead, dtype=bool), decode_mask(arrays, "entropy", count - lead)])


def encode_seeded(mask: np.ndarray, seed: Optional[int], spans: Spans) -> Tuple[str, Dict[str, np.ndarray]]:
    """(order, arrays): ``mask`` coded (a leading run, the rest range-coded) in the cheapest of
    :data:`MASK_ORDERS` (over the domain ``spans``; flat when there is no seed or a kept entry
    lies outside the domain)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    best = ("flat", _encode_run(mask))
    if seed is None:
        return best
    inside = _domain(spans, mask.size).gather(torch.from_numpy(mask)).numpy()
    if int(inside.sum()) != int(mask.sum()):
        return best
    for order in MASK_ORDERS[1:]:
        arrays = _encode_run(inside[coding_order(order, inside.size, int(seed))])
        if _nbytes(arrays) < _nbytes(best[1]):
            best = (order, arrays)
    return best


def decode_seeded(arrays: Mapping[str, np.ndarray], num_entries: int, order: str, seed: Optional[int],
                  spans: Spans) -> np.ndarray:
    """Inverse of :func:`encode_seeded` (``ValueError`` on arrays that cannot be such a mask)."""
    if order == "flat":
        return _decode_run(arrays, num_entries)
    if seed is None:
        raise ValueError(f"a mask in the {order!r} order needs its seed")
    count = sum(b - a for a, b in spans)
    read = _decode_run(arrays, count)
    inside = np.empty(count, dtype=bool)
    inside[coding_order(order, count, int(seed))] = read
    return _domain(spans, num_entries).scatter(torch.from_numpy(inside)).numpy()
