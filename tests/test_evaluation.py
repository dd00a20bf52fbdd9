"""Evaluators (the task pool), model loading and flat-buffer binding."""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.errors import NPSError
from nps_pruning.evaluation import (Evaluator, bind_flat, evaluate_path, load_model,
                                    make_evaluator)
from nps_pruning.task_vector import Layout


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(base, ft) tiny BERT folders, built once for this module (they are never modified)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_text_csv(tmp_path_factory.mktemp("data") / "data.csv", rows=40)


def _rows(path):
    with open(path, newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _float_layout(model):
    return Layout.from_tensors({k: v for k, v in model.state_dict().items() if v.is_floating_point()})


# -- text ---------------------------------------------------------------------------------------
def test_text_accuracy_equals_hand_written_loop(bert, data_csv):
    from transformers import AutoTokenizer
    _, ft = bert
    model = load_model(ft)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(str(ft))
    rows = _rows(data_csv)
    correct = 0
    with torch.no_grad():
        for text, label in rows:
            logits = model(**tok(text, return_tensors="pt")).logits
            correct += int(logits.argmax(-1).item() == label)
    expected = correct / len(rows)
    assert 0 < expected < 1  # a score that could be wrong either way
    for bs in (1, 7, 64):
        ev = make_evaluator(f"text-classification:{data_csv}", model_path=ft, batch_size=bs)
        assert isinstance(ev, Evaluator)
        assert ev.num_rows == len(rows)
        assert ev(model) == expected
    # batches are sorted by length and padded only to their own longest row
    ev = make_evaluator(f"text-classification:{data_csv}", model_path=ft, batch_size=7)
    widths = [b[0]["input_ids"].shape[1] for b in ev.batches]
    assert widths == sorted(widths)



def test_text_padding_is_exact_on_varied_lengths(bert, tmp_path):
    """Labels = the model's own one-row-at-a-time predictions on texts of 1..20 words: any padding
    or masking mistake in the batched path flips some prediction and the score drops below 1."""
    from conftest import WORDS
    from transformers import AutoTokenizer
    _, ft = bert
    model = load_model(ft)
    tok = AutoTokenizer.from_pretrained(str(ft))
    g = torch.Generator().manual_seed(5)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())
             for n in list(range(1, 21)) * 3]
    with torch.no_grad():
        logits = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])
        # the tiny random model predicts one class everywhere: move the decision boundary into
        # the widest gap between the middle rows' logit margins, so both classes occur and no
        # row sits near the boundary (batched float noise cannot flip it)
        margin = torch.sort(logits[:, 1] - logits[:, 0]).values
        mid = margin[len(texts) // 4: 3 * len(texts) // 4]
        gaps = mid[1:] - mid[:-1]
        j = int(gaps.argmax())
        assert float(gaps[j]) > 1e-6  # batched-vs-single logit noise here is ~4e-9
        model.classifier.bias[1] -= float(mid[j] + mid[j + 1]) / 2
        preds = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    assert 10 < sum(preds) < len(texts) - 10
    same = _write_csv(tmp_path / "same.csv", ["text", "label"], list(zip(texts, preds)))
    flip = _write_csv(tmp_path / "flip.csv", ["text", "label"], [(t, 1 - p) for t, p in zip(texts, preds)])
    for bs in (4, 64):
        assert make_evaluator(f"text-classification:{same}", model_path=ft, batch_size=bs)(model) == 1.0
        assert make_evaluator(f"text-classification:{flip}", model_path=ft, batch_size=bs)(model) == 0.0

def test_text_jsonl_equals_csv_and_pickles(bert, data_csv, tmp_path):
    _, ft = bert
    model = load_model(ft)
    jl = _write_jsonl(tmp_path / "data.jsonl", _rows(data_csv))
    ev_csv = make_evaluator(f"text-classification:{data_csv}", model_path=ft)
    ev_jl = make_evaluator(f"text-classification:{jl}", model_path=ft)
    assert ev_jl.num_rows == ev_csv.num_rows == 40
    assert ev_jl(model) == ev_csv(model)
    clone = pickle.loads(pickle.dumps(ev_jl))  # process executors ship evaluators
    assert clone(model) == ev_csv(model)


def test_text_calibration_subsample(bert, data_csv):
    _, ft = bert
    spec = f"text-classification:{data_csv}"
    a = make_evaluator(spec, model_path=ft, calib_size=10, seed=3)
    b = make_evaluator(spec, model_path=ft, calib_size=10, seed=3)
    c = make_evaluator(spec, model_path=ft, calib_size=10, seed=4)
    assert a.num_rows == 10 and len(set(a.indices.tolist())) == 10
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()
    # the rows scored are those rows: score equals the accuracy over exactly them
    model = load_model(ft)
    rows = _rows(data_csv)
    sub = [rows[i] for i in a.indices.tolist()]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ft))
    with torch.no_grad():
        hits = sum(int(model(**tok(t, return_tensors="pt")).logits.argmax(-1).item() == y) for t, y in sub)
    assert a(model) == hits / 10
    # rest = the complement
    rest = make_evaluator(spec, model_path=ft, calib_size=10, seed=3, subset="rest")
    assert rest.num_rows == 30
    assert set(rest.indices.tolist()).isdisjoint(a.indices.tolist())
    # larger than the file: every row, and the evaluator says so
    big = make_evaluator(spec, model_path=ft, calib_size=1000)
    assert big.num_rows == 40 and "1000" in big.note and "all 40" in big.note


# -- bind_flat ----------------------------------------------------------------------------------
def test_bind_flat_writes_change_the_model(bert, data_csv):
    from transformers import AutoTokenizer
    _, ft = bert
    model = load_model(ft)
    layout = _float_layout(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = bind_flat(model, layout)
    assert flat.dtype == torch.float32 and flat.is_contiguous() and flat.numel() == layout.numel
    # initialised with the model's values, in layout order
    for name, start, stop, shape in layout.spans():
        assert torch.equal(flat[start:stop].view(shape), before[name])
    tok = AutoTokenizer.from_pretrained(str(ft))
    inputs = tok(["good movie", "awful plot not fun", "the actor was very dull"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        logits0 = model(**inputs).logits.clone()
    g = torch.Generator().manual_seed(0)
    flat.add_(0.5 * torch.randn(flat.shape, generator=g))
    with torch.no_grad():
        logits1 = model(**inputs).logits
    assert not torch.allclose(logits0, logits1, atol=1e-3)
    fresh = load_model(ft)
    sd = fresh.state_dict()
    sd.update({k: v.clone() for k, v in layout.unflatten(flat).items()})
    fresh.load_state_dict(sd)
    with torch.no_grad():
        expected = fresh(**inputs).logits
    torch.testing.assert_close(logits1, expected, rtol=0, atol=1e-6)
    # the evaluator sees the bound weights too (no reload)
    ev = make_evaluator(f"text-classification:{data_csv}", model_path=ft)
    assert ev(model) == ev(fresh)


def test_bind_flat_base_names_and_prefix(bert):
    base, ft = bert
    ft_model = load_model(ft)
    layout = Layout.from_tensors({k: v for k, v in ft_model.state_dict().items()
                                  if k.startswith("bert.") and v.is_floating_point()})
    base_model = load_model(base)   # a BertModel: names without the "bert." prefix
    flat = bind_flat(base_model, layout)
    flat.zero_()
    assert float(base_model.embeddings.word_embeddings.weight.detach().abs().sum()) == 0.0
    # an explicit mapping wins
    name = layout.names[0]
    small = Layout((name,), (layout.shapes[0],), (layout.dtypes[0],))
    mapped = bind_flat(load_model(base), small, base_names={name: name[len("bert."):]})
    assert mapped.numel() == small.numel
    bad = Layout(("no.such.tensor",), ((3,),), (torch.float32,))
    with pytest.raises(NPSError, match="no.such.tensor"):
        bind_flat(base_model, bad)
    wrong_shape = Layout((name,), ((1, 2),), (torch.float32,))
    with pytest.raises(NPSError, match="shape"):
        bind_flat(load_model(base), wrong_shape)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3, bias=False)
        self.b = torch.nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def test_bind_flat_tied_weights_and_buffers():
    m = _Tied()
    both = Layout(("a.weight", "b.weight"), ((3, 3), (3, 3)), (torch.float32, torch.float32))
    with pytest.raises(NPSError, match="tied"):
        bind_flat(m, both)
    one = Layout(("a.weight", "scale"), ((3, 3), (3,)), (torch.float32, torch.float32))
    flat = bind_flat(m, one)
    flat[:9] = torch.eye(3).reshape(-1)
    flat[9:] = 2.0
    assert m.b.weight is m.a.weight and torch.equal(m.b.weight, torch.eye(3))
    x = torch.randn(2, 3)
    torch.testing.assert_close(m(x), 2 * x)


# -- image (model built by a user factory) -----------------------------------------------------
NET_PY = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, channels=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(h)

def build(state_dict):
    return Net(state_dict["conv.weight"].shape[1])

def constant(model):
    return 0.25

def numpy_score(model):
    import numpy
    return numpy.float32(0.5)

def not_a_float(model):
    return "high"

def boom(model):
    raise RuntimeError("kaput")

def not_a_module(state_dict):
    return 3
'''


@pytest.fixture
def net(tmp_path):
    from safetensors.torch import save_file
    mod = tmp_path / "netmod.py"
    mod.write_text(NET_PY)
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(0)
    m = ns["Net"]()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(weights))
    return mod, weights


def _manual_accuracy(model, x, labels):
    with torch.no_grad():
        return int((model(x).argmax(-1) == torch.as_tensor(labels)).sum()) / len(labels)


def test_image_evaluator_layouts_and_normalisation(net, tmp_path):
    mod, weights = net
    model = load_model(weights, model_factory=f"python:{mod}:build")
    assert not model.training
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, size=30)
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    expected = _manual_accuracy(model, x, labels)
    assert 0 < expected < 1
    np.savez(tmp_path / "hw.npz", images=imgs, labels=labels)
    np.savez(tmp_path / "hwc.npz", images=imgs[..., None], labels=labels)
    np.savez(tmp_path / "float.npz", images=imgs.astype(np.float32) / 255, labels=labels)
    for name in ("hw", "hwc", "float"):
        ev = make_evaluator(f"image-classification:{tmp_path / name}.npz", batch_size=7)
        assert ev.num_rows == 30
        assert ev(model) == expected, name
    # per-channel mean/std on a 3-channel channel-last set
    rgb = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    lab3 = rng.integers(0, 3, size=20)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=lab3, mean=mean, std=std)
    from safetensors.torch import save_file
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(1)
    m3 = ns["Net"](3)
    save_file(m3.state_dict(), str(tmp_path / "net3.safetensors"))
    load_model_3ch = load_model(tmp_path / "net3.safetensors", model_factory=f"python:{mod}:build")
    xr = torch.from_numpy(rgb).float().div(255).permute(0, 3, 1, 2)
    xr = (xr - torch.tensor(mean).float().view(1, 3, 1, 1)) / torch.tensor(std).float().view(1, 3, 1, 1)
    ev = make_evaluator(f"image-classification:{tmp_path / 'rgb.npz'}")
    assert ev(load_model_3ch) == _manual_accuracy(load_model_3ch, xr, lab3)
    # calibration subsample on images
    a = make_evaluator(f"image-classification:{tmp_path / 'hw.npz'}", calib_size=12, seed=1)
    b = make_evaluator(f"image-classification:{tmp_path / 'hw.npz'}", calib_size=12, seed=1)
    assert a.num_rows == 12 and a.indices.tolist() == b.indices.tolist()
    idx = a.indices.numpy()
    assert a(model) == _manual_accuracy(model, x[idx], labels[idx])


def test_image_label_out_of_range_and_bad_arrays(net, tmp_path):
    mod, weights = net
    model = load_model(weights, model_factory=f"python:{mod}:build")
    imgs = np.zeros((4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", images=imgs, labels=np.array([0, 1, 2, 3]))
    ev = make_evaluator(f"image-classification:{tmp_path / 'big.npz'}")  # fine until called
    with pytest.raises(NPSError, match=r"big\.npz.*label 3.*3 outputs"):
        ev(model)
    np.savez(tmp_path / "nolabels.npz", images=imgs)
    with pytest.raises(NPSError, match=r"nolabels\.npz.*'labels'"):
        make_evaluator(f"image-classification:{tmp_path / 'nolabels.npz'}")
    np.savez(tmp_path / "fl.npz", images=imgs, labels=np.array([0.5, 1, 2, 0]))
    with pytest.raises(NPSError, match=r"fl\.npz.*integer"):
        make_evaluator(f"image-classification:{tmp_path / 'fl.npz'}")
    np.savez(tmp_path / "empty.npz", images=imgs[:0], labels=np.array([], dtype=np.int64))
    with pytest.raises(NPSError, match=r"empty\.npz.*empty"):
        make_evaluator(f"image-classification:{tmp_path / 'empty.npz'}")
    with pytest.raises(NPSError, match=r"missing\.npz"):
        make_evaluator(f"image-classification:{tmp_path / 'missing.npz'}")


# -- python: specs and factories ------------------------------------------------------------------
def test_python_spec_file_and_dotted_module(net, tmp_path, monkeypatch):
    mod, weights = net
    model = load_model(weights, model_factory=f"python:{mod}:build")
    ev = make_evaluator(f"python:{mod}:constant")
    assert ev(model) == 0.25 and ev.name == f"python:{mod}:constant"
    assert make_evaluator(f"python:{mod}:numpy_score")(model) == 0.5
    assert pickle.loads(pickle.dumps(ev))(model) == 0.25
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_evaluator("python:netmod:constant")(model) == 0.25
    with pytest.raises(NPSError, match="not_a_float.*str"):
        make_evaluator(f"python:{mod}:not_a_float")(model)
    with pytest.raises(NPSError, match="boom.*kaput"):
        make_evaluator(f"python:{mod}:boom")(model)
    with pytest.raises(NPSError, match="nope"):
        make_evaluator(f"python:{mod}:nope")
    with pytest.raises(NPSError, match="no_such_module_xyz"):
        make_evaluator("python:no_such_module_xyz:fn")
    with pytest.raises(NPSError, match="MODULE:FUNCTION"):
        make_evaluator("python:justonepart")


def test_load_model_factory_errors(net, bert, tmp_path):
    mod, weights = net
    with pytest.raises(NPSError, match="--model-factory"):
        load_model(weights)
    with pytest.raises(NPSError, match="nn.Module"):
        load_model(weights, model_factory=f"python:{mod}:not_a_module")
    # strict loading: a state dict that does not fit the factory's model
    from safetensors.torch import load_file, save_file
    sd = load_file(str(weights))
    sd["extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(NPSError, match="extra"):
        load_model(tmp_path / "extra.safetensors", model_factory=f"python:{mod}:build")
    with pytest.raises(NPSError, match="nowhere"):
        load_model(tmp_path / "nowhere")


# -- text errors ----------------------------------------------------------------------------------
def test_text_errors(bert, tmp_path):
    _, ft = bert
    model = load_model(ft)
    spec = "text-classification:"
    with pytest.raises(NPSError, match=r"missing\.csv"):
        make_evaluator(spec + str(tmp_path / "missing.csv"), model_path=ft)
    with pytest.raises(NPSError, match=r"unknown evaluation kind 'audio'"):
        make_evaluator("audio:x.wav", model_path=ft)
    nocol = _write_csv(tmp_path / "nocol.csv", ["sentence", "label"], [["good", 1]])
    with pytest.raises(NPSError, match=r"nocol\.csv.*missing column 'text'"):
        make_evaluator(spec + str(nocol), model_path=ft)
    jl_nocol = tmp_path / "nocol.jsonl"
    jl_nocol.write_text(json.dumps({"text": "good"}) + "\n")
    with pytest.raises(NPSError, match=r"nocol\.jsonl.*missing column 'label'"):
        make_evaluator(spec + str(jl_nocol), model_path=ft)
    for bad in ("positive", "1.5", ""):
        path = _write_csv(tmp_path / "badlab.csv", ["text", "label"], [["good", 1], ["bad", bad]])
        with pytest.raises(NPSError, match=r"badlab\.csv.*row 2.*integer"):
            make_evaluator(spec + str(path), model_path=ft)
    empty = _write_csv(tmp_path / "empty.csv", ["text", "label"], [])
    with pytest.raises(NPSError, match=r"empty\.csv.*empty"):
        make_evaluator(spec + str(empty), model_path=ft)
    (tmp_path / "blank.jsonl").write_text("")
    with pytest.raises(NPSError, match=r"blank\.jsonl.*empty"):
        make_evaluator(spec + str(tmp_path / "blank.jsonl"), model_path=ft)
    big = _write_csv(tmp_path / "big.csv", ["text", "label"], [["good", 0], ["bad", 2]])
    ev = make_evaluator(spec + str(big), model_path=ft)   # checked at the first call
    with pytest.raises(NPSError, match=r"big\.csv.*label 2.*2 outputs"):
        ev(model)
    ok = _write_csv(tmp_path / "ok.csv", ["text", "label"], [["good", 0]])
    with pytest.raises(NPSError, match="model_path|model folder"):
        make_evaluator(spec + str(ok))
    with pytest.raises(NPSError, match="subset"):
        make_evaluator(spec + str(ok), model_path=ft, subset="test")


def test_evaluate_path(bert, data_csv):
    _, ft = bert
    out = evaluate_path(ft, f"text-classification:{data_csv}", calib_size=15, seed=2)
    ev = make_evaluator(f"text-classification:{data_csv}", model_path=ft, calib_size=15, seed=2)
    assert out["num_rows"] == 15 and out["seconds"] >= 0
    assert out["score"] == ev(load_model(ft))
    json.dumps(out)


def test_bind_flat_follows_transformers_load_time_renames(tmp_path):
    """transformers >= 5 loads Dinov2's saved `attention.attention.query` as `attention.q_proj`:
    the layout (the file's names) still binds, and writing θ into the flat buffer moves the
    renamed module's weight."""
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
    except ImportError:
        pytest.skip("transformers without load-time renames")
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2ForImageClassification
    from nps_pruning.apps.session import Session
    torch.manual_seed(0)
    m = Dinov2ForImageClassification(Dinov2Config(hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  image_size=28, patch_size=14, num_labels=3))
    m.save_pretrained(tmp_path / "pre")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    m.save_pretrained(tmp_path / "ft")
    saved = load_file(tmp_path / "ft" / "model.safetensors")
    key = "dinov2.encoder.layer.0.attention.attention.query.weight"
    assert key in saved                                   # the file keeps the old name
    s = Session.load(str(tmp_path / "pre"), str(tmp_path / "ft"))
    assert key in s.task_vector.layout.names
    s.set_task_values(torch.zeros_like(s.task_vector.values))
    q = dict(s.model.named_parameters())["dinov2.encoder.layer.0.attention.q_proj.weight"]
    pre = load_file(tmp_path / "pre" / "model.safetensors")[key]
    assert torch.equal(q.detach(), pre)
    s.set_task_values(s.task_vector.values)
    assert torch.equal(q.detach(), saved[key])
