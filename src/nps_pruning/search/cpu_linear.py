"""The search's fp32 linear layers on the CPU through oneDNN (``PruneSettings.cpu_linear``).

PyTorch's CPU build runs an fp32 ``F.linear`` through MKL's sgemm, whose fast code paths are
chosen by CPU vendor: on the benchmark's AMD EPYC (AVX-512) a MiniLM-sized linear layer ran 2.2×
slower there than in oneDNN, Intel's deep-learning kernels in the same build, which picks its
code by the CPU's instruction sets. ``"onednn"`` (the default) sends each fp32 CPU ``F.linear``
of the search's forward passes (candidates, held-out re-scoring) to oneDNN's
``torch.ops.mkldnn._linear_pointwise`` (the kernel torch.compile's CPU backend calls for a linear
layer). Its results agree with torch's to float32 rounding, not bit for bit: scores differ from
``"torch"``'s in their last bits (same seed, same kernel: the same result).

The call goes to torch unchanged where oneDNN is missing from the build or fails a check against
``F.linear`` once per process, and for anything but float32 CPU tensors, a 1-D input, under
autocast (which chooses the dtype itself) and where autograd would need the call's gradient.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import NPSError

CPU_LINEARS = ("onednn", "torch")     # PruneSettings.cpu_linear's values (the CLI's --cpu-linear)

_PLAIN = (torch.Tensor, torch.nn.Parameter)


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel and it computes ``F.linear`` (checked once)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((3, 5, 16), (7, 16), (7,)))
        with torch.no_grad():
            got = _kernel(x, w, b)
            return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-5))
    except Exception:       # an op missing or refused by this build: torch's own kernel then
        return False


def _kernel(x, w, b):
    """oneDNN's fp32 linear layer: x @ wᵀ + b over x's last dimension."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _onednn_args(args, kwargs):
    """(x, w, b) when this ``F.linear`` call can go to oneDNN, else None."""
    names = ("input", "weight", "bias")
    got = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    x, w, b = got
    tensors = [t for t in (x, w, b) if t is not None]
    if len(tensors) < 2 or x is None or w is None or any(type(t) not in _PLAIN for t in tensors):
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != w.shape[1] or x.numel() == 0 or (
            b is not None and tuple(b.shape) != (w.shape[0],)):
        return None         # torch's own call (and its error for a shape that does not fit)
    if torch.is_autocast_enabled("cpu"):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return x, w, b


class OneDNNLinear(TorchFunctionMode):
    """While active: fp32 CPU ``F.linear`` calls run in oneDNN (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            xwb = _onednn_args(args, kwargs)
            if xwb is not None:
                return _kernel(*xwb)
        return func(*args, **kwargs)


def check_cpu_linear(cpu_linear: str) -> None:
    """Refuse a ``cpu_linear`` that is not one of :data:`CPU_LINEARS` (the settings' check)."""
    if cpu_linear not in CPU_LINEARS:
        raise NPSError(f"settings: cpu_linear must be one of {', '.join(CPU_LINEARS)}, got {cpu_linear!r}")


def linear_mode(cpu_linear: str, device) -> contextlib.AbstractContextManager:
    """The context the search's forward passes on ``device`` run in for ``cpu_linear``."""
    check_cpu_linear(cpu_linear)
    if cpu_linear == "onednn" and torch.device(device).type == "cpu" and onednn_available():
        return OneDNNLinear()
    return contextlib.nullcontext()
