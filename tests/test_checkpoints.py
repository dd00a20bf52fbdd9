"""Checkpoint I/O: lazy loading, round trips, name matching, bad inputs, atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nps_pruning.checkpoints import (MARKER, atomic_output_dir, match_names, open_checkpoint,
                                     save_model_folder, save_tensors)
from nps_pruning.checkpoints.load import SafetensorsCheckpoint, TorchCheckpoint
from nps_pruning.checkpoints.names import detect_prefix
from nps_pruning.errors import NPSError


# -- helpers ------------------------------------------------------------------------------------
def tree_hash(root: Path) -> dict:
    """Path -> sha256 of every file under root (and the file list itself)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def reference_state_dict(folder: Path) -> dict:
    """Tensors read independently of our loader (safetensors' own API, copied)."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def assert_same_tensors(ckpt, ref: dict) -> None:
    assert sorted(ckpt.keys()) == sorted(ref)
    for k, t in ref.items():
        got = ckpt.get(k)
        assert got.dtype == t.dtype, k
        assert tuple(got.shape) == tuple(t.shape) == ckpt.shape(k), k
        assert ckpt.dtype(k) == t.dtype
        assert torch.equal(got, t), k


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    ids = torch.tensor([[2, 5, 9, 11, 7, 3], [2, 6, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def one_line_naming(err: pytest.ExceptionInfo, needle) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(needle) in msg, msg


# -- opening ------------------------------------------------------------------------------------
def test_open_hf_folder_is_lazy_and_complete(tiny_bert):
    base, ft = tiny_bert
    ck = open_checkpoint(ft)
    assert isinstance(ck, SafetensorsCheckpoint)
    assert ck.folder == ft.absolute() and ck.path == ft.absolute()
    assert ck.config["model_type"] == "bert"
    assert ck.config["architectures"] == ["BertForSequenceClassification"]
    assert ck.files == [ft.absolute() / "model.safetensors"]
    assert "classifier.weight" in ck and "bert.pooler.dense.weight" in ck
    assert ck.shape("classifier.weight") == (2, 16)
    assert_same_tensors(ck, reference_state_dict(ft))
    sd = ck.state_dict()
    assert list(sd) == ck.keys()
    with pytest.raises(NPSError, match="no tensor named"):
        ck.get("nope")
    assert open_checkpoint(ck) is ck


def test_open_base_folder_matches_transformers_model(tiny_bert):
    from transformers import BertModel
    base, _ = tiny_bert
    ck = open_checkpoint(str(base))
    model_sd = BertModel.from_pretrained(str(base)).state_dict()
    for k in ck.keys():
        assert torch.equal(ck.get(k), model_sd[k]), k


# -- round trips --------------------------------------------------------------------------------
def test_roundtrip_hf_folder_bit_exact_and_loads_in_transformers(tiny_bert, tmp_path):
    _, ft = tiny_bert
    before = tree_hash(ft)
    ck = open_checkpoint(ft)
    out = save_model_folder(tmp_path / "w" / "out", ck.state_dict(), like=ck)
    assert out == (tmp_path / "w" / "out").absolute()
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            MARKER} <= names
    assert (out / "config.json").read_bytes() == (ft / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_same_tensors(open_checkpoint(out), reference_state_dict(ft))
    assert torch.equal(logits(out), logits(ft))
    # the tokenizer travels too
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(out))("good movie")["input_ids"] == \
        AutoTokenizer.from_pretrained(str(ft))("good movie")["input_ids"]
    assert tree_hash(ft) == before
    # no temporary leftovers next to the output
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["out"]


def test_roundtrip_sharded_folder(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ck = open_checkpoint(ft)
    ref = reference_state_dict(ft)
    out = save_model_folder(tmp_path / "sharded", ck.state_dict(), like=ck, max_shard_bytes=4096)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    back = open_checkpoint(out)
    assert len(back.files) == n
    assert_same_tensors(back, ref)
    assert torch.equal(logits(out), logits(ft))
    # a sharded folder round-trips again into a single file, bit-exactly
    again = save_model_folder(tmp_path / "single", back.state_dict(), like=back)
    assert (again / "model.safetensors").is_file() and not list(again.glob("model-*"))
    assert_same_tensors(open_checkpoint(again), ref)


def test_roundtrip_bare_safetensors_and_mixed_dtypes(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ref = reference_state_dict(ft)
    ref["half"] = torch.randn(3, 5).to(torch.bfloat16)
    ref["f16"] = torch.randn(7).half()
    ref["ids"] = torch.arange(9).reshape(1, 9)
    ref["flag"] = torch.tensor([True, False, True])
    ref["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    ref["empty"] = torch.zeros(0, 4)
    p = save_tensors(tmp_path / "w" / "w.safetensors", ref, {"format": "pt", "note": "x"})
    with safe_open(str(p), framework="pt") as f:  # readable by safetensors itself
        assert f.metadata() == {"format": "pt", "note": "x"}
        for k in ref:
            assert torch.equal(f.get_tensor(k), ref[k]), k
    ck = open_checkpoint(p)
    assert ck.folder is None and ck.config is None and ck.path == p
    assert ck.name == "w"
    assert_same_tensors(ck, ref)
    assert [q.name for q in p.parent.iterdir()] == ["w.safetensors"]


def test_save_views_into_one_flat_buffer(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    tensors = {"a": flat[:6].view(2, 3), "b": flat[6:].view(3, 2), "overlap": flat[2:8],
               "nc": torch.arange(6.0).view(2, 3).t()}
    p = save_tensors(tmp_path / "v.safetensors", tensors)
    ck = open_checkpoint(p)
    for k, t in tensors.items():
        assert torch.equal(ck.get(k), t), k
        assert ck.get(k).is_contiguous()


def test_roundtrip_torch_bin_file_and_folder(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ref = reference_state_dict(ft)
    bare = tmp_path / "weights.pt"
    torch.save(ref, bare)
    ck = open_checkpoint(bare)
    assert isinstance(ck, TorchCheckpoint) and ck.folder is None and ck.config is None
    assert_same_tensors(ck, ref)
    # an HF folder with pytorch_model.bin -> saved as safetensors, loads the same
    folder = tmp_path / "binfolder"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((ft / name).read_bytes())
    torch.save(ref, folder / "pytorch_model.bin")
    ck2 = open_checkpoint(folder)
    assert isinstance(ck2, TorchCheckpoint) and ck2.config["model_type"] == "bert"
    assert_same_tensors(ck2, ref)
    out = save_model_folder(tmp_path / "converted", ck2.state_dict(), like=ck2)
    assert not list(out.glob("*.bin"))
    assert_same_tensors(open_checkpoint(out), ref)
    assert torch.equal(logits(out), logits(ft))
    # a checkpoint dict wrapping the state dict, in the legacy (non-zip) format
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": ref, "epoch": 3}, legacy, _use_new_zipfile_serialization=False)
    assert_same_tensors(open_checkpoint(legacy), ref)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"w": torch.zeros(2), "x": _Evil(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    # sanity: the payload really would create the file when unpickled unsafely
    assert not marker.exists()
    with pytest.raises(NPSError) as err:
        open_checkpoint(path)
    one_line_naming(err, path)
    assert "refused" in str(err.value)
    assert not marker.exists()
    # and through a model folder
    folder = tmp_path / "m"
    folder.mkdir()
    os.replace(path, folder / "pytorch_model.bin")
    with pytest.raises(NPSError):
        open_checkpoint(folder)
    assert not marker.exists()


def test_pickle_payload_really_runs_when_loaded_unsafely(tmp_path):
    """Guards the test above: the crafted file is dangerous for an unsafe loader."""
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"x": _Evil(str(marker))}, f)
    with open(tmp_path / "evil.bin", "rb") as f:
        pickle.load(f).get("x").close()
    assert marker.exists()


# -- bad inputs ---------------------------------------------------------------------------------
def test_missing_path_and_folder_without_weights(tmp_path):
    with pytest.raises(NPSError) as err:
        open_checkpoint(tmp_path / "nowhere")
    one_line_naming(err, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(NPSError) as err:
        open_checkpoint(empty)
    one_line_naming(err, empty)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(NPSError):
        open_checkpoint(tmp_path / "x.txt")


def test_truncated_and_corrupt_safetensors(tiny_bert, tmp_path):
    _, ft = tiny_bert
    data = (ft / "model.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(NPSError) as err:
        open_checkpoint(trunc)
    one_line_naming(err, trunc)
    # flip bytes inside the JSON header
    hlen = int.from_bytes(data[:8], "little")
    bad = bytearray(data)
    for i in range(8 + 5, 8 + min(hlen, 60)):
        bad[i] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(NPSError) as err:
        open_checkpoint(corrupt)
    one_line_naming(err, corrupt)
    # a header length pointing past the end of the file
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(NPSError):
        open_checkpoint(huge)
    # the same, inside a model folder
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NPSError) as err:
        open_checkpoint(folder)
    one_line_naming(err, folder / "model.safetensors")


def test_missing_shard_is_named(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ck = open_checkpoint(ft)
    out = save_model_folder(tmp_path / "sh", ck.state_dict(), like=ck, max_shard_bytes=4096)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(NPSError) as err:
        open_checkpoint(out)
    one_line_naming(err, victim.name)
    assert "missing" in str(err.value)


def test_shard_lacking_a_listed_tensor(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ck = open_checkpoint(ft)
    out = save_model_folder(tmp_path / "sh", ck.state_dict(), like=ck, max_shard_bytes=4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = sorted(index["weight_map"].values())[0]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NPSError, match="ghost.weight"):
        open_checkpoint(out)


# -- name matching ------------------------------------------------------------------------------
def test_match_names_bert_prefix(tiny_bert):
    base, ft = tiny_bert
    bk, fk = open_checkpoint(base).keys(), open_checkpoint(ft).keys()
    assert detect_prefix(bk, fk) == ("bert.", "ft")
    m = match_names(bk, fk)
    assert "classifier.weight" not in m and "classifier.bias" not in m
    assert len(m) == len(bk) == len(fk) - 2
    for f, b in m.items():
        assert f == "bert." + b
    assert list(m) == [k for k in fk if k in m]  # fine-tuned order


def test_match_names_reverse_identity_and_legacy():
    head = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
            "cls.predictions.bias"]
    plain = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"]
    # base is the head model (prefixed), fine-tuned is the bare encoder
    assert match_names(head, plain) == {p: "bert." + p for p in plain}
    # identical names map to themselves, unrelated ones are left out
    assert match_names(plain + ["x"], plain + ["y"]) == {p: p for p in plain}
    # legacy LayerNorm.gamma/beta names, as transformers renames them
    assert match_names(["enc.LayerNorm.gamma", "enc.LayerNorm.beta"],
                       ["roberta.enc.LayerNorm.weight", "roberta.enc.LayerNorm.bias", "head.w"]) == {
        "roberta.enc.LayerNorm.weight": "enc.LayerNorm.gamma",
        "roberta.enc.LayerNorm.bias": "enc.LayerNorm.beta"}
    assert match_names(["a.b"], ["c.d"]) == {}


# -- atomic outputs -----------------------------------------------------------------------------
def test_atomic_dir_exception_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert not (tmp_path / "sub").exists()
    # an existing output of ours survives a failed rewrite untouched
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / MARKER).is_file()
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
    # and a successful rewrite replaces it whole
    with atomic_output_dir(target) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_save_model_folder_failure_leaves_nothing(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ck = open_checkpoint(ft)
    sd = ck.state_dict()
    sd["bad"] = "not a tensor"
    with pytest.raises(NPSError, match="bad"):
        save_model_folder(tmp_path / "out", sd, like=ck)
    assert not (tmp_path / "out").exists()
    sd = ck.state_dict()
    sd["cplx"] = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(NPSError, match="cplx"):
        save_model_folder(tmp_path / "out", sd, like=ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_existing_foreign_folder_is_refused_empty_is_accepted(tiny_bert, tmp_path):
    _, ft = tiny_bert
    ck = open_checkpoint(ft)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(NPSError) as err:
        save_model_folder(foreign, ck.state_dict(), like=ck)
    one_line_naming(err, foreign)
    assert "exists; remove it or choose another" in str(err.value)
    assert (foreign / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model_folder(empty, ck.state_dict(), like=ck)
    assert (empty / "model.safetensors").is_file()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(NPSError):
        save_model_folder(f, ck.state_dict(), like=ck)
    assert f.read_text() == "x"


def test_refuses_to_write_into_or_over_an_input(tiny_bert, tmp_path):
    base, ft = tiny_bert
    before = {p: tree_hash(p) for p in (base, ft)}
    ck = open_checkpoint(ft)
    sd = ck.state_dict()
    for target in (ft, ft / "inside", ft.parent):  # equal, inside, input inside the output
        with pytest.raises(NPSError) as err:
            save_model_folder(target, sd, like=ck)
        one_line_naming(err, target.absolute())
    # via `inputs` (the base is not `like` here) and through a symlink
    with pytest.raises(NPSError):
        save_model_folder(base / "out", sd, like=ck, inputs=[base])
    link = tmp_path / "link"
    link.symlink_to(ft, target_is_directory=True)
    with pytest.raises(NPSError):
        save_model_folder(link, sd, like=ck)
    with pytest.raises(NPSError):
        save_tensors(ft / "model.safetensors", sd, inputs=[ck])
    with pytest.raises(NPSError):
        save_tensors(base / "extra.safetensors", sd, inputs=[base])
    with pytest.raises(NPSError):
        with atomic_output_dir(ft / "x", inputs=[str(ft)]):
            pass
    # a bare input file: writing next to it is fine, over it is not
    bare = save_tensors(tmp_path / "bare.safetensors", {"a": torch.ones(2)})
    with pytest.raises(NPSError):
        save_tensors(bare, {"a": torch.zeros(2)}, inputs=[bare])
    assert torch.equal(open_checkpoint(bare).get("a"), torch.ones(2))
    save_tensors(tmp_path / "next.safetensors", {"a": torch.zeros(2)}, inputs=[bare])
    for p, h in before.items():
        assert tree_hash(p) == h


def test_side_files_copied_weight_files_not(tiny_bert, tmp_path):
    _, ft = tiny_bert
    src = tmp_path / "src"
    import shutil
    shutil.copytree(ft, src)
    ck0 = open_checkpoint(src)
    ref = reference_state_dict(src)
    (src / "generation_config.json").write_text("{}")
    (src / "special_tokens_map.json").write_text("{}")
    (src / "modules.json").write_text("[]")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "1_Pooling" / "stale.safetensors").write_bytes(b"junk")
    torch.save({"old": torch.zeros(1)}, src / "pytorch_model.bin")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / MARKER).write_text("{}")
    ck = open_checkpoint(src)
    assert ck.files == ck0.files  # safetensors preferred over the .bin
    out = save_model_folder(tmp_path / "out", ck.state_dict(), like=ck, max_shard_bytes=4096)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "special_tokens_map.json", "modules.json", "1_Pooling", MARKER} <= names
    assert not names & {"pytorch_model.bin", "pytorch_model.bin.index.json", ".git",
                        "model.safetensors"}
    assert [p.name for p in (out / "1_Pooling").iterdir()] == ["config.json"]
    assert json.loads((out / MARKER).read_text())["tool"] == "nps-pruning"
    assert_same_tensors(open_checkpoint(out), ref)
