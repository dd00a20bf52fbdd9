"""The library API (issue 11, item 1): typed settings and plain functions, no CLI options object.

``prune(session, method, settings=PruneSettings(...))`` gives exactly the τ̂ and scores of
``nps prune`` with the same flags and seed; the defaults of the settings are the CLI's; no public
function of ``nps_pruning.apps`` but the commands' own takes an options object; library errors
name settings, not flags.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.checkpoints.sparse import read_task_vector
from nps_pruning.apps.prune import PruneOutcome, Session, prune
from nps_pruning.apps.settings import MergeSettings, PruneSettings, SearchSettings
from nps_pruning.search import shipped_search
from nps_pruning.cli import main
from nps_pruning.cli.options import MergeOptions, PruneOptions, TransferOptions, build
from nps_pruning.cli.settings import merge_settings, prune_settings
from nps_pruning.errors import NPSError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base, ft = make_tiny_bert(root)
    return {"base": base, "ft": ft, "calib": write_text_csv(root / "calib.csv", rows=40, seed=0),
            "test": write_text_csv(root / "test.csv", rows=40, seed=1)}


def _cli_tau(out, session) -> torch.Tensor:
    """The written task vector, flat in the session's layout order."""
    tv = read_task_vector(out / "task_vector.safetensors")
    return torch.cat([tv[name].reshape(-1) for name in session.task_vector.layout.names])


def _cli(argv) -> int:
    return main([str(a) for a in argv])


CASES = {
    # the shipped default: hybrid space, loglik fitness, 25% of the rows held out for re-scoring
    "default": ([], {}),
    # the paper's NPS
    "paper": (["--space", "magnitude", "--fitness", "accuracy", "--holdout", "0"],
              {"space": "magnitude", "fitness": "accuracy", "holdout": 0.0}),
    # log-scale search with explicit bounds, a calibration subsample
    "log": (["--space", "magnitude", "--param", "log", "--lower", "0.5", "--upper", "4",
             "--calib-size", "24", "--scheme", "uniform"],
            {"space": "magnitude", "param": "log", "lower": 0.5, "upper": 4.0,
             "sigma0": 1.0, "calib_size": 24, "scheme": "uniform"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prune_with_settings_equals_the_cli(pair, tmp_path, case):
    flags, over = CASES[case]
    spec = f"text-classification:{pair['calib']}"
    out = tmp_path / "cli"
    assert _cli(["prune", pair["base"], pair["ft"], "-o", out, "--keep", "0.1", "--bands", "4",
                 "--generations", "2", "--popsize", "4", "--seed", "3", "--eval", spec,
                 "--quiet", *flags]) == 0
    rep = json.loads((out / "report.json").read_text())
    session = Session.load(pair["base"], pair["ft"])
    settings = PruneSettings(keep_ratio=0.1, bands=4, seed=3).replace(generations=2, popsize=4, **over)
    got = prune(session, "nps", settings=settings, eval_spec=spec, progress=False)
    assert isinstance(got, PruneOutcome)
    assert torch.equal(got.pruned, _cli_tau(out, session))
    assert got.calibration == rep["calibration"]
    assert [c["score"] for c in got.search.candidates] == [c["score"] for c in rep["search"]["candidates"]]
    assert [list(map(float, c["weights"])) for c in got.search.candidates] == \
        [c["weights"] for c in rep["search"]["candidates"]]
    assert settings.search.to_dict() == rep["search_settings"]
    assert got.rescored == rep["search"]["rescored"]


def test_baseline_prune_and_transfer_equal_the_cli(pair, tmp_path):
    spec, test = f"text-classification:{pair['calib']}", f"text-classification:{pair['test']}"
    out = tmp_path / "dare"
    assert _cli(["prune", pair["base"], pair["ft"], "-o", out, "--method", "dare", "--keep", "0.2",
                 "--seed", "5", "--eval", spec, "--quiet"]) == 0
    session = Session.load(pair["base"], pair["ft"])
    got = prune(session, "dare", settings=PruneSettings(keep_ratio=0.2, seed=5), eval_spec=spec)
    assert torch.equal(got.pruned, _cli_tau(out, session))
    assert got.calibration == json.loads((out / "report.json").read_text())["calibration"]

    from nps_pruning.apps.transfer import transfer
    out = tmp_path / "transfer"
    assert _cli(["transfer", pair["base"], pair["ft"], "-o", out, "--method", "magnitude",
                 "--keep", "0.2", "--eval-source", test, "--eval-target", spec,
                 "--lambdas", "0.5", "1.0", "1.5", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    source, target = session.evaluator(test), session.evaluator(spec)
    res = transfer(session, "magnitude", source, target, lambdas=[0.5, 1.0, 1.5],
                   settings=PruneSettings(keep_ratio=0.2), eval_target_spec=spec)
    assert res["lambda"] == rep["lambda"] and res["lambda_grid"] == rep["lambda_grid"]
    assert res["calibration"] == rep["calibration"]


BASE = {"pretrained": "p", "finetuned": "f", "output": "o"}


def test_the_settings_defaults_are_the_clis():
    assert prune_settings(build(PruneOptions, BASE)) == PruneSettings()
    assert prune_settings(build(TransferOptions, {**BASE, "eval_source": "a",
                                                              "eval_target": "b"})) == PruneSettings()
    merge = build(MergeOptions, {**BASE, "finetuned": ["a", "b"]})
    assert prune_settings(merge) == PruneSettings()
    assert merge_settings(merge) == MergeSettings()
    s = prune_settings(build(PruneOptions, {**BASE, "param": "log", "seed": 4,
                                                        "space": "magnitude", "keep": 0.2}))
    log = SearchSettings.for_param("log")
    assert s.search == shipped_search(param="log", lower=log.lower, upper=log.upper, sigma0=log.sigma0,
                                      seed=4, space="magnitude")
    assert (s.seed, s.space, s.keep_ratio) == (4, "magnitude", 0.2)


def test_settings_replace_and_the_one_seed():
    s = PruneSettings(seed=3)
    assert s.search.seed == 3 and s.search.space == s.space == "hybrid"
    assert PruneSettings(search=SearchSettings(seed=7, space="magnitude")).seed == 7
    r = s.replace(keep_ratio=0.1, generations=9, upper=2.0, seed=5, space="magnitude")
    assert (r.keep_ratio, r.search.generations, r.search.upper) == (0.1, 9, 2.0)
    assert r.seed == r.search.seed == 5 and r.space == r.search.space == "magnitude"
    assert s.search == shipped_search(seed=3)        # s is unchanged: the shipped search
    with pytest.raises(NPSError, match="unknown setting"):
        s.replace(keep=0.1)
    for bad in ({"keep_ratio": 0.0}, {"holdout": 0.95}, {"kept_values": "other"}):
        with pytest.raises(NPSError, match="settings: "):
            PruneSettings(**bad)


def test_library_errors_name_settings_not_flags(pair):
    session = Session.load(pair["base"], pair["ft"], need_model=False)
    for kwargs in ({}, {"settings": PruneSettings(kept_values="original"),
                        "eval_spec": f"text-classification:{pair['calib']}"}):
        with pytest.raises(NPSError) as e:
            prune(session, "nps", **kwargs)
        assert "--" not in str(e.value)
    with pytest.raises(NPSError) as e:
        Session.search_fitness("python:mod:fn", "loglik")
    assert "--" not in str(e.value)


def _library_modules():
    """Every module of ``nps_pruning`` outside ``nps_pruning.cli`` (the optional extras included:
    importing a module does not import its extra)."""
    import pkgutil
    import nps_pruning
    for info in pkgutil.walk_packages(nps_pruning.__path__, "nps_pruning."):
        if not (info.name == "nps_pruning.cli" or info.name.startswith("nps_pruning.cli.")):
            yield importlib.import_module(info.name)


def _public_callables():
    for mod in _library_modules():
        for attr, obj in vars(mod).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{attr}", attr, obj
            elif inspect.isclass(obj):
                for m, fn in vars(obj).items():
                    fn = getattr(fn, "__func__", fn)
                    if not m.startswith("_") and inspect.isfunction(fn):
                        yield f"{mod.__name__}.{attr}.{m}", m, fn


def test_no_library_function_takes_an_options_object():
    """Issue 33: the options objects live in ``nps_pruning.cli``; no function or method below it
    takes one (its commands and the one mapping onto settings, ``cli/settings.py``, are the CLI)."""
    seen = 0
    for where, name, fn in _public_callables():
        params = inspect.signature(fn).parameters
        seen += 1
        assert not any(p in ("opts", "options") for p in params), \
            f"{where}{inspect.signature(fn)} takes a CLI options object"
    assert seen > 200
    import nps_pruning.cli.options as options
    option_types = tuple(options.COMMANDS.values()) + (options.SearchOptions,)
    for mod in _library_modules():         # nor does the library import the option types
        assert not any(isinstance(v, type) and issubclass(v, option_types) for v in vars(mod).values()), mod
    for fn in (prune, Session.evaluator, Session.search_evaluators):
        assert all(p.kind is not p.POSITIONAL_OR_KEYWORD for n, p in inspect.signature(fn).parameters.items()
                   if n not in ("self", "session", "method", "spec"))


def _imports_of(path, module: str, is_package: bool):
    """The ``nps_pruning`` modules ``path`` imports (module level and inside functions alike)."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) + is_package - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out |= {name} | {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_the_import_graph_of_src_has_no_cycle():
    """Issue 33: no two modules of ``src/`` import each other, directly or through others —
    counting imports inside functions too (a lazy import is still a dependency)."""
    from pathlib import Path
    import nps_pruning
    root = Path(nps_pruning.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = ["nps_pruning", *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {m: sorted(t for t in _imports_of(p, m, pk) if t in files and t != m)
             for m, (p, pk) in files.items()}
    # a package's __init__ that only names its submodules lazily is not an import of them
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for t in graph[m]:
            visit(t)
        on_path.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)
    assert len(graph) > 60 and graph["nps_pruning.cli"]


def test_the_main_api_is_importable_from_the_package():
    """Issue 33: the public face — the main API from ``nps_pruning`` itself (loaded lazily),
    the very objects the submodules define."""
    import nps_pruning
    from nps_pruning.apps.prune import prune
    from nps_pruning.apps.session import Session
    from nps_pruning.store import write_store
    assert nps_pruning.prune is prune and nps_pruning.Session is Session
    assert nps_pruning.write_store is write_store
    for name in nps_pruning.__all__:
        assert getattr(nps_pruning, name) is not None, name
    with pytest.raises(AttributeError):
        nps_pruning.not_a_name
