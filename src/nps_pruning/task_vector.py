"""Task vectors as flat tensors (SPEC §1).

Every prunable entry of a checkpoint lives in one flat 1-D tensor ordered by a :class:`Layout`
(tensor names, shapes and offsets). Bands, masks, searches and merges are then plain vector
operations over ``D`` entries; the layout turns a flat vector back into named tensors.

Names in a layout are the *fine-tuned* model's state-dict names (the model that gets written);
``TaskVector.base_names`` maps them to the pre-trained checkpoint's names where they differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch

from .errors import NPSError


@dataclass(frozen=True)
class Layout:
    """Where each prunable tensor sits in a flat vector."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[torch.dtype, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)):
            raise ValueError("layout names, shapes and dtypes differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("layout has duplicate tensor names")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "Layout":
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()),
                   tuple(t.dtype for t in tensors.values()))

    @property
    def sizes(self) -> List[int]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return out

    @property
    def offsets(self) -> List[int]:
        offs, pos = [], 0
        for n in self.sizes:
            offs.append(pos)
            pos += n
        return offs

    @property
    def numel(self) -> int:
        """D: the number of prunable entries."""
        return sum(self.sizes)

    def spans(self) -> Iterator[Tuple[str, int, int, Tuple[int, ...]]]:
        """(name, start, stop, shape) for every tensor, in flat order."""
        for name, start, size, shape in zip(self.names, self.offsets, self.sizes, self.shapes):
            yield name, start, start + size, shape

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate the named tensors into one flat vector (copying, cast to ``dtype``)."""
        if out is None:
            out = torch.empty(self.numel, dtype=dtype)
        elif out.numel() != self.numel:
            raise ValueError(f"flat buffer has {out.numel()} entries, layout needs {self.numel}")
        for name, start, stop, shape in self.spans():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise NPSError(f"tensor {name}: shape {tuple(t.shape)} does not match {shape}")
            out[start:stop].copy_(t.reshape(-1))
        return out

    def unflatten(self, flat: torch.Tensor, cast: bool = False) -> Dict[str, torch.Tensor]:
        """Named views into ``flat`` (no copy), or copies in each tensor's own dtype if ``cast``."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} entries, layout needs {self.numel}")
        out = {}
        for (name, start, stop, shape), dt in zip(self.spans(), self.dtypes):
            view = flat[start:stop].view(shape)
            out[name] = view.to(dt) if cast else view
        return out


@dataclass
class TaskVector:
    """τ = θ_ft − θ_pre over the prunable entries, plus what is carried verbatim.

    * ``values``: flat τ (1-D, ``layout.numel`` entries);
    * ``task_specific``: tensors present only in the fine-tuned model (a new head): kept whole;
    * ``buffers``: integer buffers of the fine-tuned model (position ids, counters): copied;
    * ``base_names``: fine-tuned name -> pre-trained name, for the prunable tensors.
    """

    layout: Layout
    values: torch.Tensor
    task_specific: Dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    base_names: Dict[str, str] = field(default_factory=dict)
    name: str = "task"

    def __post_init__(self) -> None:
        if self.values.dim() != 1 or self.values.numel() != self.layout.numel:
            raise ValueError(f"task vector values must be 1-D with {self.layout.numel} entries, "
                             f"got shape {tuple(self.values.shape)}")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        """D, the number of prunable entries."""
        return self.layout.numel

    def __len__(self) -> int:
        return self.num_entries

    def count_nonzero(self) -> int:
        return int(torch.count_nonzero(self.values))

    # -- algebra (Ilharco et al.'s task vector arithmetic) ------------------------------------
    def with_values(self, values: torch.Tensor, name: str | None = None) -> "TaskVector":
        """Same layout and carried tensors, new flat values."""
        return TaskVector(self.layout, values, self.task_specific, self.buffers, self.base_names,
                          self.name if name is None else name)

    def _check_same_layout(self, other: "TaskVector") -> None:
        if self.layout != other.layout:
            raise NPSError(f"task vectors {self.name!r} and {other.name!r} have different layouts "
                           "(different architectures or tensor sets)")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # lets sum() work
            return self
        self._check_same_layout(other)
        return self.with_values(self.values + other.values)

    __radd__ = __add__

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check_same_layout(other)
        return self.with_values(self.values - other.values)

    def __neg__(self) -> "TaskVector":
        return self.with_values(-self.values)

    def __mul__(self, scale: float) -> "TaskVector":
        return self.with_values(self.values * float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "TaskVector":
        return self.with_values(self.values / float(scale))

    def apply_to(self, base_flat: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """θ = θ_pre + scale·τ as a flat vector (``base_flat`` is θ_pre in this layout)."""
        if base_flat.numel() != self.num_entries:
            raise ValueError("base vector does not match the task vector's layout")
        return base_flat + scale * self.values.to(base_flat.dtype)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, τ tensor view) for each prunable tensor."""
        yield from self.layout.unflatten(self.values).items()

    def state_dict(self, base_flat: torch.Tensor, scale: float = 1.0, *,
                   in_place: bool = False) -> Dict[str, torch.Tensor]:
        """The full fine-tuned-style state dict of θ_pre + scale·τ (each tensor in its own dtype),
        with the task-specific tensors and integer buffers added verbatim. ``in_place``: θ is
        computed into ``base_flat`` itself (its caller's last use of θ_pre), with no model-sized
        temporary; the same values bit for bit."""
        if in_place:
            if base_flat.numel() != self.num_entries:
                raise ValueError("base vector does not match the task vector's layout")
            theta = base_flat.add_(self.values.to(base_flat.dtype) if scale == 1.0
                                   else scale * self.values.to(base_flat.dtype))
        else:
            theta = self.apply_to(base_flat, scale)
        return self.model_state(theta)

    def model_state(self, theta_flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The state dict of a model whose prunable weights are ``theta_flat`` (views where each
        tensor's dtype is the flat vector's, copies in the tensor's own dtype otherwise), with the
        task-specific tensors and integer buffers added verbatim."""
        out = self.layout.unflatten(theta_flat, cast=True)
        out = {k: v.contiguous() for k, v in out.items()}
        out.update(self.task_specific)
        out.update(self.buffers)
        return out


def same_extras(a: TaskVector, b: TaskVector) -> bool:
    """Whether ``a`` and ``b`` carry the same task-specific tensors and buffers (names, dtypes,
    shapes, values): on one layout their :meth:`TaskVector.model_state` for one θ are then equal."""
    def same(x: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor]) -> bool:
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)
    return same(a.task_specific, b.task_specific) and same(a.buffers, b.buffers)


def stack_values(vectors: Sequence[TaskVector]) -> torch.Tensor:
    """(N, D) matrix of several task vectors' flat values, checking they share one layout."""
    if not vectors:
        raise NPSError("no task vectors given")
    for v in vectors[1:]:
        vectors[0]._check_same_layout(v)
    return torch.stack([v.values for v in vectors])
