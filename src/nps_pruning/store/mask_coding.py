"""Mask coding for the compression store (pure; no I/O).

``packed``: one bit per prunable entry (numpy.packbits). ``entropy``: a range coder (the
``constriction`` library) with a Bernoulli model per chunk of 65,536 entries whose probability is
that chunk's own keep frequency; all-kept and all-pruned chunks cost nothing. At keep ratio 0.05 a
random mask costs about 0.30 bits per entry against its entropy H(0.05) = 0.286.
"""
from __future__ import annotations

from typing import Dict, Mapping

import constriction
import numpy as np

MASK_CODINGS = ("packed", "entropy")
ENTROPY_CHUNK = 1 << 16


def _bernoulli(count: int, size: int):
    return constriction.stream.model.Bernoulli(count / size, perfect=False)


def encode_mask(mask: np.ndarray, coding: str) -> Dict[str, np.ndarray]:
    """Arrays that encode a boolean mask: ``{"bits"}`` packed, or ``{"chunk_counts", "code"}``."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if coding == "packed":
        return {"bits": np.packbits(mask, bitorder="little")}
    if coding != "entropy":
        raise ValueError(f"mask coding must be one of {MASK_CODINGS}, got {coding!r}")
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


