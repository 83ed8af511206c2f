"""SNRAdamW(fused=True) against the per-tensor oracle (every option, mask, reduction, dtype; resume), its
one-warning fallback, and state_dtype="bfloat16" (state bytes and what it changes)."""

import warnings

import pytest
import torch
from test_gate_options import K_MICRO, OPTION_SETS, _feed, _mixed, resume_matches_straight

from hf_snr import SNRAdamW, fused_cpu

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
    # the culprit is named by its place in the caller's list (empty tensors, which are never read, included)
    with pytest.raises(ValueError, match=r"tensor 2 is torch.float16 cpu shape \(3,\)"):
        fused_cpu.any_nonfinite([torch.zeros(3), torch.zeros(0, dtype=torch.float16), torch.zeros(3).half()])
    with pytest.raises(ValueError, match="tensor 1 is list"):
        fused_cpu.any_nonfinite([torch.zeros(3), [1.0]])


def _folded_setup(policy, groups_opts):
    """Two groups (as the Trainer makes), the second mixing fp32 and bf16 (two kernel calls), one step taken."""
    gen = torch.Generator().manual_seed(0)
    shapes = [[(300, 7), (11,)], [(64, 9), (5,), (130,)]]
    params = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in g] for g in shapes]
    params[1][1].data = params[1][1].data.bfloat16()
    groups = [dict(params=ps, **o) for ps, o in zip(params, groups_opts)]
    opt = SNRAdamW(groups, fused=True, nonfinite=policy, warmup_steps=0)
    flat = [p for g in params for p in g]
    for t in (1, 2):
        for p in flat:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if t == 1:
            opt.step()
    return flat, opt


# element gates only (the check in the first group's update call), a row gate in the second group (in its
# moments call, after the first group's moments), a row gate in the first (the very first call)
FOLDED = {"element": ({}, dict(weight_decay=0.0)),
          "row_second": ({}, dict(reduction="row", noise="ema")),
          "row_first": (dict(reduction="tensor"), dict(mask="soft"))}


@needs_kernel
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("case", FOLDED)
def test_the_nonfinite_skip_folded_into_the_kernel_changes_nothing(case, where, monkeypatch):
    from test_optimizer import _assert_skipped_step_changes_nothing

    flat, opt = _folded_setup("skip", FOLDED[case])
    ref_flat, ref_opt = _folded_setup("skip", FOLDED[case])
    # the step reads the gradients once, inside the kernel: the separate check is not called
    monkeypatch.setattr(fused_cpu, "any_nonfinite", lambda *a, **k: pytest.fail("the separate check ran"))
    bad = flat[0] if where == "first" else flat[-1]
    bad.grad.view(-1)[-1] = float("nan")
    _assert_skipped_step_changes_nothing(opt, flat)
    # the next step is the one the reference takes at its step 2
    gen = torch.Generator().manual_seed(5)
    for a, b in zip(flat, ref_flat):
        a.grad = torch.randn(a.shape, generator=gen).to(a.dtype)
        b.grad = a.grad.clone()
    ref_opt.request_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        ref_opt.step()
    for a, b in zip(flat, ref_flat):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["step"], ref_opt.state[b]["step"])
    assert opt.last_stats["mask_mean"] == ref_opt.last_stats["mask_mean"]
    assert opt.last_stats["skipped_steps"] == 1.0


@needs_kernel
def test_the_nonfinite_raise_folded_into_the_kernel_changes_nothing():
    from test_optimizer import _assert_unchanged, _snapshot

    flat, opt = _folded_setup("raise", FOLDED["row_second"])
    flat[-1].grad[3] = float("inf")
    snap = _snapshot(opt, flat)
    with pytest.raises(RuntimeError, match=r"non-finite \(inf/nan\) gradient at optimizer step 2"):
        opt.step()
    _assert_unchanged(opt, flat, snap)
    assert opt.snr_state["steps"] == 1


_TRITON_WIRING = r"""
import math, sys, warnings
import torch
from hf_snr import SNRAdamW, _fused, _nonfinite, fused_triton
assert fused_triton.available(), fused_triton.unavailable_reason()
# route the optimizer's CUDA path to the interpreted kernel on CPU tensors
_fused.kernel = lambda t: fused_triton
_fused.unavailable = lambda t: None
_nonfinite.all_fused_on_cuda = lambda param_groups: all(g["fused"] for g in param_groups)
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
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape)
        y.grad = x.grad.clone()
    a[0].grad[1, 1] = b[0].grad[1, 1] = float("nan")
    fused.request_stats()
    fused.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.step()  # skipped on the host
    after = [x.detach() for x in a] + [fused.state[x][k] for x in a for k in ("exp_avg", "exp_avg_sq", "exp_var")]
    assert all(torch.equal(u, v) for u, v in zip(before, after))
    # the steps after it take the bias corrections (and warm-up) of the steps taken, not attempted, before the
    # skip count is read (no sync): the trajectory stays the oracle's
    for t in range(8, 10):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        fused.step(); ref.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stats = fused.last_stats
    assert stats["skipped_steps"] == 1.0 and any("on the device" in str(x.message) for x in w)
    # read with the statistics, the skip folds into the step counts: those of the steps taken, as the oracle's
    assert [fused.state[x]["step"].item() for x in a] == [ref.state[y]["step"].item() for y in b] == [8.0, 8.0]
    assert fused.snr_state["steps"] == ref.snr_state["steps"] == 8
    assert all("device_skips" not in st for st in fused.state_dict()["state"].values())
print("TRITON-WIRING-OK")
"""  # noqa: E501 (a line of the code this string runs: rewrapping it would change the string)


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
