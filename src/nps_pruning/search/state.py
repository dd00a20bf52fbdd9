"""What a search has seen so far: every candidate, the generation summaries, the best, failures.

:class:`SearchState` scores (or replays from the log) one generation at a time, turns each outcome
into a record (logged at once), keeps the best and the consecutive-failure count, and builds the
:class:`SearchResult`. ``run_search`` (cmaes_search.py) is a loop over it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import NPSError
from ..evaluation.fitness import score_from_rows
from .race import race_order, race_schedule, survivors, told_scores
from .search_log import Records, SearchLog, settings_dict

_FAILED_TOLD_MARGIN = 1.0  # a failed candidate is told "worst score seen minus this"
_RECORD_KEYS = ("gen", "idx", "weights", "score", "status", "error", "build_s", "eval_s", "examples")
_RACE_KEYS = ("rows_scored", "eliminated_at", "partial_score")   # raced generations' records only


def best_up_to(candidates: List[dict], generation: int) -> Optional[dict]:
    """The candidate ``run_search`` returns had it stopped after ``generation`` generations:
    the highest-scoring successful record with ``gen <= generation``, the earliest on ties.
    (CMA-ES never looks at the number of generations to come, so a longer run's first G
    generations are exactly a G-generation run.)"""
    best = None
    for rec in candidates:
        if int(rec["gen"]) <= generation and rec.get("status", "ok") == "ok" and rec.get("score") is not None:
            if best is None or rec["score"] > best["score"]:
                best = rec
    return best


@dataclass
class SearchResult:
    best_weights: np.ndarray
    best_score: float
    baseline_score: Optional[float]     # score of w = 1 (None if it failed)
    candidates: List[dict]              # every candidate scored, in ask order (gen, idx)
    generations: List[dict]             # one summary per generation (0 = baseline)
    stopped_early: Optional[str]        # None, or why the run stopped before the last generation
    seconds: float
    reused: int = 0                     # candidates taken from the log on resume
    settings: Optional[dict] = None
    num_bands: int = 0
    stopped_at: Optional[int] = None    # the last generation run when --patience stopped it
    cma_free: Optional[List[int]] = None  # the second stream's free coordinates (None: one stream)

    def to_dict(self) -> dict:
        """JSON-ready form (for report.json)."""
        extra = {} if self.stopped_at is None else {"stopped_at": self.stopped_at}
        if self.cma_free is not None:
            extra["cma_free"] = list(self.cma_free)
        return {**extra,
            "num_bands": self.num_bands,
            "settings": self.settings,
            "best_weights": [float(x) for x in self.best_weights],
            "best_score": self.best_score,
            "baseline_score": self.baseline_score,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "reused": self.reused,
            "generations": self.generations,
            "candidates": self.candidates,
        }


class SearchAborted(NPSError):
    """Too many consecutive candidates failed; ``.result`` holds the partial SearchResult."""

    def __init__(self, message: str, result: SearchResult):
        super().__init__(message)
        self.result = result


def _normalize(result: Any) -> Tuple[float, dict]:
    """A scorer returns (score, info) or a bare number."""
    if isinstance(result, tuple) and len(result) == 2:
        score, info = result
    else:
        score, info = result, {}
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise NPSError(f"scorer returned {type(score).__name__}, not a number") from None
    if not math.isfinite(score):
        raise NPSError(f"scorer returned a non-finite score ({score})")
    return score, dict(info or {})


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {msg}" if msg and name not in ("NPSError", "CandidateError") else (msg or name)


def _new_record(gen: int, idx: int, weights: np.ndarray, outcome) -> dict:
    """The record of a freshly scored candidate; ``outcome`` is the executor's (score, info),
    info an exception when scoring raised."""
    score, info = outcome
    rec = {"gen": gen, "idx": idx, "weights": [float(v) for v in weights],
           "score": None, "status": "ok", "error": None, "build_s": None, "eval_s": None}
    if isinstance(info, BaseException):
        rec.update(status="failed", error=_error_text(info))
        return rec
    try:
        score, info = _normalize((score, info))
        rec["score"] = score
    except NPSError as exc:
        rec.update(status="failed", error=str(exc))
    if isinstance(info, dict):
        for key in ("build_s", "eval_s"):
            if info.get(key) is not None:
                rec[key] = float(info[key])
        if info.get("examples") is not None:
            rec["examples"] = int(info["examples"])
        if rec["eval_s"] is None and info.get("wall_s") is not None:
            rec["eval_s"] = float(info["wall_s"])
    return rec


def _is_record(outcome) -> bool:
    return isinstance(outcome, dict) and "status" in outcome and "gen" in outcome


def _add_times(o: dict, info, rows: int) -> None:
    info = info if isinstance(info, dict) else {}
    for key in ("build_s", "eval_s"):
        if info.get(key) is not None:
            o[key] += float(info[key])
    o["examples"] += int(info["examples"]) if info.get("examples") is not None else int(rows)


def _race_record(gen: int, idx: int, weights: np.ndarray, o: dict) -> dict:
    """The record of one raced candidate (race.py): failed, eliminated, or a finalist with its
    full score; times and ``examples`` summed over every stage it was scored in."""
    rows = int(len(o["values"]))
    if o["full"] is not None:
        rec = _new_record(gen, idx, weights, o["full"])
        full_examples = rec.get("examples")
        rec["rows_scored"] = int(o["num_rows"]) if rec["status"] == "ok" else rows
    else:
        rec = _new_record(gen, idx, weights, (None, o["error"]) if o["error"] is not None
                          else (0.0, {}))
        full_examples = None
        rec["rows_scored"] = rows
        if o["error"] is None:
            rec.update(status="eliminated", score=None, eliminated_at=int(o["eliminated_at"]),
                       partial_score=score_from_rows(o["fitness"], o["values"]))
    if rec["status"] != "failed" or rows:
        for key in ("build_s", "eval_s"):
            rec[key] = (rec.get(key) or 0.0) + o[key]
    if full_examples is None and rec["status"] == "ok":
        full_examples = int(o["num_rows"])        # a scorer that does not count: every row
    rec["examples"] = o["examples"] + int(full_examples or 0)
    rec.setdefault("eliminated_at", None)
    return rec


def scores_of(recs: Sequence[dict]) -> List[Optional[float]]:
    """Each record's score, None where it failed (what a search space's refine/mean0 take)."""
    return [r["score"] if r["status"] == "ok" else None for r in recs]


class SearchState:
    """One run's candidates, generation summaries, best and failure count.

    ``previous``: the records of the log being resumed ({(gen, idx): record}); a candidate found
    there with the same weights is replayed, not scored again."""

    def __init__(self, *, scorer: Callable, executor, space, settings, num_bands: int,
                 log: SearchLog, previous: Optional[Records] = None,
                 on_generation: Optional[Callable[[dict], None]] = None,
                 t_start: Optional[float] = None):
        self.scorer, self.executor, self.space, self.settings = scorer, executor, space, settings
        self.num_bands, self.log, self.previous = num_bands, log, previous or {}
        self.on_generation = on_generation
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.candidates: List[dict] = []
        self.generations: List[dict] = []
        self.best: Optional[dict] = None
        self.best_score = -math.inf
        self.consecutive = 0             # failed candidates in a row
        self.last_error = ""
        self.reused = 0                  # candidates replayed from the log
        self.worst = math.inf            # the lowest successful (or partial) score seen
        self.stopped_early: Optional[str] = None
        self.stopped_at: Optional[int] = None
        self.best_gen: Optional[int] = None   # the generation of the best candidate
        self.examples = 0                # calibration rows forwarded so far (logged records)
        self.cma_free: Optional[List[int]] = None   # the second stream's free coordinates

    # -- candidates ------------------------------------------------------------------------
    def record(self, gen: int, idx: int, weights: np.ndarray, outcome,
               reused: Optional[dict]) -> dict:
        """Turn one scored (or replayed) candidate into a record; log it; track best/failures.
        Raises :class:`SearchAborted` after ``settings.max_failures`` failures in a row."""
        if reused is not None:
            rec = {k: reused.get(k) for k in _RECORD_KEYS}
            rec.update({k: reused[k] for k in _RACE_KEYS if k in reused})
            self.reused += 1
        else:
            rec = outcome if _is_record(outcome) else _new_record(gen, idx, weights, outcome)
            self.log.write(rec)
        self.candidates.append(rec)
        self.examples += int(rec.get("examples") or 0)
        if rec["status"] == "ok":
            self.consecutive = 0
            self.worst = min(self.worst, rec["score"])
            if rec["score"] > self.best_score:        # ties: the earliest stays
                self.best, self.best_score, self.best_gen = rec, rec["score"], gen
        elif rec["status"] == "eliminated":           # scored on some rows: not a failure
            self.consecutive = 0
            self.worst = min(self.worst, rec["partial_score"])
        else:
            self.consecutive += 1
            self.last_error = rec["error"] or "unknown error"
            if self.consecutive >= self.settings.max_failures:
                self.abort(f"candidate scoring failed {self.consecutive} times in a row: "
                           f"{self.last_error}")
        return rec

    def _replayable(self, gen: int, idx: int, weights: np.ndarray,
                    raced: bool = False) -> Optional[dict]:
        """The logged record of (gen, idx) if it succeeded with these very weights (``raced``:
        a record of a raced generation, a finalist or an eliminated candidate)."""
        old = self.previous.get((gen, idx))
        statuses = ("ok", "eliminated") if raced else ("ok",)
        ok = (old is not None and old.get("status") in statuses
              and (not raced or old.get("rows_scored") is not None)
              and len(old.get("weights") or ()) == self.space.dim
              and np.allclose(np.asarray(old["weights"], dtype=np.float64), weights,
                              rtol=0.0, atol=1e-12))
        return old if ok else None

    def score_generation(self, gen: int, xs: Sequence[np.ndarray], first: int = 0) -> List[dict]:
        """Score (or replay) one generation's candidates, given in CMA-ES coordinates (indices
        from ``first``); records in ask order."""
        weights = [self.space.to_params(x) for x in xs]
        reuse = [self._replayable(gen, idx, w) for idx, w in enumerate(weights, start=first)]
        ex = self.executor
        if getattr(ex, "kind", None) == "serial":
            # one at a time: each candidate is logged as soon as it is scored, and an abort
            # stops before scoring the rest of the generation
            return [self.record(gen, first + i, w,
                                None if reuse[i] is not None else ex.map(self.scorer, [w])[0],
                                reuse[i])
                    for i, w in enumerate(weights)]
        todo = [i for i, r in enumerate(reuse) if r is None]
        outcomes = dict(zip(todo, ex.map(self.scorer, [weights[i] for i in todo]))) if todo else {}
        return [self.record(gen, first + i, w, outcomes.get(i), reuse[i])
                for i, w in enumerate(weights)]

    def told(self, xs: Sequence[np.ndarray], recs: Sequence[dict]) -> List[Tuple[np.ndarray, float]]:
        """What CMA-ES is told for one generation: (x, -score) (cmaes minimizes). A failed
        candidate is told a value worse than every score seen so far (finite, so CMA-ES's
        arithmetic stays sane); it only depends on the history, so a resumed run tells exactly
        the same values. An eliminated candidate of a raced generation: see race.told_scores."""
        worst = self.worst if math.isfinite(self.worst) else 0.0
        if any(r["status"] == "eliminated" for r in recs):
            return [(x, -t) for x, t in zip(xs, told_scores(recs, worst - _FAILED_TOLD_MARGIN))]
        return [(x, -float(r["score"] if r["status"] == "ok" else worst - _FAILED_TOLD_MARGIN))
                for x, r in zip(xs, recs)]

    # -- racing (race.py) --------------------------------------------------------------------
    def race_generation(self, gen: int, xs: Sequence[np.ndarray], num_rows: int) -> List[dict]:
        """Score one generation by racing over the calibration rows (race.py's rule); records
        in ask order, logged once the race is decided. A generation found whole in the log is
        replayed; one logged in part (killed while its records were written) is raced again."""
        st = self.settings
        stages = race_schedule(num_rows, st.race_min_rows, st.race_eta)
        if not stages:                    # too few rows to race: the ordinary path
            return self.score_generation(gen, xs)
        weights = [self.space.to_params(x) for x in xs]
        reuse = [self._replayable(gen, idx, w, raced=True) for idx, w in enumerate(weights)]
        if all(r is not None for r in reuse):
            return [self.record(gen, i, w, None, reuse[i]) for i, w in enumerate(weights)]
        outcomes = self._race(weights, race_order(st.seed, gen, num_rows), stages, num_rows)
        return [self.record(gen, i, w, _race_record(gen, i, w, outcomes[i]), None)
                for i, w in enumerate(weights)]

    def _race(self, weights, order: np.ndarray, stages: Sequence[int], num_rows: int) -> List[dict]:
        """Run the stages; per candidate {"values", "info", "fitness", "eliminated_at",
        "error", "full"} (see race.py)."""
        st, ex = self.settings, self.executor
        n = len(weights)
        out = [{"values": np.empty(0), "build_s": 0.0, "eval_s": 0.0, "examples": 0,
                "fitness": None, "eliminated_at": None, "error": None, "full": None}
               for _ in range(n)]
        alive = list(range(n))
        done = 0
        for rows in stages:
            new = order[done:rows]
            for i, (vals, info) in zip(alive, ex.map(self.scorer, [weights[i] for i in alive],
                                                     rows=[new] * len(alive))):
                o = out[i]
                if isinstance(info, BaseException):
                    o["error"] = info
                    continue
                vals = np.asarray(vals, dtype=np.float64).reshape(-1)
                if len(vals) != len(new) or not np.all(np.isfinite(vals)):
                    o["error"] = NPSError(f"scorer returned {len(vals)} row values for "
                                          f"{len(new)} rows, or non-finite ones")
                    continue
                o["values"] = np.concatenate([o["values"], vals])
                _add_times(o, info, len(vals))
                o["fitness"] = (info or {}).get("fitness")
            alive = [i for i in alive if out[i]["error"] is None]
            done = rows
            keep = survivors({i: out[i]["values"] for i in alive}, st.race_eta, st.race_z)
            for i in alive:
                if i not in keep:
                    out[i]["eliminated_at"] = rows
            alive = keep
            if len(alive) <= 1:
                break
        finals = ex.map(self.scorer, [weights[i] for i in alive]) if alive else []
        for i, outcome in zip(alive, finals):
            out[i]["full"] = outcome
            out[i]["num_rows"] = num_rows
        return out

    # -- generations and results -----------------------------------------------------------
    def summarize(self, gen: int, recs: List[dict], opt=None, seconds: float = 0.0) -> dict:
        """Append (and pass to ``on_generation``) the summary of one generation."""
        ok = [r for r in recs if r["status"] == "ok"]
        gbest = max(ok, key=lambda r: r["score"]) if ok else None   # max keeps the first of ties
        best = self.best
        summary = {
            "gen": gen,
            "label": "baseline" if gen == 0 else "cma-es",
            "num_candidates": len(recs),
            "failures": sum(1 for r in recs if r["status"] not in ("ok", "eliminated")),
            "best_score": gbest["score"] if gbest else None,
            "mean_score": float(np.mean([r["score"] for r in ok])) if ok else None,
            "best_weights": gbest["weights"] if gbest else None,
            "best_so_far": self.best_score if best is not None else None,
            "best_so_far_weights": best["weights"] if best is not None else None,
            "mean": ([float(v) for v in self.space.to_params(opt.mean)] if opt is not None else None),
            "sigma": (float(getattr(opt, "_sigma", float("nan"))) if opt is not None else None),
            "seconds": seconds,
        }
        if getattr(self.settings, "race", None):
            summary["eliminated"] = sum(1 for r in recs if r["status"] == "eliminated")
            summary["examples"] = sum(int(r.get("examples") or 0) for r in recs)
        self.generations.append(summary)
        if self.on_generation is not None:
            self.on_generation(summary)
        return summary

    def partial_result(self) -> SearchResult:
        """The result so far (also what :class:`SearchAborted` carries)."""
        best, cands = self.best, self.candidates
        return SearchResult(
            best_weights=(np.asarray(best["weights"], dtype=np.float64) if best
                          else self.space.to_params(self.space.start_points()[0])),
            best_score=best["score"] if best else float("nan"),
            baseline_score=cands[0]["score"] if cands and cands[0]["status"] == "ok" else None,
            candidates=cands, generations=self.generations, stopped_early=self.stopped_early,
            seconds=time.perf_counter() - self.t_start, reused=self.reused,
            settings=settings_dict(self.settings), num_bands=self.num_bands,
            stopped_at=self.stopped_at, cma_free=self.cma_free)

    def stop(self, reason: str, gen: int) -> None:
        """The run ends after generation ``gen`` (not an abort: the result is complete)."""
        self.stopped_early, self.stopped_at = reason, gen

    def abort(self, reason: str) -> None:
        """Stop the run: close the log, raise :class:`SearchAborted` with the partial result."""
        self.stopped_early = reason
        self.log.close()
        raise SearchAborted(f"search aborted: {reason}", self.partial_result())

    def result(self) -> SearchResult:
        """The finished run's result (raises :class:`SearchAborted` if no candidate succeeded)."""
        if self.best is None:
            # cannot happen without an abort unless max_failures exceeds every candidate
            self.stopped_early = "every candidate failed"
            raise SearchAborted(f"search aborted: every candidate failed: {self.last_error}",
                                self.partial_result())
        return self.partial_result()


def within_gap(gap: Optional[float], best: Optional[float], reference: Optional[float]) -> bool:
    """Whether the best score is at most ``gap`` below the reference score (True with no gap or
    no reference score)."""
    if gap is None or reference is None:
        return True
    return best is not None and best >= reference - float(gap)


def near_reference(settings, best: Optional[float], reference: Optional[float]) -> Optional[str]:
    """``settings.patience_gap``: the tail of a --patience stop's message when it may stop ("" with
    no gap or no reference score), None while the best is more than the gap below the reference."""
    if settings.patience_gap is None or reference is None:
        return ""
    if not within_gap(settings.patience_gap, best, reference):
        return None
    return f", within {settings.patience_gap:g} of the fine-tuned model's {reference:.4f}"
