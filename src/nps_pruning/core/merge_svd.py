"""Mergers that use each tensor's matrix structure (registered in :data:`.merge.MERGERS` as
``tsv-m`` and ``iso-c``).

They need the shapes of the tensors in the flat vector (``shapes``, in layout order: the
``Layout.shapes`` of the task vectors); :func:`.merge.merge` passes them to every merger marked
``needs_shapes``. Which tensors are matrices is ``matrices`` (:data:`MATRIX_RULES`):

* ``"2d"`` (the default: both methods' published code, which FusionBench follows) — exactly the
  2-D tensors, whatever their width; every other tensor (biases, norms, convolution kernels) is
  averaged over the tasks. A 1-wide matrix then follows each method's formula: TSV-M keeps
  ⌊1/N⌋ = 0 triplets of it (a zero update), Iso-C gives the task-arithmetic sum itself;
* ``"flatten"`` — a tensor with at least two dimensions, both sides > 1, is the matrix
  ``(shape[0], prod(shape[1:]))`` (a convolution kernel flattens its input side) and TSV-M keeps
  at least one triplet of each; every other tensor (1-wide matrices too) is averaged.

λ then scales the whole merged vector.

* ``tsv-m`` — Task Singular Vectors merge (Gargiulo et al., CVPR 2025): per matrix, each task's
  update Δ_i = U_i Σ_i V_iᵀ keeps its top ⌊rank/N⌋ singular triplets; the kept
  U = [U_1 … U_N] and V = [V_1 … V_N] are decorrelated by their orthogonal polar factors
  (U = P S Qᵀ → P Qᵀ, likewise V), and the merged update is λ · U⊥ diag(Σ_1 … Σ_N) V⊥ᵀ.
* ``iso-c`` — Isotropic merging (Marczak et al., ICML 2025): per matrix, the task-arithmetic sum
  Δ = Σ_i Δ_i = U Σ Vᵀ gets a flat spectrum, λ · σ̄ U Vᵀ with σ̄ the mean of Δ's singular values.

``keep_ratio`` and ``seed`` are not used (both are deterministic and dense).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

from .merge_registry import check_scalar, check_taus

Shape = Tuple[int, ...]


MATRIX_RULES = ("2d", "flatten")      # which tensors the SVD merges treat as matrices


def _segments(shapes: Optional[Sequence[Shape]], num_entries: int,
              matrices: str = "2d") -> Iterator[Tuple[int, int, Optional[Tuple[int, int]]]]:
    """(start, stop, matrix shape or None) of every tensor of ``shapes`` in the flat vector."""
    if shapes is None:
        raise ValueError("this merger needs the tensors' shapes (shapes=Layout.shapes)")
    if matrices not in MATRIX_RULES:
        raise ValueError(f"matrices must be one of {', '.join(MATRIX_RULES)}, got {matrices!r}")
    pos = 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= int(s)
        rows = int(shape[0]) if len(shape) >= 2 else 0
        if matrices == "2d":
            matrix = (rows, int(shape[1])) if len(shape) == 2 and size > 0 else None
        else:
            matrix = (rows, size // rows) if rows > 1 and size // max(rows, 1) > 1 else None
        yield pos, pos + size, matrix
        pos += size
    if pos != num_entries:
        raise ValueError(f"shapes cover {pos} entries, the task vectors have {num_entries}")


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``a`` (closest matrix with orthonormal columns): P Qᵀ of a = P S Qᵀ."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_matrix(deltas: torch.Tensor, min_keep: int = 0) -> torch.Tensor:
    """TSV-M of one matrix: ``deltas`` (N, m, n) -> the merged (m, n) update (λ not applied); each
    task keeps max(``min_keep``, ⌊min(m, n)/N⌋) triplets (none: a zero update)."""
    n_tasks, m, n = deltas.shape
    k = max(int(min_keep), min(m, n) // n_tasks)
    if k == 0:
        return torch.zeros((m, n), dtype=torch.float64, device=deltas.device)
    us, ss, vs = [], [], []
    for d in deltas.double():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    return (_polar(u_cat) * s_cat) @ _polar(v_cat).T


def iso_c_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C of one matrix: σ̄ U Vᵀ of Σ_i Δ_i (λ not applied)."""
    total = deltas.double().sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def _by_matrix(taus: torch.Tensor, shapes, matrix_fn, matrices: str = "2d") -> torch.Tensor:
    check_taus(taus)
    out = torch.empty(taus.shape[1], dtype=taus.dtype, device=taus.device)
    for start, stop, matrix in _segments(shapes, taus.shape[1], matrices):
        part = taus[:, start:stop]
        if matrix is None:
            out[start:stop] = part.mean(dim=0)
        else:
            merged = matrix_fn(part.reshape(taus.shape[0], *matrix))
            out[start:stop] = merged.reshape(-1).to(taus.dtype)
    return out


def _scaled(taus, shapes, lam, matrix_fn, matrices) -> torch.Tensor:
    """θ_pre + λ · (merged matrices, averaged rest): λ scales the whole merged vector, as in both
    methods' code."""
    lam = check_scalar("lam", lam)
    return lam * _by_matrix(taus, shapes, matrix_fn, matrices)


def tsv_m(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2, seed: int = 0,
          shapes: Optional[Sequence[Shape]] = None, matrices: str = "2d") -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): see the module docstring."""
    fn = (lambda d: tsv_matrix(d, min_keep=1)) if matrices == "flatten" else tsv_matrix
    return _scaled(taus, shapes, lam, fn, matrices)


def iso_c(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2, seed: int = 0,
          shapes: Optional[Sequence[Shape]] = None, matrices: str = "2d") -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): see the module docstring."""
    return _scaled(taus, shapes, lam, iso_c_matrix, matrices)
