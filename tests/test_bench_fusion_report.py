"""The fusion table's merge-aware rows: the default NPS-merge at other r (``nps-default-r<k>``) get
their own labelled rows, sorted by r, and can be the verdict's best NPS-merge row."""
from __future__ import annotations

from nps_bench.report_tables import MERGE_AWARE_LABELS, _fusion_rows, _fusion_verdict, _study_keep


def _row(test, calib=0.5, lam=1.0):
    return {"test": test, "test_mean": sum(test) / len(test), "calib_mean": calib, "lambda": lam}


def test_study_keep_rows_are_labelled_sorted_and_counted_in_the_verdict():
    F = {"ties": _row([0.50, 0.60]), "tsv-m": _row([0.55, 0.65])}
    MA = {"rows": {"nps-default": _row([0.40, 0.50]), "nps-default-r0.2": _row([0.70, 0.80]),
                   "nps-default-r0.1": _row([0.45, 0.55]), "ties-layer": _row([0.5, 0.5]),
                   "nps-best": _row([0.60, 0.70])}}
    assert _study_keep("nps-default-r0.2") == 0.2 and _study_keep("nps-default") == 0.0
    assert _study_keep("nps-default-collide") == 0.0
    labels = [label for label, _ in _fusion_rows(F, MA)]
    r01 = next(i for i, l in enumerate(labels) if l.startswith("NPS-merge, Eq. 7, at r = 0.1:"))
    r02 = next(i for i, l in enumerate(labels) if l.startswith("NPS-merge, Eq. 7, at r = 0.2:"))
    assert r01 < r02 and sum("(default)**" in l for l in labels) == 1
    # the shipped merge (--combine best: row nps-best) is the one marked (default)
    assert [l for l in labels if "(default)**" in l][0].endswith(MERGE_AWARE_LABELS["nps-best"].split(", ", 1)[1])
    verdict = _fusion_verdict(F, MA, [1000, 1000])
    # the shipped default, then Eq. 7 (r = 0.05) are what the verdict compares; the best row is named beside them
    assert "The shipped NPS-merge (default) scores 0.6500 on test; against TIES (TIES 0.5500): +0.1000" in verdict
    assert "Eq. 7 (`--combine nps`) scores 0.4500 on test; against TIES (TIES 0.5500): -0.1000" in verdict
    assert verdict.rstrip().endswith("Best row merging NPS vectors here: NPS-merge, Eq. 7, at r = 0.2 0.7500.")
    # a suite whose run has Eq. 7 only says the shipped merge was not measured there
    del MA["rows"]["nps-best"]
    assert "was not measured on this suite" in _fusion_verdict(F, MA, [1000, 1000])
