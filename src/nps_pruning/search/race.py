"""Racing (successive halving) over calibration rows: a generation scored for a fraction of the
forward passes, its winner still scored on every row (``--race halving``; ``--race auto`` races
where the evaluator can score some of its rows, the classification and language-model ones, and
runs unraced elsewhere: a ``python:`` evaluator, or fewer than ``race_min_rows · race_eta²``
calibration rows (144 with the defaults), where two partial stages do not fit and racing saves
little).

Within one CMA-ES generation (generation 0, the start points, is never raced):

1. The calibration rows are put in a seeded order (:func:`race_order`: a permutation drawn from
   the search seed and the generation number, so a resumed run draws the same one).
2. Stages (:func:`race_schedule`): every candidate is scored on the first ``min_rows`` rows of
   that order, the survivors on the first ``min_rows·eta`` (only the new rows are forwarded), and
   so on while a stage has fewer rows than the whole calibration set.
3. After each stage the survivors are (:func:`survivors`): the top ⌈alive/eta⌉ by mean per-row
   value (ties: the earlier candidate), plus every other candidate that the stage cannot tell
   apart from the stage's leader — a paired normal-approximation bound on the per-row differences
   d_r = v_i,r − v_lead,r over the rows both were scored on: kept when mean(d) + z·SE(d) > 0,
   SE(d) = std(d, ddof=1)/sqrt(rows). (Paired because every candidate sees the same rows: two
   nearby candidates differ far less than their scores' own spread. Strict, so a candidate equal
   to the leader on every row so far — common with accuracy on a flat landscape — is not carried
   on by the bound: it goes on only if it is in the top ⌈alive/eta⌉.)
4. Whoever is left after the last partial stage (or once one candidate is left) is scored on all
   the rows by the scorer's ordinary full call — the same score an unraced search would record,
   bit for bit — and only those full scores compete for the search's best.

A candidate eliminated at a stage is recorded with status ``"eliminated"``, its ``partial_score``
(the score of the rows it was scored on), ``rows_scored`` and ``eliminated_at`` (the row count of
the stage that dropped it); ``examples`` counts every row forwarded for a candidate, the full
re-score of a finalist included. CMA-ES uses its told values only as a ranking; an eliminated
candidate is told min(its partial score, the lowest told value of the candidates that outlasted
it), so it ranks below every candidate that went further, and eliminated ones rank among
themselves by partial score (:func:`told_scores`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import NPSError

RACES = ("halving", "auto")   # "auto": halving where the evaluator scores rows, else no racing
RACE_OFF = "off"              # the CLI's way to say "no racing" (None in SearchSettings)


def race_schedule(num_rows: int, min_rows: int, eta: float) -> List[int]:
    """Row counts of the partial stages, each below ``num_rows`` (empty: nothing to race)."""
    stages: List[int] = []
    r = int(min_rows)
    while r < int(num_rows):
        stages.append(r)
        r = max(r + 1, int(math.ceil(r * float(eta))))
    return stages


def race_order(seed: int, gen: int, num_rows: int) -> np.ndarray:
    """The seeded order in which generation ``gen`` scores the calibration rows."""
    rng = np.random.default_rng([int(seed), int(gen), 0x7ACE])
    return rng.permutation(int(num_rows))


def survivors(values: Dict[int, np.ndarray], eta: float, z: float) -> List[int]:
    """The candidates (keys of ``values``: per-row values on the same rows) carried to the next
    stage, in index order; see the module docstring for the rule."""
    alive = sorted(values)
    if len(alive) <= 1:
        return alive
    means = {i: float(np.mean(values[i])) for i in alive}
    ranked = sorted(alive, key=lambda i: (-means[i], i))
    n_keep = max(1, int(math.ceil(len(alive) / float(eta))))
    keep = set(ranked[:n_keep])
    lead = values[ranked[0]]
    for i in ranked[n_keep:]:
        d = values[i] - lead
        se = float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
        if float(np.mean(d)) + float(z) * se > 0.0:
            keep.add(i)
    return sorted(keep)


def told_scores(recs: Sequence[dict], failed_value: float) -> List[float]:
    """The score CMA-ES is told for each record of a raced generation (higher is better):
    the full score of a finalist, ``failed_value`` for a failure, and for an eliminated candidate
    min(partial score, lowest told value of those that outlasted it)."""
    told: List[Optional[float]] = [None] * len(recs)
    for j, r in enumerate(recs):
        if r["status"] == "ok":
            told[j] = float(r["score"])
        elif r["status"] != "eliminated":
            told[j] = float(failed_value)
    stages = sorted({int(r["eliminated_at"]) for r in recs if r["status"] == "eliminated"},
                    reverse=True)
    for stage in stages:
        further = [told[j] for j, r in enumerate(recs)
                   if r["status"] == "ok" or (r["status"] == "eliminated"
                                              and int(r["eliminated_at"]) > stage)]
        cap = min(further) if further else math.inf
        for j, r in enumerate(recs):
            if r["status"] == "eliminated" and int(r["eliminated_at"]) == stage:
                told[j] = min(float(r["partial_score"]), cap)
    return [float(t) for t in told]


def auto_race_min(settings) -> int:
    """``race="auto"`` races only over at least this many calibration rows: two partial stages
    (``race_min_rows`` and ``race_min_rows · race_eta`` rows) before the full one."""
    return int(math.ceil(settings.race_min_rows * settings.race_eta ** 2))


def race_rows(scorer, settings, calib_rows: Optional[int]) -> Optional[int]:
    """The number of calibration rows a raced search races over (None: not racing)."""
    if settings.race is None:
        return None
    if not (callable(getattr(scorer, "score_rows", None))
            and getattr(scorer, "supports_rows", True)):
        if settings.race == "auto":          # racing where it can be done, a plain search elsewhere
            return None
        raise NPSError("search: racing (race='halving') needs a scorer that scores rows "
                       "(score_rows): a text- or image-classification evaluator")
    n = calib_rows if calib_rows is not None else getattr(scorer, "num_rows", None)
    if settings.race == "auto" and (n is None or int(n) < auto_race_min(settings)):
        return None                          # too few rows for two stages: racing would save little
    if n is None or int(n) < 1:
        raise NPSError("search: racing needs the number of calibration rows (calib_rows)")
    return int(n)
