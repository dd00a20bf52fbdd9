"""Pure numerical core over flat task vectors: no I/O, no printing, no globals beyond registries.

``bands`` (magnitude-rank bands), ``mask`` (the fast exact NPS candidate mask and its sort-based
reference), ``sparsify`` (single-vector pruners), ``merge`` (multi-task mergers).
"""
from .bands import Bands, band_starts, make_bands
from .mask import band_counts, build_candidate, candidate_mask, keep_count, reference_mask, topk_mask
from .merge import MERGERS, nps_combine
from .sparsify import PRUNERS, register_pruner

__all__ = ["Bands", "make_bands", "band_starts", "keep_count", "band_counts", "candidate_mask",
           "build_candidate", "reference_mask", "topk_mask", "PRUNERS", "register_pruner",
           "MERGERS", "nps_combine"]
