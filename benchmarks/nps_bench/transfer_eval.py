"""The "source ability" of the text suite's transfer benchmark (Table 1 of the paper).

The pre-trained all-MiniLM-L6-v2 is a sentence-embedding model: its ability is the quality of
its mean-pooled embeddings as frozen features. :class:`KnnSourceEvaluator` measures it as k-NN
accuracy (k = 10, cosine similarity, majority vote; ties broken by the summed similarity) on
*other* text tasks' data: for each other task, a fixed reference set and a fixed query set are
embedded by the model being scored, and each query is labelled by its k nearest references.
The score is the mean accuracy over the other tasks.

Rows come from each other task's calibration split, cut by a seeded permutation into
``reference`` | ``select`` | ``report`` parts: ``part="select"`` queries the rows used to choose
λ, ``part="report"`` the held-out rows the table reports. The evaluator is picklable (it keeps
raw texts and tokenizes lazily, on the first call).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder of a sequence-classification model (``model.bert`` for BERT-like models,
    ``base_model`` otherwise)."""
    for attr in ("bert", "roberta", "distilbert", "encoder_model"):
        enc = getattr(model, attr, None)
        if isinstance(enc, torch.nn.Module):
            return enc
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def split_sizes(n: int, ref: int, select: int, report: int) -> Tuple[int, int, int]:
    """The requested sizes when n rows allow them, else the rows shared in the same proportions."""
    want = ref + select + report
    if n >= want:
        return ref, select, report
    r = max(1, n * ref // want)
    s = max(1, n * select // want)
    return r, s, max(1, n - r - s)


class KnnSourceEvaluator:
    """k-NN accuracy of mean-pooled encoder embeddings on other tasks' data (see module doc)."""

    def __init__(self, sources: Sequence[Tuple[str, Sequence[str], Sequence[int]]], tokenizer_path: str,
                 *, part: str = "report", k: int = 10, ref_rows: int = 150, select_rows: int = 100,
                 report_rows: int = 150, seed: int = 0, max_length: int = 64, batch_size: int = 64):
        if part not in ("select", "report"):
            raise ValueError(f"part must be 'select' or 'report', not {part!r}")
        self.tokenizer_path = str(tokenizer_path)
        self.part, self.k, self.seed = part, int(k), int(seed)
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.sources: List[dict] = []
        for name, texts, labels in sources:
            texts, labels = list(texts), np.asarray(labels, dtype=np.int64)
            n_ref, n_sel, n_rep = split_sizes(len(texts), ref_rows, select_rows, report_rows)
            perm = np.random.default_rng(self.seed).permutation(len(texts))
            ref = perm[:n_ref]
            query = perm[n_ref:n_ref + n_sel] if part == "select" else \
                perm[n_ref + n_sel:n_ref + n_sel + n_rep]
            self.sources.append({"name": name,
                                 "ref_texts": [texts[i] for i in ref], "ref_labels": labels[ref],
                                 "query_texts": [texts[i] for i in query], "query_labels": labels[query]})
        self.name = f"knn{self.k}-source[{part}]:" + ",".join(s["name"] for s in self.sources)
        self.num_rows = int(sum(len(s["query_texts"]) for s in self.sources))
        self.embedded_rows = int(sum(len(s["query_texts"]) + len(s["ref_texts"]) for s in self.sources))
        self._batches: Optional[Dict[str, list]] = None
        self.last_per_source: Dict[str, float] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_batches"] = None
        return state

    def _prepare(self) -> None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self._batches = {}
        for s in self.sources:
            for which in ("ref", "query"):
                texts = s[f"{which}_texts"]
                batches = []
                for i in range(0, len(texts), self.batch_size):
                    enc = tok(texts[i:i + self.batch_size], truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")
                    batches.append({k: v for k, v in enc.items()
                                    if k in ("input_ids", "attention_mask", "token_type_ids")})
                self._batches[f"{s['name']}/{which}"] = batches

    @torch.inference_mode()
    def _embed(self, encoder, key: str) -> torch.Tensor:
        out = []
        for batch in self._batches[key]:
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def _knn_accuracy(self, ref: torch.Tensor, ref_labels: np.ndarray, query: torch.Tensor,
                      query_labels: np.ndarray) -> float:
        sims = query @ ref.T
        k = min(self.k, ref.shape[0])
        top = torch.topk(sims, k, dim=1)
        labels = torch.as_tensor(ref_labels)[top.indices]            # (Q, k)
        num_classes = int(max(ref_labels.max(), query_labels.max())) + 1
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, labels, torch.ones_like(top.values))
        weight = torch.zeros(query.shape[0], num_classes)
        weight.scatter_add_(1, labels, top.values)
        # majority vote; ties by summed similarity (votes dominate: weights are < k)
        pred = (votes * (k + 1) + weight).argmax(dim=1).numpy()
        return float(np.mean(pred == query_labels))

    def __call__(self, model: torch.nn.Module) -> float:
        if self._batches is None:
            self._prepare()
        encoder = encoder_of(model)
        accs = {}
        for s in self.sources:
            ref = self._embed(encoder, f"{s['name']}/ref")
            query = self._embed(encoder, f"{s['name']}/query")
            accs[s["name"]] = self._knn_accuracy(ref, s["ref_labels"], query, s["query_labels"])
        self.last_per_source = accs
        return float(np.mean(list(accs.values())))

    def __repr__(self) -> str:
        return f"KnnSourceEvaluator({self.name!r}, num_rows={self.num_rows})"
