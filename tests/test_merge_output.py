"""`nps merge`'s output folders: a task without a head of its own gets the same merged model as the
first task, and its weight files are hard links of the first folder's (one copy on disk); tasks
with their own heads keep files of their own; without hard links every folder is written."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert
from nps_pruning.cli import main as nps


def _bodies(root, n=3):
    """root/base (BertModel) and n fine-tuned BertModel bodies (no head): base + noise."""
    from transformers import BertModel
    base, _ = make_tiny_bert(root)
    out = []
    for i in range(n):
        m = BertModel.from_pretrained(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"t{i}")
        out.append(root / f"t{i}")
    return base, out


def _merge(base, fts, out):
    assert nps(["merge", str(base), *map(str, fts), "--method", "task-arithmetic", "--lambda", "0.5",
                "-o", str(out), "--quiet"]) == 0
    return json.loads((out / "report.json").read_text())


def test_head_less_tasks_share_the_first_folder_s_weight_file(tmp_path):
    base, fts = _bodies(tmp_path / "m")
    rep = _merge(base, fts, tmp_path / "out")
    files = [tmp_path / "out" / f"t{i}" / "model.safetensors" for i in range(3)]
    assert rep["weights_shared_with_first"] == ["t1", "t2"]
    assert os.path.samefile(files[0], files[1]) and os.path.samefile(files[0], files[2])
    assert os.stat(files[0]).st_nlink == 3
    # the one file holds θ_pre + 0.5 Σ τ_i, and each folder loads as a model with its own config
    pre = load_file(base / "model.safetensors")
    fin = [load_file(f / "model.safetensors") for f in fts]
    got = load_file(files[0])
    for k, v in pre.items():
        if v.is_floating_point():
            want = v + 0.5 * sum(f[k] - v for f in fin)
            assert torch.allclose(got[k], want, atol=1e-6), k
    from transformers import BertModel
    for i in range(3):
        BertModel.from_pretrained(tmp_path / "out" / f"t{i}")
        assert (tmp_path / "out" / f"t{i}" / "config.json").is_file()


def test_tasks_with_their_own_heads_keep_their_own_files(tmp_path):
    from transformers import BertForSequenceClassification
    base, ft_a = make_tiny_bert(tmp_path / "m")
    m = BertForSequenceClassification.from_pretrained(ft_a)
    with torch.no_grad():                      # the same body, another head
        m.classifier.weight.add_(1.0)
    m.save_pretrained(tmp_path / "m" / "other")
    heads = {n: load_file(tmp_path / "m" / n / "model.safetensors")["classifier.weight"] for n in ("ft", "other")}
    rep = _merge(base, [ft_a, tmp_path / "m" / "other"], tmp_path / "out")
    fa, fb = (tmp_path / "out" / n / "model.safetensors" for n in ("ft", "other"))
    assert rep["weights_shared_with_first"] == []
    assert not os.path.samefile(fa, fb)
    for n, f in (("ft", fa), ("other", fb)):
        assert torch.equal(load_file(f)["classifier.weight"], heads[n])


def test_without_hard_links_every_folder_is_written(tmp_path, monkeypatch):
    base, fts = _bodies(tmp_path / "m", n=2)
    def refuse(*a, **k):
        raise OSError("no hard links here")
    monkeypatch.setattr(os, "link", refuse)
    rep = _merge(base, fts, tmp_path / "out")
    f0, f1 = (tmp_path / "out" / f"t{i}" / "model.safetensors" for i in range(2))
    assert rep["weights_shared_with_first"] == []
    assert not os.path.samefile(f0, f1)
    assert f0.read_bytes() == f1.read_bytes()
