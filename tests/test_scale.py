"""Large-model paths (issue items 2–3): compact (16-bit) τ, compact sorted magnitudes, and the
device parameter. CUDA cases run only where torch sees a GPU; elsewhere they skip, saying so."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nps_pruning.apps.settings import PruneSettings
from nps_pruning.checkpoints import load_task_vector
from nps_pruning.core import build_candidate, candidate_mask, keep_count, make_bands, reference_mask
from nps_pruning.core.bands import _make_bands_reference
from nps_pruning.errors import NPSError

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: no GPU here; "
        "the CUDA path is checked on a GPU machine")),
]
HALF = (torch.bfloat16, torch.float16)


def _tau(D, gen, dtype):
    v = torch.randn(D, generator=gen) * 1e-3
    v[torch.rand(D, generator=gen) < 0.2] = 0.0
    return v.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_tau_fast_mask_equals_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    for i in range(40):
        D = int(torch.randint(50, 4000, (1,), generator=gen))
        v = _tau(D, gen, dtype)
        M = (2, 8, 20)[i % 3]
        r = (0.05, 0.2, 0.01, 0.7)[i % 4]
        w = torch.rand(M, generator=gen) * 3
        if i % 5 == 1:
            w = torch.round(w * 2) / 2           # product ties across bands
        for sorted_dtype in (torch.float32, dtype):
            bands = make_bands(v, M, ("focused", "uniform")[i % 2], keep_ratio=r,
                               sorted_dtype=sorted_dtype)
            ref = reference_mask(v, bands, w, r)
            assert torch.equal(candidate_mask(v, bands, w, r), ref)
            assert int(ref.sum()) == keep_count(D, r)
            # the 16-bit τ behaves exactly as the float32 vector holding the same values
            v32 = v.float()
            b32 = make_bands(v32, M, bands.scheme, keep_ratio=r)
            assert torch.equal(b32.band_of, bands.band_of)
            base = torch.randn(D, generator=gen).to(dtype)
            for kept in ("weighted", "original"):
                got = build_candidate(v, bands, w, r, base=base, kept_values=kept,
                                      out=torch.empty(D))
                want = build_candidate(v32, b32, w, r, base=base.float(), kept_values=kept)
                assert torch.equal(got, want)


def _write_pair(tmp_path, dtype, *, scale=1.0, noise=1e-3):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(30, 20, generator=g) * scale, "b.bias": torch.randn(20, generator=g)}
    ft = {k: t + noise * torch.randn(t.shape, generator=g) for k, t in base.items()}
    ft["head.weight"] = torch.randn(3, 20, generator=g)           # task-specific
    base = {k: t.to(dtype).contiguous() for k, t in base.items()}
    ft = {k: t.to(dtype).contiguous() for k, t in ft.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors", base, ft


@pytest.mark.parametrize("ckpt_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau_dtype", [torch.float32, torch.bfloat16, torch.float16, "bfloat16"])
def test_load_task_vector_compact(tmp_path, ckpt_dtype, tau_dtype):
    pb, pf, base, ft = _write_pair(tmp_path, ckpt_dtype)
    want_dt = torch.bfloat16 if tau_dtype == "bfloat16" else tau_dtype
    b32, tv32 = load_task_vector(pb, pf)
    bflat, tv = load_task_vector(pb, pf, dtype=tau_dtype, base_dtype="checkpoint")
    assert tv.values.dtype == want_dt
    assert bflat.dtype == (ckpt_dtype if ckpt_dtype != torch.float32 else torch.float32)
    assert torch.equal(bflat.float(), b32)                          # lossless
    assert torch.equal(tv.values, tv32.values.to(want_dt))          # one rounding of the fp32 τ
    assert set(tv.task_specific) == {"head.weight"}
    exp = torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in ("a.weight", "b.bias")])
    assert torch.equal(tv32.values, exp)


def test_load_task_vector_fp16_overflow_names_the_tensor(tmp_path):
    pb, pf, _, _ = _write_pair(tmp_path, torch.float32, scale=1e6, noise=1e5)
    with pytest.raises(NPSError, match=r"a\.weight.*float16"):
        load_task_vector(pb, pf, dtype=torch.float16)
    _, tv = load_task_vector(pb, pf, dtype=torch.bfloat16)          # bfloat16 has the range
    assert bool(torch.isfinite(tv.values).all())
    with pytest.raises(ValueError):
        load_task_vector(pb, pf, dtype=torch.int8)
    with pytest.raises(ValueError):
        load_task_vector(pb, pf, base_dtype="float8")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_path_equals_cpu(device, dtype):
    gen = torch.Generator().manual_seed(5)
    D = 20000
    v = _tau(D, gen, dtype)
    v[:300] = v[300:600]                                            # exact ties
    base = torch.randn(D, generator=gen)
    cpu_bands = make_bands(v, 8, "focused", keep_ratio=0.05)
    dv = v.to(device)
    bands = make_bands(dv, 8, "focused", keep_ratio=0.05, sorted_dtype=dtype)
    assert bands.band_of.device.type == device
    assert bands.sorted_abs.device.type == "cpu"                    # host memory, always
    assert torch.equal(bands.band_of.cpu(), cpu_bands.band_of)
    assert torch.equal(bands.sorted_abs.float(), cpu_bands.sorted_abs)
    for i in range(6):
        w = torch.rand(8, generator=gen) * 2.5
        r = (0.05, 0.01, 0.3)[i % 3]
        m = candidate_mask(dv, bands, w, r)
        assert m.device.type == device
        assert torch.equal(m.cpu(), reference_mask(v, cpu_bands, w, r))
        out = torch.empty(D, device=device)
        build_candidate(dv, bands, w, r, base=base.to(device), out=out)
        assert torch.equal(out.cpu(), build_candidate(v, cpu_bands, w, r, base=base))


def test_device_mismatch_is_a_clear_error():
    v = torch.randn(100)
    bands = make_bands(v, 4, "uniform")
    moved = type(bands)(bands.num_bands, bands.scheme, bands.starts, bands.band_of.to("meta"),
                        bands.sorted_abs)
    with pytest.raises(ValueError, match="band_of"):
        candidate_mask(v, moved, np.ones(4), 0.1)
    with pytest.raises(ValueError, match="out"):
        build_candidate(v, bands, np.ones(4), 0.1, out=torch.empty(100, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_compact_tau_and_device(tiny_bert, text_csv, device):
    pytest.importorskip("transformers")
    from nps_pruning.search import CandidateScorer
    base, ft = tiny_bert
    spec = f"text-classification:{text_csv}"
    run = PruneSettings(keep_ratio=0.1, bands=4, space="magnitude")
    ref = CandidateScorer(base, ft, spec, run)
    s = CandidateScorer(base, ft, spec, run, device=device, tau_dtype="bfloat16")
    w = np.array([1.0, 1.5, 0.5, 2.0])
    score, info = s(w)
    st = s.state
    assert st.prep.values.dtype == torch.bfloat16 and st.prep.values.device.type == device
    assert st.bands.band_of.device.type == device and st.bands.sorted_abs.device.type == "cpu"
    assert set(info) == {"build_s", "eval_s", "examples"} and 0.0 <= score <= 1.0
    # the candidate in the model is the float32 path's candidate for the bf16-rounded τ
    ref(w)
    v16 = ref.state.prep.values.to(torch.bfloat16)
    b = make_bands(v16, 4, "focused", keep_ratio=0.1)
    # the scorer keeps no θ_pre of its own (the model holds it): take it from the checkpoints
    from nps_pruning.checkpoints import load_task_vector
    assert st.base_flat is None and ref.state.base_flat is None
    theta_pre, _ = load_task_vector(base, ft)
    want = build_candidate(v16, b, w, 0.1, base=theta_pre)
    assert torch.equal(st.flat.cpu(), want)
    s.restore()                    # and gives the model θ_pre back exactly
    assert torch.equal(st.flat.cpu().view(torch.int32), theta_pre.view(torch.int32))
    if device == "cpu":
        ref_bands = _make_bands_reference(v16, 4, "focused", keep_ratio=0.1)
        assert torch.equal(ref_bands.band_of, st.bands.band_of)
