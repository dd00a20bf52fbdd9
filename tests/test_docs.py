"""Issue 34: the README's quickstart runs as written. Every code block after a
``<!-- runnable`` comment in README.md and docs/guide.md is run, in a folder holding tiny models
and data under the names the block uses (``base/``, ``ft-a/``, ``ft-b/``, ``calib-a.csv``):
bash blocks line by line through the real ``nps`` entry point, Python blocks as they are."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable[^>]*-->\s*```(\w+)\n(.*?)```", re.S)


def runnable_blocks():
    out = []
    for doc in ("README.md", "docs/guide.md"):
        path = ROOT / doc
        if path.is_file():
            out += [(doc, lang, code) for lang, code in BLOCK.findall(path.read_text())]
    return out


def test_the_readme_has_runnable_blocks():
    kinds = [lang for doc, lang, _ in runnable_blocks() if doc == "README.md"]
    assert "bash" in kinds and "python" in kinds


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    base, ft = make_tiny_bert(root / "a")
    _, ft_b = make_tiny_bert(root / "b", seed=0, finetune_noise=0.03)      # same base (seed 0)
    shutil.copytree(base, root / "base")
    shutil.copytree(ft, root / "ft-a")
    shutil.copytree(ft_b, root / "ft-b")
    write_text_csv(root / "calib-a.csv", rows=32, seed=0)
    return root


@pytest.mark.parametrize("doc, lang, code", runnable_blocks(),
                         ids=[f"{d}-{i}-{l}" for i, (d, l, _) in enumerate(runnable_blocks())])
def test_runnable_block_runs_as_written(workdir, monkeypatch, doc, lang, code):
    monkeypatch.chdir(workdir)
    if lang == "python":
        exec(compile(code, f"{doc}:python", "exec"), {"__name__": "__quickstart__"})
        return
    assert lang == "bash", lang
    for line in code.splitlines():
        line = line.split("  #")[0].strip()
        if not line:
            continue
        argv = shlex.split(line)
        assert argv[0] == "nps", line
        assert main(argv[1:]) == 0, line


def test_the_readme_results_table_is_the_one_the_results_give():
    """The README's numbers come from benchmarks/results/wins.json alone (nps_bench.readme_table;
    `python -m nps_bench.readme_table` rewrites the block, as `make bench-wins` does)."""
    import json
    from nps_bench.freshness import counts, stale_parts
    from nps_bench.readme_table import BEGIN, END, load_ablation, load_suites, render
    wins = json.loads((ROOT / "benchmarks" / "results" / "wins.json").read_text())
    text = (ROOT / "README.md").read_text()
    block = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    suites = load_suites(ROOT)
    res = ROOT / "benchmarks" / "results"
    stale = {s: stale_parts(counts(s, res / "steps", res)) for s in suites}
    assert block == render(wins, load_ablation(ROOT), suites, stale), "run `python -m nps_bench.readme_table`"
    assert "| text | all-MiniLM-L6-v2 |" in block
    # the fusion and compression headline, one row per suite with results (‡: built from stale steps)
    assert re.search(r"\| text( ‡)? \| 0.805 \| NPS-merge \(default\) 0.671 \| 0.671 \*default\* \|", block)
    assert "at 1.03 bits/entry |" in block
