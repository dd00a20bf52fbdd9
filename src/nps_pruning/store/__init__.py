"""The compression store (SPEC §2 "Compression", Eq. 8, App. C.3).

A store keeps θ_pre once and, per task, its pruned task vector τ̂_i as a 1-bit mask over the D
prunable entries plus the kept values, and the task-specific tensors verbatim::

    STORE/
      manifest.json                    format, layout, D, θ_pre's sha256, per task: counts, parts
      pretrained.safetensors           θ_pre's prunable tensors (omitted with embed_pretrained=False)
      tasks/000/mask.safetensors       packed bits (numpy.packbits) or a range-coded mask
      tasks/000/values.safetensors     the kept values, in order, as fp32 | fp16 | bf16, or quantized
                                       (q2|q3|q4|q8|sign|sign-q2: :mod:`.value_coding`)
      tasks/000/task_specific.safetensors, tasks/000/buffers.safetensors
      tasks/000/side/000 ...           the task folder's config/tokenizer files, byte for byte

Every part has its size and sha256 in the manifest, and the manifest carries a checksum of
itself. Sizes are checked when a store is opened (a missing part = a partial store, a short one =
truncated); checksums when a task is read. Stores are written into a temporary folder next to
the destination and renamed into place, so a store is either complete or absent.

**Bit-identical restore.** :func:`restore_task` returns ``base_flat + τ̂`` where τ̂ is a float32
zero vector with the stored values (cast to float32) scattered into the mask positions. That is
exactly the float arithmetic of the pruned model ``base_flat + τ̂.to(dtype).float()`` built with
the same value precision ``dtype``, so the two are equal bit for bit (``torch.equal``). (IEEE
addition of a zero is exact except that −0.0 + 0.0 = +0.0: a pruned entry is restored as
``θ_pre + 0.0``, which differs from ``θ_pre + (−0.0)`` only where θ_pre itself holds −0.0.)

**Entropy-coded mask.** The mask is cut into chunks of 65,536 entries; each chunk's kept count
is stored (32 bits) and its bits are range-coded (``constriction``) under a Bernoulli model with
that chunk's keep frequency. At r = 0.05 this costs about H(0.05) ≈ 0.29 bits per entry, less
where the kept entries cluster (some layers keep far more than others), against 1 bit packed.

**Seeded mask.** ``mask_coding="seeded"`` reads the mask in the order of the pruner's own seeded
draw (a :class:`StoreTask`'s ``mask_seed`` and ``mask_domain``), codes its leading run of kept
entries as one count and range-codes the rest; the order (DARE's permutation, the rank-weighted
sample's exponentials, or flat) is the one that codes smallest. A DARE mask costs a few bytes.

**Where the code is.** This module is the store's public face; every name below is importable
from here. :mod:`.types` holds what writer and reader share (format constants, StoreTask,
RestoredTask, checksums), :mod:`.write` writes a store, :mod:`.read` opens, verifies
and restores one, :mod:`.manifest` checks a manifest field by field before it is used, and
:mod:`.mask_coding` packs or range-codes the mask.
"""
from __future__ import annotations

from .mask_coding import ENTROPY_CHUNK, MASK_CODINGS, decode_mask, encode_mask
from .read import Store, read_store, restore_task, store_info
from .types import (FORMAT, FORMAT_VERSION, MANIFEST, VALUE_CODINGS, VALUE_DTYPES, RestoredTask, StoreTask,
                    flat_sha256)
from .write import write_store

__all__ = ["StoreTask", "Store", "RestoredTask", "write_store", "read_store", "restore_task",
           "store_info", "encode_mask", "decode_mask", "flat_sha256", "VALUE_DTYPES", "VALUE_CODINGS",
           "MASK_CODINGS", "ENTROPY_CHUNK", "FORMAT", "FORMAT_VERSION", "MANIFEST"]
