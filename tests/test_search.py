"""CMA-ES search: plain objective functions only (no models), so it runs without the other modules."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nps_pruning.apps.settings import PruneSettings
from nps_pruning.errors import NPSError
from nps_pruning.report import plot_search
from nps_pruning.search import (CandidateScorer, SearchAborted, SearchSettings, best_up_to,
                                make_executor, run_search)

TESTS = Path(__file__).resolve().parent
TARGET = np.array([1.6, 0.3, 1.2, 0.7])


class Quadratic:
    """score = -||w - target||^2 (max 0 at the target); optionally sleeps (for the kill test)."""

    def __init__(self, target=TARGET, sleep=0.0):
        self.target = np.asarray(target, dtype=float)
        self.sleep = sleep
        self.calls = 0

    def __call__(self, w):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        return -float(np.sum((np.asarray(w) - self.target) ** 2)), {"build_s": 0.0, "eval_s": 0.0}


class Flaky(Quadratic):
    """Raises for candidates with w[0] > 1.4, returns NaN for w[1] < 0.05."""

    def __call__(self, w):
        if w[0] > 1.4:
            raise RuntimeError(f"out of memory at w0={w[0]:.3f}")
        if w[1] < 0.05:
            return float("nan")
        return super().__call__(w)


class FailAfterBaseline:
    def __call__(self, w):
        if np.all(w == 1.0):
            return 0.5
        raise ValueError("evaluator crashed")


def _key(cands):
    return [(c["gen"], c["idx"], tuple(c["weights"]), c["score"], c["status"]) for c in cands]


# The space and bound these tests were written against (SearchSettings' defaults before they became
# the CLI's): one weight per band in [0, 2].
OLD = dict(upper=2.0, space="magnitude")


def _settings(**kw):
    base = dict(generations=8, seed=3, popsize=6, **OLD)
    base.update(kw)
    return SearchSettings(**base)


def test_finds_optimum_and_keeps_best_ever():
    r = run_search(Quadratic(), 4, SearchSettings(generations=25, seed=0, **OLD), progress=False)
    c0 = r.candidates[0]
    assert (c0["gen"], c0["idx"], c0["weights"]) == (0, 0, [1.0] * 4)
    assert r.generations[0]["label"] == "baseline"
    assert r.baseline_score == pytest.approx(-float(np.sum((1 - TARGET) ** 2)))
    assert r.best_score > r.baseline_score and r.best_score > -0.05
    ok = [c for c in r.candidates if c["status"] == "ok"]
    best = max(ok, key=lambda c: c["score"])
    assert r.best_score == best["score"] and list(r.best_weights) == best["weights"]
    assert all(0.0 <= x <= 2.0 for c in r.candidates for x in c["weights"])
    assert len(r.candidates) == 1 + 25 * (4 + math.floor(3 * math.log(4)))
    assert r.stopped_early is None and r.seconds > 0


def test_ties_return_the_earliest_candidate():
    r = run_search(lambda w: 1.0, 3, _settings(generations=3), progress=False)
    assert list(r.best_weights) == [1.0, 1.0, 1.0] and r.best_score == 1.0


def test_same_seed_same_candidates_other_seed_differs():
    a = run_search(Quadratic(), 4, _settings(), progress=False)
    b = run_search(Quadratic(), 4, _settings(), progress=False)
    c = run_search(Quadratic(), 4, _settings(seed=4), progress=False)
    assert _key(a.candidates) == _key(b.candidates)
    assert _key(a.candidates) != _key(c.candidates)
    assert _key(a.candidates)[0] == _key(c.candidates)[0]       # both start with w = 1


def test_a_longer_run_starts_with_the_shorter_run_and_best_up_to_returns_its_result():
    long = run_search(Quadratic(), 4, _settings(generations=9), progress=False)
    for g in (0, 1, 3, 9):
        short = run_search(Quadratic(), 4, _settings(generations=g), progress=False)
        assert _key(long.candidates)[:len(short.candidates)] == _key(short.candidates)
        best = best_up_to(long.candidates, g)
        assert best["weights"] == list(short.best_weights) and best["score"] == short.best_score
    # ties: the earliest; failed records never win; nothing scored -> None
    recs = [{"gen": 0, "idx": 0, "weights": [1.0], "score": 0.5, "status": "ok"},
            {"gen": 1, "idx": 0, "weights": [2.0], "score": 0.5, "status": "ok"},
            {"gen": 1, "idx": 1, "weights": [3.0], "score": None, "status": "failed"},
            {"gen": 2, "idx": 0, "weights": [4.0], "score": 0.7, "status": "ok"}]
    assert best_up_to(recs, 1)["weights"] == [1.0]
    assert best_up_to(recs, 2)["weights"] == [4.0]
    assert best_up_to(recs[2:3], 5) is None


def test_log_parametrisation():
    s = SearchSettings(generations=15, seed=1, param="log", lower=0.25, upper=8.0,
                       space="magnitude")
    r = run_search(Quadratic([3.0, 0.5, 6.0, 1.0]), 4, s, progress=False)
    assert r.candidates[0]["weights"] == [1.0] * 4
    assert all(0.25 - 1e-12 <= x <= 8.0 + 1e-12 for c in r.candidates for x in c["weights"])
    assert r.best_score > r.baseline_score + 10
    with pytest.raises(NPSError, match="lower > 0"):
        run_search(Quadratic(), 4, SearchSettings(param="log", **OLD), progress=False)


def test_failures_are_recorded_and_the_search_goes_on(tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_search(Flaky(), 4, _settings(generations=10, max_failures=50), log_path=log,
                   progress=False)
    failed = [c for c in r.candidates if c["status"] == "failed"]
    assert failed, "the flaky scorer should have failed on some candidates"
    assert any("RuntimeError: out of memory" in c["error"] for c in failed)
    assert all(c["score"] is None for c in failed)
    assert r.generations[-1]["gen"] == 10 and r.stopped_early is None
    assert r.best_weights[0] <= 1.4 and r.best_score > r.baseline_score
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["type"] == "header" and len(lines) == 1 + len(r.candidates)


def test_consecutive_failures_abort_with_partial_result(tmp_path):
    log = tmp_path / "log.jsonl"
    with pytest.raises(SearchAborted, match="failed 3 times in a row: ValueError: evaluator crashed") as ei:
        run_search(FailAfterBaseline(), 3, _settings(max_failures=3), log_path=log, progress=False)
    assert isinstance(ei.value, NPSError)
    part = ei.value.result
    assert [c["status"] for c in part.candidates] == ["ok", "failed", "failed", "failed"]
    assert part.best_score == 0.5 and list(part.best_weights) == [1.0] * 3
    assert part.stopped_early and "3 times" in part.stopped_early
    assert len(log.read_text().splitlines()) == 1 + 4              # header + every candidate


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_search import Quadratic, _settings
from nps_pruning.search import run_search
run_search(Quadratic(sleep=0.03), 4, _settings(generations=12), log_path={log!r}, progress=False)
"""


def test_resume_after_a_real_kill_equals_an_uninterrupted_run(tmp_path):
    full = run_search(Quadratic(), 4, _settings(generations=12), log_path=tmp_path / "a.jsonl",
                      progress=False)
    log = tmp_path / "b.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), log=str(log))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if log.exists() and log.read_bytes().count(b"\n") >= 30:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("the child search did not log 30 candidates in 60 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    logged = log.read_bytes().count(b"\n") - 1
    assert 29 <= logged < len(full.candidates)
    scorer = Quadratic()
    resumed = run_search(scorer, 4, _settings(generations=12), log_path=log, resume=True,
                         progress=False)
    assert _key(resumed.candidates) == _key(full.candidates)
    assert list(resumed.best_weights) == list(full.best_weights)
    assert resumed.best_score == full.best_score
    assert resumed.reused >= logged - 1 and scorer.calls == len(full.candidates) - resumed.reused
    # the completed log now replays entirely
    again = Quadratic()
    r3 = run_search(again, 4, _settings(generations=12), log_path=log, resume=True, progress=False)
    assert again.calls == 0 and _key(r3.candidates) == _key(full.candidates)


def test_resume_ignores_a_truncated_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    full = run_search(Quadratic(), 4, _settings(), log_path=log, progress=False)
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:20]) + lines[20][: len(lines[20]) // 2])
    scorer = Quadratic()
    resumed = run_search(scorer, 4, _settings(), log_path=log, resume=True, progress=False)
    assert _key(resumed.candidates) == _key(full.candidates)
    assert resumed.reused == 19 and scorer.calls == len(full.candidates) - 19
    records = [json.loads(x) for x in log.read_text().splitlines()]   # every line parses
    assert len(records) == 1 + len(full.candidates)


def test_resume_with_other_settings_is_an_error(tmp_path):
    log = tmp_path / "log.jsonl"
    run_search(Quadratic(), 4, _settings(generations=2), log_path=log, progress=False)
    before = log.read_bytes()
    with pytest.raises(NPSError, match="cannot resume.*settings"):
        run_search(Quadratic(), 4, _settings(generations=2, seed=9), log_path=log, resume=True,
                   progress=False)
    with pytest.raises(NPSError, match="cannot resume.*num_bands"):
        run_search(Quadratic([1, 1, 1]), 3, _settings(generations=2), log_path=log, resume=True,
                   progress=False)
    assert log.read_bytes() == before
    log.write_text('{"gen": 0}\n')
    with pytest.raises(NPSError, match="not an nps search log"):
        run_search(Quadratic(), 4, _settings(generations=2), log_path=log, resume=True,
                   progress=False)


def test_process_executor_matches_serial():
    serial = run_search(Flaky(), 4, _settings(generations=3, max_failures=50), progress=False)
    ex = make_executor("processes", workers=2)
    try:
        par = run_search(Flaky(), 4, _settings(generations=3, max_failures=50), executor=ex,
                         progress=False)
    finally:
        ex.close()
    assert _key(par.candidates) == _key(serial.candidates)
    assert [c["error"] for c in par.candidates] == [c["error"] for c in serial.candidates]
    assert list(par.best_weights) == list(serial.best_weights)


def _descendants(root: int) -> set:
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def _is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    host = host.split("%")[0]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return host.startswith("127.") or host == "::1" or host == "localhost"


def test_ray_executor_matches_serial_and_listens_on_loopback_only():
    pytest.importorskip("ray")
    serial = run_search(Quadratic(TARGET[:3]), 3, _settings(generations=3, popsize=4), progress=False)
    ex = make_executor("ray", workers=2)
    try:
        par = run_search(Quadratic(TARGET[:3]), 3, _settings(generations=3, popsize=4), executor=ex,
                         progress=False)
        ours = _descendants(os.getpid())
        listeners = []
        for flags in ("-ltnpH", "-lunpH"):
            out = subprocess.run(["ss", flags], capture_output=True, text=True).stdout
            for line in out.splitlines():
                pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
                if pids & ours:
                    listeners.append(line.split()[3])
    finally:
        ex.close()
    assert _key(par.candidates) == _key(serial.candidates)
    assert listeners, "found no listening socket of the ray processes (is `ss` working?)"
    bad = [a for a in listeners if not _is_loopback(a)]
    assert not bad, f"ray listens on non-loopback addresses: {bad}"


def test_plot_is_a_png(tmp_path):
    r = run_search(Flaky(), 4, _settings(generations=4, max_failures=50), progress=False)
    p = plot_search(r, tmp_path / "search.png", title="quadratic")
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    plot_search(r.candidates, tmp_path / "from_list.png")
    assert (tmp_path / "from_list.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["from_list.png", "search.png"]


def test_candidate_scorer_pickles_only_its_recipe():
    s = CandidateScorer("base", "ft", "python:mod:fn",
                        PruneSettings(keep_ratio=0.05, bands=4, scheme="uniform", space="magnitude"))
    t = pickle.loads(pickle.dumps(s))
    assert (t.pretrained_path, t.finetuned_path, t.settings.keep_ratio, t.settings.bands, t._state) == \
        ("base", "ft", 0.05, 4, None)
    live = CandidateScorer.from_state(None, None, None, None, lambda m: 1.0)
    with pytest.raises(NPSError, match="serial executor"):
        pickle.dumps(live)


def test_candidate_scorer_end_to_end_on_tiny_bert(tiny_bert, text_csv):
    """Integration with checkpoints/core/evaluation (skipped while those modules are missing)."""
    pytest.importorskip("transformers")
    try:
        from nps_pruning.checkpoints import load_task_vector  # noqa: F401
        from nps_pruning.core import build_candidate, make_bands  # noqa: F401
        from nps_pruning.evaluation import bind_flat, load_model, make_evaluator  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"pipeline modules not available yet: {exc}")
    base, ft = tiny_bert
    scorer = CandidateScorer(base, ft, f"text-classification:{text_csv}",
                             PruneSettings(keep_ratio=0.1, bands=4, space="magnitude"))
    score, info = scorer(np.ones(4))
    assert 0.0 <= score <= 1.0 and set(info) == {"build_s", "eval_s", "examples"}
    assert info["examples"] == scorer.state.evaluator.num_rows > 0
    r = run_search(pickle.loads(pickle.dumps(scorer)), 4, _settings(generations=2, popsize=4),
                   progress=False)
    assert r.candidates[0]["score"] == score and r.best_score >= score
