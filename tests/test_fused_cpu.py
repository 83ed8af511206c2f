"""The fused CPU kernel (hf_snr.fused_cpu) against a plain torch reference of the same math."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from hf_snr import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason=f"fused kernel: {fused_cpu.unavailable_reason()}")

F32, BF16 = torch.float32, torch.bfloat16
TINY = torch.finfo(torch.float32).tiny
SIZES = (1, 5, 1023, 4099)

HP = dict(beta1=0.9, beta2=0.999, rho=0.99, lr=1e-2, eps=1e-8, weight_decay=0.1, alpha=0.8, softness=1.5,
          noise_scale=0.7, sq_scale=1.3, g2_scale=0.4)


# -- the reference: one tensor at a time, fp32 torch ops in the order of the equations ---------------
def bias(t, hp):
    return 1 - hp["beta1"] ** t, 1 - hp["beta2"] ** t, 1 - hp["rho"] ** t


def ref_moments(g, m, v, s, sq, hp, variance):
    gf = g.float()
    s32 = s.float()
    if variance == "ema":
        d = gf - m                                        # m: the previous, uncorrected first moment
        s32.mul_(hp["rho"]).addcmul_(d, d, value=1 - hp["rho"])
    else:
        est = (sq * hp["sq_scale"] - gf * gf * hp["g2_scale"]).clamp_min_(0.0)
        s32.mul_(hp["rho"]).add_(est, alpha=1 - hp["rho"])
        sq.zero_()
    s.copy_(s32)                                          # bf16 s: rounded to nearest even
    m.lerp_(gf, 1 - hp["beta1"])
    v.mul_(hp["beta2"]).addcmul_(gf, gf, value=1 - hp["beta2"])


def ref_signal(g, m, s, hp, t, signal):
    bc1, _, bcr = bias(t, hp)
    m_hat = m / bc1
    mu2 = m_hat.square() if signal == "ema" else g.float().square()
    sig2 = s.float() / bcr * hp["noise_scale"]
    return m_hat, mu2, sig2


def ref_mask(kind, mu2, sig2, hp):
    alpha, softness = hp["alpha"], hp["softness"]
    if kind == "snr":
        return mu2 / (mu2 + softness * alpha * sig2).clamp_min(TINY)
    if kind == "soft":
        e = (mu2 - alpha * sig2).clamp_min(0.0)
        return e / (e + softness * sig2).clamp_min(TINY)
    return (mu2 > alpha * sig2).to(mu2.dtype)


def ref_gate(kind, sum_mu2, sum_sig2, hp):  # the row / tensor gate: the sums rounded to fp32, the mask in fp32
    return ref_mask(kind, sum_mu2.float(), sum_sig2.float(), hp)


def ref_update(p, m_hat, v, q, p0, hp, t):
    _, bc2, _ = bias(t, hp)
    lr, wd = hp["lr"], hp["weight_decay"]
    denom = (v / bc2).sqrt() + hp["eps"]
    p32 = p.float()
    if p0 is None:
        p32.mul_(1 - lr * wd)
    else:
        p32.sub_(p32 - p0.float(), alpha=lr * wd)         # decay toward p0
    p32.addcdiv_(q * m_hat, denom, value=-lr)
    p.copy_(p32)
    return denom


def ref_stats(q, denom, mu2, sig2, v, hp):
    u = q * hp["lr"] / denom
    seen = v > 0
    d = torch.float64
    return torch.stack([torch.where(seen, q, 0.0).double().sum(), seen.double().sum(),
                        ((q > 0.5) & seen).double().sum(), (u * mu2).double().sum(),
                        hp["alpha"] * (u * sig2).double().sum()]).to(d)


def kinks(kind, mu2, sig2, hp):
    """Coordinates where hard/soft masks jump: mu2 within 1e-5 (relative) of alpha * sig2.

    There a rounding difference of one ulp in mu2 or sig2 flips a hard gate (or the soft gate's
    kink), so these coordinates are left out of the comparison (there are very few, often none).
    """
    if kind == "snr":
        return torch.zeros_like(mu2, dtype=torch.bool)
    a = hp["alpha"] * sig2
    top = torch.maximum(mu2, a)
    return ((mu2 - a).abs() <= 1e-5 * top) & (top > 0)  # 0 = 0 (never seen) is no kink: q = 0 on both sides


# -- data ----------------------------------------------------------------------------------------
def make_group(shapes, pdtype=F32, sdtype=F32, seed=0, t=6, anchors=False, sq=False, noise_scales=None):
    """Tensors in the middle of training: a mix of high- and low-SNR coordinates, some never seen.

    noise_scales: one noise multiplier per tensor (to spread whole-tensor / row SNRs).
    """
    gen = torch.Generator().manual_seed(seed)
    out = dict(p=[], g=[], m=[], v=[], s=[], p0=[] if anchors else None, sq=[] if sq else None)
    for i, shape in enumerate(shapes):
        n = torch.Size(shape).numel()
        snr = torch.exp(torch.randn(shape, generator=gen) * 2)         # mean / noise, wide range
        if len(shape) == 2:  # rows of different SNRs
            snr = snr * torch.exp(torch.randn(shape[0], 1, generator=gen) * 2)
        mean = torch.randn(shape, generator=gen) * 1e-2
        noise = mean.abs() / snr * (noise_scales[i] if noise_scales else 1.0)
        m = mean + noise * torch.randn(shape, generator=gen) * 0.3
        v = mean.square() + noise.square() * (0.5 + torch.rand(shape, generator=gen))
        s = noise.square() * (0.5 + torch.rand(shape, generator=gen))
        g = mean + noise * torch.randn(shape, generator=gen)
        if n >= 5:  # never-seen coordinates (ZeRO padding): v = m = s = g = 0
            idx = torch.arange(0, n, 5)
            for x in (m, v, s, g):
                x.view(-1)[idx] = 0.0
        out["p"].append(torch.randn(shape, generator=gen).to(pdtype))
        out["g"].append(g.to(pdtype))
        out["m"].append(m)
        out["v"].append(v)
        out["s"].append(s.to(sdtype))
        if anchors:
            out["p0"].append((torch.randn(shape, generator=gen) * 0.5).to(pdtype))
        if sq:
            out["sq"].append(g.float().square() * (1 + torch.rand(shape, generator=gen)))
    out["t"] = t
    return out


def clone(group):
    return {k: ([x.clone() for x in v] if isinstance(v, list) else v) for k, v in group.items()}


def kernel_hp(hp, t):
    bc1, bc2, bcr = bias(t, hp)
    return dict(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], rho=hp["rho"], eps=hp["eps"],
                weight_decay=hp["weight_decay"], bc1=bc1, bc2=bc2, bcr=bcr, alpha=hp["alpha"],
                softness=hp["softness"], noise_scale=hp["noise_scale"])


def close_f32(actual, expected, keep=None, rtol=1e-6):
    if keep is not None:
        actual, expected = actual[keep], expected[keep]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-30)


def close_p(actual, expected, keep=None):
    if keep is not None:
        actual, expected = actual[keep], expected[keep]
    if actual.dtype == BF16:  # one fp32 rounding difference can move a bf16 value by one ulp
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2 ** -7, atol=1e-30)
    else:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)


def run_reference(gr, hp, *, mask="snr", signal="ema", variance="ema", gate_open=False, reduce=None):
    """One step of the reference, in place on gr. Returns (stats, kink masks per tensor)."""
    t = gr["t"]
    total = torch.zeros(5, dtype=torch.float64)
    kink = []
    sigs = []
    for i in range(len(gr["p"])):
        ref_moments(gr["g"][i], gr["m"][i], gr["v"][i], gr["s"][i], gr["sq"][i] if gr["sq"] else None, hp, variance)
        sigs.append(ref_signal(gr["g"][i], gr["m"][i], gr["s"][i], hp, t, signal))
    for i, (m_hat, mu2, sig2) in enumerate(sigs):
        p = gr["p"][i]
        if gate_open:
            q = torch.ones_like(mu2)
            kink.append(torch.zeros_like(mu2, dtype=torch.bool))
        elif reduce is None:
            q = ref_mask(mask, mu2, sig2, hp)
            kink.append(kinks(mask, mu2, sig2, hp))
        else:
            rows = mu2.reshape(mu2.shape[0], -1) if reduce == "row" and p.dim() >= 2 else mu2.reshape(1, -1)
            srows = sig2.reshape(rows.shape)
            sm, ss = rows.double().sum(1), srows.double().sum(1)
            qr = ref_gate(mask, sm, ss, hp)
            k = kinks(mask, sm.float(), ss.float(), hp)
            q = qr[:, None].expand(rows.shape).reshape(mu2.shape)
            kink.append(k[:, None].expand(rows.shape).reshape(mu2.shape))
        denom = ref_update(p, m_hat, gr["v"][i], q, gr["p0"][i] if gr["p0"] else None, hp, t)
        total += ref_stats(q, denom, mu2, sig2, gr["v"][i], hp)
    return total, kink


def compare(got, ref, kink, stats=None, ref_stats_=None):
    for i in range(len(ref["p"])):
        keep = ~kink[i]
        close_f32(got["m"][i], ref["m"][i])
        close_f32(got["v"][i], ref["v"][i])
        if got["s"][i].dtype == BF16:
            torch.testing.assert_close(got["s"][i].float(), ref["s"][i].float(), rtol=2 ** -7, atol=1e-30)
        else:
            close_f32(got["s"][i], ref["s"][i])
        if ref["sq"]:
            assert torch.count_nonzero(got["sq"][i]) == 0
        close_p(got["p"][i], ref["p"][i], keep)
    if stats is not None:
        nk = int(sum(int(k.sum()) for k in kink))
        s = torch.tensor(stats, dtype=torch.float64)
        # counts: exact up to the coordinates at a kink; sums: fp32 terms summed in double
        assert abs(s[1] - ref_stats_[1]) == 0
        assert abs(s[0] - ref_stats_[0]) <= 1e-6 * ref_stats_[0] + nk
        assert abs(s[2] - ref_stats_[2]) <= nk
        torch.testing.assert_close(s[3:], ref_stats_[3:], rtol=1e-5 if nk == 0 else 1e-2, atol=0.0)


DTYPES = [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16)]


# -- the single-pass step --------------------------------------------------------------------------
@pytest.mark.parametrize("mask,signal,variance,decay", list(itertools.product(
    ("snr", "soft", "hard"), ("ema", "step"), ("ema", "microbatch"), ("zero", "anchor"))))
@pytest.mark.parametrize("pdtype,sdtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_step_matches_reference(mask, signal, variance, decay, pdtype, sdtype):
    gr = make_group([(n,) for n in SIZES], pdtype, sdtype, anchors=decay == "anchor", sq=variance == "microbatch")
    ref = clone(gr)
    rs, kink = run_reference(ref, HP, mask=mask, signal=signal, variance=variance)
    st = fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **kernel_hp(HP, gr["t"]), mask=mask,
                        signal=signal, variance=variance, sq_sums=gr["sq"], sq_scale=HP["sq_scale"],
                        g2_scale=HP["g2_scale"], anchors=gr["p0"], want_stats=True)
    compare(gr, ref, kink, st, rs)
    assert 0.1 < st[0] / st[1] < 0.9 and 0.1 < st[2] / st[1] < 0.9  # a mix of open and closed gates
    # mostly exact agreement (not just within tolerance)
    if pdtype == F32:
        assert sum(torch.equal(a, b) for a, b in zip(gr["m"], ref["m"])) == len(SIZES)


@pytest.mark.parametrize("pdtype,sdtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gate_open(pdtype, sdtype):
    gr = make_group([(n,) for n in SIZES], pdtype, sdtype, seed=1)
    ref = clone(gr)
    rs, kink = run_reference(ref, HP, gate_open=True)
    st = fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **kernel_hp(HP, gr["t"]), gate_open=True,
                        want_stats=True)
    compare(gr, ref, kink, st, rs)
    assert st[0] == st[1] == st[2]  # q = 1 on every seen coordinate


def test_without_stats_and_plain_values():
    gr = make_group([(n,) for n in SIZES], seed=2)
    ref = clone(gr)
    _, kink = run_reference(ref, HP)
    assert fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **kernel_hp(HP, gr["t"])) is None
    compare(gr, ref, kink)


def test_per_tensor_scalars():
    """Tensors at different steps (a parameter that missed steps, a warm start) take their own bc1, bc2,
    bcr, noise_scale and gate_open."""
    ts, nss, opens = (2, 5, 9, 30), (1.0, 0.3, 0.7, 2.0), (True, False, False, True)
    groups = [make_group([(n,)], seed=3 + i, t=t) for i, (n, t) in enumerate(zip(SIZES, ts))]
    refs = [clone(g) for g in groups]
    rs = torch.zeros(5, dtype=torch.float64)
    for r, ns, op in zip(refs, nss, opens):
        rs += run_reference(r, dict(HP, noise_scale=ns), mask="snr", gate_open=op)[0]
    cat = {k: [x for g in groups for x in g[k]] for k in ("p", "g", "m", "v", "s")}
    hp = kernel_hp(HP, 1)
    hp.update(bc1=[bias(t, HP)[0] for t in ts], bc2=[bias(t, HP)[1] for t in ts], bcr=[bias(t, HP)[2] for t in ts],
              noise_scale=nss)
    st = fused_cpu.step(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **hp, gate_open=opens, want_stats=True)
    for g, r in zip(groups, refs):
        compare(g, r, [torch.zeros(x.shape, dtype=torch.bool) for x in r["p"]])
    torch.testing.assert_close(torch.tensor(st, dtype=torch.float64), rs, rtol=1e-6, atol=0.0)


def test_per_tensor_gate_open_two_pass():
    """update() with row gates where some tensors are open: their q_rows entries are ignored."""
    opens = [False, True, False, True, False]
    gr = make_group(SHAPES_2D, seed=11, noise_scales=[1e-3, 1e-2, 3e-2, 0.1, 0.3])
    ref = clone(gr)
    hp = dict(HP, alpha=0.05)
    khp = kernel_hp(hp, gr["t"])
    sums = fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=hp["beta1"], beta2=hp["beta2"],
                             rho=hp["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens="row",
                             noise_scale=hp["noise_scale"])
    q = fused_cpu.gate(sums, mask="soft", alpha=hp["alpha"], softness=hp["softness"])
    fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens="row", gate_open=opens, mask="soft",
                     **{k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr", "alpha", "softness",
                                            "noise_scale")})
    for i, op in enumerate(opens):
        one = {k: ([v[i]] if isinstance(v, list) else v) for k, v in ref.items()}
        _, kink = run_reference(one, hp, mask="soft", gate_open=op, reduce="row")
        close_p(gr["p"][i], one["p"][0], ~kink[0])


@pytest.mark.parametrize("two_pass", [False, True])
def test_mixed_dtype_group(two_pass):
    """A group mixing dtype signatures (p/g, s, p0) runs one kernel call per signature: the same results as
    separate calls, row gates laid out in the group's tensor order."""
    shapes = [(3, 5), (7,), (4, 129), (1023,), (2, 2), (5,)]
    sigs = [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16), (F32, F32), (BF16, F32)]
    parts = [make_group([sh], pd, sd, seed=20 + i, anchors=True) for i, (sh, (pd, sd)) in enumerate(zip(shapes, sigs))]
    for i in (1, 4):  # anchors of another dtype than the parameter
        parts[i]["p0"] = [parts[i]["p0"][0].to(F32 if parts[i]["p0"][0].dtype == BF16 else BF16)]
    sep = [clone(g) for g in parts]
    cat = {k: [g[k][0] for g in parts] for k in ("p", "g", "m", "v", "s", "p0")}
    khp = kernel_hp(HP, parts[0]["t"])
    upd = {k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr", "alpha", "softness", "noise_scale")}
    mom = dict(beta1=HP["beta1"], beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"],
               noise_scale=HP["noise_scale"])
    if two_pass:
        sums = fused_cpu.moments(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **mom, row_lens="row")
        q = fused_cpu.gate(sums, alpha=HP["alpha"], softness=HP["softness"])
        st = fused_cpu.update(cat["p"], None, cat["m"], cat["v"], cat["s"], q_rows=q, row_lens="row",
                              anchors=cat["p0"], want_stats=True, **upd)
        exp_sums, exp_st = [], torch.zeros(5, dtype=torch.float64)
        for g in sep:
            s1 = fused_cpu.moments(g["p"], g["g"], g["m"], g["v"], g["s"], **mom, row_lens="row")
            exp_sums.append(s1)
            exp_st += torch.tensor(fused_cpu.update(
                g["p"], None, g["m"], g["v"], g["s"], q_rows=fused_cpu.gate(s1, alpha=HP["alpha"],
                                                                         softness=HP["softness"]),
                row_lens="row", anchors=g["p0"], want_stats=True, **upd), dtype=torch.float64)
        assert torch.equal(sums, torch.cat(exp_sums))
    else:
        st = fused_cpu.step(cat["p"], cat["g"], cat["m"], cat["v"], cat["s"], **khp, anchors=cat["p0"],
                            want_stats=True)
        exp_st = torch.zeros(5, dtype=torch.float64)
        for g in sep:
            exp_st += torch.tensor(fused_cpu.step(g["p"], g["g"], g["m"], g["v"], g["s"], **khp, anchors=g["p0"],
                                                  want_stats=True), dtype=torch.float64)
    for k in ("p", "m", "v", "s"):
        for a, g in zip(cat[k], sep):
            assert torch.equal(a, g[k][0]), k
    torch.testing.assert_close(torch.tensor(st, dtype=torch.float64), exp_st, rtol=1e-12, atol=0.0)


# -- two passes: row and whole-tensor gates ----------------------------------------------------------
SHAPES_2D = [(1, 1), (3, 5), (7, 129), (33, 64), (1023,)]


@pytest.mark.parametrize("reduce", ["row", "tensor"])
@pytest.mark.parametrize("mask,signal", list(itertools.product(("snr", "soft", "hard"), ("ema", "step"))))
@pytest.mark.parametrize("pdtype,sdtype", [(F32, F32), (BF16, BF16)], ids=lambda d: str(d).split(".")[-1])
def test_two_pass_reduction(reduce, mask, signal, pdtype, sdtype):
    hp = dict(HP, alpha=0.05)
    # tensors and rows of SNRs spread across the gate's open/closed line
    gr = make_group(SHAPES_2D, pdtype, sdtype, seed=4, anchors=True, noise_scales=[1e-3, 1e-2, 3e-2, 0.1, 0.3])
    ref = clone(gr)
    rs, kink = run_reference(ref, hp, mask=mask, signal=signal, reduce=reduce)
    khp = kernel_hp(hp, gr["t"])
    sums = fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=hp["beta1"], beta2=hp["beta2"],
                             rho=hp["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens=reduce, signal=signal,
                             noise_scale=hp["noise_scale"])
    rows = [s[0] if reduce == "row" and len(s) == 2 else 1 for s in SHAPES_2D]
    assert sums.shape == (sum(rows), 2) and sums.dtype == torch.float64
    # the moments are updated once, by pass 1, and pass 2 reads them only
    m1, v1, s1 = [x.clone() for x in gr["m"]], [x.clone() for x in gr["v"]], [x.clone() for x in gr["s"]]
    # row sums against the reference's
    start = 0
    for i, _shape in enumerate(SHAPES_2D):
        _, mu2, sig2 = ref_signal(ref["g"][i], ref["m"][i], ref["s"][i], hp, gr["t"], signal)
        r = rows[i]
        exp = torch.stack([mu2.reshape(r, -1).double().sum(1), sig2.reshape(r, -1).double().sum(1)], 1)
        torch.testing.assert_close(sums[start:start + r], exp, rtol=1e-12, atol=0.0)
        start += r
    q_rows = fused_cpu.gate(sums, mask=mask, alpha=hp["alpha"], softness=hp["softness"])
    assert (q_rows > 0.5).any() and (q_rows < 0.5).any()
    st = fused_cpu.update(gr["p"], gr["g"] if signal == "step" else None, gr["m"], gr["v"], gr["s"], q_rows=q_rows,
                          row_lens=reduce, lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                          bc1=khp["bc1"], bc2=khp["bc2"], bcr=khp["bcr"], alpha=hp["alpha"], softness=hp["softness"],
                          mask=mask, signal=signal, noise_scale=hp["noise_scale"], anchors=gr["p0"], want_stats=True)
    for a, b in zip(gr["m"] + gr["v"] + gr["s"], m1 + v1 + s1):
        assert torch.equal(a, b)
    compare(gr, ref, kink, st, rs)


def test_two_pass_gate_open_and_element_gate():
    """update() with gate_open (warm-up of a reduced group) and with the element mask (q_rows=None)."""
    for gate_open in (True, False):
        gr = make_group(SHAPES_2D, seed=5)
        ref = clone(gr)
        rs, kink = run_reference(ref, HP, mask="soft", gate_open=gate_open)
        khp = kernel_hp(HP, gr["t"])
        out = fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"], beta2=HP["beta2"],
                                rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"], row_lens=None)
        assert out is None
        st = fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], gate_open=gate_open, mask="soft",
                              want_stats=True, **{k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2",
                                                                     "bcr", "alpha", "softness", "noise_scale")})
        compare(gr, ref, kink, st, rs)


def test_microbatch_moments_zero_sq():
    gr = make_group(SHAPES_2D, seed=6, sq=True)
    ref = clone(gr)
    run_reference(ref, HP, variance="microbatch", reduce="tensor")
    khp = kernel_hp(HP, gr["t"])
    fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"], beta2=HP["beta2"],
                      rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"], variance="microbatch", sq_sums=gr["sq"],
                      sq_scale=HP["sq_scale"], g2_scale=HP["g2_scale"])
    for i in range(len(SHAPES_2D)):
        close_f32(gr["s"][i], ref["s"][i])
        close_f32(gr["m"][i], ref["m"][i])
        assert torch.count_nonzero(gr["sq"][i]) == 0


# -- threads: ranges cut tensors and rows; results depend on the thread count only ----------------------
@pytest.mark.parametrize("reduce", [None, "row", "tensor"])
def test_threads_cut_rows_deterministic(reduce):
    shapes = [(3,), (7, 10001), (70001,), (5, 3)]
    base = make_group(shapes, seed=7)
    khp = kernel_hp(HP, base["t"])
    results = {}
    for nt in (1, 2, 3, 1, 2, 3):
        gr = clone(base)
        if reduce is None:
            st = fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, want_stats=True, num_threads=nt)
            sums = None
        else:
            sums = fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=HP["beta1"],
                                     beta2=HP["beta2"], rho=HP["rho"], bc1=khp["bc1"], bcr=khp["bcr"],
                                     row_lens=reduce, num_threads=nt)
            q = fused_cpu.gate(sums, alpha=HP["alpha"], softness=HP["softness"])
            st = fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens=reduce,
                                  want_stats=True, num_threads=nt,
                                  **{k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr",
                                                         "alpha", "softness", "noise_scale")})
        if nt in results:  # the same thread count: bit-identical
            assert results[nt][0] == st
            assert sums is None or torch.equal(results[nt][1], sums)
        results[nt] = (st, sums, gr)
    st1, sums1, g1 = results[1]
    for nt in (2, 3):
        st, sums, g = results[nt]
        for k in ("p", "m", "v", "s"):  # elementwise: the same for any split
            for a, b in zip(g[k], g1[k]):
                assert torch.equal(a, b)
        torch.testing.assert_close(torch.tensor(st), torch.tensor(st1), rtol=1e-12, atol=0.0)
        if sums is not None:
            torch.testing.assert_close(sums, sums1, rtol=1e-12, atol=0.0)


# -- a trajectory ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pdtype,sdtype", [(F32, F32), (BF16, BF16)], ids=lambda d: str(d).split(".")[-1])
def test_ten_step_trajectory(pdtype, sdtype):
    shapes = [(n,) for n in SIZES]
    gen = torch.Generator().manual_seed(8)
    means = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    ours = dict(p=[torch.randn(s, generator=gen).to(pdtype) for s in shapes],
                m=[torch.zeros(s) for s in shapes], v=[torch.zeros(s) for s in shapes],
                s=[torch.zeros(s, dtype=sdtype) for s in shapes], sq=None, p0=None)
    ref = clone(ours)
    warmup = 3
    for t in range(1, 11):
        grads = [(mu + torch.randn(mu.shape, generator=gen) * 1e-2).to(pdtype) for mu in means]
        ours["g"], ref["g"], ref["t"] = grads, [g.clone() for g in grads], t
        rs, kink = run_reference(ref, HP, mask="snr", gate_open=t <= warmup)
        st = fused_cpu.step(ours["p"], ours["g"], ours["m"], ours["v"], ours["s"], **kernel_hp(HP, t),
                            gate_open=t <= warmup, want_stats=True)
        compare(ours, ref, kink, st, rs)


# -- argument checks and the build -------------------------------------------------------------------
def test_bad_tensors_raise_clear_errors():
    gr = make_group([(4, 6), (5,)], seed=9)
    khp = kernel_hp(HP, gr["t"])

    def call(**over):
        args = {k: gr[k] for k in ("p", "g", "m", "v", "s")}
        args.update(over)
        return fused_cpu.step(args["p"], args["g"], args["m"], args["v"], args["s"], **khp)

    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        call(p=[gr["p"][0].t(), gr["p"][1]])
    with pytest.raises(ValueError, match=r"grads\[1\] is not contiguous"):
        call(g=[gr["g"][0], torch.zeros(10)[::2]])
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has dtype torch.float64"):
        call(m=[gr["m"][0], gr["m"][1].double()])
    with pytest.raises(ValueError, match=r"grads\[0\] has dtype torch.bfloat16, expected torch.float32"):
        call(g=[gr["g"][0].bfloat16(), gr["g"][1]])
    with pytest.raises(ValueError, match=r"exp_vars\[1\] has 4 elements, its parameter 5"):
        call(s=[gr["s"][0], torch.zeros(4)])
    with pytest.raises(ValueError, match=r"grads\[1\] has 6 elements"):
        call(g=[gr["g"][0], torch.zeros(6)])
    with pytest.raises(ValueError, match=r"grads must be a list of 2"):
        call(g=[gr["g"][0]])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] is int"):
        call(v=[3, gr["v"][1]])
    with pytest.raises(ValueError, match=r"grads\[1\] has dtype torch.float32, expected torch.bfloat16"):
        call(p=[gr["p"][0], gr["p"][1].bfloat16()])
    with pytest.raises(ValueError, match=r"mask must be one of"):
        fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, mask="nope")
    with pytest.raises(ValueError, match=r"needs sq_sums"):
        fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **khp, variance="microbatch")
    with pytest.raises(ValueError, match=r"q_rows must be a contiguous CPU float32 tensor of 5 gates"):
        fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=torch.ones(3), row_lens="row",
                         **{k: khp[k] for k in ("lr", "eps", "weight_decay", "bc1", "bc2", "bcr")})
    with pytest.raises(ValueError, match=r"row_lens\[0\] = 5 does not divide"):
        fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=0.9, beta2=0.99, rho=0.9, bc1=0.5,
                          bcr=0.5, row_lens=[5, 5])
    # nothing was touched by the failed calls, and the good call still works after them
    call()


@pytest.fixture
def fresh_build(monkeypatch):
    fused_cpu._reset()
    yield monkeypatch
    monkeypatch.undo()
    fused_cpu._reset()


def test_missing_compiler_is_reported(fresh_build):
    fresh_build.setenv("HF_SNR_CC", "/nonexistent/cc")
    assert fused_cpu.available() is False
    assert "/nonexistent/cc" in fused_cpu.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_cpu.step([], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.99, rho=0.9, eps=1e-8, weight_decay=0.0,
                       bc1=1.0, bc2=1.0, bcr=1.0)


def test_broken_compiler_is_reported(fresh_build, tmp_path):
    fresh_build.setenv("HF_SNR_CC", "false")  # exists, fails
    fresh_build.setenv("HF_SNR_CACHE", str(tmp_path))
    assert not fused_cpu.available()
    assert fused_cpu.unavailable_reason()


def test_build_into_cache_folder(fresh_build, tmp_path):
    fresh_build.setenv("HF_SNR_CACHE", str(tmp_path / "cache"))
    assert fused_cpu.available(), fused_cpu.unavailable_reason()
    path = fused_cpu.library_path()
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no temporary left behind
    fused_cpu._reset()  # a second process: loads the cached file, does not rebuild
    mtime = os.stat(path).st_mtime_ns
    assert fused_cpu.available() and fused_cpu.library_path() == path and os.stat(path).st_mtime_ns == mtime
    # a broken file in the cache (say, an empty one) is rebuilt, not reported forever
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / os.path.basename(path)).write_bytes(b"")
    lib, path2, reason = fused_cpu._build(cache_dir=str(broken))
    assert reason is None and path2 == str(broken / os.path.basename(path)) and os.path.getsize(path2) > 0
    assert sorted(os.listdir(broken)) == [os.path.basename(path)]


def test_empty_lists_and_empty_tensors():
    khp = kernel_hp(HP, 3)
    assert fused_cpu.step([], [], [], [], [], **khp) is None
    z = [torch.zeros(0)]
    st = fused_cpu.step(z, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], **khp,
                        want_stats=True)
    assert st == (0.0,) * 5
    sums = fused_cpu.moments(z, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], beta1=0.9,
                             beta2=0.99, rho=0.9, bc1=0.5, bcr=0.5, row_lens="tensor")
    assert sums.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("mask", ["snr", "soft", "hard"])
def test_non_finite_gradients_propagate_like_torch(mask):
    """nonfinite='propagate': inf/nan in g reach m, v, s and p exactly where the torch reference puts them."""
    gr = make_group([(n,) for n in SIZES], seed=12)
    gr["g"][2][3], gr["g"][2][7], gr["g"][3][100] = float("nan"), float("inf"), -float("inf")
    ref = clone(gr)
    run_reference(ref, HP, mask=mask)
    fused_cpu.step(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], **kernel_hp(HP, gr["t"]), mask=mask)
    for k in ("p", "m", "v", "s"):
        for a, b in zip(gr[k], ref[k]):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), k
            fin = a.isfinite() & b.isfinite()
            torch.testing.assert_close(a[fin], b[fin], rtol=2e-6, atol=1e-7)
    assert not gr["p"][2][3].isfinite()


def test_empty_rows_follow_the_oracle_layout():
    """row_lens='row' takes shape[0] rows for 2+ dims (as x.reshape(x.shape[0], -1)), even when empty."""
    shapes = [(3, 0), (0, 5), (2, 3), (4,)]
    gr = make_group(shapes, seed=13)
    sums = fused_cpu.moments(gr["p"], gr["g"], gr["m"], gr["v"], gr["s"], beta1=0.9, beta2=0.99, rho=0.9, bc1=0.5,
                             bcr=0.5, row_lens="row")
    assert sums.shape == (3 + 0 + 2 + 1, 2)
    assert sums[:3].eq(0).all() and sums[3:].gt(0).all()
    q = fused_cpu.gate(sums)
    fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q, row_lens="row", lr=1e-3, eps=1e-8,
                     weight_decay=0.0, bc1=0.5, bc2=0.5, bcr=0.5)
    with pytest.raises(ValueError, match="q_rows must be .* of 6 gates"):
        fused_cpu.update(gr["p"], None, gr["m"], gr["v"], gr["s"], q_rows=q[:5], row_lens="row", lr=1e-3, eps=1e-8,
                         weight_decay=0.0, bc1=0.5, bc2=0.5, bcr=0.5)


def test_parameter_version_is_bumped():
    """Like an in-place op: a graph that saved the parameter refuses to backpropagate after the step."""
    w = torch.randn(37, requires_grad=True)
    y = (w * w).sum()
    v0 = w._version
    with torch.no_grad():
        fused_cpu.step([w], [torch.ones(37)], [torch.zeros(37)], [torch.zeros(37)], [torch.zeros(37)],
                       **kernel_hp(HP, 1))
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
