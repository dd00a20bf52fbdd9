"""make bench per suite and per experiment: a run of one suite keeps the other suites' results,
a skipped experiment keeps its last results, and each suite says which run wrote it."""
import dataclasses
import json
from types import SimpleNamespace

import pytest

from nps_bench import run as brun


@dataclasses.dataclass
class _Task:                  # the TaskEntry fields the runner reads
    name: str
    kind: str = "text"
    num_classes: int = 2
    finetuned_acc: float = 0.9
    pretrained_acc: float = 0.5
    head_only_acc: float = 0.6
    majority_acc: float = 0.5
    sizes: dict = dataclasses.field(default_factory=dict)
    key: str = "k"
    max_length: int = 8


def _fake_suite(name, **_):
    task = _Task(f"{name}-task")
    return SimpleNamespace(name=name, base="b", quick=True, tasks=[task], task_names=[task.name])


def test_a_one_suite_run_keeps_the_others_and_skipped_experiments(tmp_path, monkeypatch):
    import nps_bench.suites as suites
    monkeypatch.setattr(suites, "build_suite", _fake_suite)
    calls = []
    fakes = {"run_pruning_job": lambda s, t, c, r: calls.append(("pruning", s)) or {"x": 1},
             "run_fusion_job": lambda *a: calls.append(("fusion", a[0])) or {"fused": 2}}
    monkeypatch.setattr(brun, "_job", lambda name: fakes[name])
    import nps_bench.exp_speed as exp_speed
    monkeypatch.setattr(exp_speed, "run_speed", lambda *a: calls.append(("speed",)) or {"rows": [], "table": ""})
    res = tmp_path / "results"
    res.mkdir()
    (res / "run.json").write_text(json.dumps({"command": "old", "date": "d0", "commit": "c0",
                                              "suites": ["text", "vision"], "speed": {"old": 1}, "speed_s": 5}))
    (res / "vision.json").write_text(json.dumps({"tasks": {"v": 1}}))
    (res / "text.json").write_text(json.dumps({"tasks": {}, "fusion": {"kept": 3}, "transfer": {"t": 4}}))
    cfg = brun.BenchConfig.quick(suites=("text",), jobs=1)
    out = brun.run_benchmark(cfg, results_dir=res, cache_root=tmp_path / "c", command="new",
                             log=lambda *_: None, skip=("fusion", "speed", "transfer"))
    assert calls == [("pruning", "text")]
    assert list(out["suites"]) == ["text", "vision"]          # the report's order, not the run's
    assert out["suites"]["vision"]["tasks"] == {"v": 1}
    assert out["suites"]["vision"]["run"] == {"command": "old", "date": "d0", "commit": "c0"}
    assert out["suites"]["text"]["fusion"] == {"kept": 3} and out["suites"]["text"]["transfer"] == {"t": 4}
    assert out["suites"]["text"]["run"]["command"] == "new"
    assert out["meta"]["speed"] == {"old": 1}
    # not skipped: fusion runs again
    calls.clear()
    out = brun.run_benchmark(cfg, results_dir=res, cache_root=tmp_path / "c", command="new2",
                             log=lambda *_: None, skip=("speed", "transfer"))
    assert ("fusion", "text") in calls and out["suites"]["text"]["fusion"]["fused"] == 2
    with pytest.raises(ValueError, match="unknown experiment"):
        brun.run_benchmark(cfg, results_dir=res, cache_root=tmp_path / "c", command="x", skip=("nope",))
