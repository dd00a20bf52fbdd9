"""Shared fixtures: tiny real `transformers` models built inside the tests (never committed)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("good great fine bad awful poor movie film plot actor story the a is was very not "
         "fun dull love hate boring exciting").split()


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores vocab_file here (every word became [UNK]): pass the vocabulary itself
    try:
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:
        tok = None
    if tok is None or len(tok) != len(vocab):
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    assert len(tok) == len(vocab) and tok.unk_token_id not in tok("good movie")["input_ids"]
    return tok, len(vocab)


def make_tiny_bert(root: Path, num_labels: int = 2, seed: int = 0, finetune_noise: float = 0.02):
    """Writes root/base (BertModel, as the shipped MiniLM is) and root/ft
    (BertForSequenceClassification = base + small perturbation + a new head). Returns both paths."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    tok, vocab_size = _tokenizer(root / "_vocab")
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(seed)
    base = BertModel(cfg, add_pooling_layer=True)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    ft = BertForSequenceClassification(cfg)
    ft.bert.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.bert.parameters():
            p.add_(finetune_noise * torch.randn(p.shape, generator=g))
    ft.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def write_text_csv(path: Path, rows: int = 40, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(rows):
            idx = torch.randint(len(WORDS), (6,), generator=g).tolist()
            text = " ".join(WORDS[i] for i in idx)
            label = int(sum(1 for i in idx if WORDS[i] in ("good", "great", "fine", "love", "fun")) > 0)
            w.writerow([text, label])
    return path


@pytest.fixture
def tiny_bert(tmp_path):
    """(base_folder, finetuned_folder) of a tiny BERT pair with tokenizers."""
    return make_tiny_bert(tmp_path / "models")


@pytest.fixture
def text_csv(tmp_path):
    return write_text_csv(tmp_path / "data.csv")
