"""End-to-end tests of the applications through the real `nps` entry point (SPEC §2-3).

Every test drives ``nps_pruning.cli.main([...])`` (or the installed program in a subprocess, for
exit codes and kills) on a family of tiny BERT models fine-tuned from ONE base, and checks the
written files against references computed here by hand (torch.topk on the flat τ, the mergers of
``core.merge`` applied to task vectors built independently, closed forms).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert, write_text_csv
from nps_pruning.checkpoints.sparse import read_task_vector
from nps_pruning.cli import main

NPS = [sys.executable, "-m", "nps_pruning.cli"]
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# -- the model family ---------------------------------------------------------------------------
def make_task(base_dir: Path, out: Path, *, num_labels: int = 2, seed: int = 1,
              noise: float = 0.02) -> Path:
    """Another fine-tuned model of the base at ``base_dir``: BertForSequenceClassification whose
    body is base + noise (seeded) and whose head is new (``num_labels`` classes)."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig.from_pretrained(base_dir, num_labels=num_labels)
    cfg.architectures = None
    torch.manual_seed(seed)
    ft = BertForSequenceClassification(cfg)
    missing, unexpected = ft.bert.load_state_dict(load_file(base_dir / "model.safetensors"), strict=False)
    assert not unexpected and all("position_ids" in m or "token_type_ids" in m for m in missing)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in ft.bert.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    ft.save_pretrained(out)
    for f in base_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """base + four fine-tuned models of it (ft: 2 labels from conftest; task_a: 2, task_b: 3,
    task_c: 2 labels), data CSVs, and a base of another size. Read-only for every test."""
    root = tmp_path_factory.mktemp("family")
    base, ft = make_tiny_bert(root)
    tasks = [make_task(base, root / "task_a", num_labels=2, seed=11),
             make_task(base, root / "task_b", num_labels=3, seed=12),
             make_task(base, root / "task_c", num_labels=2, seed=13, noise=0.03)]
    other_base = make_tiny_bert(root / "other", seed=5)[0]           # same shapes, other weights
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    small = BertModel(BertConfig(vocab_size=27, hidden_size=8, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=16,
                                 max_position_embeddings=64))
    small.save_pretrained(root / "small_base")
    data = write_text_csv(root / "calib.csv", rows=40, seed=0)
    test = write_text_csv(root / "test.csv", rows=40, seed=1)
    return {"root": root, "base": base, "ft": ft, "tasks": tasks, "other_base": other_base,
            "small_base": root / "small_base", "calib": data, "test": test}


def _s(p) -> str:
    return str(p)


def run(argv) -> int:
    """`nps ARGV...` in this process; returns the exit code."""
    return main([str(a) for a in argv])


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# -- references computed by hand ----------------------------------------------------------------
def read_sd(folder: Path):
    return load_file(Path(folder) / "model.safetensors")


def body_pairs(base_sd, ft_sd):
    """(fine-tuned name, base name) of every prunable tensor: float, in both, same shape."""
    out = []
    for k, t in ft_sd.items():
        if not t.is_floating_point():
            continue
        b = k[len("bert."):] if k.startswith("bert.") else k
        if b in base_sd and base_sd[b].shape == t.shape:
            out.append((k, b))
    return out


def flat_tau(base_dir, ft_dir):
    """(pairs, base_flat, τ) in this file's own order (the fine-tuned file's key order)."""
    base_sd, ft_sd = read_sd(base_dir), read_sd(ft_dir)
    pairs = body_pairs(base_sd, ft_sd)
    base_flat = torch.cat([base_sd[b].reshape(-1).float() for _, b in pairs])
    tau = torch.cat([(ft_sd[k].float() - base_sd[b].float()).reshape(-1) for k, b in pairs])
    return pairs, base_flat, tau


def unflat(pairs, flat, sd_like):
    out, pos = {}, 0
    for k, _ in pairs:
        n = sd_like[k].numel()
        out[k] = flat[pos:pos + n].reshape(sd_like[k].shape)
        pos += n
    assert pos == flat.numel()
    return out


def topk_tau(tau, keep):
    k = round(keep * tau.numel())
    idx = torch.topk(tau.abs(), k).indices
    out = torch.zeros_like(tau)
    out[idx] = tau[idx]
    return out, k


def assert_equal_tensors(got: dict, expected: dict, keys=None):
    for k in (keys if keys is not None else expected):
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), f"{k} differs"


def from_pretrained(folder):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()


def one_error_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nps: error:"), lines[0]
    return lines[0]


def report_of(folder):
    return json.loads((Path(folder) / "report.json").read_text())


def cand_key(report):
    return [(c["gen"], c["idx"], c["weights"], c["score"], c["status"])
            for c in report["search"]["candidates"]]


# -- 1. prune -------------------------------------------------------------------------------------
def test_prune_magnitude_writes_base_plus_topk(fam, tmp_path):
    out = tmp_path / "mag"
    assert run(["prune", fam["base"], fam["ft"], "-o", out, "--method", "magnitude", "--keep", "0.1",
                "--seed", "3", "--quiet"]) == 0
    pairs, base_flat, tau = flat_tau(fam["base"], fam["ft"])
    pruned, k = topk_tau(tau, 0.1)
    ft_sd, got = read_sd(fam["ft"]), read_sd(out)
    expected = unflat(pairs, base_flat + pruned, ft_sd)
    assert_equal_tensors(got, expected)
    # the head (task-specific) and every other tensor are the fine-tuned ones, bit for bit
    body = {k for k, _ in pairs}
    assert {k for k in ft_sd if k not in body} >= {"classifier.weight", "classifier.bias"}
    assert set(got) == set(ft_sd)
    assert_equal_tensors(got, ft_sd, [k for k in ft_sd if k not in body])
    # the folder loads like its input did, with exactly these weights (nothing re-initialised)
    model = from_pretrained(out)
    sd = model.state_dict()
    for name, t in got.items():
        assert torch.equal(sd[name], t), name
    # the pruned task vector: exactly k nonzeros, equal to the reference
    tvec = read_task_vector(out / "task_vector.safetensors")
    assert set(tvec) == body
    assert sum(int(torch.count_nonzero(t)) for t in tvec.values()) == k
    assert_equal_tensors(tvec, unflat(pairs, pruned, ft_sd))
    rep = report_of(out)
    for key in ("settings", "seed", "versions", "timings"):
        assert key in rep
    assert rep["seed"] == 3 and rep["settings"]["method"] == "magnitude"
    assert rep["settings"]["keep"] == 0.1
    assert rep["model"]["kept"] == k and rep["model"]["num_entries"] == tau.numel()
    assert {"torch", "transformers", "nps_pruning"} <= set(rep["versions"])
    assert rep["timings"]["total_s"] > 0
    assert sorted(rep["model"]["task_specific"]) == ["classifier.bias", "classifier.weight"]
    assert not (tmp_path / "mag.nps-run").exists()


# the paper's NPS exactly (the shipped default searches the hybrid space on a loglik fitness with a
# held-out re-scoring; tests/test_space.py covers it)
PAPER_NPS = ["--space", "magnitude", "--fitness", "accuracy", "--holdout", "0", "--race", "off",
             "--patience", "0"]


def _nps_prune(fam, out, seed=7):
    return run(["prune", fam["base"], fam["ft"], "-o", out, "--method", "nps", "--keep", "0.1",
                *PAPER_NPS,
                "--bands", "4", "--generations", "2", "--popsize", "4", "--seed", seed,
                "--eval", f"text-classification:{fam['calib']}",
                "--test", f"text-classification:{fam['test']}", "--quiet"])


def test_prune_nps_report_model_and_repeatability(fam, tmp_path):
    from nps_pruning.core import make_bands, reference_mask
    a, b = tmp_path / "a", tmp_path / "b"
    assert _nps_prune(fam, a) == 0
    rep = report_of(a)
    cands = rep["search"]["candidates"]
    assert len(cands) == 1 + 2 * 4
    assert cands[0]["weights"] == [1.0] * 4
    assert rep["calibration"]["nps"] >= rep["calibration"]["magnitude"]
    assert rep["calibration"]["nps"] == max(c["score"] for c in cands)
    assert rep["calibration"]["magnitude"] == cands[0]["score"]
    assert set(rep["test"]) == {"finetuned", "magnitude", "nps"}
    assert (a / "search.png").stat().st_size > 0
    # peak resident memory: the search's and the command's, in bytes (this process's high-water mark)
    mem = rep["memory"]
    assert 50 * 2**20 < mem["search_peak_rss_bytes"] <= mem["peak_rss_bytes"]
    # the pruned τ is exactly mask(w*) ⊙ (w*[band] · τ) with k nonzeros (sort-based reference)
    pairs, base_flat, tau = flat_tau(fam["base"], fam["ft"])
    w = np.asarray(rep["search"]["best_weights"], dtype=np.float64)
    bands = make_bands(tau, 4, "focused", 0.1, 3.0)
    mask = reference_mask(tau, bands, w, 0.1)
    w32 = torch.tensor(w, dtype=torch.float32)
    ref = torch.where(mask, w32[bands.band_of.long()] * tau, torch.zeros_like(tau))
    k = round(0.1 * tau.numel())
    ft_sd = read_sd(fam["ft"])
    tvec = read_task_vector(a / "task_vector.safetensors")
    got_tau = torch.cat([tvec[name].reshape(-1) for name, _ in pairs])
    assert int(torch.count_nonzero(got_tau)) == k
    assert torch.equal(got_tau != 0, mask)
    torch.testing.assert_close(got_tau, ref, rtol=1e-6, atol=0)
    got = read_sd(a)
    assert_equal_tensors(got, unflat(pairs, base_flat + got_tau, ft_sd))
    assert_equal_tensors(got, ft_sd, ["classifier.weight", "classifier.bias"])
    # same seed twice: the same candidates and the same bytes
    assert _nps_prune(fam, b) == 0
    assert cand_key(report_of(b)) == cand_key(rep)
    assert (b / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()


def test_prune_dare_is_seeded(fam, tmp_path):
    def dare(out, seed):
        assert run(["prune", fam["base"], fam["ft"], "-o", out, "--method", "dare", "--keep", "0.2",
                    "--seed", seed, "--quiet"]) == 0
        return (out / "model.safetensors").read_bytes()
    one, again, other = (dare(tmp_path / "d1", 5), dare(tmp_path / "d2", 5), dare(tmp_path / "d3", 6))
    assert one == again and one != other
    pairs, _, tau = flat_tau(fam["base"], fam["ft"])
    tvec = read_task_vector(tmp_path / "d1" / "task_vector.safetensors")
    got = torch.cat([tvec[name].reshape(-1) for name, _ in pairs])
    k = round(0.2 * tau.numel())
    kept = got != 0
    assert int(kept.sum()) == k
    torch.testing.assert_close(got[kept], tau[kept] * (tau.numel() / k), rtol=1e-6, atol=0)


# -- 2. resume --------------------------------------------------------------------------------------
SLOW_EVAL = '''
import os, time, torch
_IDS = torch.tensor([[2, 5, 7, 9, 11, 13, 3], [2, 6, 8, 10, 12, 14, 3], [2, 20, 21, 22, 23, 24, 3]])

def score(model):
    time.sleep(float(os.environ.get("NPS_TEST_DELAY", "0")))
    calls = os.environ.get("NPS_TEST_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write("x\\n")
        stop = os.environ.get("NPS_TEST_INTERRUPT_AT")
        if stop and sum(1 for _ in open(calls)) == int(stop):
            raise KeyboardInterrupt    # Ctrl-C in the middle of a search
    logits = model(input_ids=_IDS).logits
    return float(logits[:, 0].sum() - logits[:, 1].sum())
'''


def test_resume_after_kill_equals_uninterrupted_run(fam, tmp_path, monkeypatch):
    ev = tmp_path / "slow_eval.py"
    ev.write_text(SLOW_EVAL)
    gens, pop = 5, 4
    args = ["prune", _s(fam["base"]), _s(fam["ft"]), "--method", "nps", *PAPER_NPS, "--keep", "0.1", "--bands", "3",
            "--generations", str(gens), "--popsize", str(pop), "--seed", "11",
            "--eval", f"python:{ev}:score", "--quiet"]
    killed = tmp_path / "killed"
    log = tmp_path / "killed.nps-run" / "search.jsonl"
    proc = subprocess.Popen(NPS + args + ["-o", _s(killed)], env={**SUB_ENV, "NPS_TEST_DELAY": "0.25"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.read_bytes().count(b"\n") >= 6:     # header + 5 candidates
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists()                                          # outputs are atomic
    assert not list(tmp_path.glob(".killed.tmp-*"))
    done = [l for l in log.read_text().splitlines()[1:] if l.strip()]
    assert 5 <= len(done) < 1 + gens * pop

    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("NPS_TEST_CALLS", str(calls))
    assert main(args + ["-o", _s(killed), "--resume"]) == 0
    resumed_calls = len(calls.read_text().splitlines())
    # only the candidates missing from the log are scored again (+1: the fine-tuned model's score)
    assert resumed_calls == 1 + gens * pop - len(done) + 1
    assert not log.parent.exists()

    assert main(args + ["-o", _s(tmp_path / "straight")]) == 0
    got, want = report_of(killed), report_of(tmp_path / "straight")
    assert len(got["search"]["candidates"]) == 1 + gens * pop
    assert cand_key(got) == cand_key(want)
    assert got["search"]["best_weights"] == want["search"]["best_weights"]
    assert ((killed / "model.safetensors").read_bytes()
            == (tmp_path / "straight" / "model.safetensors").read_bytes())


def test_merge_nps_resume_after_interrupt(fam, tmp_path, monkeypatch, capsys):
    """--resume works for merge too (its logs are one search-<task>.jsonl per task)."""
    ev = tmp_path / "ev.py"
    ev.write_text(SLOW_EVAL)
    args = ["merge", _s(fam["base"]), *map(_s, fam["tasks"]), "--method", "nps", *PAPER_NPS, "--keep", "0.2",
            "--bands", "2", "--generations", "2", "--popsize", "4", "--lambda-grid", "1.0", "1.5",
            "--lambda-generations", "1", "--seed", "3", "--quiet"]
    for _ in fam["tasks"]:
        args += ["--eval", f"python:{ev}:score"]
    out = tmp_path / "m"
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("NPS_TEST_CALLS", str(calls))
    monkeypatch.setenv("NPS_TEST_INTERRUPT_AT", "14")      # task 1: 9 candidates + 1; then 4 of task 2
    assert main(args + ["-o", _s(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    wd = tmp_path / "m.nps-run"
    assert sorted(p.name for p in wd.iterdir()) == [".nps-owner",    # the work folder is ours
                                                    f"search-{fam['tasks'][0].name}.jsonl",
                                                    f"search-{fam['tasks'][1].name}.jsonl"]
    monkeypatch.delenv("NPS_TEST_INTERRUPT_AT")
    calls.unlink()
    assert main(args + ["-o", _s(out), "--resume"]) == 0
    resumed_calls = len(calls.read_text().splitlines())
    calls.unlink()
    assert main(args + ["-o", _s(tmp_path / "straight")]) == 0
    straight_calls = len(calls.read_text().splitlines())
    assert resumed_calls == straight_calls - 9 - 3       # task 1's and task 2's logged candidates reused
    got, want = report_of(out), report_of(tmp_path / "straight")
    assert got["lambdas"] == want["lambdas"]
    for name in got["pruning"]:
        assert cand_key({"search": got["pruning"][name]}) == cand_key({"search": want["pruning"][name]})
    assert ((out / "merged_task_vector.safetensors").read_bytes()
            == (tmp_path / "straight" / "merged_task_vector.safetensors").read_bytes())


# -- 3. merge ---------------------------------------------------------------------------------------
def _merge_reference(fam, method, lam, keep, seed):
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.core.merge import merge
    tvs = [load_task_vector(fam["base"], t) for t in fam["tasks"]]
    base_flat = tvs[0][0]
    taus = torch.stack([tv.values for _, tv in tvs])
    merged = merge(method, taus, lam=lam, keep_ratio=keep, seed=seed, shapes=tvs[0][1].layout.shapes)
    return tvs[0][1].layout, base_flat, merged


@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties", "dare-linear", "dare-ties",
                                    "della", "tsv-m", "iso-c"])
def test_merge_baselines_with_fixed_lambda(fam, tmp_path, method):
    out = tmp_path / "merged"
    extra = ["--keep", "0.3"] if method in ("ties", "dare-linear", "dare-ties", "della") else []
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", method, "--lambda", "0.7",
                "--seed", "2", "--quiet", *extra]) == 0
    layout, base_flat, merged = _merge_reference(fam, method, 0.7, 0.3 if extra else 0.05, 2)
    expected = layout.unflatten(base_flat + merged)
    base_sd = read_sd(fam["base"])
    task_sds = [read_sd(t) for t in fam["tasks"]]
    pairs = body_pairs(base_sd, task_sds[0])
    for task, task_sd in zip(fam["tasks"], task_sds):
        folder = out / task.name
        got = read_sd(folder)
        assert set(got) == set(task_sd)
        assert_equal_tensors(got, {k: v.contiguous() for k, v in expected.items()})
        assert_equal_tensors(got, task_sd, ["classifier.weight", "classifier.bias"])   # its own head
        model = from_pretrained(folder)
        assert model.config.num_labels == task_sd["classifier.weight"].shape[0]
        assert torch.equal(model.classifier.weight, task_sd["classifier.weight"])
        if method == "task-arithmetic":         # closed form: θ_pre + 0.7 Σ τ_i
            for k, b in pairs:
                hand = base_sd[b] + 0.7 * sum(sd[k] - base_sd[b] for sd in task_sds)
                torch.testing.assert_close(got[k], hand, rtol=0, atol=2e-6)
        if method == "average":                 # closed form: the mean of the fine-tuned models
            for k, _ in pairs:
                hand = sum(sd[k] for sd in task_sds) / len(task_sds)
                torch.testing.assert_close(got[k], hand, rtol=0, atol=2e-6)
    tvec = load_file(out / "merged_task_vector.safetensors")
    assert_equal_tensors(tvec, {k: v.contiguous() for k, v in layout.unflatten(merged).items()})
    rep = report_of(out)
    assert rep["tasks"] == [t.name for t in fam["tasks"]]
    assert rep["lambdas"] == ([0.7] * 3 if method != "average" else None)   # average has no λ


def _paper_nps_pruned(fam, weights_of):
    """Each task's τ and its paper-NPS τ̂ as the merge tests run it (2 focused bands, r = 0.2) at the
    band weights ``weights_of(i, task)``: (task vectors, (N, D) pruned)."""
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.core import build_candidate, make_bands
    tvs, pruned = [], []
    for i, t in enumerate(fam["tasks"]):
        _, tv = load_task_vector(fam["base"], t)
        tvs.append(tv)
        bands = make_bands(tv.values, 2, "focused", 0.2, 3.0)
        pruned.append(build_candidate(tv.values, bands, np.asarray(weights_of(i, t)), 0.2))
    return tvs, torch.stack(pruned)


def _assert_merged_tau_written(out, tv, merged):
    """``out``'s merged_task_vector.safetensors holds ``merged`` (flat, in ``tv``'s layout)."""
    tvec = load_file(out / "merged_task_vector.safetensors")
    assert_equal_tensors(tvec, {k: v.contiguous() for k, v in tv.layout.unflatten(merged).items()})


def test_merge_nps_searches_and_reports_lambdas(fam, tmp_path):
    from nps_pruning.core.merge import nps_combine
    out = tmp_path / "nps"
    evals = []
    for t in fam["tasks"]:
        evals += ["--eval", f"text-classification:{fam['calib']}"]
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "nps", *PAPER_NPS, *evals,
                "--keep", "0.2", "--bands", "2", "--generations", "1", "--popsize", "4",
                "--lambda-grid", "1.0", "1.5", "--lambda-generations", "1", "--combine", "nps",
                "--quiet"]) == 0
    rep = report_of(out)
    assert rep["combine"] == {"rule": "nps"}
    names = [t.name for t in fam["tasks"]]
    assert len(rep["lambdas"]) == 3 and all(isinstance(x, float) for x in rep["lambdas"])
    assert [g["lambda"] for g in rep["lambda_grid"]] == [1.0, 1.5]
    assert set(rep["pruning"]) == set(names) and set(rep["calibration"]) == set(names)
    # the merged τ is Eq. 7 over the per-task NPS-pruned vectors at the reported weights and λ
    tvs, pruned = _paper_nps_pruned(fam, lambda i, t: rep["pruning"][t.name]["best_weights"])
    _assert_merged_tau_written(out, tvs[0], nps_combine(pruned, rep["lambdas"], "mask-count"))
    for t in fam["tasks"]:
        assert (out / t.name / "model.safetensors").is_file()


def test_merge_nps_joint_search_is_never_worse_and_reports_its_merge(fam, tmp_path):
    """--joint-generations: every task's band weights and λ_i searched on the merged model;
    generation 0 is the two-stage result, so the joint score is at least its score, and the
    written merged τ is Eq. 7 at the joint point (with --collide magnitude applied)."""
    from nps_pruning.core.merge import nps_combine
    out = tmp_path / "joint"
    evals = []
    for t in fam["tasks"]:
        evals += ["--eval", f"text-classification:{fam['calib']}"]
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "nps", *PAPER_NPS, *evals,
                "--keep", "0.2", "--bands", "2", "--generations", "1", "--popsize", "4",
                "--lambda-grid", "1.0", "1.5", "--lambda-generations", "0",
                "--joint-generations", "1", "--collide", "magnitude", "--quiet"]) == 0
    rep = report_of(out)
    joint = rep["joint_search"]
    assert joint["best_score"] >= joint["two_stage_score"] - 1e-12
    assert joint["candidates"][0]["start"] == "two-stage"
    assert joint["candidates"][0]["score"] == pytest.approx(joint["two_stage_score"], abs=1e-9)
    assert joint["examples_scored"] > 0 and len(joint["candidates"]) > 1
    w = np.asarray(joint["best_weights"])
    assert w.shape == (3 * 2 + 3,) and rep["lambdas"] == pytest.approx(list(w[6:]))
    tvs, pruned = _paper_nps_pruned(fam, lambda i, t: w[2 * i:2 * i + 2])
    _assert_merged_tau_written(out, tvs[0], nps_combine(pruned, rep["lambdas"], "mask-count", collide="magnitude"))


def test_merge_nps_combine_best_writes_the_merge_with_the_best_calibration_score(fam, tmp_path):
    """--combine best (the default): Eq. 7 on the slim τ̂, TSV-M and Iso-C on the slim and on the dense τ are
    tried (in that order), the one of highest mean calibration score is written (the first of
    equals), and the written τ is that merge rebuilt from the report: the method at its λ."""
    from nps_pruning.apps.merge import PICKS
    from nps_pruning.core.merge import merge, nps_combine
    out = tmp_path / "best"
    evals = []
    for t in fam["tasks"]:
        evals += ["--eval", f"text-classification:{fam['calib']}"]
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "nps", *PAPER_NPS, *evals,
                "--keep", "0.2", "--bands", "2", "--generations", "1", "--popsize", "4",
                "--lambda-grid", "1.0", "1.5", "--lambda-generations", "1", "--quiet"]) == 0
    rep = report_of(out)                          # --combine best: the default
    assert rep["combine"]["rule"] == "best"
    tried = rep["combine"]["tried"]
    assert [(t["inputs"], t["merge"]) for t in tried] == list(PICKS)
    scores = [t["score"] for t in tried]
    picked = rep["combine"]["picked"]
    assert picked == tried[scores.index(max(scores))]
    assert np.mean(list(rep["calibration"].values())) == pytest.approx(picked["score"], abs=1e-12)
    assert rep["lambdas"] == picked["lambdas"]
    tvs, pruned = _paper_nps_pruned(fam, lambda i, t: rep["pruning"][t.name]["best_weights"])
    vecs = pruned if picked["inputs"] == "slim" else torch.stack([tv.values for tv in tvs])
    want = (nps_combine(vecs, picked["lambdas"], "mask-count") if picked["merge"] == "nps" else
            merge(picked["merge"], vecs, lam=picked["lambdas"][0], shapes=tvs[0].layout.shapes))
    _assert_merged_tau_written(out, tvs[0], want)


def test_merge_nps_with_a_fixed_lambda_is_eq7_at_that_lambda(fam, tmp_path):
    """A fixed --lambda leaves nothing to pick: --method nps writes Eq. 7 at that λ (--combine
    best, the default, applies to a searched λ only)."""
    from nps_pruning.core.merge import nps_combine
    out = tmp_path / "fixed"
    evals = sum((["--eval", f"text-classification:{fam['calib']}"] for _ in fam["tasks"]), [])
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "nps", *PAPER_NPS, *evals,
                "--keep", "0.2", "--bands", "2", "--generations", "1", "--popsize", "4",
                "--lambda", "0.7", "--quiet"]) == 0
    rep = report_of(out)
    assert rep["combine"] == {"rule": "nps"} and rep["lambdas"] == [0.7] * 3
    tvs, pruned = _paper_nps_pruned(fam, lambda i, t: rep["pruning"][t.name]["best_weights"])
    _assert_merged_tau_written(out, tvs[0], nps_combine(pruned, [0.7] * 3, "mask-count"))


@pytest.mark.parametrize("case", ["collide-average", "trim-dare", "joint-ties", "joint-lambda", "combine-ties"])
def test_merge_refuses_options_the_method_does_not_take(fam, tmp_path, capsys, case):
    out = tmp_path / "m"
    t = fam["tasks"]
    base = ["merge", fam["base"], *t, "-o", out, "--lambda", "0.5"]
    argv = {"collide-average": base + ["--method", "average", "--collide", "magnitude"],
            "trim-dare": base + ["--method", "dare-ties", "--trim", "layer"],
            "joint-ties": base + ["--method", "ties", "--joint-generations", "2"],
            "joint-lambda": base + ["--method", "nps", "--joint-generations", "2",
                                    *sum((["--eval", f"text-classification:{fam['calib']}"] for _ in t), [])],
            "combine-ties": base + ["--method", "ties", "--combine", "nps"],
            }[case]
    assert run(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert {"collide-average": "--collide", "trim-dare": "--trim", "joint-ties": "--joint-generations",
            "joint-lambda": "--lambda", "combine-ties": "--combine"}[case] in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("trim", ["layer", "sequential"])
def test_merge_ties_trims_match_the_core(fam, tmp_path, trim):
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.core.merge import merge
    out = tmp_path / trim
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "ties", "--lambda", "0.9",
                "--keep", "0.1", "--trim", trim, "--collide", "order", "--quiet"]) == 0
    tvs = [load_task_vector(fam["base"], t)[1] for t in fam["tasks"]]
    want = merge("ties", torch.stack([tv.values for tv in tvs]), lam=0.9, keep_ratio=0.1,
                 shapes=tvs[0].layout.shapes, trim=trim, collide="order")
    tvec = load_file(out / "merged_task_vector.safetensors")
    assert_equal_tensors(tvec, {k: v.contiguous() for k, v in tvs[0].layout.unflatten(want).items()})


@pytest.mark.parametrize("pruner,method", [("magnitude", "task-arithmetic"), ("dare", "tsv-m"),
                                           ("magnitude", "ties")])
def test_merge_of_pruned_vectors_is_the_merge_of_each_pruner_output(fam, tmp_path, pruner, method):
    """--prune P --keep R: each task vector is slimmed by P at R first, then merged by --method;
    the merged τ equals the core merge of the pruners' outputs (closed form for task arithmetic)."""
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.core import PRUNERS
    from nps_pruning.core.merge import merge
    out = tmp_path / f"{pruner}-{method}"
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", method, "--lambda", "0.9",
                "--prune", pruner, "--keep", "0.1", "--seed", "3", "--quiet"]) == 0
    tvs = [load_task_vector(fam["base"], t)[1] for t in fam["tasks"]]
    slim = torch.stack([PRUNERS[pruner](tv.values, 0.1, seed=3) for tv in tvs])
    want = merge(method, slim, lam=0.9, keep_ratio=0.1, seed=3, shapes=tvs[0].layout.shapes)
    if method == "task-arithmetic":
        torch.testing.assert_close(want, 0.9 * slim.sum(dim=0), rtol=0, atol=1e-6)
    tvec = load_file(out / "merged_task_vector.safetensors")
    assert_equal_tensors(tvec, {k: v.contiguous() for k, v in tvs[0].layout.unflatten(want).items()})
    rep = report_of(out)
    D = tvs[0].values.numel()
    assert {n: (p["method"], p["kept"]) for n, p in rep["pruning"].items()} == {
        t.name: (pruner, round(0.1 * D)) for t in fam["tasks"]}


def test_merge_of_nps_pruned_vectors_searches_each_task_and_refuses_misuse(fam, tmp_path, capsys):
    evals = [x for t in ("calib", "calib", "calib") for x in ("--eval", f"text-classification:{fam[t]}")]
    out = tmp_path / "nps-tsvm"
    assert run(["merge", fam["base"], *fam["tasks"], "-o", out, "--method", "tsv-m", "--prune", "nps",
                "--keep", "0.1", "--generations", "1", "--popsize", "4", "--bands", "3", *evals,
                "--lambda-grid", "0.5", "1.0", "--quiet"]) == 0
    rep = report_of(out)
    assert all(p["method"] == "nps" and p["candidates"] for p in rep["pruning"].values())
    assert rep["lambdas"][0] in (0.5, 1.0) and not (tmp_path / "nps-tsvm.nps-run").exists()
    capsys.readouterr()
    assert run(["merge", fam["base"], *fam["tasks"], "-o", tmp_path / "x", "--method", "nps", "--prune",
                "dare", *evals, "--quiet"]) == 2
    assert "--method nps prunes each task with NPS itself" in capsys.readouterr().err
    assert run(["merge", fam["base"], *fam["tasks"], "-o", tmp_path / "y", "--method", "ties", "--prune",
                "nps", "--lambda", "1.0", "--quiet"]) == 2
    assert "--prune nps searches each task" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["one-model", "eval-count", "no-lambda-no-eval"])
def test_merge_usage_errors(fam, tmp_path, capsys, case):
    out = tmp_path / "m"
    t = fam["tasks"]
    argv = {"one-model": ["merge", fam["base"], t[0], "-o", out, "--method", "average"],
            "eval-count": ["merge", fam["base"], *t, "-o", out, "--method", "ties",
                           "--eval", f"text-classification:{fam['calib']}"],
            "no-lambda-no-eval": ["merge", fam["base"], *t, "-o", out, "--method", "task-arithmetic"],
            }[case]
    assert run(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert {"one-model": "two", "eval-count": "--eval", "no-lambda-no-eval": "--lambda"}[case] in line
    assert list(tmp_path.iterdir()) == []


# -- 4. compress / restore / info ---------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(fam, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    common = ["--method", "magnitude", "--keep", "0.1", "--quiet"]
    assert run(["compress", fam["base"], *fam["tasks"], "-o", root / "fp32", *common]) == 0
    assert run(["compress", fam["base"], *fam["tasks"], "-o", root / "fp16", "--values", "fp16",
                *common]) == 0
    assert run(["compress", fam["base"], *fam["tasks"], "-o", root / "ref", "--reference-pretrained",
                *common]) == 0
    for t in fam["tasks"]:
        assert run(["prune", fam["base"], t, "-o", root / "pruned" / t.name, *common]) == 0
    return root


def test_compress_eval_count_is_checked_for_every_method(fam, tmp_path, capsys):
    assert run(["compress", fam["base"], *fam["tasks"], "-o", tmp_path / "s", "--method", "magnitude",
                "--eval", f"text-classification:{fam['calib']}", "--quiet"]) == 2
    assert "--eval" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_restore_equals_pruned_model_bit_for_bit(fam, stores, tmp_path):
    for t in fam["tasks"]:
        out = tmp_path / t.name
        assert run(["restore", stores / "fp32", t.name, "-o", out]) == 0
        pruned = read_sd(stores / "pruned" / t.name)
        got = read_sd(out)
        assert set(got) == set(pruned)
        assert_equal_tensors(got, pruned)
        model = from_pretrained(out)
        assert model.config.num_labels == pruned["classifier.weight"].shape[0]


def test_restore_fp16_values(fam, stores, tmp_path):
    for t in fam["tasks"]:
        out = tmp_path / t.name
        assert run(["restore", stores / "fp16", t.name, "-o", out]) == 0
        pairs, base_flat, tau = flat_tau(fam["base"], t)
        tau_hat, _ = topk_tau(tau, 0.1)
        sd = read_sd(t)
        expected = unflat(pairs, base_flat + tau_hat.half().float(), sd)
        got = read_sd(out)
        assert_equal_tensors(got, expected)
        assert_equal_tensors(got, sd, ["classifier.weight", "classifier.bias"])
        assert not all(torch.equal(got[k], read_sd(stores / "pruned" / t.name)[k]) for k, _ in pairs)


def test_compress_seeded_mask_codes_dare_in_its_own_order(fam, tmp_path):
    """`nps compress --method dare --mask seeded`: the mask is coded in DARE's permutation (its
    chunk counts only), and restore gives what `nps prune --method dare` writes, bit for bit."""
    common = ["--method", "dare", "--keep", "0.1", "--seed", "5", "--quiet"]
    store = tmp_path / "seeded"
    assert run(["compress", fam["base"], *fam["tasks"], "-o", store, "--mask", "seeded", *common]) == 0
    plain = tmp_path / "entropy"
    assert run(["compress", fam["base"], *fam["tasks"], "-o", plain, "--mask", "entropy", *common]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    for i, t in enumerate(fam["tasks"]):
        entry = manifest["tasks"][i]
        assert entry["mask_order"] == "permutation" and entry["mask_seed"] == 5
        other = json.loads((plain / "manifest.json").read_text())["tasks"][i]
        assert entry["parts"]["mask"]["bytes"] < other["parts"]["mask"]["bytes"]
        assert entry["mask_sha256"] == other["mask_sha256"]
        out, pruned = tmp_path / ("r-" + t.name), tmp_path / ("p-" + t.name)
        assert run(["restore", store, t.name, "-o", out]) == 0
        assert run(["prune", fam["base"], t, "-o", pruned, *common]) == 0
        assert_equal_tensors(read_sd(out), read_sd(pruned))


def test_compress_q3_values_restore_what_the_store_describes(fam, tmp_path, capsys):
    """`nps compress --values q3 --mask entropy`: restore = θ_pre + the 3-bit codebook's τ̂, and
    `nps info` counts its values at under 3 bits per kept entry plus the codebooks."""
    import numpy as np
    from nps_pruning.store.value_coding import encode_values, group_sizes_of
    store = tmp_path / "q3"
    assert run(["compress", fam["base"], *fam["tasks"], "-o", store, "--values", "q3", "--mask", "entropy",
                "--method", "magnitude", "--keep", "0.1", "--quiet"]) == 0
    for t in fam["tasks"]:
        out = tmp_path / ("r-" + t.name)
        assert run(["restore", store, t.name, "-o", out]) == 0
        pairs, base_flat, tau = flat_tau(fam["base"], t)
        tau_hat, _ = topk_tau(tau, 0.1)
        mask = tau_hat != 0
        spans, start, sd = [], 0, read_sd(t)
        for k, _ in pairs:                  # one codebook per tensor, in the layout's order
            spans.append((start, start + sd[k].numel()))
            start += sd[k].numel()
        _, dec = encode_values(tau_hat[mask].numpy(), group_sizes_of(mask.numpy(), spans), "q3")
        expected_tau = torch.zeros_like(tau_hat)
        expected_tau[mask] = torch.from_numpy(dec)
        assert_equal_tensors(read_sd(out), unflat(pairs, base_flat + expected_tau, read_sd(t)))
    capsys.readouterr()
    assert run(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for task in info["tasks"]:
        assert task["value_dtype"] == "q3"
        assert task["values_bytes"] * 8 < 3 * task["kept"] + 8 * (len(pairs) * 8 * 10 * 4 + 400)
        assert np.isfinite(task["bits_per_entry"])


def test_compress_tune_levels(fam, tmp_path, capsys):
    """--tune-levels: the tuned factors are in the report and the manifest, the calibration score
    is never below the least-squares levels', and a float coding is refused in one line."""
    store = tmp_path / "tuned"
    spec = f"text-classification:{fam['calib']}"
    args = ["compress", fam["base"], *fam["tasks"], "-o", store, "--method", "magnitude", "--keep", "0.1",
            "--values", "q2", "--tune-levels", "2", "--popsize", "4", "--quiet"]
    for _ in fam["tasks"]:
        args += ["--eval", spec]
    from nps_pruning.cli.store import run_compress
    from nps_pruning.cli import build_parser
    from nps_pruning.cli.options import COMMANDS, from_namespace
    ns = build_parser().parse_args([str(a) for a in args])
    report = run_compress(from_namespace(COMMANDS["compress"], ns))
    manifest = json.loads((store / "manifest.json").read_text())
    for t, entry in zip(fam["tasks"], manifest["tasks"]):
        lv = report["pruning"][t.name]["levels"]
        assert lv["calib_tuned"] >= lv["calib_least_squares"]
        assert entry["level_scale"] == lv["factors"] and len(lv["factors"]) == 4
        assert run(["restore", store, t.name, "-o", tmp_path / ("r" + t.name)]) == 0
    bad = [a if a != "q2" else "fp16" for a in args]
    bad[bad.index(store)] = tmp_path / "nope"
    assert run(bad) == 2
    assert "--tune-levels needs a quantized" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "nope").exists()


def test_info_json(fam, stores, capsys):
    capsys.readouterr()
    assert run(["info", stores / "fp32", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    info = json.loads(out)
    names = [t.name for t in fam["tasks"]]
    assert [t["name"] for t in info["tasks"]] == names
    files = [p for p in (stores / "fp32").rglob("*") if p.is_file()]
    assert info["total_bytes"] == sum(p.stat().st_size for p in files)
    _, _, tau = flat_tau(fam["base"], fam["tasks"][0])
    D = tau.numel()
    k = round(0.1 * D)
    for name in names:   # packed mask (1 bit) + k fp32 values, per prunable entry, plus headers
        bpe = info["bits_per_entry"][name]
        assert 1 + 32 * k / D <= bpe < 1 + 32 * k / D + 8 * 512 / D


def test_restore_errors_write_nothing(fam, stores, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["restore", stores / "fp32", "nope", "-o", out]) == 2
    assert "nope" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    # one flipped byte in a stored part: a clear error naming the file, nothing written
    bad = tmp_path / "bad"
    shutil.copytree(stores / "fp32", bad)
    part = bad / "tasks" / "001" / "values.safetensors"
    assert part.is_file()
    data = bytearray(part.read_bytes())
    data[len(data) - 5] ^= 0x01
    part.write_bytes(bytes(data))
    name = fam["tasks"][1].name
    assert run(["restore", bad, name, "-o", out]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "values.safetensors" in line and "checksum" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    # the other tasks of that store are still fine
    assert run(["restore", bad, fam["tasks"][0].name, "-o", out]) == 0


def test_referenced_pretrained(fam, stores, tmp_path, capsys):
    name = fam["tasks"][2].name
    out = tmp_path / "out"
    assert run(["restore", stores / "ref", name, "-o", out]) == 2
    assert "pre-trained" in one_error_line(capsys.readouterr().err)
    assert run(["restore", stores / "ref", name, "-o", out, "--pretrained", fam["other_base"]]) == 2
    assert "wrong pre-trained model" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert run(["restore", stores / "ref", name, "-o", out, "--pretrained", fam["base"]]) == 0
    assert_equal_tensors(read_sd(out), read_sd(stores / "pruned" / name))
    from nps_pruning.store import store_info
    info = store_info(stores / "ref")
    assert info["pretrained"]["embedded"] is False and info["pretrained"]["bytes"] == 0


# -- 5. transfer -----------------------------------------------------------------------------------
TRANSFER_EVAL = '''
import torch
from safetensors.torch import load_file
_BASE = load_file({base!r})["encoder.layer.0.attention.self.query.weight"]
_FT = load_file({ft!r})["bert.encoder.layer.0.attention.self.query.weight"]

def _dist(model, ref):   # in float64: a one-ulp change of any weight changes the score
    return float((model.bert.encoder.layer[0].attention.self.query.weight.double() - ref.double()).norm())

def source(model):
    return 1.0 / (1.0 + 5.0 * _dist(model, _BASE))

def target(model):
    return 1.0 / (1.0 + 5.0 * _dist(model, _FT))
'''


def test_transfer_chooses_lambda_and_writes_base_plus_lambda_tau(fam, tmp_path):
    from nps_pruning.evaluation import resolve_python
    ev = tmp_path / "transfer_eval.py"
    ev.write_text(TRANSFER_EVAL.format(base=str(fam["base"] / "model.safetensors"),
                                       ft=str(fam["ft"] / "model.safetensors")))
    out = tmp_path / "tr"
    grid = [0.4, 0.8, 1.2, 1.6]
    assert run(["transfer", fam["base"], fam["ft"], "-o", out, "--method", "magnitude", "--keep", "0.3",
                "--eval-source", f"python:{ev}:source", "--eval-target", f"python:{ev}:target",
                "--lambdas", *grid, "--quiet"]) == 0
    rep = report_of(out)
    for who in ("pretrained", "finetuned", "result"):
        assert set(rep["calibration"][who]) >= {"source", "target", "h_score"}
        s = rep["calibration"][who]
        assert s["h_score"] == pytest.approx(2 * s["source"] * s["target"] / (s["source"] + s["target"]))
    assert [g["lambda"] for g in rep["lambda_grid"]] == grid
    best = max(rep["lambda_grid"], key=lambda g: g["h_score"])
    assert rep["lambda"] == best["lambda"] and rep["lambda"] in grid
    assert rep["calibration"]["result"]["h_score"] == best["h_score"]
    lam = rep["lambda"]
    pairs, base_flat, tau = flat_tau(fam["base"], fam["ft"])
    tau_hat, _ = topk_tau(tau, 0.3)
    ft_sd = read_sd(fam["ft"])
    got = read_sd(out)
    assert_equal_tensors(got, unflat(pairs, base_flat + lam * tau_hat, ft_sd))
    assert_equal_tensors(got, ft_sd, ["classifier.weight", "classifier.bias"])
    # the reported scores are the scores of the written model, and of θ_pre / θ_ft
    source, target = resolve_python(f"python:{ev}:source"), resolve_python(f"python:{ev}:target")
    with torch.no_grad():
        written, ft_model = from_pretrained(out), from_pretrained(fam["ft"])
        assert rep["calibration"]["result"]["source"] == source(written)
        assert rep["calibration"]["result"]["target"] == target(written)
        assert rep["calibration"]["finetuned"]["target"] == target(ft_model)
        assert rep["calibration"]["pretrained"]["source"] == pytest.approx(1.0)


# -- 6. eval and YAML --------------------------------------------------------------------------------
def test_eval_json_matches_a_hand_written_loop(fam, capsys):
    import csv
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()
    capsys.readouterr()
    assert run(["eval", fam["ft"], "--eval", f"text-classification:{fam['calib']}", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in err          # the CLI silences transformers' progress bars
    assert out.count("\n") == 1
    result = json.loads(out)
    tok = AutoTokenizer.from_pretrained(str(fam["ft"]))
    model = from_pretrained(fam["ft"])
    rows = list(csv.DictReader(open(fam["calib"])))
    right = 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tok(row["text"], return_tensors="pt")).logits
            right += int(int(logits.argmax(-1)) == int(row["label"]))
    assert result["score"] == pytest.approx(right / len(rows), abs=1e-12)
    assert result["num_rows"] == len(rows)


def test_yaml_run_equals_flags(fam, tmp_path):
    flags = tmp_path / "flags"
    assert run(["prune", fam["base"], fam["ft"], "-o", flags, "--method", "dare", "--keep", "0.15",
                "--seed", "4", "--bands", "5", "--quiet"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"command: prune\npretrained: {fam['base']}\nfinetuned: {fam['ft']}\n"
                   f"output: {tmp_path / 'yaml'}\nmethod: dare\nkeep: 0.15\nseed: 4\nbands: 5\nquiet: true\n")
    assert main(["run", str(cfg)]) == 0
    a, b = report_of(flags)["settings"], report_of(tmp_path / "yaml")["settings"]
    assert a.pop("output") != b.pop("output")
    assert a == b
    assert (flags / "model.safetensors").read_bytes() == (tmp_path / "yaml" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("command", ["transfer", "merge"])
def test_yaml_empty_lambda_grid_is_a_clear_error(fam, tmp_path, capsys, command):
    spec = f"text-classification:{fam['calib']}"
    cfg = tmp_path / "cfg.yaml"
    if command == "transfer":
        body = (f"pretrained: {fam['base']}\nfinetuned: {fam['ft']}\neval_source: {spec}\n"
                f"eval_target: {spec}\nmethod: magnitude\nlambdas: []\n")
    else:
        body = (f"pretrained: {fam['base']}\nfinetuned: [{fam['tasks'][0]}, {fam['tasks'][1]}]\n"
                f"eval: [{spec}, {spec}]\nmethod: task-arithmetic\nlambda_grid: []\n")
    cfg.write_text(f"command: {command}\noutput: {tmp_path / 'out'}\nquiet: true\n" + body)
    assert main(["run", str(cfg)]) == 2
    assert "at least one" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


# -- 7. errors through the installed program ---------------------------------------------------------
@pytest.mark.parametrize("case", ["missing-pretrained", "shape-mismatch", "out-inside-input",
                                  "out-holds-input"])
def test_cli_errors_exit_2_one_line_inputs_untouched(fam, tmp_path, case):
    inputs = [fam["base"], fam["ft"], fam["small_base"]]
    before = [tree_hash(p) for p in inputs]
    out = tmp_path / "out"
    pre, ft = {"missing-pretrained": (tmp_path / "no_such_model", fam["ft"]),
               "shape-mismatch": (fam["small_base"], fam["ft"]),
               "out-inside-input": (fam["base"], fam["ft"]),
               "out-holds-input": (fam["base"], fam["ft"])}[case]
    if case == "out-inside-input":
        out = fam["ft"] / "pruned"
    if case == "out-holds-input":                  # -o names a folder that contains an input
        out = tmp_path / "holder"
        ft = shutil.copytree(fam["ft"], out / "ft")
        inputs.append(ft)
        before.append(tree_hash(ft))
    proc = subprocess.run(NPS + ["prune", _s(pre), _s(ft), "-o", _s(out), "--method", "magnitude"],
                          capture_output=True, text=True, env=SUB_ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    expect = {"missing-pretrained": "no_such_model", "shape-mismatch": "shape",
              "out-inside-input": "input", "out-holds-input": "input"}[case]
    assert expect in line
    if case == "shape-mismatch":                   # names the tensor and both shapes
        assert "tensor bert." in line and "(16" in line and "(8" in line
    assert [tree_hash(p) for p in inputs] == before
    if case == "out-holds-input":
        assert sorted(p.name for p in out.iterdir()) == ["ft"]
        out = tmp_path / "nothing-else"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["holder"])   # no work dir, no temp folder
    assert not list(fam["root"].parent.glob("*.nps-run"))


def test_prune_with_16bit_tau_equals_reference_on_rounded_tau(tmp_path):
    """--tau-dtype bfloat16: the search and the output use τ rounded once to bf16; the written model
    is θ_pre + magnitude top-k of that rounded τ (w = 1 baseline) computed in float32."""
    import torch
    from conftest import make_tiny_bert
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.cli import main
    from nps_pruning.core import PRUNERS
    from safetensors.torch import load_file
    base, ft = make_tiny_bert(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["prune", str(base), str(ft), "-o", str(out), "--method", "magnitude", "--keep", "0.1",
                 "--tau-dtype", "bfloat16", "--quiet"]) == 0
    base_flat, tv = load_task_vector(base, ft, dtype="bfloat16")
    expected = tv.with_values(PRUNERS["magnitude"](tv.values.float(), 0.1)).state_dict(base_flat.float())
    written = load_file(str(out / "model.safetensors"))
    for name in tv.layout.names:
        assert torch.equal(written[name], expected[name]), name


def test_tau_dtype_is_refused_by_merge_methods_that_need_float32(tmp_path, capsys):
    """(16-bit τ is taken by ties / task-arithmetic / average: tests/test_merge_memory.py.)"""
    from nps_pruning.cli import main
    assert main(["merge", "p", "a", "b", "-o", str(tmp_path / "o"), "--lambda", "1",
                 "--tau-dtype", "float16"]) == 2       # the default method, nps
    assert "merges hold 16-bit task vectors for --method average, task-arithmetic, ties" in \
        capsys.readouterr().err


def test_repeated_failures_keep_the_best_model_so_far(tmp_path):
    """An evaluator that starts failing after a few candidates: the run stops with a clear error,
    the best candidate scored so far is written, and the search log stays for --resume."""
    import json as _json
    import subprocess
    import sys
    from conftest import make_tiny_bert, write_text_csv
    base, ft = make_tiny_bert(tmp_path / "m")
    data = write_text_csv(tmp_path / "d.csv")
    counter = tmp_path / "count.txt"
    evalf = tmp_path / "flaky.py"
    evalf.write_text(f'''
from pathlib import Path
from nps_pruning.evaluation import make_evaluator
_ev = None
def score(model):
    global _ev
    c = Path({str(counter)!r}); n = int(c.read_text()) if c.exists() else 0; c.write_text(str(n + 1))
    if n >= 6:
        raise RuntimeError("evaluator broke")
    if _ev is None:
        _ev = make_evaluator("text-classification:{data}", model_path={str(ft)!r})
    return _ev(model)
''')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nps_pruning.cli", "prune", str(base), str(ft), "-o", str(out),
                           "--eval", f"python:{evalf}:score", "--keep", "0.1", "--bands", "2",
                           "--generations", "5", "--popsize", "4", "--max-failures", "3", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "failed" in err[0] and "best candidate so far was written" in err[0]
    report = _json.loads((out / "report.json").read_text())
    assert report["search"]["stopped_early"]
    ok = [c for c in report["search"]["candidates"] if c["status"] == "ok"]
    assert len(ok) >= 5 and report["search"]["best_score"] == max(c["score"] for c in ok)
    assert (out / "model.safetensors").exists()
    assert (tmp_path / "out.nps-run" / "search.jsonl").exists()


def test_prune_race_and_patience_count_fewer_examples(fam, tmp_path):
    """--race halving / --patience through `nps prune`: fewer rows forwarded than the plain search,
    eliminated candidates marked, the reported best a full (search-rows) score; same seed twice:
    the same report; the holdout re-scoring only sees fully scored candidates."""
    common = ["prune", fam["base"], fam["ft"], "--method", "nps", "--keep", "0.1", *PAPER_NPS,
              "--bands", "4", "--generations", "4", "--popsize", "6", "--seed", 7,
              "--eval", f"text-classification:{fam['calib']}", "--quiet"]
    assert run(common + ["-o", tmp_path / "plain"]) == 0
    cheap = ["--race", "halving", "--race-min-rows", "4", "--patience", "2"]
    assert run(common + ["-o", tmp_path / "a"] + cheap) == 0
    assert run(common + ["-o", tmp_path / "b"] + cheap) == 0
    plain, rep = report_of(tmp_path / "plain")["search"], report_of(tmp_path / "a")
    s = rep["search"]
    assert s["examples_scored"] < plain["examples_scored"]
    assert s["examples_scored"] == sum(c["examples"] for c in s["candidates"])
    assert any(c["status"] == "eliminated" for c in s["candidates"])
    assert rep["search_settings"]["race"] == "halving" and rep["search_settings"]["patience"] == 2
    ok = [c for c in s["candidates"] if c["status"] == "ok"]
    assert rep["calibration"]["nps"] in [c["score"] for c in ok]
    assert all(r["search_score"] is not None for r in s["rescored"])
    if s["stopped_early"]:
        assert s["stopped_at"] < 4
    assert cand_key(report_of(tmp_path / "b")) == cand_key(rep)
    assert "race" not in report_of(tmp_path / "plain")["search_settings"]
