"""The search's fp32 linear layers through oneDNN (search/cpu_linear.py, PruneSettings.cpu_linear):
the same products as F.linear to float32 rounding, used exactly where they may be (float32 CPU,
no autocast, no gradient), torch's own call everywhere else, and the default of `nps prune`."""
import pytest
import torch
import torch.nn.functional as F

from nps_pruning.apps.settings import PruneSettings
from nps_pruning.errors import NPSError
from nps_pruning.search import cpu_linear
from nps_pruning.search.cpu_linear import CPU_LINEARS, OneDNNLinear, linear_mode, onednn_available
from nps_pruning.search.scorer import CandidateScorer

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear kernel")


@pytest.fixture
def calls(monkeypatch):
    """How many F.linear calls reached oneDNN's kernel."""
    seen = []
    real = cpu_linear._kernel

    def counted(x, w, b):
        seen.append(tuple(x.shape))
        return real(x, w, b)
    monkeypatch.setattr(cpu_linear, "_kernel", counted)
    return seen


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear(calls, shape, bias):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(shape, generator=g), torch.randn(24, 16, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    want = F.linear(x, w, b)
    with OneDNNLinear():
        got = F.linear(x, w, b)
        again = F.linear(x, w, bias=b)          # keyword bias too
        t = F.linear(x, w.t().contiguous().t(), b)      # a transposed view of a weight
    assert calls == [tuple(shape)] * 3
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again) and torch.allclose(t, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_in_a_module_and_deterministic(calls):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
    x = torch.randn(8, 10, 16)
    with torch.no_grad():
        want = net(x)
        with OneDNNLinear():
            a, b = net(x), net(x)
    assert len(calls) == 4
    assert torch.equal(a, b) and torch.allclose(a, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_torch_keeps_what_onednn_may_not_take(calls):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    with OneDNNLinear():
        # float64, a 1-D input: torch's own call, bit for bit
        assert torch.equal(F.linear(x.double(), w.double(), b.double()), torch.nn.functional.linear(
            x.double(), w.double(), b.double()))
        assert F.linear(x[0], w, b).shape == (8,)
        # autocast chooses the dtype: bf16 out, as without the mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x, w, b).dtype == torch.bfloat16
        # a gradient is needed: torch's call, and the gradient flows
        wg = w.clone().requires_grad_(True)
        F.linear(x, wg, b).sum().backward()
        assert torch.allclose(wg.grad, x.sum(0).expand(8, 16))
        # a shape that does not fit: torch's own error
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            F.linear(x, torch.randn(8, 15), b)
    assert calls == []


def test_linear_mode_picks_the_kernel(monkeypatch):
    assert CPU_LINEARS == ("onednn", "torch")
    assert isinstance(linear_mode("onednn", "cpu"), OneDNNLinear) == onednn_available()
    assert not isinstance(linear_mode("torch", "cpu"), OneDNNLinear)
    assert not isinstance(linear_mode("onednn", "meta"), OneDNNLinear)    # CPU only
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)   # a build without it
    assert not isinstance(linear_mode("onednn", "cpu"), OneDNNLinear)
    with pytest.raises(NPSError, match="cpu_linear must be one of onednn, torch"):
        linear_mode("mkl", "cpu")


def test_settings_and_cli_default_to_onednn():
    from nps_pruning.cli.options import PruneOptions, build
    assert PruneSettings().cpu_linear == "onednn"
    with pytest.raises(NPSError, match="cpu_linear must be one of"):
        PruneSettings(cpu_linear="mkl")
    opts = build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o"}, source="t")
    assert opts.cpu_linear == "onednn"
    with pytest.raises(NPSError, match="cpu_linear"):
        build(PruneOptions, {"pretrained": "a", "finetuned": "b", "output": "o", "cpu_linear": "mkl"},
              source="t")


@needs_onednn
@pytest.mark.parametrize("kind,used", [("onednn", True), ("torch", False)])
def test_scorer_forward_passes_use_the_setting(calls, kind, used):
    """The candidates' forward passes run under the scorer's cpu_linear (from its settings)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 2)
    x = torch.randn(6, 16)

    def evaluator(model):
        return float(model(x).sum())
    scorer = CandidateScorer.from_state(None, None, net, torch.zeros(3), evaluator, cpu_linear=kind)
    with scorer._forward_mode(scorer.state):
        evaluator(net)
    assert bool(calls) == used
    recipe = CandidateScorer("a", "b", "python:m:f", PruneSettings(cpu_linear=kind))
    assert recipe.cpu_linear == kind


def test_a_log_of_the_other_kernel_does_not_resume(tmp_path):
    """The kernel changes the scores' last bits: it is part of a search log's identity (absent for
    torch's, so logs written before it existed still resume)."""
    from nps_pruning.search.identity import run_identity
    (tmp_path / "m").mkdir()
    (tmp_path / "calib.csv").write_text("text,label\na,0\n")
    base = dict(keep=0.05, bands=8)

    def ident(fields):
        return run_identity(pretrained=tmp_path / "m", finetuned=tmp_path / "m",
                            eval_spec=f"text-classification:{tmp_path / 'calib.csv'}", fields=fields)
    ids = {k: ident({**base, "cpu_linear": k}) for k in CPU_LINEARS}
    assert ids["onednn"]["cpu_linear"] == "onednn" and "cpu_linear" not in ids["torch"]
    assert ids["onednn"] != ids["torch"] and ids["torch"] == ident(base)


@needs_onednn
def test_merges_choose_under_the_setting_and_test_scores_keep_torch(calls):
    """The merges' λ choices score under MergeSettings.cpu_linear (onednn by default, as the
    CLI's); merged_scores without it (a test score) keeps torch's kernel."""
    from nps_pruning.apps.merge import merged_scores
    from nps_pruning.apps.settings import MergeSettings
    from nps_pruning.cli.settings import merge_settings
    torch.manual_seed(0)
    net, x = torch.nn.Linear(16, 2), torch.randn(6, 16)

    class Task:
        device = "cpu"

        def score(self, ev, merged):
            return ev(net)

    def evaluator(model):
        with torch.no_grad():
            return float(model(x).sum())
    want = merged_scores([Task()], [evaluator], None)
    assert calls == []
    got = merged_scores([Task()], [evaluator], None, MergeSettings().cpu_linear)
    assert len(calls) == 1 and got == pytest.approx(want, rel=1e-5)
    assert MergeSettings().cpu_linear == "onednn"
    with pytest.raises(NPSError, match="cpu_linear must be one of"):
        MergeSettings(cpu_linear="mkl")
    from nps_pruning.cli.options import MergeOptions, build
    opts = build(MergeOptions, {"pretrained": "a", "finetuned": ["b", "c"], "output": "o",
                                "cpu_linear": "torch"}, source="t")
    assert merge_settings(opts).cpu_linear == "torch"
