"""CMA-ES over the band weights (SPEC §1 "Search").

``run_search`` scores w = 1 (plain magnitude top-k) first, then runs a seeded CMA-ES (the
``cmaes`` library) for a fixed number of generations and returns the best candidate ever seen.

Every candidate is appended to a JSONL log (flushed and fsync'd as soon as it is known), so a
killed run can be resumed: the same seeded CMA-ES is replayed, candidates found in the log are not
scored again, and CMA-ES is fed exactly the values it was fed the first time, so the resumed run
ends exactly where an uninterrupted one would.

Log format (one JSON object per line)::

    {"type": "header", "format": "nps-search-log/1", "num_bands": M, "settings": {...},
     "run": {...}}                     # the run identity (search/identity.py), when given
    {"gen": 0, "idx": 0, "weights": [...], "score": 0.75, "status": "ok", "error": null,
     "build_s": 0.01, "eval_s": 0.5}
    ...

Generation 0 is the baseline (w = 1, one candidate); generations 1..G are CMA-ES generations.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import NPSError

LOG_FORMAT = "nps-search-log/1"
_FAILED_TOLD_MARGIN = 1.0  # a failed candidate is told "worst score seen minus this"


# The search's defaults, the only place they are written: the CLI, YAML configs (config.py) and
# the benchmark read them from here.
# Bounds and initial step size of the band weights by parametrisation: (lower, upper, sigma0), in
# the units searched (w for "linear", the weights themselves for "log", whose CMA-ES runs over
# log2 w). Chosen from the benchmark (BENCHMARKS.md, "Defaults chosen"): at small keep ratios the
# weights must be able to pass 2.
PARAM_DEFAULTS: Dict[str, Tuple[float, float, float]] = {
    "linear": (0.0, 4.0, 0.3),
    "log": (0.25, 8.0, 1.0),
}
POPSIZE_MIN = 4                  # the smallest CMA-ES population accepted (its own default is 4 + 3 ln M)


@dataclass
class SearchSettings:
    """How the band weights are searched. Its defaults are the CLI's (``nps prune`` with no search
    flags searches exactly ``SearchSettings()``); for ``param="log"`` pass the bounds and step
    size of :data:`PARAM_DEFAULTS` ``["log"]`` (or use :meth:`for_param`)."""

    generations: int = 30
    sigma0: float = PARAM_DEFAULTS["linear"][2]
    lower: float = PARAM_DEFAULTS["linear"][0]
    upper: float = PARAM_DEFAULTS["linear"][1]
    popsize: Optional[int] = None   # None: the library default 4 + floor(3 ln M)
    seed: int = 0
    param: str = "linear"           # "linear": search w; "log": search log2(w) (needs lower > 0)
    max_failures: int = 5           # consecutive failed candidates before the run stops
    space: str = "hybrid"           # core.space.SPACES: "hybrid" or "magnitude" (the paper's)

    @classmethod
    def for_param(cls, param: str = "linear", *, lower: Optional[float] = None,
                  upper: Optional[float] = None, sigma0: Optional[float] = None,
                  **rest) -> "SearchSettings":
        """Settings for ``param`` whose bounds and step size not given are that
        parametrisation's defaults (:data:`PARAM_DEFAULTS`)."""
        if param not in PARAM_DEFAULTS:
            raise NPSError(f"search: param must be 'linear' or 'log', got {param!r}")
        lo, hi, sigma = PARAM_DEFAULTS[param]
        return cls(param=param, lower=lo if lower is None else lower,
                   upper=hi if upper is None else upper,
                   sigma0=sigma if sigma0 is None else sigma0, **rest)

    def validate(self) -> None:
        if self.generations < 0:
            raise NPSError(f"search: generations must be >= 0, got {self.generations}")
        if not (self.sigma0 > 0 and math.isfinite(self.sigma0)):
            raise NPSError(f"search: sigma0 must be a positive number, got {self.sigma0}")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise NPSError(f"search: bounds must satisfy lower < upper, got [{self.lower}, {self.upper}]")
        if self.popsize is not None and self.popsize < POPSIZE_MIN:
            raise NPSError(f"search: popsize must be >= {POPSIZE_MIN}, got {self.popsize}")
        if self.param not in PARAM_DEFAULTS:
            raise NPSError(f"search: param must be 'linear' or 'log', got {self.param!r}")
        if self.param == "log" and self.lower <= 0:
            raise NPSError(f"search: param='log' needs lower > 0, got lower={self.lower}")
        from ..core.space import SPACES
        if self.space not in SPACES:
            raise NPSError(f"search: unknown space {self.space!r} (choose from {', '.join(SPACES)})")
        if self.max_failures < 1:
            raise NPSError(f"search: max_failures must be >= 1, got {self.max_failures}")


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

    def to_dict(self) -> dict:
        """JSON-ready form (for report.json)."""
        return {
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


# ---------------------------------------------------------------------------------------------
# log file
# ---------------------------------------------------------------------------------------------
def _header(num_bands: int, settings: SearchSettings, run_id: Optional[dict] = None) -> dict:
    header = {"type": "header", "format": LOG_FORMAT, "num_bands": int(num_bands),
              "settings": asdict(settings)}
    if run_id is not None:
        header["run"] = run_id
    return header


def _check_same_run(log_path: Path, old: dict, new: dict) -> None:
    """Refuse to resume from the log of another run, saying what differs."""
    from .identity import identity_diff
    if "run" in new and "run" not in old:
        raise NPSError(f"{log_path}: cannot resume: the log carries no run identity (written by an "
                       "older nps), so it cannot be checked against this run; rerun without --resume")
    keys = ("num_bands", "settings", "run")
    diffs = identity_diff({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})
    if diffs:
        raise NPSError(f"{log_path}: cannot resume: the log is of another run ({'; '.join(diffs)}); "
                       "rerun without --resume to start afresh")


def _read_log(path: Path) -> Tuple[Optional[dict], Dict[Tuple[int, int], dict], int]:
    """(header, {(gen, idx): record}, byte length of the complete lines).

    A last line without its newline (the run was killed while writing it) is ignored; any other
    unreadable line is an error. Later records for the same (gen, idx) win."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1           # complete lines only
    header, records = None, {}
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise NPSError(f"{path}: line {lineno} of the search log is not valid JSON") from None
        if lineno == 1 or obj.get("type") == "header":
            if obj.get("type") != "header" or obj.get("format") != LOG_FORMAT:
                raise NPSError(f"{path}: not an nps search log (no header on line 1)")
            if header is not None:
                raise NPSError(f"{path}: line {lineno}: second header in the search log")
            header = obj
            continue
        try:
            records[(int(obj["gen"]), int(obj["idx"]))] = obj
        except (KeyError, TypeError, ValueError):
            raise NPSError(f"{path}: line {lineno} of the search log is not a candidate record") from None
    return header, records, end


class _Log:
    def __init__(self, path: Optional[Path]):
        self.path = path
        self._fh = None

    def open(self, header: dict, keep_bytes: Optional[int]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_bytes is None:             # fresh log
            self._fh = open(self.path, "w", encoding="utf-8")
            self.write(header)
        else:                              # resume: drop a truncated last line, then append
            with open(self.path, "r+b") as fh:
                fh.truncate(keep_bytes)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(obj) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
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


def run_search(scorer: Callable[[np.ndarray], Any], num_bands: int,
               settings: Optional[SearchSettings] = None, *, log_path=None, resume: bool = False,
               executor=None, progress: bool = True,
               on_generation: Optional[Callable[[dict], None]] = None,
               space=None, run_id: Optional[dict] = None) -> SearchResult:
    """Search band weights with CMA-ES; see the module docstring.

    ``scorer(weights) -> (score, {"build_s", "eval_s"})`` (higher is better; a bare float is
    accepted). ``executor``: None / "serial" / "processes" / "ray" or an object from
    :func:`make_executor` (not closed here when passed in). Raises :class:`SearchAborted`
    (an NPSError carrying the partial result) after ``max_failures`` consecutive failures.

    ``space``: a :mod:`~nps_pruning.core.space` object (its ``name`` must be ``settings.space``);
    default the paper's band-weight space over ``settings``' bounds. Generation 0 scores the
    space's start points (magnitude top-k; the hybrid space also DARE and a half-and-half point);
    CMA-ES starts from the space's ``mean0`` of those scores. Records' ``weights`` are the points
    in parameter units (band weights, then the space's extra parameters).

    ``run_id`` (JSON-ready, see :mod:`.identity`) goes into the log's header; ``resume`` refuses
    a log whose header differs from this run's."""
    from cmaes import CMA
    from tqdm.auto import tqdm

    from .executors import make_executor

    settings = settings or SearchSettings()
    settings.validate()
    num_bands = int(num_bands)
    if num_bands < 1:
        raise NPSError(f"search: num_bands must be >= 1, got {num_bands}")
    t_start = time.perf_counter()

    own_executor = executor is None or isinstance(executor, str)
    if own_executor:
        executor = make_executor(executor or "serial")

    log_path = Path(log_path) if log_path is not None else None
    header = _header(num_bands, settings, run_id)
    previous: Dict[Tuple[int, int], dict] = {}
    keep_bytes = None
    if resume:
        if log_path is None:
            raise NPSError("search: resume needs a log path")
        if log_path.exists() and log_path.stat().st_size > 0:
            old_header, previous, keep_bytes = _read_log(log_path)
            if old_header is None:
                raise NPSError(f"{log_path}: search log has no header; cannot resume from it")
            _check_same_run(log_path, old_header, header)
    log = _Log(log_path)
    log.open(header, keep_bytes)

    # parametrisation: the search space maps CMA-ES coordinates to candidate parameters
    if space is None:
        from ..core.space import make_space
        space = make_space(settings.space, num_bands, settings.lower, settings.upper, settings.param)
    if space.name != settings.space:
        raise NPSError(f"search: settings.space is {settings.space!r} but the space passed is "
                       f"{space.name!r}")
    to_weights = space.to_params
    bounds = space.bounds()
    dim = space.dim

    candidates: List[dict] = []
    generations: List[dict] = []
    state = {"best": None, "best_score": -math.inf, "consecutive": 0, "last_error": "",
             "reused": 0, "worst": math.inf}
    stopped_early: Optional[str] = None

    def partial_result() -> SearchResult:
        best = state["best"]
        return SearchResult(
            best_weights=(np.asarray(best["weights"], dtype=np.float64) if best
                          else space.to_params(space.start_points()[0])),
            best_score=best["score"] if best else float("nan"),
            baseline_score=(candidates[0]["score"] if candidates and candidates[0]["status"] == "ok"
                            else None),
            candidates=candidates, generations=generations, stopped_early=stopped_early,
            seconds=time.perf_counter() - t_start, reused=state["reused"],
            settings=asdict(settings), num_bands=num_bands)

    def record(gen: int, idx: int, weights: np.ndarray, outcome, reused: Optional[dict]) -> dict:
        """Turn one scored (or replayed) candidate into a record; log it; track best/failures."""
        if reused is not None:
            rec = {k: reused.get(k) for k in
                   ("gen", "idx", "weights", "score", "status", "error", "build_s", "eval_s",
                    "examples")}
            state["reused"] += 1
        else:
            score, info = outcome
            rec = {"gen": gen, "idx": idx, "weights": [float(v) for v in weights],
                   "score": None, "status": "ok", "error": None, "build_s": None, "eval_s": None}
            if isinstance(info, BaseException):
                rec.update(status="failed", error=_error_text(info))
            else:
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
            log.write(rec)
        candidates.append(rec)
        if rec["status"] == "ok":
            state["consecutive"] = 0
            state["worst"] = min(state["worst"], rec["score"])
            if rec["score"] > state["best_score"]:        # ties: the earliest stays
                state["best"], state["best_score"] = rec, rec["score"]
        else:
            state["consecutive"] += 1
            state["last_error"] = rec["error"] or "unknown error"
            if state["consecutive"] >= settings.max_failures:
                nonlocal_stop(f"candidate scoring failed {state['consecutive']} times in a row: "
                              f"{state['last_error']}")
        return rec

    def nonlocal_stop(reason: str) -> None:
        nonlocal stopped_early
        stopped_early = reason
        log.close()
        raise SearchAborted(f"search aborted: {reason}", partial_result())

    def score_generation(gen: int, xs: List[np.ndarray], first: int = 0) -> List[dict]:
        """Score (or replay) one generation's candidates (indices from ``first``); records in
        ask order."""
        weights = [to_weights(x) for x in xs]
        reuse: List[Optional[dict]] = []
        for idx, w in enumerate(weights, start=first):
            old = previous.get((gen, idx))
            ok = (old is not None and old.get("status") == "ok"
                  and len(old.get("weights") or ()) == dim
                  and np.allclose(np.asarray(old["weights"], dtype=np.float64), w,
                                  rtol=0.0, atol=1e-12))
            reuse.append(old if ok else None)
        todo = [i for i, r in enumerate(reuse) if r is None]
        recs: List[dict] = []
        if getattr(executor, "kind", None) == "serial":
            # one at a time: each candidate is logged as soon as it is scored, and an abort
            # stops before scoring the rest of the generation
            for i, w in enumerate(weights):
                outcome = None if reuse[i] is not None else executor.map(scorer, [w])[0]
                recs.append(record(gen, first + i, w, outcome, reuse[i]))
        else:
            outcomes = dict(zip(todo, executor.map(scorer, [weights[i] for i in todo]))) if todo else {}
            for i, w in enumerate(weights):
                recs.append(record(gen, first + i, w, outcomes.get(i), reuse[i]))
        return recs

    def summarize(gen: int, recs: List[dict], opt=None, seconds: float = 0.0) -> dict:
        ok = [r for r in recs if r["status"] == "ok"]
        gbest = max(ok, key=lambda r: r["score"]) if ok else None   # max keeps the first of ties
        summary = {
            "gen": gen,
            "label": "baseline" if gen == 0 else "cma-es",
            "num_candidates": len(recs),
            "failures": len(recs) - len(ok),
            "best_score": gbest["score"] if gbest else None,
            "mean_score": float(np.mean([r["score"] for r in ok])) if ok else None,
            "best_weights": gbest["weights"] if gbest else None,
            "best_so_far": state["best_score"] if state["best"] is not None else None,
            "best_so_far_weights": state["best"]["weights"] if state["best"] is not None else None,
            "mean": ([float(v) for v in to_weights(opt.mean)] if opt is not None else None),
            "sigma": (float(getattr(opt, "_sigma", float("nan"))) if opt is not None else None),
            "seconds": seconds,
        }
        generations.append(summary)
        if on_generation is not None:
            on_generation(summary)
        return summary

    bar = None
    try:
        # generation 0: the space's start points (first: w = 1, plain magnitude top-k)
        t0 = time.perf_counter()
        points = list(space.start_points())
        recs = score_generation(0, points)
        for rec, label in zip(recs, space.start_labels()):
            rec["start"] = label
        for round_ in range(getattr(space, "refine_rounds", 0)):   # adaptive gen-0 points
            more, labels = space.refine(points, [r["score"] if r["status"] == "ok" else None
                                                 for r in recs], round_)
            if not more:
                break
            new = score_generation(0, more, first=len(points))
            for rec, label in zip(new, labels):
                rec["start"] = label
            points += more
            recs += new
        summarize(0, recs, None, time.perf_counter() - t0)
        mean0 = space.mean0([r["score"] if r["status"] == "ok" else None for r in recs], points)

        scales = np.asarray(space.step_scales(), dtype=np.float64)
        cov = None if np.all(scales == 1.0) else np.diag(scales ** 2)
        opt = CMA(mean=mean0, sigma=float(settings.sigma0), bounds=bounds, seed=int(settings.seed),
                  population_size=settings.popsize, cov=cov)
        bar = tqdm(total=settings.generations, disable=not progress, desc="NPS search",
                   unit="gen", dynamic_ncols=True, leave=False)
        bar.set_postfix(best=f"{state['best_score']:.4f}", refresh=False)
        for gen in range(1, settings.generations + 1):
            t0 = time.perf_counter()
            xs = [opt.ask() for _ in range(opt.population_size)]
            recs = score_generation(gen, xs)
            told = []
            # a failed candidate is told a value worse than every score seen so far (finite, so
            # CMA-ES's arithmetic stays sane); it only depends on the history, so a resumed run
            # tells exactly the same values
            worst = state["worst"] if math.isfinite(state["worst"]) else 0.0
            for x, r in zip(xs, recs):
                value = r["score"] if r["status"] == "ok" else worst - _FAILED_TOLD_MARGIN
                told.append((x, -float(value)))                     # cmaes minimizes
            opt.tell(told)
            summarize(gen, recs, opt, time.perf_counter() - t0)
            bar.set_postfix(best=f"{state['best_score']:.4f}", gen=gen, refresh=False)
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        log.close()
        if own_executor:
            executor.close()

    if state["best"] is None:
        # cannot happen without an abort unless max_failures exceeds every candidate
        stopped_early = "every candidate failed"
        raise SearchAborted(f"search aborted: every candidate failed: {state['last_error']}",
                            partial_result())
    return partial_result()
