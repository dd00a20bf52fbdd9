"""``image-classification:FILE`` — accuracy of an image classifier on an NPZ file (SPEC §3).

The NPZ holds ``images`` and ``labels`` (integer class ids). Images are prepared once, at
construction:

* integer pixels (``uint8``) are scaled to [0, 1]; floating pixels are kept as they are;
* ``(N, H, W)`` gets a channel axis -> ``(N, 1, H, W)``;
* channel-last ``(N, H, W, C)`` with C in {1, 3} (and dim 1 not in {1, 3}) becomes NCHW;
* optional arrays ``mean`` and ``std`` normalise per channel: ``(x - mean) / std``;
* other ranks (``(N, D)`` feature vectors, say) are passed through unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import NPSError
from .fitness import FitnessScored, check_fitness
from .model import logits_of
from .text import check_num_outputs, forward_or_explain, select_rows


def prepare_images(images: np.ndarray, mean=None, std=None, source: str = "") -> torch.Tensor:
    """float32 NCHW tensor (see the module docstring for the rules)."""
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer)
                                        or np.issubdtype(images.dtype, np.floating)):
        raise NPSError(f"{source}: images have dtype {images.dtype}, expected uint8 or float")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if np.issubdtype(images.dtype, np.integer) else x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.contiguous()
    if mean is not None or std is not None:
        channels = x.shape[1] if x.dim() >= 2 else 1
        shape = [1, -1] + [1] * (x.dim() - 2)

        def per_channel(a, what, default):
            if a is None:
                return torch.full((channels,), default)
            t = torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(-1)
            if t.numel() == 1:
                t = t.expand(channels)
            if t.numel() != channels:
                raise NPSError(f"{source}: {what} has {t.numel()} values, images have "
                               f"{channels} channels")
            return t

        m = per_channel(mean, "mean", 0.0).reshape(shape)
        s = per_channel(std, "std", 1.0).reshape(shape)
        for t, what in ((m, "mean"), (s, "std")):
            if not bool(torch.isfinite(t).all()):
                raise NPSError(f"{source}: {what} has a NaN or infinite entry")
        if bool((s == 0).any()):
            raise NPSError(f"{source}: std has a zero entry")
        x = (x - m) / s
    bad = ~torch.isfinite(x)
    if bool(bad.any()):        # NaN weights are refused; NaN data would score silently too
        rows = int(bad.reshape(len(x), -1).any(dim=1).sum()) if x.dim() else 1
        raise NPSError(f"{source}: {rows} of the {len(x)} images have NaN or infinite pixels"
                       f"{' after normalisation by mean/std' if mean is not None or std is not None else ''}")
    return x


class ImageClassificationEvaluator(FitnessScored):
    """Accuracy (argmax of logits) over the selected images of an NPZ file."""

    def __init__(self, path, *, calib_size=None, seed=0, batch_size=64, device="cpu",
                 subset="all", fitness="accuracy", rest_size=None, **_ignored) -> None:
        self.path = Path(path)
        self.name = f"image-classification:{path}"
        self.fitness = check_fitness(fitness, str(path))
        self.reference = None
        src = str(self.path)
        if not self.path.is_file():
            raise NPSError(f"{src}: no such file")
        if int(batch_size) <= 0:
            raise NPSError(f"{src}: batch_size must be positive, got {batch_size}")
        try:
            data = np.load(self.path, allow_pickle=False)
        except Exception as exc:
            raise NPSError(f"{src}: not a readable NPZ file ({type(exc).__name__}: {exc})") from exc
        if not hasattr(data, "files"):
            raise NPSError(f"{src}: expected an NPZ archive with arrays 'images' and 'labels'")
        with data:
            for key in ("images", "labels") if self.fitness != "agreement" else ("images",):
                if key not in data.files:
                    raise NPSError(f"{src}: missing array {key!r} (arrays: {', '.join(data.files)})")
            try:
                images = data["images"]
                labels = (data["labels"] if "labels" in data.files
                          else np.zeros(len(images), dtype=np.int64))
                mean = data["mean"] if "mean" in data.files else None
                std = data["std"] if "std" in data.files else None
            except Exception as exc:  # object arrays (pickles) are refused, corrupt members
                raise NPSError(f"{src}: cannot read arrays ({type(exc).__name__}: {exc})") from exc
        labels = labels.reshape(-1) if labels.ndim > 1 and labels.size == len(labels) else labels
        if images.ndim == 0 or len(images) == 0:
            raise NPSError(f"{src}: empty file (no images)")
        if labels.ndim != 1 or len(labels) != len(images):
            raise NPSError(f"{src}: {len(images)} images but labels of shape {labels.shape}")
        if np.issubdtype(labels.dtype, np.floating):
            if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                raise NPSError(f"{src}: labels are not integer class ids")
        elif labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
            raise NPSError(f"{src}: labels have dtype {labels.dtype}, expected integer class ids")
        if labels.min() < 0:
            raise NPSError(f"{src}: negative label {int(labels.min())}")
        self.total_rows = len(images)
        self.indices, self.note = select_rows(len(images), calib_size, seed, subset, src,
                                              rest_size=rest_size)
        idx = self.indices.numpy()
        self.device = torch.device(device)
        self.images = prepare_images(images[idx], mean, std, src).to(self.device)
        self.labels = torch.from_numpy(labels[idx].astype(np.int64)).to(self.device)
        self.num_rows = len(idx)
        self.max_label = int(self.labels.max())
        self.batch_size = int(batch_size)

    def _logits(self, model: torch.nn.Module):
        with torch.inference_mode():
            for s in range(0, self.num_rows, self.batch_size):
                logits = logits_of(forward_or_explain(model, self.path, self.images[s:s + self.batch_size]))
                check_num_outputs(logits, self.max_label, str(self.path))
                yield logits, self.labels[s:s + self.batch_size]

    # -- some of the rows (FitnessScored.score_rows) -------------------------------------------
    def _batch_positions(self):
        return [np.arange(s, min(s + self.batch_size, self.num_rows), dtype=np.int64)
                for s in range(0, self.num_rows, self.batch_size)]

    def _subset_positions(self, pos: np.ndarray):
        return [pos[s:s + self.batch_size] for s in range(0, len(pos), self.batch_size)]

    def _subset_logits(self, model: torch.nn.Module, parts):
        with torch.inference_mode():
            for part in parts:
                at = torch.as_tensor(part, device=self.images.device)
                logits = logits_of(forward_or_explain(model, self.path, self.images[at]))
                check_num_outputs(logits, self.max_label, str(self.path))
                yield logits, self.labels[at]

    def __repr__(self) -> str:
        return f"ImageClassificationEvaluator({str(self.path)!r}, num_rows={self.num_rows})"
