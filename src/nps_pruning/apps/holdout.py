"""How the NPS search's result is chosen: the held-out re-scoring of its finalists (against the
winner's curse), the note report.json carries about it, and the LM evaluators' logits peak that
the prune's report records."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..evaluation import eval_kind
from ..search.scorer import CandidateScorer
from .session import Session

__all__ = ["holdout_finalists", "rescore_on_holdout", "holdout_note", "logits_peak"]


def logits_peak(*evaluators) -> Dict[str, int]:
    """The largest logits tensor a language-model evaluator's forward pass returned in this
    process (bounded by evaluation.lm.LOGITS_BUDGET_BYTES; none for other evaluators)."""
    peak = max([int((getattr(e, "memory", None) or {}).get("peak_logits_bytes", 0))
                for e in evaluators if e is not None] + [0])
    return {"eval_peak_logits_bytes": peak} if peak else {}


def holdout_note(share: float, evaluator, holdout, eval_spec: str, min_rows: int) -> Dict[str, Any]:
    """report.json's word on how the search's result was chosen: on held-out rows, or (why not)
    by the best search score on every calibration row."""
    if holdout is not None:
        return {"share": float(share), "search_rows": int(evaluator.num_rows),
                "held_out_rows": int(holdout.num_rows), "chosen_by": "held-out score"}
    note: Dict[str, Any] = {"share": float(share or 0.0), "chosen_by": "search score"}
    if share and eval_kind(eval_spec).own_score:
        note["why"] = "the evaluator returns its own score: it has no rows to hold out"
    elif share:
        note["search_rows"] = int(evaluator.num_rows)
        note["why"] = (f"a {share:g} hold-out of {evaluator.num_rows} calibration rows would hold "
                       f"out fewer than {min_rows} (--holdout-min-rows): too few to overrule the "
                       "search score, so the search used every row")
        note["holdout_min_rows"] = int(min_rows)
    return note


def holdout_finalists(candidates, top: int) -> List[dict]:
    """The candidates :func:`rescore_on_holdout` re-scores: every scored generation-0 point, then
    the ``top`` best distinct ones of the later generations (by search score, the earlier on ties)."""
    ok = [c for c in candidates if c.get("status") == "ok" and c.get("score") is not None]
    pool, seen = [], set()
    starts = [c for c in ok if int(c["gen"]) == 0]
    ranked = sorted((c for c in ok if int(c["gen"]) > 0), key=lambda c: -c["score"])
    for c in starts + ranked:
        key = tuple(round(float(v), 12) for v in c["weights"])
        if key in seen:
            continue
        seen.add(key)
        pool.append(c)
        if len(pool) >= len(starts) + top:
            break
    return pool


def rescore_on_holdout(session: Session, prepared, result, holdout, top: int,
                       autocast: Optional[str] = None, cpu_linear: str = "onednn"):
    """Against the winner's curse: re-score the generation-0 start points and the ``top`` best
    distinct candidates of the search on held-out calibration rows; return (chosen record,
    rows). The chosen one has the best held-out score (ties: the better search score, then the
    earlier candidate)."""
    pool = holdout_finalists(result.candidates, top)
    rows = []
    session.ensure_model()
    # the session's θ_pre (or, parked, the model itself) under each finalist in turn
    writer = CandidateScorer.from_state(session.base_flat, prepared, session.model, session.flat,
                                        holdout, autocast=autocast, cpu_linear=cpu_linear)
    for c in pool:
        w = np.asarray(c["weights"], dtype=np.float64)
        hs, _ = writer(w)
        rows.append({"gen": int(c["gen"]), "idx": int(c["idx"]), "weights": c["weights"],
                     "search_score": c["score"], "holdout_score": hs, "start": c.get("start")})
    writer.restore()
    best = max(range(len(rows)), key=lambda i: (rows[i]["holdout_score"], rows[i]["search_score"], -i))
    return pool[best], rows
