"""Issue 38 item 1: tensors whose τ is identically zero (a LoRA adapter's untouched tensors, frozen
layers) are left out of D, so ``--keep r`` buys every method the same budget: k = round(r·D_changed)
kept entries, DARE's and the hybrid space's random positions among the changed entries, rescaled by
D_changed / k. And the prepared task vector (core.prepared) decodes a search point the same way in
every caller: with no unchanged tensor, bit for bit what the core functions give on τ."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nps_pruning.core import PRUNERS, keep_count, make_bands
from nps_pruning.core.prepared import Domain, changed_domain, prepare, prune_in_domain
from nps_pruning.core.space import build_point, make_hybrid_index


def _tau_with_zero_tensors(seed=0):
    """A flat τ of five tensors (sizes 50, 300, 120, 7, 400), the 1st and 4th identically zero."""
    g = torch.Generator().manual_seed(seed)
    sizes = [50, 300, 120, 7, 400]
    spans, pos = [], 0
    for n in sizes:
        spans.append((pos, pos + n))
        pos += n
    v = torch.randn(pos, generator=g)
    for a, b in (spans[0], spans[3]):
        v[a:b] = 0.0
    return v, spans


def test_domain_leaves_out_the_all_zero_tensors_and_round_trips():
    v, spans = _tau_with_zero_tensors()
    d = changed_domain(v, spans)
    assert d.spans == ((50, 470), (477, 877)) and d.count == 820 and d.total == 877 and not d.is_whole
    compact = d.gather(v)
    want = torch.cat([v[50:470], v[477:877]])
    assert torch.equal(compact, want)
    assert torch.equal(d.scatter(compact), v)             # zero where τ was zero anyway
    idx = torch.tensor([0, 1, 419, 420, 421, 819])
    assert d.to_full(idx).tolist() == [50, 51, 469, 477, 478, 876]
    assert torch.equal(v[d.to_full(torch.arange(820))], compact)
    # no unchanged tensor, or nothing changed at all: the whole vector, no copy
    w = torch.randn(30)
    assert changed_domain(w, [(0, 10), (10, 30)]).is_whole
    assert changed_domain(torch.zeros(30), [(0, 10), (10, 30)]).is_whole
    whole = Domain.whole(30)
    assert whole.gather(w) is w and whole.scatter(w) is w
    with pytest.raises(ValueError, match="877 entries"):
        d.gather(torch.zeros(5))


@pytest.mark.parametrize("method", ["magnitude", "dare", "random"])
def test_baselines_keep_the_same_budget_over_the_changed_entries(method):
    v, spans = _tau_with_zero_tensors(1)
    d = changed_domain(v, spans)
    r = 0.05
    out = prune_in_domain(PRUNERS[method], v, r, d, seed=3)
    k = keep_count(d.count, r)
    assert int(torch.count_nonzero(out)) == k == 41
    assert not out[0:50].any() and not out[470:477].any()        # never in an unchanged tensor
    ref = PRUNERS[method](d.gather(v), r, seed=3)                 # the pruner over D_changed
    assert torch.equal(d.gather(out), ref)
    if method == "dare":                                          # the unbiased rescale D_changed / k
        kept = out != 0
        torch.testing.assert_close(out[kept], v[kept] * (820 / 41), rtol=0, atol=0)


def test_prepared_equals_the_core_functions_on_a_whole_tau_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2000, generator=g) * (torch.rand(2000, generator=g) < 0.8)
    base = torch.randn(2000, generator=g)
    spans = [(0, 700), (700, 2000)]
    M, r = 4, 0.05
    for space, p in (("hybrid", np.r_[np.linspace(0.5, 2, M), 1.0, 0.4, -0.3]),
                     ("magnitude", np.linspace(0.5, 2, M))):
        prep = prepare(v, spans, keep=r, num_bands=M, space=space, seed=1)
        assert prep.domain.is_whole and prep.compact is v
        bands = make_bands(v, M, "focused", r)
        index = make_hybrid_index(v, 1) if space == "hybrid" else None
        want = build_point(space, v, bands, index, p, r)
        assert torch.equal(prep.build(p).view(torch.int32), want.view(torch.int32))
        assert torch.equal(prep.build(p, base=base), build_point(space, v, bands, index, p, r, base=base))
        idx, vals = prep.entries(p)
        assert torch.equal(base[idx] + vals, want[idx] + base[idx])


def test_prepared_over_a_domain_is_the_compact_candidate_scattered():
    v, spans = _tau_with_zero_tensors(4)
    M, r = 3, 0.1
    prep = prepare(v, spans, keep=r, num_bands=M, space="hybrid", seed=5)
    d = prep.domain
    compact = d.gather(v)
    bands = make_bands(compact, M, "focused", r)
    index = make_hybrid_index(compact, 5)
    base = torch.randn(v.numel(), generator=torch.Generator().manual_seed(9))
    for p in (np.r_[np.ones(M), 0.0, 0.0, 0.0],          # magnitude top-k
              np.r_[np.ones(M), 0.0, 1.0, 0.0],          # DARE over the changed entries
              np.r_[[0.5, 1.5, 2.0], 1.5, 0.5, 0.25]):
        want = d.scatter(build_point("hybrid", compact, bands, index, p, r))
        got = prep.build(p)
        assert torch.equal(got, want)
        assert int(torch.count_nonzero(got)) == keep_count(d.count, r) == 82
        assert torch.equal(prep.build(p, base=base), base + got)
        idx, vals = prep.entries(p)
        assert torch.equal(idx, torch.nonzero(got).squeeze(1)) and torch.equal(vals, got[idx])
    dare = prep.build(np.r_[np.ones(M), 0.0, 1.0, 0.0])
    assert torch.equal(dare, prune_in_domain(PRUNERS["dare"], v, r, d, seed=5))   # DARE(seed) exactly


# -- the done-when: a tiny causal LM and a LoRA adapter built here ---------------------------------
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_a_lora_adapter_leaves_its_untouched_tensors_out_of_d_for_every_method(tmp_path, monkeypatch,
                                                                               capsys):
    from test_llm_sized_inputs import _tiny_llama_and_lora
    from nps_pruning.cli import main
    from safetensors.torch import load_file
    monkeypatch.setenv("NPS_INPUT_CACHE", str(tmp_path / "cache"))
    base, adapter, pm = _tiny_llama_and_lora(tmp_path)
    data = tmp_path / "calib.jsonl"
    words = ["good", "bad", "fine", "love", "dull", "fun", "plot", "film"]
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 3 + j) % 8] for j in range(6))}) + "\n"
                            for i in range(24)))
    b = load_file(str(base / "model.safetensors"))
    changed = {k for k in b if "q_proj" in k or "v_proj" in k}
    d_changed = sum(b[k].numel() for k in changed)
    r = 0.05
    k = keep_count(d_changed, r)
    kept = {}
    for method in ("magnitude", "dare", "nps"):
        out = tmp_path / method
        argv = ["prune", str(base), str(adapter), "-o", str(out), "--method", method, "--keep", str(r)]
        if method == "nps":
            argv += ["--bands", "3", "--generations", "1", "--popsize", "4", "--eval", f"perplexity:{data}"]
        assert main(argv) == 0, method
        printed = capsys.readouterr().out
        rep = json.loads((out / "report.json").read_text())
        m = rep["model"]
        assert m["num_entries"] == d_changed and m["kept"] == k, (method, m)
        assert set(m["unchanged_tensors"]) == set(b) - changed
        assert m["unchanged_entries"] == sum(b[n].numel() for n in b) - d_changed
        assert f"kept {k:,} of {d_changed:,} prunable entries ({k / d_changed:.2%})" in printed
        assert "unchanged by the fine-tune" in printed
        w = load_file(str(out / "model.safetensors"))
        tau = {n: w[n].float() - b[n].float() for n in b}
        assert all(not tau[n].any() for n in set(b) - changed), method    # written as they were
        kept[method] = sum(int(torch.count_nonzero(tau[n])) for n in changed)
    assert kept["magnitude"] == kept["dare"] == kept["nps"] == k
