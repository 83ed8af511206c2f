"""The Triton kernel (hf_snr.fused_triton) against the plain torch reference of tests/test_fused_cpu.py.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors:
the same kernel source, each program executed with numpy (IEEE fp32 ops, true fmas). There the
results also equal the CPU kernel (hf_snr.fused_cpu) bit for bit, which these tests check where
it builds. The one path the interpreter does not run is the bf16 cast (it uses integer rounding
there, see the module doc). Without a GPU the compiled path is checked as far as it goes: the
kernel compiles to sm_90 code with IEEE division and square root and no other fused operations.
With a CUDA device (test_cuda_*) the compiled kernel runs against the same reference, and a step
runs under torch's sync debug mode. The availability tests run everywhere.

The interpreter has to be switched on before triton is first imported (triton.language's own
functions, tl.sum and the like, are decorated at import), so a normal run leaves the interpreter
tests to a child process: :func:`test_interpreter_suite` runs this file again with
TRITON_INTERPRET=1, where they run and the availability tests are skipped. To run them directly:
``TRITON_INTERPRET=1 pytest tests/test_fused_triton.py``.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from hf_snr import fused_cpu, fused_triton

F32, BF16 = torch.float32, torch.bfloat16


def _load_reference():
    """tests/test_fused_cpu.py's reference and data helpers, loaded by path (any pytest import mode)."""
    path = pathlib.Path(__file__).with_name("test_fused_cpu.py")
    spec = importlib.util.spec_from_file_location("_fused_cpu_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load_reference()
HP, SIZES, SHAPES_2D, DTYPES = R.HP, R.SIZES, R.SHAPES_2D, R.DTYPES
UPD_KEYS = ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr", "alpha", "softness", "noise_scale")


# the interpreter is on for this whole process (set before anything imported triton)
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


# -- availability: runs everywhere -------------------------------------------------------------------
@pytest.fixture
def compiled_mode(monkeypatch):
    """The module as a normal process sees it: no interpreter, nothing cached."""
    if IN_INTERPRETER:
        pytest.skip("checked by the parent process, without the interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_triton._reset()
    yield
    fused_triton._reset()


def test_availability_is_reported(compiled_mode):
    ok, reason = fused_triton.available(), fused_triton.unavailable_reason()
    assert isinstance(ok, bool) and (reason is None) == ok
    try:
        import triton  # noqa: F401
        has_triton = True
    except ImportError:
        has_triton = False
    if not has_triton:
        assert not ok and "triton is not installed" in reason
    elif not torch.cuda.is_available():
        assert not ok and "no CUDA device" in reason
    if not ok:
        with pytest.raises(RuntimeError, match="fused_triton is unavailable"):
            fused_triton.step([], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.99, rho=0.9, eps=1e-8,
                              weight_decay=0.0, bc1=1.0, bc2=1.0, bcr=1.0)


def test_cpu_only_machine_is_unavailable(compiled_mode):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert fused_triton.available() is False
    reason = fused_triton.unavailable_reason()
    assert "no CUDA device" in reason or "triton is not installed" in reason, reason


_FLOAT_ARGS = ("bc1_s", "bc2_s", "bcr_s", "ns_s", "open_s", "beta1", "beta2", "rho", "omb1", "omb2", "omr", "lr",
               "eps", "decay_mul", "lrwd", "alpha", "softness", "c", "mb_a", "mb_b")


@pytest.mark.parametrize("variant", [
    dict(PASS=0, MASK=0, SIGNAL=0, VARIANCE=0, DECAY=0, WANT_STATS=True, ROWS=False, P_BF16=False, S_BF16=False),
    dict(PASS=0, MASK=1, SIGNAL=1, VARIANCE=1, DECAY=1, WANT_STATS=True, ROWS=False, P_BF16=True, S_BF16=True),
    dict(PASS=0, MASK=2, SIGNAL=0, VARIANCE=0, DECAY=1, WANT_STATS=False, ROWS=False, P_BF16=True, S_BF16=False),
    dict(PASS=1, MASK=0, SIGNAL=0, VARIANCE=0, DECAY=0, WANT_STATS=False, ROWS=True, P_BF16=False, S_BF16=True),
    dict(PASS=2, MASK=0, SIGNAL=1, VARIANCE=0, DECAY=0, WANT_STATS=True, ROWS=True, P_BF16=True, S_BF16=True),
], ids=["f32", "bf16-soft-step-microbatch-anchor", "bf16-hard-nostats", "moments-rows", "update-rows"])
def test_kernel_compiles_for_sm90(compiled_mode, monkeypatch, tmp_path, variant):
    """The compiled path, without a GPU: the kernel compiles to a cubin for sm_90 (ptxas included), and the
    PTX has IEEE division and square root, no fused multiply-adds beyond the explicit ones, no flush to zero,
    and vector loads when the addresses are aligned."""
    pytest.importorskip("triton")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - another triton layout
        pytest.skip(f"triton's compiler API: {e}")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel, rowsum = fused_triton._get_kernels()
    cs = dict(variant, PER_TENSOR=variant["PASS"] == 2, HAS_FLAG=True, LERP_SMALL=True, P0_BF16=variant["P_BF16"],
              MANUAL=False, ALIGNED=variant["PASS"] != 2, NEED_G=variant["PASS"] != 2 or variant["SIGNAL"] == 1,
              NEED_MUSIG=variant["ROWS"] if variant["PASS"] == 1 else variant["WANT_STATS"] or not variant["ROWS"],
              BLOCK=fused_triton.BLOCK)
    sig = dict(ptrs="*i64", gptrs="*i64", items="*i64", meta="*i64", tsc="*fp32" if cs["PER_TENSOR"] else "*i64",
               q_rows="*fp32" if cs["ROWS"] and cs["PASS"] == 2 else "*i64", partials="*fp64", flag="*fp32", T="i32")
    sig.update({f: "fp32" for f in _FLOAT_ARGS})
    sig.update({k: "constexpr" for k in cs})
    assert sorted(sig) == sorted(kernel.arg_names)
    sig = {k: sig[k] for k in kernel.arg_names}
    ck = triton.compile(ASTSource(kernel, sig, constexprs=cs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=4, enable_fp_fusion=False))
    ptx = ck.asm["ptx"]
    assert ck.asm.get("cubin")
    assert "div.rn.f32" in ptx and ".ftz" not in ptx and "div.full" not in ptx and "approx" not in ptx
    if cs["PASS"] != 1:
        assert "sqrt.rn.f32" in ptx
    if cs["P_BF16"] and cs["PASS"] != 1 or cs["S_BF16"] and cs["PASS"] != 2:
        assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx)
    if cs["ALIGNED"]:  # the full blocks: 16-byte vector loads and stores (4 fp32 or 8 bf16)
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    fmas = ptx.count("fma.rn.f32")  # explicit: s, m, v (moments), the decay towards p0; 8 elements a thread,
    per_thread = fused_triton.BLOCK // (4 * 32)  # in two copies of the block (full blocks, the tail)
    assert fmas == 2 * per_thread * ((3 if cs["PASS"] != 2 else 0) + (cs["DECAY"] if cs["PASS"] != 1 else 0))
    sig2 = dict(partials="*fp64", row_items="*i64", out="*fp64", CHUNK="constexpr")
    assert triton.compile(ASTSource(rowsum, sig2, constexprs=dict(CHUNK=fused_triton._ROWSUM_CHUNK)),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm.get("cubin")


# -- the kernel under the interpreter ---------------------------------------------------------------
@pytest.mark.slow
def test_interpreter_suite():
    """Runs this file's interpreter tests in a child process with TRITON_INTERPRET=1."""
    if IN_INTERPRETER:
        pytest.skip("this is the interpreter run")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pytest", str(pathlib.Path(__file__).resolve()), "-q",
                          "-p", "no:cacheprovider", "-k", "not test_interpreter_suite"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 150, out[-3000:]  # the interpreter tests ran (not skipped)


@pytest.fixture
def interp():
    pytest.importorskip("triton")
    if not IN_INTERPRETER:
        pytest.skip("runs under the Triton interpreter in a child process (test_interpreter_suite), or "
                    "with TRITON_INTERPRET=1 set before pytest starts")
    fused_triton._reset()
    assert fused_triton.available(), fused_triton.unavailable_reason()
    yield
    fused_triton._reset()


def st_list(st):
    assert isinstance(st, torch.Tensor) and st.dtype == torch.float64 and st.shape == (5,)
    return st.tolist()


def cpu_kernel():
    return fused_cpu.available()


def same(a, b, keys=("p", "m", "v", "s")):
    for k in keys:
        if a.get(k) is None:
            continue
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k


@pytest.mark.parametrize("mask,signal,variance,decay", list(itertools.product(
    ("snr", "soft", "hard"), ("ema", "step"), ("ema", "microbatch"), ("zero", "anchor"))))
@pytest.mark.parametrize("pdtype,sdtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_step_matches_reference(interp, mask, signal, variance, decay, pdtype, sdtype):
    gr = R.make_group([(n,) for n in SIZES], pdtype, sdtype, anchors=decay == "anchor", sq=variance == "microbatch")
    ref, cpu = R.clone(gr), R.clone(gr)
    rs, kink = R.run_reference(ref, HP, mask=mask, signal=signal, variance=variance)
    kw = dict(**R.kernel_hp(HP, gr["t"]), mask=mask, signal=signal, variance=variance, sq_scale=HP["sq_scale"],
              g2_scale=HP["g2_scale"], want_stats=True)
    st = fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], sq_sums=gr["sq"], anchors=gr["p0"], **kw)
    st = st_list(st)
    R.compare(gr, ref, kink, st, rs)
    assert 0.1 < st[0] / st[1] < 0.9 and 0.1 < st[2] / st[1] < 0.9
    if cpu_kernel():  # the same IEEE operations as the C kernel: the same bits
        st_c = fused_cpu.step(cpu["p"], cpu["g"], cpu["m"], cpu["v"], cpu["s"], sq_sums=cpu["sq"],
                              anchors=cpu["p0"], **kw)
        same(gr, cpu, ("p", "m", "v", "s", "sq"))
        assert st[1:3] == list(st_c[1:3])
        torch.testing.assert_close(torch.tensor(st, dtype=torch.float64), torch.tensor(st_c, dtype=torch.float64),
                                   rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("pdtype,sdtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gate_open(interp, pdtype, sdtype):
    gr = R.make_group([(n,) for n in SIZES], pdtype, sdtype, seed=1)
    ref = R.clone(gr)
    rs, kink = R.run_reference(ref, HP, gate_open=True)
    st = st_list(fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **R.kernel_hp(HP, gr["t"]),
                                   gate_open=True, want_stats=True))
    R.compare(gr, ref, kink, st, rs)
    assert st[0] == st[1] == st[2]


def test_without_stats(interp):
    gr = R.make_group([(n,) for n in SIZES], seed=2)
    ref = R.clone(gr)
    _, kink = R.run_reference(ref, HP)
    assert fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **R.kernel_hp(HP, gr["t"])) is None
    R.compare(gr, ref, kink)


@pytest.mark.parametrize("as_tensors", [False, True])
def test_per_tensor_scalars(interp, as_tensors):
    """bc1, bc2, bcr, noise_scale, gate_open per tensor: as lists (uploaded), or as tensors on the device."""
    ts, nss, opens = (2, 5, 9, 30), (1.0, 0.3, 0.7, 2.0), (True, False, False, True)
    groups = [R.make_group([(n,)], seed=3 + i, t=t) for i, (n, t) in enumerate(zip(SIZES, ts))]
    refs = [R.clone(g) for g in groups]
    rs = torch.zeros(5, dtype=torch.float64)
    for r, ns, op in zip(refs, nss, opens):
        rs += R.run_reference(r, dict(HP, noise_scale=ns), mask="snr", gate_open=op)[0]
    cat = {k: [x for g in groups for x in g[k]] for k in ("p", "g", "m", "v", "s")}
    hp = R.kernel_hp(HP, 1)
    per = dict(bc1=[R.bias(t, HP)[0] for t in ts], bc2=[R.bias(t, HP)[1] for t in ts],
               bcr=[R.bias(t, HP)[2] for t in ts], noise_scale=list(nss))
    gate_open = opens
    if as_tensors:  # on the parameters' device (here: the interpreter's CPU); one of them a shared value
        per = {k: torch.tensor(v, dtype=torch.float64) for k, v in per.items()}
        per["bc2"] = per["bc2"].float()
        gate_open = torch.tensor(opens)
    hp.update(per)
    st = fused_triton.step(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **hp, gate_open=gate_open,
                           want_stats=True)
    for g, r in zip(groups, refs):
        R.compare(g, r, [torch.zeros(x.shape, dtype=torch.bool) for x in r["p"]])
    torch.testing.assert_close(st, rs, rtol=1e-6, atol=0.0)


def test_per_tensor_scalar_length_is_checked(interp):
    gr = R.make_group([(4,), (5,)], seed=3)
    hp = R.kernel_hp(HP, 3)
    hp["bc1"] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="bc1 has 3 values for 2 tensors"):
        fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **hp)
    hp["bc1"] = torch.ones(3)
    with pytest.raises(ValueError, match="bc1 has 3 values for 2 tensors"):
        fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **hp)


@pytest.mark.parametrize("reduce", ["row", "tensor"])
@pytest.mark.parametrize("mask,signal", list(itertools.product(("snr", "soft", "hard"), ("ema", "step"))))
@pytest.mark.parametrize("pdtype,sdtype", [(F32, F32), (BF16, BF16)], ids=lambda d: str(d).split(".")[-1])
def test_two_pass_reduction(interp, reduce, mask, signal, pdtype, sdtype):
    hp = dict(HP, alpha=0.05)
    gr = R.make_group(SHAPES_2D, pdtype, sdtype, seed=4, anchors=True, noise_scales=[1e-3, 1e-2, 3e-2, 0.1, 0.3])
    ref, cpu = R.clone(gr), R.clone(gr)
    rs, kink = R.run_reference(ref, hp, mask=mask, signal=signal, reduce=reduce)
    khp = R.kernel_hp(hp, gr["t"])
    mom = dict(beta1=hp["beta1"], beta2=hp["beta2"], rho=hp["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens=reduce,
               signal=signal, noise_scale=hp["noise_scale"])
    sums = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **mom)
    rows = [s[0] if reduce == "row" and len(s) == 2 else 1 for s in SHAPES_2D]
    assert sums.shape == (sum(rows), 2) and sums.dtype == torch.float64
    m1, v1, s1 = [x.clone() for x in gr["m"]], [x.clone() for x in gr["v"]], [x.clone() for x in gr["s"]]
    start = 0
    for i in range(len(SHAPES_2D)):
        _, mu2, sig2 = R.ref_signal(ref["g"][i], ref["m"][i], ref["s"][i], hp, gr["t"], signal)
        r = rows[i]
        exp = torch.stack([mu2.reshape(r, -1).double().sum(1), sig2.reshape(r, -1).double().sum(1)], 1)
        torch.testing.assert_close(sums[start:start + r], exp, rtol=1e-12, atol=0.0)
        start += r
    q_rows = fused_triton.gate(sums, mask=mask, alpha=hp["alpha"], softness=hp["softness"])
    assert q_rows.dtype == F32 and (q_rows > 0.5).any() and (q_rows < 0.5).any()
    upd = dict(q_rows=q_rows, row_lens=reduce, **{k: khp[k] for k in UPD_KEYS}, mask=mask, signal=signal,
               anchors=gr["p0"], want_stats=True)
    st = fused_triton.update(gr["p"], gr["g"] if signal == "step" else None, gr["m"], gr["v"], gr["s"], **upd)
    for a, b in zip(gr["m"] + gr["v"] + gr["s"], m1 + v1 + s1):
        assert torch.equal(a, b)
    R.compare(gr, ref, kink, st_list(st), rs)
    if cpu_kernel():
        sums_c = fused_cpu.moments(cpu["p"], cpu["g"], cpu["m"], cpu["v"], cpu["s"], **mom)
        torch.testing.assert_close(sums, sums_c, rtol=1e-12, atol=0.0)
        upd_c = dict(upd, q_rows=q_rows, anchors=cpu["p0"])
        fused_cpu.update(cpu["p"], cpu["g"] if signal == "step" else None, cpu["m"], cpu["v"], cpu["s"], **upd_c)
        same(gr, cpu)


def test_two_pass_gate_open_and_element_gate(interp):
    for gate_open in (True, False):
        gr = R.make_group(SHAPES_2D, seed=5)
        ref = R.clone(gr)
        rs, kink = R.run_reference(ref, HP, mask="soft", gate_open=gate_open)
        khp = R.kernel_hp(HP, gr["t"])
        out = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"], beta2=HP["beta2"],
                                   rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens=None)
        assert out is None
        st = fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], gate_open=gate_open, mask="soft",
                                 want_stats=True, **{k: khp[k] for k in UPD_KEYS})
        R.compare(gr, ref, kink, st_list(st), rs)


def test_per_tensor_gate_open_two_pass(interp):
    opens = [False, True, False, True, False]
    gr = R.make_group(SHAPES_2D, seed=11, noise_scales=[1e-3, 1e-2, 3e-2, 0.1, 0.3])
    ref = R.clone(gr)
    hp = dict(HP, alpha=0.05)
    khp = R.kernel_hp(hp, gr["t"])
    sums = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=hp["beta1"], beta2=hp["beta2"],
                                rho=hp["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens="row",
                                noise_scale=hp["noise_scale"])
    q = fused_triton.gate(sums, mask="soft", alpha=hp["alpha"], softness=hp["softness"])
    fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens="row", gate_open=opens,
                        mask="soft", **{k: khp[k] for k in UPD_KEYS})
    for i, op in enumerate(opens):
        one = {k: ([v[i]] if isinstance(v, list) else v) for k, v in ref.items()}
        _, kink = R.run_reference(one, hp, mask="soft", gate_open=op, reduce="row")
        R.close_p(gr["p"][i], one["p"][0], ~kink[0])


@pytest.mark.parametrize("two_pass", [False, True])
def test_mixed_dtype_group(interp, two_pass):
    """One launch per dtype signature: the same results as separate calls, rows in the group's order."""
    shapes = [(3, 5), (7,), (4, 129), (1023,), (2, 2), (5,)]
    sigs = [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16), (F32, F32), (BF16, F32)]
    parts = [R.make_group([sh], pd, sd, seed=20 + i, anchors=True)
             for i, (sh, (pd, sd)) in enumerate(zip(shapes, sigs))]
    for i in (1, 4):
        parts[i]["p0"] = [parts[i]["p0"][0].to(F32 if parts[i]["p0"][0].dtype == BF16 else BF16)]
    sep = [R.clone(g) for g in parts]
    cat = {k: [g[k][0] for g in parts] for k in ("p", "g", "m", "v", "s", "p0")}
    khp = R.kernel_hp(HP, parts[0]["t"])
    upd = {k: khp[k] for k in UPD_KEYS}
    mom = dict(beta1=HP["beta1"], beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"],
               noise_scale=HP["noise_scale"])
    if two_pass:
        sums = fused_triton.moments(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **mom, row_lens="row")
        q = fused_triton.gate(sums, alpha=HP["alpha"], softness=HP["softness"])
        st = fused_triton.update(cat["p"], None, cat["m"], cat["v"], cat["s"], q_rows=q, row_lens="row",
                                 anchors=cat["p0"], want_stats=True, **upd)
        exp_sums, exp_st = [], torch.zeros(5, dtype=torch.float64)
        for g in sep:
            s1 = fused_triton.moments(g["p"], g["g"], g["m"], g["v"], g["s"], **mom, row_lens="row")
            exp_sums.append(s1)
            exp_st += fused_triton.update(g["p"], None, g["m"], g["v"], g["s"],
                                          q_rows=fused_triton.gate(s1, alpha=HP["alpha"], softness=HP["softness"]),
                                          row_lens="row", anchors=g["p0"], want_stats=True, **upd)
        assert torch.equal(sums, torch.cat(exp_sums))
    else:
        st = fused_triton.step(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **khp, anchors=cat["p0"],
                               want_stats=True)
        exp_st = torch.zeros(5, dtype=torch.float64)
        for g in sep:
            exp_st += fused_triton.step(g["p"], g["g"], g["m"], g["v"], g["s"], **khp, anchors=g["p0"],
                                        want_stats=True)
    for k in ("p", "m", "v", "s"):
        for a, g in zip(cat[k], sep):
            assert torch.equal(a, g[k][0]), k
    torch.testing.assert_close(st, exp_st, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("reduce", [None, "row"])
def test_unaligned_views(interp, reduce):
    """Views at odd offsets (not 16-byte aligned) take the unhinted path, with the same results; row
    sums of rows that are not a multiple of 8 elements as well."""
    def views(group):  # the same values, one element into a larger buffer
        out = {}
        for k, v in group.items():
            if isinstance(v, list):
                out[k] = []
                for x in v:
                    buf = torch.zeros(x.numel() + 1, dtype=x.dtype)
                    buf[1:].copy_(x.reshape(-1))
                    out[k].append(buf[1:].view(x.shape))
            else:
                out[k] = v
        return out

    shapes = [(3, 1100), (2500,), (4, 8)]
    base = R.make_group(shapes, BF16, F32, seed=16)
    khp = R.kernel_hp(HP, base["t"])
    results = []
    for gr in (R.clone(base), views(base)):
        if reduce is None:
            st = fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, want_stats=True)
        else:
            sums = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"],
                                        beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"],
                                        row_lens=reduce, noise_scale=HP["noise_scale"])
            st = fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], want_stats=True,
                                     q_rows=fused_triton.gate(sums, alpha=HP["alpha"], softness=HP["softness"]),
                                     row_lens=reduce, **{k: khp[k] for k in UPD_KEYS})
        subs = [sub for plan in fused_triton._plans.values() for sub in plan.subs]
        rows_subs = [sub for plan in fused_triton._plans.values() if plan.has_rows for sub in plan.subs]
        results.append((gr, st, subs, rows_subs))
        fused_triton._plans.clear()
    (g0, st0, subs0, rows0), (g1, st1, subs1, rows1) = results
    assert subs0 and all(sub.aligned for sub in subs0) and not any(sub.aligned for sub in subs1)
    assert all(sub.g_aligned for sub in subs0 if sub.gkey) and not any(sub.g_aligned for sub in subs1)
    if reduce == "row":
        assert rows0 and not any(sub.rows_aligned for sub in rows0)  # rows of 1100 elements
    same(g0, g1)
    assert torch.equal(st0, st1)


def test_microbatch_moments_zero_sq(interp):
    gr = R.make_group(SHAPES_2D, seed=6, sq=True)
    ref = R.clone(gr)
    R.run_reference(ref, HP, variance="microbatch", reduce="tensor")
    khp = R.kernel_hp(HP, gr["t"])
    fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"], beta2=HP["beta2"],
                         rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"], variance="microbatch", sq_sums=gr["sq"],
                         sq_scale=HP["sq_scale"], g2_scale=HP["g2_scale"])
    for i in range(len(SHAPES_2D)):
        R.close_f32(gr["s"][i], ref["s"][i])
        R.close_f32(gr["m"][i], ref["m"][i])
        assert torch.count_nonzero(gr["sq"][i]) == 0


@pytest.mark.parametrize("items", ["one block each", "several blocks each"])
@pytest.mark.parametrize("reduce", [None, "row", "tensor"])
def test_multi_block_rows_and_determinism(interp, monkeypatch, reduce, items):
    """Rows and tensors of several blocks (the stage-2 row sums loop over chunks of items), programs
    walking one or several blocks: sums as the reference's, and bit-identical on a rerun."""
    monkeypatch.setattr(fused_triton, "_ROWSUM_CHUNK", 2)  # rows of 3 items: two iterations of the loop
    if items != "one block each":  # as in a large group: 2 blocks a program (the 5000 elements: 3 programs)
        monkeypatch.setattr(fused_triton, "_TARGET_PROGRAMS", 5)
        monkeypatch.setattr(fused_triton, "_MAX_ITEM_BLOCKS", 2)
    shapes = [(3,), (2, 2500), (5000,), (5, 3)]
    base = R.make_group(shapes, seed=7)
    khp = R.kernel_hp(HP, base["t"])
    results = []
    for _ in range(2):
        gr = R.clone(base)
        if reduce is None:
            st = fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, want_stats=True)
            sums = None
        else:
            sums = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"],
                                        beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"],
                                        row_lens=reduce, noise_scale=HP["noise_scale"])
            q = fused_triton.gate(sums, alpha=HP["alpha"], softness=HP["softness"])
            st = fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens=reduce,
                                     want_stats=True, **{k: khp[k] for k in UPD_KEYS})
        results.append((st, sums, gr))
    (st0, sums0, g0), (st1, sums1, g1) = results
    assert torch.equal(st0, st1)
    same(g0, g1)
    ref = R.clone(base)
    rs, kink = R.run_reference(ref, HP, reduce=reduce)
    R.compare(g0, ref, kink, st_list(st0), rs)
    if reduce is not None:
        assert torch.equal(sums0, sums1)
        assert sums0.shape == ((1 + 2 + 1 + 5) if reduce == "row" else 4, 2)


@pytest.mark.parametrize("pdtype,sdtype", [(F32, F32), (BF16, BF16)], ids=lambda d: str(d).split(".")[-1])
def test_ten_step_trajectory(interp, pdtype, sdtype):
    """New gradient tensors every step (their pointer array is uploaded again), warm-up then the gate."""
    shapes = [(n,) for n in SIZES]
    gen = torch.Generator().manual_seed(8)
    means = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    ours = dict(p=[torch.randn(s, generator=gen).to(pdtype) for s in shapes],
                m=[torch.zeros(s) for s in shapes], v=[torch.zeros(s) for s in shapes],
                s=[torch.zeros(s, dtype=sdtype) for s in shapes], sq=None, p0=None)
    ref = R.clone(ours)
    for t in range(1, 11):
        grads = [(mu + torch.randn(mu.shape, generator=gen) * 1e-2).to(pdtype) for mu in means]
        ours["g"], ref["g"], ref["t"] = grads, [g.clone() for g in grads], t
        rs, kink = R.run_reference(ref, HP, mask="snr", gate_open=t <= 3)
        st = fused_triton.step(ours["p"], ours["g"], ours["m"], ours["v"], ours["s"], **R.kernel_hp(HP, t),
                               gate_open=t <= 3, want_stats=True)
        R.compare(ours, ref, kink, st_list(st), rs)


# -- found_inf: a no-op decided inside the kernel ----------------------------------------------------
def _snapshot(gr):
    return {k: [x.clone() for x in gr[k]] for k in ("p", "g", "m", "v", "s", "sq", "p0") if gr.get(k)}


def _unchanged(gr, snap):
    for k, xs in snap.items():
        for a, b in zip(gr[k], xs):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("variance", ["ema", "microbatch"])
@pytest.mark.parametrize("pdtype,sdtype", [(F32, F32), (BF16, BF16)], ids=lambda d: str(d).split(".")[-1])
def test_found_inf_is_a_no_op(interp, variance, pdtype, sdtype):
    gr = R.make_group(SHAPES_2D, pdtype, sdtype, seed=14, anchors=True, sq=True)
    snap = _snapshot(gr)
    khp = R.kernel_hp(HP, gr["t"])
    inf = torch.tensor(1.0)  # any nonzero value
    args = (gr["p"], gr["g"], gr["m"], gr["v"], gr["s"])
    st = fused_triton.step(*args, **khp, variance=variance, sq_sums=gr["sq"], anchors=gr["p0"], want_stats=True,
                           found_inf=inf)
    assert st.tolist() == [0.0] * 5
    for row_lens in ("row", "tensor", None):
        sums = fused_triton.moments(*args, beta1=HP["beta1"], beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"],
                                    bcr=khp["bcr"], row_lens=row_lens, variance=variance, sq_sums=gr["sq"],
                                    found_inf=inf)
        if row_lens is None:
            assert sums is None
        else:
            assert sums.eq(0).all()
    q = torch.ones(sum(s[0] if len(s) == 2 else 1 for s in SHAPES_2D))
    for kw in (dict(q_rows=q, row_lens="row"), dict(q_rows=None), dict(gate_open=True)):
        st = fused_triton.update(*args, **kw, **{k: khp[k] for k in UPD_KEYS}, signal="step", anchors=gr["p0"],
                                 want_stats=True, found_inf=torch.tensor(float("inf")))
        assert st.tolist() == [0.0] * 5
    _unchanged(gr, snap)
    # a zero flag: the ordinary step, bit for bit
    ref, ours = R.clone(gr), R.clone(gr)
    a = fused_triton.step(ref["p"], ref["g"], ref["m"], ref["v"], ref["s"], **khp, variance=variance,
                          sq_sums=ref["sq"], anchors=ref["p0"], want_stats=True)
    b = fused_triton.step(ours["p"], ours["g"], ours["m"], ours["v"], ours["s"], **khp, variance=variance,
                          sq_sums=ours["sq"], anchors=ours["p0"], want_stats=True, found_inf=torch.zeros(()))
    same(ours, ref, ("p", "m", "v", "s", "sq"))
    assert torch.equal(a, b)


def test_found_inf_is_checked(interp):
    gr = R.make_group([(4,)], seed=15)
    khp = R.kernel_hp(HP, 3)
    for bad in (1.0, torch.tensor(1.0, dtype=torch.float64), torch.zeros(2), torch.zeros((), device="meta")):
        with pytest.raises(ValueError, match="found_inf must be a one-element float32 tensor"):
            fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, found_inf=bad)


# -- edge cases and argument checks ----------------------------------------------------------------
def test_bad_tensors_raise_clear_errors(interp):
    gr = R.make_group([(4, 6), (5,)], seed=9)
    khp = R.kernel_hp(HP, gr["t"])

    def call(**over):
        args = {k: gr[k] for k in ("p", "g", "m", "v", "s")}
        args.update(over)
        return fused_triton.step(args["p"], args["g"], args["m"], args["v"], args["s"], **khp)

    with pytest.raises(ValueError, match=r"fused_triton: params\[0\] is not contiguous"):
        call(p=[gr["p"][0].t(), gr["p"][1]])
    with pytest.raises(ValueError, match=r"grads\[1\] is not contiguous"):
        call(g=[gr["g"][0], torch.zeros(10)[::2]])
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has dtype torch.float64"):
        call(m=[gr["m"][0], gr["m"][1].double()])
    with pytest.raises(ValueError, match=r"grads\[0\] has dtype torch.bfloat16, expected torch.float32"):
        call(g=[gr["g"][0].bfloat16(), gr["g"][1]])
    with pytest.raises(ValueError, match=r"exp_vars\[1\] has 4 elements, its parameter 5"):
        call(s=[gr["s"][0], torch.zeros(4)])
    with pytest.raises(ValueError, match=r"grads must be a list of 2"):
        call(g=[gr["g"][0]])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] is int"):
        call(v=[3, gr["v"][1]])
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is on meta, expected a CUDA tensor"):
        call(m=[torch.zeros(24, device="meta"), gr["m"][1]])
    with pytest.raises(ValueError, match=r"mask must be one of"):
        fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, mask="nope")
    with pytest.raises(ValueError, match=r"needs sq_sums"):
        fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, variance="microbatch")
    with pytest.raises(ValueError, match=r"q_rows must be a contiguous .* float32 tensor of 5 gates"):
        fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=torch.ones(3), row_lens="row",
                            **{k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr")})
    with pytest.raises(ValueError, match=r"row_lens\[0\] = 5 does not divide"):
        fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=0.9, beta2=0.99, rho=0.9, bc1=0.5,
                             bcr=0.5, row_lens=[5, 5])
    call()


def test_empty_lists_and_empty_tensors(interp):
    khp = R.kernel_hp(HP, 3)
    assert fused_triton.step([], [], [], [], [], **khp) is None
    z = [torch.zeros(0)]
    st = fused_triton.step(z, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], **khp,
                           want_stats=True)
    assert st.tolist() == [0.0] * 5
    sums = fused_triton.moments(z, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)],
                                beta1=0.9, beta2=0.99, rho=0.9, bc1=0.5, bcr=0.5, row_lens="tensor")
    assert sums.tolist() == [[0.0, 0.0]]


def test_empty_rows_follow_the_oracle_layout(interp):
    shapes = [(3, 0), (0, 5), (2, 3), (4,)]
    gr = R.make_group(shapes, seed=13)
    sums = fused_triton.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=0.9, beta2=0.99, rho=0.9,
                                bc1=0.5, bcr=0.5, row_lens="row")
    assert sums.shape == (3 + 0 + 2 + 1, 2)
    assert sums[:3].eq(0).all() and sums[3:].gt(0).all()
    q = fused_triton.gate(sums)
    fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens="row", lr=1e-3, eps=1e-8,
                        weight_decay=0.0, bc1=0.5, bc2=0.5, bcr=0.5)
    with pytest.raises(ValueError, match="q_rows must be .* of 6 gates"):
        fused_triton.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q[:5], row_lens="row", lr=1e-3,
                            eps=1e-8, weight_decay=0.0, bc1=0.5, bc2=0.5, bcr=0.5)


@pytest.mark.parametrize("mask", ["snr", "soft", "hard"])
def test_non_finite_gradients_propagate_like_torch(interp, mask):
    gr = R.make_group([(n,) for n in SIZES], seed=12)
    gr["g"][2][3], gr["g"][2][7], gr["g"][3][100] = float("nan"), float("inf"), -float("inf")
    ref = R.clone(gr)
    R.run_reference(ref, HP, mask=mask)
    fused_triton.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **R.kernel_hp(HP, gr["t"]), mask=mask)
    for k in ("p", "m", "v", "s"):
        for a, b in zip(gr[k], ref[k]):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), k
            fin = a.isfinite() & b.isfinite()
            torch.testing.assert_close(a[fin], b[fin], rtol=2e-6, atol=1e-7)


def test_bf16_rounding_is_nearest_even(interp):
    """Ties, carries into the exponent, overflow to inf, subnormals: stored as torch rounds them."""
    x = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, 1.9999999, 3.9999, -1.9999999,
                      3.3895e38, 1e-39, -1e-40, 0.0, float("inf"), 1.1754942e-38, 2.0 - 2 ** -9,
                      3.0 - 2 ** -8], dtype=F32)
    n = x.numel()
    # lr = 0, weight_decay = 0: the update stores p (read as fp32 from fp32 anchors... here p itself) rounded;
    # decay towards p0 with lr * wd = 1 stores exactly p0 rounded to bf16
    p = torch.zeros(n, dtype=BF16)
    fused_triton.update([p], None, [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)], lr=1.0, eps=1.0,
                        weight_decay=1.0, bc1=1.0, bc2=1.0, bcr=1.0, anchors=[x], gate_open=True)
    assert torch.equal(p.view(torch.int16), x.to(BF16).view(torch.int16)), (p, x.to(BF16))


def test_parameter_version_is_bumped(interp):
    w = torch.randn(37, requires_grad=True)
    y = (w * w).sum()
    v0 = w._version
    with torch.no_grad():
        fused_triton.step([w], [torch.ones(37)], [torch.zeros(37)], [torch.zeros(37)], [torch.zeros(37)],
                          **R.kernel_hp(HP, 1))
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# -- on a CUDA device (skipped without one) ----------------------------------------------------------
@pytest.fixture
def cuda(compiled_mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert fused_triton.available(), fused_triton.unavailable_reason()
    return torch.device("cuda")


def to(group, device):
    return {k: ([x.to(device) for x in v] if isinstance(v, list) else v) for k, v in group.items()}


@pytest.mark.parametrize("mask,signal,variance,decay", [
    ("snr", "ema", "ema", "zero"), ("soft", "step", "microbatch", "anchor"), ("hard", "ema", "microbatch", "zero")])
@pytest.mark.parametrize("pdtype,sdtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cuda_step_matches_reference(cuda, mask, signal, variance, decay, pdtype, sdtype):
    gr = R.make_group([(n,) for n in SIZES], pdtype, sdtype, anchors=decay == "anchor", sq=variance == "microbatch")
    ref, cpu = R.clone(gr), R.clone(gr)
    rs, kink = R.run_reference(ref, HP, mask=mask, signal=signal, variance=variance)
    kw = dict(**R.kernel_hp(HP, gr["t"]), mask=mask, signal=signal, variance=variance, sq_scale=HP["sq_scale"],
              g2_scale=HP["g2_scale"], want_stats=True)
    d = to(gr, cuda)
    st = fused_triton.step(d["p"], d["g"], d["m"], d["v"], d["s"], sq_sums=d["sq"], anchors=d["p0"], **kw)
    assert st.device.type == "cuda"
    back = to(d, "cpu")
    R.compare(back, ref, kink, st.tolist(), rs)
    if cpu_kernel():  # IEEE division, square root, explicit fmas, nearest-even bf16: the C kernel's bits
        fused_cpu.step(cpu["p"], cpu["g"], cpu["m"], cpu["v"], cpu["s"], sq_sums=cpu["sq"], anchors=cpu["p0"], **kw)
        same(back, cpu, ("p", "m", "v", "s", "sq"))


@pytest.mark.parametrize("reduce", ["row", "tensor"])
def test_cuda_two_pass_matches_reference(cuda, reduce):
    hp = dict(HP, alpha=0.05)
    gr = R.make_group(SHAPES_2D + [(3, 2500)], BF16, BF16, seed=4, anchors=True,
                      noise_scales=[1e-3, 1e-2, 3e-2, 0.1, 0.3, 0.05])
    ref = R.clone(gr)
    rs, kink = R.run_reference(ref, hp, mask="soft", reduce=reduce)
    khp = R.kernel_hp(hp, gr["t"])
    d = to(gr, cuda)
    sums = fused_triton.moments(d["p"], d["g"], d["m"], d["v"], d["s"], beta1=hp["beta1"], beta2=hp["beta2"],
                                rho=hp["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens=reduce,
                                noise_scale=hp["noise_scale"])
    q = fused_triton.gate(sums, mask="soft", alpha=hp["alpha"], softness=hp["softness"])
    st = fused_triton.update(d["p"], None, d["m"], d["v"], d["s"], q_rows=q, row_lens=reduce, mask="soft",
                             anchors=d["p0"], want_stats=True, **{k: khp[k] for k in UPD_KEYS})
    R.compare(to(d, "cpu"), ref, kink, st.tolist(), rs)


def test_cuda_no_host_sync_and_found_inf(cuda):
    """No call waits for the device (torch's sync debug mode raises on a synchronising op), and a nonzero
    found_inf leaves everything as it was."""
    gr = to(R.make_group(SHAPES_2D, BF16, F32, seed=14, anchors=True, sq=True), cuda)
    khp = R.kernel_hp(HP, gr["t"])
    args = (gr["p"], gr["g"], gr["m"], gr["v"], gr["s"])
    flag = torch.zeros((), device=cuda)
    bc = torch.tensor([khp["bc1"]] * len(SHAPES_2D), device=cuda)
    for _ in range(2):  # the first call builds the plan (uploads without waiting as well)
        torch.cuda.set_sync_debug_mode("error")
        try:
            st = fused_triton.step(*args, **dict(khp, bc1=bc), variance="microbatch", sq_sums=gr["sq"],
                                   anchors=gr["p0"], want_stats=True, found_inf=flag)
            sums = fused_triton.moments(*args, beta1=HP["beta1"], beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"],
                                        bcr=khp["bcr"], row_lens="row", found_inf=flag)
            q = fused_triton.gate(sums)
            fused_triton.update(*args, q_rows=q, row_lens="row", **{k: khp[k] for k in UPD_KEYS},
                                want_stats=True, found_inf=flag)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert st[1].item() > 0
    snap = {k: [x.clone() for x in gr[k]] for k in ("p", "m", "v", "s", "sq")}
    flag.fill_(float("inf"))
    st = fused_triton.step(*args, **khp, variance="microbatch", sq_sums=gr["sq"], anchors=gr["p0"],
                           want_stats=True, found_inf=flag)
    assert st.tolist() == [0.0] * 5
    for k, xs in snap.items():
        for a, b in zip(gr[k], xs):
            assert torch.equal(a, b), k
