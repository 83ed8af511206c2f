"""SNRAdamW(fused=True) against the per-tensor oracle (every option, mask, reduction, dtype; resume), its
one-warning fallback, and state_dtype="bfloat16" (state bytes and what it changes)."""

import warnings

import pytest
import torch

from hf_snr import SNRAdamW, fused_cpu

from test_gate_options import K_MICRO, OPTION_SETS, _feed, _mixed, resume_matches_straight

needs_kernel = pytest.mark.skipif(not fused_cpu.available(), reason=f"no C kernel: {fused_cpu.unavailable_reason()}")

CASES = {**OPTION_SETS, "tensor_hard": dict(reduction="tensor", mask="hard"), "signal_step": dict(signal="step"),
         "bf16_variance": dict(state_dtype="bfloat16"), "tensor_bf16": dict(reduction="tensor", state_dtype="bfloat16")}


def _run(opts, impl, steps=10):
    params, groups = _mixed(dict(opts, warmup_steps=2, **({} if "mask" in opts else {"mask": "soft"}), alpha=0.5),
                            dict(opts, warmup_steps=0, lr=3e-3, weight_decay=0.2))
    kw = dict(fused=True) if impl == "fused" else dict(foreach=impl == "foreach")
    opt = SNRAdamW(groups, **kw)
    stats = []
    for t in range(1, steps + 1):
        if t % 3 == 0:
            opt.request_stats()
        _feed(params, t, K_MICRO)
        opt.step()
        stats.append(dict(opt.last_stats))
    return params, opt, stats


@needs_kernel
@pytest.mark.parametrize("name", CASES)
def test_fused_equals_the_oracle(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the kernel really ran
        pf, of, sf = _run(CASES[name], "fused")
    po, oo, so = _run(CASES[name], "single")
    for a, b in zip(pf, po):
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # the same fp32 value rounded to bf16: at most one bf16 ulp apart
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "exp_var"):
            assert of.state[a][key].dtype == oo.state[b][key].dtype
            torch.testing.assert_close(of.state[a][key].float(), oo.state[b][key].float(), rtol=1e-5, atol=1e-9)
    for x, y in zip(sf, so):
        for key in x:
            scale = abs(y["signal"]) + abs(y["noise"]) if key == "population_gain" else abs(y[key])
            assert x[key] == pytest.approx(y[key], abs=1e-5 * scale + 1e-12), key


@needs_kernel
@pytest.mark.parametrize("name", ["default", "all", "bf16_variance"])
def test_fused_resume_equals_a_straight_run(name, tmp_path):
    opts = dict(CASES[name], fused=True, warmup_steps=2, lr=1e-2, weight_decay=0.1)
    (p, opt), (_, loaded) = resume_matches_straight(opts, tmp_path, shape=(8, 6))
    assert loaded["exp_var"].dtype == opt.state[p]["exp_var"].dtype  # state_dtype survives loading


def test_fused_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SNR_CC", "/nonexistent/cc")
    monkeypatch.setenv("HF_SNR_CACHE", str(tmp_path))
    fused_cpu._reset()
    try:
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = SNRAdamW([p], fused=True)
        with pytest.warns(RuntimeWarning, match=r"fused=True\) runs the foreach path instead: .*not found") as rec:
            for t in range(1, 4):
                _feed([p], t, 1)
                opt.step()
        assert len([w for w in rec if "fused=True" in str(w.message)]) == 1
    finally:
        monkeypatch.undo()
        fused_cpu._reset()


def test_state_dtype_bfloat16_state_bytes_and_trajectory():
    """bf16 variance: optimizer state 1.25x AdamW's fp32 state (m, v fp32 + s bf16), and the trajectory stays
    close to the fp32 one on a noisy problem (the gate reads s rounded to 8 bits of mantissa)."""
    def run(state_dtype):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32))
        opt = SNRAdamW([p], state_dtype=state_dtype, lr=1e-2, warmup_steps=2)
        means = []
        for t in range(1, 41):
            _feed([p], t, 2)
            opt.request_stats()
            opt.step()
            means.append(opt.last_stats["mask_mean"])
        return p, opt, means

    p32, o32, m32 = run("float32")
    p16, o16, m16 = run("bfloat16")
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.randn(64, 32))])
    adamw.param_groups[0]["params"][0].grad = torch.randn(64, 32)
    adamw.step()

    def nbytes(opt):
        return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k != "step")

    assert o16.state[p16]["exp_var"].dtype == torch.bfloat16
    assert nbytes(o32) / nbytes(adamw) == pytest.approx(1.5)
    assert nbytes(o16) / nbytes(adamw) == pytest.approx(1.25)
    assert max(abs(a - b) for a, b in zip(m32, m16)) < 0.02
    assert (p32 - p16).abs().max().item() < 0.05 * (p32.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_nonfinite_check_finds_inf_and_nan_and_nothing_else(dtype):
    big = torch.finfo(dtype).max
    for threads in (1, 2):
        ts = [torch.randn(70_001).to(dtype), torch.full((5,), big, dtype=dtype), torch.zeros(0, dtype=dtype)]
        assert not fused_cpu.any_nonfinite(ts, num_threads=threads)  # the largest finite value is finite
        for bad in (float("inf"), float("-inf"), float("nan")):
            ts[0][69_999] = bad
            assert fused_cpu.any_nonfinite(ts, num_threads=threads), bad
            ts[0][69_999] = 0.0
    with pytest.raises(ValueError, match="contiguous CPU float32 or bfloat16"):
        fused_cpu.any_nonfinite([torch.zeros(4, 4).t()])


_TRITON_WIRING = r"""
import math, sys, warnings
import torch
import hf_snr.optimizer as om
from hf_snr import SNRAdamW, fused_triton
assert fused_triton.available(), fused_triton.unavailable_reason()
# route the optimizer's CUDA path to the interpreted kernel on CPU tensors
om._fused._kernel = staticmethod(lambda t: fused_triton)
om._fused.unavailable = staticmethod(lambda t: None)
om.SNRAdamW._all_fused_on_cuda = lambda self: all(g["fused"] for g in self.param_groups)
for opts in ({}, dict(reduction="row", noise="ema"), dict(decay_to="init", mask="soft")):
    torch.manual_seed(0)
    start = [torch.randn(6, 5), torch.randn(7)]
    a = [torch.nn.Parameter(x.clone()) for x in start]
    b = [torch.nn.Parameter(x.clone()) for x in start]
    hp = dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, **opts)
    fused, ref = SNRAdamW(a, fused=True, **hp), SNRAdamW(b, foreach=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 7):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        fused.request_stats(); ref.request_stats()
        fused.step(); ref.step()
        fs, rs = fused.last_stats, ref.last_stats
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert abs(fs["mask_mean"] - rs["mask_mean"]) < 1e-5, (fs, rs)
    # a non-finite gradient: decided on the device, nothing moves, counted when the statistics are read
    before = [x.detach().clone() for x in a] + [fused.state[x][k].clone() for x in a for k in ("exp_avg", "exp_avg_sq", "exp_var")]
    for x in a:
        x.grad = torch.randn(x.shape)
    a[0].grad[1, 1] = float("nan")
    fused.request_stats()
    fused.step()
    after = [x.detach() for x in a] + [fused.state[x][k] for x in a for k in ("exp_avg", "exp_avg_sq", "exp_var")]
    assert all(torch.equal(u, v) for u, v in zip(before, after))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stats = fused.last_stats
    assert stats["skipped_steps"] == 1.0 and any("on the device" in str(x.message) for x in w)
print("TRITON-WIRING-OK")
"""


@pytest.mark.slow
def test_the_cuda_fused_path_through_the_triton_interpreter(tmp_path):
    """The optimizer's CUDA wiring (kernel calls, device-side statistics, the found_inf skip) run on CPU under
    Triton's interpreter: equal to the oracle, and a non-finite step leaves parameters and state untouched."""
    pytest.importorskip("triton", reason="triton is not installed (CUDA builds of torch bring it)")
    import os
    import subprocess
    import sys

    script = tmp_path / "wiring.py"
    script.write_text(_TRITON_WIRING)
    env = dict(os.environ, TRITON_INTERPRET="1", HF_SNR_AUTOREGISTER="0")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON-WIRING-OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
