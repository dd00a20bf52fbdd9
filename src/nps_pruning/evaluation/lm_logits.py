"""The language-model evaluators' forward passes (:mod:`.lm`): per-token log-probabilities and each
row's last-position logits, with the logits of one forward pass bounded by a memory budget
(:data:`LOGITS_BUDGET_BYTES`: a batch that would need more goes through the model in slices of
rows, with the same scores)."""
from __future__ import annotations

import inspect

import torch

from .fitness import LOG_FLOOR
from .model import logits_of
from .text import forward_or_explain

__all__ = ["LOGITS_BUDGET_BYTES", "rows_per_forward", "token_logp", "last_logits"]


# The most logits one forward pass of an LM evaluator may return (rows × width × vocabulary × 4
# bytes): a batch that would need more is scored in as many slices of rows as it takes (a row
# alone may exceed it). At 1 GiB the benchmark's SmolLM2 batches (49k vocabulary, 16 rows of
# <= 128 tokens: 0.4 GB) are one slice; a 262k vocabulary at 64 × 128 tokens (8.6 GB) is 8 slices.
LOGITS_BUDGET_BYTES = 1 << 30


def _vocab_size(model) -> int | None:
    """The number of logits a position gets: the output embedding's rows, else the config's."""
    try:
        out = model.get_output_embeddings()
        if out is not None and getattr(out, "weight", None) is not None:
            return int(out.weight.shape[0])
    except Exception:
        pass
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) and v > 0 else None


def rows_per_forward(model, rows: int, positions: int, budget: int | None = None) -> int:
    """How many rows of ``positions`` logits each go into one forward pass so that its logits stay
    within ``budget`` bytes (default :data:`LOGITS_BUDGET_BYTES`, float32 counted): all ``rows``
    when they fit or the vocabulary is unknown, at least 1."""
    vocab = _vocab_size(model)
    budget = LOGITS_BUDGET_BYTES if budget is None else int(budget)
    if vocab is None or rows * positions * vocab * 4 <= budget:
        return max(1, rows)
    return max(1, budget // (positions * vocab * 4))


def _note_peak(stats, logits: torch.Tensor) -> None:
    if stats is not None:
        n = logits.numel() * logits.element_size()
        stats["peak_logits_bytes"] = max(int(stats.get("peak_logits_bytes", 0)), n)


def token_logp(model, ids, mask, source, stats=None) -> torch.Tensor:
    """log p(token t | tokens < t) for t ≥ 1: a (batch, width − 1) float tensor. The rows go
    through the model in slices whose logits fit :data:`LOGITS_BUDGET_BYTES` (the whole batch
    at once when it fits), and the log-softmax runs one row at a time, so besides one slice's
    logits it holds one row's (width × vocabulary). ``stats["peak_logits_bytes"]``: the largest
    logits tensor a forward returned."""
    got = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32, device=ids.device)
    step = rows_per_forward(model, ids.shape[0], ids.shape[1])
    for s in range(0, ids.shape[0], step):
        e = min(ids.shape[0], s + step)
        part = ids if (s, e) == (0, ids.shape[0]) else ids[s:e]
        logits = logits_of(forward_or_explain(model, source, input_ids=part,
                                              attention_mask=mask if part is ids else mask[s:e]))
        _note_peak(stats, logits)
        for i in range(e - s):
            logp = torch.log_softmax(logits[i, :-1].float(), dim=-1)
            got[s + i] = logp.gather(1, part[i, 1:].unsqueeze(-1)).squeeze(-1)
        del logits
    return torch.nan_to_num(got, nan=LOG_FLOOR, neginf=LOG_FLOOR).clamp_min(LOG_FLOOR)


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def last_logits(model, ids, mask, source, stats=None) -> torch.Tensor:
    """(batch, vocabulary) logits at each row's last real token (right-padded ``ids``).

    A ``transformers`` causal LM is asked for those positions alone (``logits_to_keep`` as a
    (batch, 1) tensor of positions, transformers ≥ 5), so the LM head projects one position a row
    instead of every position: for a 50k-word vocabulary at batch 16 × 128 tokens that is 3 MB of
    logits instead of 400 MB. A model that does not take it, or answers in another shape (an
    older transformers), is scored with its full logits, as before."""
    last = mask.sum(dim=1) - 1
    keep = getattr(model, "_nps_logits_to_keep", None)     # None: not asked yet
    if keep is None:
        keep = _takes_logits_to_keep(model)
    if keep:
        try:
            out = logits_of(model(input_ids=ids, attention_mask=mask, logits_to_keep=last.unsqueeze(1)))
        except (TypeError, ValueError, RuntimeError, IndexError):
            out = None
        keep = out is not None and out.dim() == 3 and out.shape[:2] == (ids.shape[0], 1)
    try:
        object.__setattr__(model, "_nps_logits_to_keep", keep)   # ask (or not) the same next time
    except Exception:
        pass
    if keep:
        _note_peak(stats, out)
        return out[:, 0].float()
    rows = []                      # the full logits: in slices that fit the budget
    step = rows_per_forward(model, ids.shape[0], ids.shape[1])
    for s in range(0, ids.shape[0], step):
        e = min(ids.shape[0], s + step)
        whole = (s, e) == (0, ids.shape[0])
        logits = logits_of(forward_or_explain(model, source, input_ids=ids if whole else ids[s:e],
                                              attention_mask=mask if whole else mask[s:e]))
        _note_peak(stats, logits)
        rows.append(logits[torch.arange(e - s, device=ids.device), last[s:e]].float())
        del logits
    return rows[0] if len(rows) == 1 else torch.cat(rows)
