"""Full fine-tuning of the benchmark's pre-trained models (SPEC §4), CPU-friendly and seeded.

Text: ``BertForSequenceClassification`` initialised from the shipped all-MiniLM-L6-v2 ``BertModel``
folder (AdamW, linear warm-up/decay, batch 32, max_length 64, length-bucketed batches).
Vision: :class:`~nps_bench.vision_model.GrayMobileNetV2` initialised from the ImageNet
backbone (AdamW, cosine decay, batch 64).

Every function here is pure with respect to the file system except where it is handed an output
directory; the caching / atomic layout is in :mod:`nps_bench.suites`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split, Splits

MAX_THREADS = 2


def set_threads(n: int | None = None) -> None:
    torch.set_num_threads(max(1, min(n or MAX_THREADS, MAX_THREADS)))


@dataclass
class TextSettings:
    epochs: int = 2
    lr: float = 8e-5
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0


@dataclass
class VisionSettings:
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64
    image_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0


def _log(progress: bool | Callable, msg: str) -> None:
    if progress is True:
        print(msg, flush=True)
    elif callable(progress):
        progress(msg)


def majority_accuracy(train: Split, test: Split) -> float:
    """Accuracy on `test` of always predicting the most frequent `train` label."""
    maj = int(np.bincount(np.asarray(train.y)).argmax())
    return float(np.mean(np.asarray(test.y) == maj))


# ------------------------------------------------------------------------------ text
def _length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar length. With rng: shuffled, sorted by length inside chunks of 50 batches,
    batch order shuffled. Without: plain length order (evaluation)."""
    n = len(lengths)
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    perm = rng.permutation(n)
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        idx = perm[s:s + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: list[list[int]], idx, pad_id: int):
    seqs = [ids[i] for i in idx]
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, :len(s)] = torch.tensor(s)
        attn[r, :len(s)] = 1
    return input_ids, attn


@torch.no_grad()
def text_accuracy(model, tokenizer, split: Split, *, max_length: int = 64, batch_size: int = 64,
                  ids: list[list[int]] | None = None) -> float:
    model.eval()
    ids = ids if ids is not None else _encode(tokenizer, split.x, max_length)
    y = torch.as_tensor(np.asarray(split.y))
    correct = 0
    for idx in _length_batches([len(s) for s in ids], batch_size, None):
        input_ids, attn = _collate(ids, idx, tokenizer.pad_token_id or 0)
        logits = model(input_ids=input_ids, attention_mask=attn).logits
        correct += int((logits.argmax(-1) == y[idx]).sum())
    return correct / max(1, len(ids))


def finetune_text(splits: Splits, base_path, out_dir, settings: TextSettings, *,
                  progress: bool | Callable = True) -> dict:
    """Fine-tunes all-MiniLM (or any BertModel folder) on `splits`; saves the model + tokenizer
    into `out_dir` (save_pretrained, safetensors). Returns metrics and timings."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging
    set_threads()
    hf_logging.set_verbosity_error()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(base_path))
    torch.manual_seed(settings.seed)
    id2label = {i: n for i, n in enumerate(splits.class_names)}
    model = BertForSequenceClassification.from_pretrained(
        str(base_path), num_labels=splits.num_classes, id2label=id2label,
        label2id={n: i for i, n in id2label.items()})
    tr_ids = _encode(tok, splits.train.x, settings.max_length)
    te_ids = _encode(tok, splits.test.x, settings.max_length)
    t_prep = time.time() - t0

    t = time.time()
    pre_acc = text_accuracy(model, tok, splits.test, max_length=settings.max_length, ids=te_ids)
    t_eval_pre = time.time() - t
    _log(progress, f"  [{splits.name}] pre-trained body + untrained head: test acc {pre_acc:.4f} ({t_eval_pre:.0f}s)")

    no_decay = ("bias", "LayerNorm.weight")
    params = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
               "weight_decay": settings.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    rng = np.random.default_rng(settings.seed)
    steps_per_epoch = math.ceil(len(tr_ids) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    y = torch.as_tensor(np.asarray(splits.train.y))
    lengths = [len(s) for s in tr_ids]
    t = time.time()
    step = 0
    model.train()
    for ep in range(settings.epochs):
        run_loss = 0.0
        for idx in _length_batches(lengths, settings.batch_size, rng):
            input_ids, attn = _collate(tr_ids, idx, tok.pad_token_id or 0)
            loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=attn).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step(); step += 1
            run_loss += loss.item()
        _log(progress, f"  [{splits.name}] epoch {ep + 1}/{settings.epochs}: mean loss "
                       f"{run_loss / steps_per_epoch:.4f} ({time.time() - t:.0f}s)")
    t_train = time.time() - t

    t = time.time()
    ft_acc = text_accuracy(model, tok, splits.test, max_length=settings.max_length, ids=te_ids)
    t_eval_ft = time.time() - t
    # head only: the pre-trained body with the fine-tuned head (keep ratio 0 for τ)
    ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_model = BertForSequenceClassification.from_pretrained(str(base_path), num_labels=splits.num_classes)
    base_model.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in ft_state.items()
                                           if k.startswith("classifier.")})
    head_acc = text_accuracy(base_model, tok, splits.test, max_length=settings.max_length, ids=te_ids)
    del base_model
    _log(progress, f"  [{splits.name}] fine-tuned: test acc {ft_acc:.4f}; pre-trained body + fine-tuned "
                   f"head: {head_acc:.4f}")

    model.eval()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return {"finetuned_acc": ft_acc, "pretrained_acc": pre_acc, "head_only_acc": head_acc,
            "majority_acc": majority_accuracy(splits.train, splits.test),
            "settings": asdict(settings), "steps": step,
            "timings": {"prepare_s": t_prep, "train_s": t_train, "eval_s": t_eval_pre + t_eval_ft,
                        "total_s": time.time() - t0}}


# ------------------------------------------------------------------------------ vision
@torch.no_grad()
def image_accuracy(model, split: Split, *, batch_size: int = 256) -> float:
    model.eval()
    x = torch.as_tensor(np.asarray(split.x))
    y = torch.as_tensor(np.asarray(split.y))
    correct = 0
    for s in range(0, len(y), batch_size):
        correct += int((model(x[s:s + batch_size]).argmax(-1) == y[s:s + batch_size]).sum())
    return correct / max(1, len(y))


def finetune_vision(splits: Splits, base_state: dict[str, torch.Tensor], settings: VisionSettings, *,
                    progress: bool | Callable = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tunes GrayMobileNetV2 (backbone from `base_state`, new seeded head) on `splits`.
    Returns (fine-tuned state dict incl. classifier, metrics)."""
    from .vision_model import GrayMobileNetV2
    set_threads()
    t0 = time.time()
    torch.manual_seed(settings.seed)
    model = GrayMobileNetV2(num_classes=splits.num_classes, image_size=settings.image_size)
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)

    t = time.time()
    pre_acc = image_accuracy(model, splits.test)
    t_eval_pre = time.time() - t
    _log(progress, f"  [{splits.name}] pre-trained backbone + untrained head: test acc {pre_acc:.4f} ({t_eval_pre:.0f}s)")

    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    x = torch.as_tensor(np.asarray(splits.train.x))
    y = torch.as_tensor(np.asarray(splits.train.y))
    n = len(y)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(settings.seed)
    t = time.time()
    for ep in range(settings.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        run_loss = 0.0
        for s in range(0, n, settings.batch_size):
            idx = perm[s:s + settings.batch_size]
            if len(idx) < 2:    # BatchNorm needs >1 sample
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            run_loss += loss.item()
        _log(progress, f"  [{splits.name}] epoch {ep + 1}/{settings.epochs}: mean loss "
                       f"{run_loss / steps_per_epoch:.4f} ({time.time() - t:.0f}s)")
    t_train = time.time() - t

    t = time.time()
    ft_acc = image_accuracy(model, splits.test)
    t_eval_ft = time.time() - t
    ft_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    head = GrayMobileNetV2(num_classes=splits.num_classes, image_size=settings.image_size)
    head.load_state_dict({**base_state, **{k: v for k, v in ft_state.items() if k.startswith("classifier.")}},
                         strict=True)
    head_acc = image_accuracy(head, splits.test)
    _log(progress, f"  [{splits.name}] fine-tuned: test acc {ft_acc:.4f}; pre-trained backbone + "
                   f"fine-tuned head: {head_acc:.4f}")
    return ft_state, {"finetuned_acc": ft_acc, "pretrained_acc": pre_acc, "head_only_acc": head_acc,
                      "majority_acc": majority_accuracy(splits.train, splits.test),
                      "settings": asdict(settings), "steps": total,
                      "timings": {"train_s": t_train, "eval_s": t_eval_pre + t_eval_ft,
                                  "total_s": time.time() - t0}}
