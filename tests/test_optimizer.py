"""Tests of SNRAdamW (CPU, fast).

Each test states a behaviour a user relies on: the equations of docs/algorithm.md (checked against plain
Python floats), AdamW when the gate is open, the gate's range and its limits, the two code paths
agreeing, a statistical check that the gate separates signal from noise, fp32 state and exact
save/resume, validation messages, the non-finite policies, ZeRO flat partitions and the risk
statistics. The FSDP2 (2-process) check lives in tests/test_fsdp2.py.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import hf_snr._foreach as foreach_module  # the foreach path's block size (moved out of hf_snr.optimizer)
from hf_snr._foreach import _foreach_mask
from hf_snr._fused_common import mask as _mask
from hf_snr.optimizer import SNRAdamW

MASKS = ("snr", "soft", "hard")
FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_var")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _params(shapes_dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=gen).to(dtype)) for shape, dtype in shapes_dtypes]


def _set_grads(params, step, seed=1, scale=0.5):
    """Deterministic synthetic gradients: a fixed per-coordinate mean plus fresh noise each step.

    Gradients do not depend on the parameters, so two optimizers fed the same sequence can be
    compared state for state without their small rounding differences feeding back.
    """
    for i, p in enumerate(params):
        mean_gen = torch.Generator().manual_seed(seed * 1000 + i)
        mean = torch.randn(p.shape, generator=mean_gen) * (i % 3 == 0)  # some tensors: pure noise
        gen = torch.Generator().manual_seed(seed * 100000 + step * 100 + i)
        p.grad = (mean + scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params},
    )


def _assert_unchanged(opt, params, snap):
    before_p, before_s = snap
    for p, b in zip(params, before_p):
        assert torch.equal(p.detach(), b)
    for p in params:
        now = opt.state[p]
        assert set(now) == set(before_s[id(p)])
        for k, v in before_s[id(p)].items():
            assert torch.equal(now[k], v), k


# ---------------------------------------------------------------------------------------------
# 1. the equations, by hand
# ---------------------------------------------------------------------------------------------
def _hand_run(p0, grads, *, lr, betas, eps, wd, rho, mask, softness, alpha):
    """docs/algorithm.md's step in plain Python floats, coordinate by coordinate."""
    b1, b2 = betas
    n = len(p0)
    p, m, v, s = list(p0), [0.0] * n, [0.0] * n, [0.0] * n
    out = []
    for t, g in enumerate(grads, start=1):
        rec = {k: [] for k in ("m", "v", "s", "mu2", "sig2", "q", "p", "u")}
        for k in range(n):
            p[k] = p[k] * (1 - lr * wd)
            d = g[k] - m[k]
            s[k] = rho * s[k] + (1 - rho) * d * d
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
            m_hat, v_hat, s_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t), s[k] / (1 - rho**t)
            mu2, sig2 = m_hat * m_hat, s_hat
            if mask == "snr":
                den = mu2 + softness * alpha * sig2
                q = mu2 / den if den > 0 else 0.0
            elif mask == "soft":
                excess = max(mu2 - alpha * sig2, 0.0)
                den = excess + softness * sig2
                q = excess / den if den > 0 else 0.0
            else:
                q = 1.0 if mu2 > alpha * sig2 else 0.0
            denom = math.sqrt(v_hat) + eps
            p[k] = p[k] - lr * q * m_hat / denom
            for key, val in (("m", m[k]), ("v", v[k]), ("s", s[k]), ("mu2", mu2), ("sig2", sig2),
                             ("q", q), ("p", p[k]), ("u", lr * q / denom)):
                rec[key].append(val)
        out.append(rec)
    return out


# Coordinates: steady signal, alternating sign (noise), never any gradient (0/0 guard), signal with
# noise, mixed. Case "dyadic" uses powers of two so that fp32 is exact through step 1, where
# mu^2 == sigma^2 exactly: it pins the boundary (snr: q = 1/2, soft/hard: closed, q > 1/2 is strict).
HAND_GRADS = [[1.0, 1.0, 0.0, -2.0, 0.5], [1.0, -1.0, 0.0, -1.5, 2.0], [1.0, 1.0, 0.0, -2.5, -1.0]]
HAND_P0 = [0.5, -1.0, 2.0, 0.25, -0.75]
HAND_CASES = {
    "dyadic": dict(lr=0.125, betas=(0.5, 0.75), eps=1e-8, wd=0.25, rho=0.5, softness=1.0, alpha=1.0),
    "defaults": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1, rho=0.99, softness=3.0, alpha=0.5),
}


@FOREACH
@pytest.mark.parametrize("case", list(HAND_CASES))
@pytest.mark.parametrize("mask", MASKS)
def test_first_three_steps_match_hand_computation(mask, case, foreach):
    hp = HAND_CASES[case]
    expected = _hand_run(HAND_P0, HAND_GRADS, mask=mask, **hp)
    p = nn.Parameter(torch.tensor(HAND_P0))
    opt = SNRAdamW([p], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"], rho=hp["rho"],
                   mask=mask, softness=hp["softness"], alpha=hp["alpha"], warmup_steps=0, foreach=foreach)
    for t, (g, exp) in enumerate(zip(HAND_GRADS, expected), start=1):
        # the data are well posed: away from the gate boundary except where fp32 is exact
        if not (case == "dyadic" and t == 1):
            for mu2, sig2 in zip(exp["mu2"], exp["sig2"]):
                assert mu2 == sig2 == 0.0 or abs(mu2 - hp["alpha"] * sig2) > 1e-2 * max(mu2, sig2)
        p.grad = torch.tensor(g)
        opt.request_stats()
        opt.step()
        st = opt.state[p]
        assert st["step"].item() == t
        for key, name in (("exp_avg", "m"), ("exp_avg_sq", "v"), ("exp_var", "s")):
            torch.testing.assert_close(st[key], torch.tensor(exp[name]), rtol=1e-6, atol=1e-9, msg=f"{name} t={t}")
        # p carries q coordinate by coordinate (each nonzero-gradient coordinate has m_hat != 0)
        torch.testing.assert_close(p.detach(), torch.tensor(exp["p"]), rtol=2e-6, atol=1e-8, msg=f"p t={t}")
        # the statistics carry mu^2, sigma^2 and q: signal = sum u mu^2, noise = alpha sum u sigma^2
        stats = opt.last_stats
        q = exp["q"]
        signal = sum(u * mu2 for u, mu2 in zip(exp["u"], exp["mu2"]))
        noise = hp["alpha"] * sum(u * s2 for u, s2 in zip(exp["u"], exp["sig2"]))
        # mask statistics count the coordinates that have had a gradient (v > 0): a coordinate that
        # never had one has no gate to speak of (and ZeRO's zero padding must not count as closed)
        q_seen = [qk for qk, vk in zip(q, exp["v"]) if vk > 0]
        assert len(q_seen) == len(q) - 1
        assert stats["mask_mean"] == pytest.approx(sum(q_seen) / len(q_seen), rel=1e-6, abs=1e-9)
        assert stats["active_fraction"] == sum(x > 0.5 for x in q_seen) / len(q_seen)
        assert stats["signal"] == pytest.approx(signal, rel=1e-5)
        assert stats["noise"] == pytest.approx(noise, rel=1e-5)
        assert stats["population_gain"] == pytest.approx(signal - noise, rel=1e-5, abs=1e-7)
    if case == "dyadic":
        # step 1 sits on the boundary: snr = 1/2 (softness 1), soft and hard closed
        q1 = _hand_run(HAND_P0, HAND_GRADS[:1], mask=mask, **hp)[0]["q"]
        assert q1[0] == {"snr": 0.5, "soft": 0.0, "hard": 0.0}[mask]


# ---------------------------------------------------------------------------------------------
# 2. an open gate is AdamW
# ---------------------------------------------------------------------------------------------
OPEN_GATES = {
    "snr_false_group": dict(mask="soft", alpha=1.0, group_snr=False),
    "hard_alpha0": dict(mask="hard", alpha=0.0),
    "snr_alpha0": dict(mask="snr", alpha=0.0),
    "hard_alpha0_tensor": dict(mask="hard", alpha=0.0, reduction="tensor"),
}


@FOREACH
@pytest.mark.parametrize("gate", list(OPEN_GATES))
def test_open_gate_equals_torch_adamw_for_50_steps(gate, foreach):
    cfg = dict(OPEN_GATES[gate])
    group_snr = cfg.pop("group_snr", True)
    shapes = [((8, 5), torch.float32), ((5,), torch.float32), ((3, 4, 2), torch.float32)]
    ours, ref = _params(shapes), _params(shapes)
    hp = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt = SNRAdamW([{"params": ours, "snr": group_snr}], warmup_steps=0, foreach=foreach, **hp, **cfg)
    adamw = torch.optim.AdamW(ref, foreach=False, **hp)
    for step in range(50):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        adamw.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(opt.state[a]["exp_avg"], adamw.state[b]["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], adamw.state[b]["exp_avg_sq"], rtol=0, atol=1e-6)


@FOREACH
def test_warmup_steps_are_adamw_then_gate_applies(foreach):
    shapes = [((6, 4), torch.float32)]
    ours, ref = _params(shapes), _params(shapes)
    opt = SNRAdamW(ours, mask="hard", warmup_steps=4, lr=1e-2, foreach=foreach)
    adamw = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(5):
        _set_grads(ours, step, scale=3.0)
        _set_grads(ref, step, scale=3.0)
        opt.step()
        adamw.step()
        if step < 4:
            torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    assert (ours[0] - ref[0]).abs().max() > 1e-4  # step 5: the (noisy) gate closed something


@FOREACH
def test_parameter_that_starts_late_gets_its_own_warmup(foreach):
    """A tensor whose first gradient comes late (unfrozen, unused branch) starts as AdamW too."""
    shapes = [((6, 4), torch.float32), ((5,), torch.float32)]
    ours, ref = _params(shapes), _params(shapes)
    opt = SNRAdamW(ours, mask="hard", warmup_steps=3, lr=1e-2, foreach=foreach)
    adamw = torch.optim.AdamW(ref[1:], lr=1e-2, foreach=False)
    for step in range(9):
        _set_grads(ours, step, scale=3.0)
        _set_grads(ref, step, scale=3.0)
        if step < 6:
            ours[1].grad = None
        opt.step()
        if step >= 6:
            adamw.step()
            torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-6)
    assert opt.state[ours[0]]["step"].item() == 9 and opt.state[ours[1]]["step"].item() == 3


# ---------------------------------------------------------------------------------------------
# 3. the gate's range and its limits
# ---------------------------------------------------------------------------------------------
_EXTREMES = [0.0, 1e-45, 1.2e-38, 1e-30, 1e-14, 1e-7, 0.5, 1.0, 3.0, 1e12, 1e30, 3.0e38]


@pytest.mark.parametrize("mask", MASKS)
def test_mask_function_stays_in_unit_interval_on_extreme_inputs(mask):
    grid = torch.tensor(_EXTREMES)
    mu2, sig2 = torch.meshgrid(grid, grid, indexing="ij")
    for alpha in (0.0, 0.5, 1.0, 1e30, 3.0e38):
        for softness in (0.0, 1.0, 1e30, 3.0e38):
            c = min(softness * alpha, torch.finfo(torch.float32).max)
            qs = [_mask(mask, mu2, sig2, alpha, softness, c), _foreach_mask(mask, [mu2], [sig2], alpha, softness, c)[0]]
            qs.append(_mask(mask, mu2[3, 7], sig2[3, 7], alpha, softness, c))  # 0-d: reduction="tensor"
            for q in qs:
                assert torch.isfinite(q).all(), (alpha, softness)
                assert ((q >= 0) & (q <= 1)).all(), (alpha, softness)


@FOREACH
@pytest.mark.parametrize("reduction", ["element", "tensor"])
@pytest.mark.parametrize("mask", MASKS)
def test_gated_step_is_never_larger_than_adamw_nor_reversed(mask, reduction, foreach):
    """q in [0, 1], read off real steps: step = q * (AdamW's step), coordinate by coordinate."""
    p = _params([((64,), torch.float32), ((32,), torch.float32)])  # signal + noise, pure noise
    lr = 1e-2
    opt = SNRAdamW(p, lr=lr, weight_decay=0.0, mask=mask, reduction=reduction, warmup_steps=0,
                   alpha=0.7, softness=0.5, foreach=foreach)
    b1, b2 = 0.9, 0.999
    seen_partial = False
    for step in range(1, 31):
        _set_grads(p, step, scale=1.0)
        before = [x.detach().double().clone() for x in p]
        opt.step()
        for x, x0 in zip(p, before):
            st = opt.state[x]
            adam_step = lr * (st["exp_avg"].double() / (1 - b1**step)) / (
                (st["exp_avg_sq"].double() / (1 - b2**step)).sqrt() + 1e-8)
            taken = x0 - x.detach().double()
            big = adam_step.abs() > 1e-4  # where the ratio is well conditioned in fp32
            q = taken[big] / adam_step[big]
            assert (q >= -1e-3).all() and (q <= 1 + 1e-3).all(), q
            seen_partial |= bool((q < 0.99).any())
    assert seen_partial  # the check saw the gate doing something other than all-open


HUGE = [
    ("snr", 1e30, 1.0), ("snr", 1.0, 1e30), ("snr", 1e300, 1e300),
    ("soft", 1e30, 1.0), ("soft", 1.0, 1e30), ("soft", 1e300, 1.0), ("soft", 1.0, 1e300),
    ("hard", 1.0, 1e30), ("hard", 1.0, 1e300),
]


@FOREACH
@pytest.mark.parametrize("reduction", ["element", "tensor"])
@pytest.mark.parametrize("mask,softness,alpha", HUGE)
def test_huge_softness_or_alpha_moves_nothing_but_weight_decay(mask, softness, alpha, reduction, foreach):
    lr, wd, warm = 1e-2, 0.1, 3
    # one coordinate never gets a gradient: sigma^2 = 0 there, where huge * 0 must not become nan
    p = nn.Parameter(torch.randn(4, 6))
    opt = SNRAdamW([p], lr=lr, weight_decay=wd, mask=mask, softness=softness, alpha=alpha,
                   reduction=reduction, warmup_steps=warm, foreach=foreach)
    start = p.detach().clone()
    for step in range(8):
        _set_grads([p], step)
        p.grad[0, 0] = 0.0
        before = p.detach().clone()
        opt.request_stats()
        opt.step()
        if step < warm:
            continue
        assert torch.equal(p.detach(), before * (1 - lr * wd)), f"step {step + 1}"
        stats = opt.last_stats
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert stats["mask_mean"] < 1e-6 and stats["active_fraction"] == 0.0
    assert not torch.equal(start * (1 - lr * wd) ** 8, p.detach())  # warm-up moved it (AdamW)


# ---------------------------------------------------------------------------------------------
# 4. the two code paths agree
# ---------------------------------------------------------------------------------------------
def _mixed_groups(mask, reduction):
    bf16, f32 = torch.bfloat16, torch.float32
    params = _params([((6, 5), f32), ((5,), f32), ((4, 3), bf16), ((7,), bf16), ((3, 3), f32),
                      ((2, 4), bf16), ((4, 2), f32), ((9,), f32)])
    other_mask = MASKS[(MASKS.index(mask) + 1) % 3]
    other_red = "element" if reduction == "tensor" else "tensor"
    groups = [
        {"params": params[0:3]},  # fp32 + bf16 in one group, constructor defaults
        {"params": params[3:5], "lr": 3e-3, "betas": (0.8, 0.99), "rho": 0.9, "alpha": 0.5, "softness": 3.0,
         "weight_decay": 0.1, "warmup_steps": 2, "eps": 1e-6},
        {"params": params[5:6], "snr": False, "lr": 2e-3},
        {"params": params[6:8], "mask": other_mask, "reduction": other_red, "warmup_steps": 0, "alpha": 2.0},
    ]
    return params, groups


# The foreach path runs on CPU over blocks of _CPU_BLOCK_NUMEL elements, cutting large tensors into
# views and packing small ones; a block of 7 cuts every tensor here into uneven pieces.
@pytest.fixture
def block_numel(request, monkeypatch):
    if getattr(request, "param", None) is not None:
        monkeypatch.setattr(foreach_module, "_CPU_BLOCK_NUMEL", request.param)
    return foreach_module._CPU_BLOCK_NUMEL


def test_blocks_cover_every_element_once_and_respect_size():
    tensors = [torch.zeros(20), torch.zeros(3), torch.zeros(4, 4).t(), torch.zeros(0), torch.zeros(9)]
    lists = [tensors, [t.clone() for t in tensors]]
    blocks = foreach_module._blocks(lists, 7)
    for block in blocks:
        assert sum(views[0].numel() for _, views in block) <= 7 or len(block) == 1
        for _, views in block:
            assert views[1].shape == views[0].shape
    for i, t in enumerate(tensors):
        if t.is_contiguous():
            for _, views in (x for b in blocks for x in b if x[0] == i):
                views[0].add_(1.0)
            assert torch.equal(t, torch.ones_like(t)), i  # every element once, views write through
        else:  # never cut: one whole piece
            assert [views[0] is t for b in blocks for j, views in b if j == i] == [True]
    assert foreach_module._blocks(lists, None) == [[(i, [t, lists[1][i]]) for i, t in enumerate(tensors)]]


@pytest.mark.parametrize("block_numel", [None, 7], ids=["block_default", "block_7"], indirect=True)
@pytest.mark.parametrize("reduction", ["element", "tensor"])
@pytest.mark.parametrize("mask", MASKS)
def test_foreach_path_equals_per_tensor_path(mask, reduction, block_numel):
    runs = []
    for foreach in (False, True):
        params, groups = _mixed_groups(mask, reduction)
        opt = SNRAdamW(groups, mask=mask, reduction=reduction, warmup_steps=3, foreach=foreach)
        stats = []
        for step in range(12):
            _set_grads(params, step)
            if step < 5:
                params[1].grad = None  # starts late: its own warm-up while its group's gate is on
            if step % 4 == 3 or step == 0:
                opt.request_stats()
            opt.step()
            stats.append(dict(opt.last_stats))
        runs.append((params, opt, stats))
    (p_a, opt_a, st_a), (p_b, opt_b, st_b) = runs
    for a, b in zip(p_a, p_b):
        assert a.dtype == b.dtype
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # the same fp32 result rounded to bf16: at most one bf16 ulp apart
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)
        for key in STATE_KEYS:
            torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=1e-6, atol=1e-9)
        assert torch.equal(opt_a.state[a]["step"], opt_b.state[b]["step"])
    for sa, sb in zip(st_a, st_b):
        assert sa.keys() == sb.keys()
        for k in sa:
            # population_gain = signal - noise: its error is relative to the terms, not to the difference
            scale = abs(sb["signal"]) + abs(sb["noise"]) if k == "population_gain" else abs(sb[k])
            assert sa[k] == pytest.approx(sb[k], rel=0, abs=1e-5 * scale + 1e-12), k
    assert opt_a.snr_state == pytest.approx(opt_b.snr_state, rel=1e-5)


def test_zero_flat_partition_element_reduction_equals_per_tensor():
    """ZeRO hands the optimizer one flat fp32 partition; reduction='element' is exact there."""
    shapes = [((6, 5), torch.float32), ((5,), torch.float32), ((3, 4), torch.float32)]
    params = _params(shapes)
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    opt = SNRAdamW(params, mask="soft", alpha=0.5, warmup_steps=0)
    opt_flat = SNRAdamW([flat], mask="soft", alpha=0.5, warmup_steps=0)
    for step in range(6):
        _set_grads(params, step)
        flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
        opt.request_stats()
        opt_flat.request_stats()
        opt.step()
        opt_flat.step()
    torch.testing.assert_close(flat.detach(), torch.cat([p.detach().reshape(-1) for p in params]), rtol=0, atol=0)
    for k in ("mask_mean", "active_fraction", "signal", "noise"):
        assert opt_flat.last_stats[k] == pytest.approx(opt.last_stats[k], rel=1e-5)


def test_tensor_reduction_refuses_flat_partitions():
    params = _params([((6, 5), torch.float32), ((5,), torch.float32), ((3, 4), torch.float32)])
    opt = SNRAdamW(params, reduction="tensor")
    # DeepSpeed ZeRO: after construction, the group's params are replaced by one flat partition
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match=r"reduction='tensor' needs whole parameter tensors.*flat partitions"):
        opt.step()
    assert torch.equal(flat.grad, torch.ones_like(flat)) and len(opt.state) == 0


# ---------------------------------------------------------------------------------------------
# 5. statistics: the gate closes pure-noise coordinates and opens signal ones
# ---------------------------------------------------------------------------------------------
@FOREACH
@pytest.mark.parametrize("mask", MASKS)
def test_gate_separates_signal_from_noise_on_noisy_quadratic(mask, foreach):
    """Loss 0.5 * sum_k a_k (x_k - 5)^2, minibatch gradient = a_k (x_k - 5) + N(0, 1).

    Half the coordinates have a_k = 1 (signal: mean gradient about -5, noise std 1), half a_k = 0
    (pure noise: zero-mean gradient). We read the effective gate off the steps the optimizer takes:
    q_eff = sum |step taken| / sum |AdamW's step from the same moments|, over steps 15..120.
    (Signal stays below 1: s also remembers the start-up bias of the uncorrected m for ~1/(1-rho).)
    """
    n, lr, steps = 64, 1e-2, 120
    b1, b2 = 0.9, 0.999
    a = torch.cat([torch.ones(n), torch.zeros(n)])
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(steps, 2 * n, generator=gen)
    x = nn.Parameter(torch.zeros(2 * n))
    x_ref = nn.Parameter(torch.zeros(2 * n))
    opt = SNRAdamW([x], lr=lr, weight_decay=0.0, mask=mask, foreach=foreach)  # default alpha = 1, warm-up 10
    adamw = torch.optim.AdamW([x_ref], lr=lr, weight_decay=0.0)
    taken = torch.zeros(2 * n, dtype=torch.float64)
    full = torch.zeros(2 * n, dtype=torch.float64)
    for t in range(1, steps + 1):
        x.grad = a * (x.detach() - 5.0) + noise[t - 1]
        x_ref.grad = a * (x_ref.detach() - 5.0) + noise[t - 1]
        before = x.detach().double().clone()
        opt.step()
        adamw.step()
        if t >= 15:
            st = opt.state[x]
            adam_step = lr * (st["exp_avg"].double() / (1 - b1**t)) / (
                (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + 1e-8)
            taken += (before - x.detach().double()).abs()
            full += adam_step.abs()
    q_signal = taken[:n].sum() / full[:n].sum()
    q_noise = taken[n:].sum() / full[n:].sum()
    # what a user sees: signal coordinates progress as under AdamW, noise ones drift much less
    drift, drift_ref = x.detach()[n:].abs().mean(), x_ref.detach()[n:].abs().mean()
    progress, progress_ref = x.detach()[:n].mean(), x_ref.detach()[:n].mean()
    assert q_signal > 0.75, (q_signal, q_noise)
    assert q_noise < 0.15, (q_signal, q_noise)
    assert drift < 0.5 * drift_ref, (drift, drift_ref)
    assert progress > 0.75 * progress_ref > 0, (progress, progress_ref)


# ---------------------------------------------------------------------------------------------
# 6. fp32 state, save and resume
# ---------------------------------------------------------------------------------------------
@FOREACH
def test_bf16_params_keep_fp32_state_across_state_dict_round_trip(foreach, tmp_path):
    params = _params([((5, 3), torch.bfloat16), ((4,), torch.bfloat16), ((2, 2), torch.float32)])
    opt = SNRAdamW(params, warmup_steps=0, foreach=foreach)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    for p in params:
        for key in STATE_KEYS:
            assert opt.state[p][key].dtype == torch.float32, (p.dtype, key)
    # values that bf16 cannot hold: a cast on load would round them
    assert any(not torch.equal(opt.state[p]["exp_var"], opt.state[p]["exp_var"].bfloat16().float()) for p in params)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = SNRAdamW(fresh, warmup_steps=0, foreach=foreach)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for p, q in zip(params, fresh):
        for key in STATE_KEYS:
            assert opt2.state[q][key].dtype == torch.float32, key
            assert torch.equal(opt2.state[q][key], opt.state[p][key]), key
    _set_grads(params, 3)
    _set_grads(fresh, 3)
    opt.step()
    opt2.step()
    for p, q in zip(params, fresh):
        assert torch.equal(p, q)


class _MixedNet(nn.Module):
    """A small MLP with one bf16 layer (its optimizer state must stay fp32 through a resume)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4).to(torch.bfloat16)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).to(torch.bfloat16)).float()


def _train(model, opt, steps, stats_at):
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t in stats_at:
            opt.request_stats()
        opt.step()


@FOREACH
@pytest.mark.parametrize("reduction", ["element", "tensor"])
def test_save_resume_is_exact(foreach, reduction, tmp_path):
    n = 6
    stats_at = {2, 5, 7, 10, 12}
    hp = dict(lr=1e-2, mask="soft", alpha=0.5, warmup_steps=2, reduction=reduction, foreach=foreach)

    torch.manual_seed(0)
    straight = _MixedNet()
    init = copy.deepcopy(straight.state_dict())
    opt = SNRAdamW(straight.parameters(), **hp)
    _train(straight, opt, range(1, 2 * n + 1), stats_at)

    torch.manual_seed(0)
    first = _MixedNet()
    first.load_state_dict(init)
    opt1 = SNRAdamW(first.parameters(), **hp)
    _train(first, opt1, range(1, n + 1), stats_at)
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "ckpt.pt")
    del first, opt1

    torch.manual_seed(99)  # a fresh model with other weights, then the checkpoint
    resumed = _MixedNet()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = SNRAdamW(resumed.parameters(), **hp)
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.snr_state["cumulative_noise"] > 0
    _train(resumed, opt2, range(n + 1, 2 * n + 1), stats_at)

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        for key in STATE_KEYS:
            assert opt2.state[b][key].dtype == torch.float32
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), (name, key)
    assert opt2.snr_state == opt.snr_state
    assert opt2.last_stats == opt.last_stats


def test_state_dict_carries_snr_state_and_no_internal_keys():
    p = _params([((3,), torch.float32)])
    opt = SNRAdamW(p)
    _set_grads(p, 0)
    opt.request_stats()
    opt.step()
    sd = opt.state_dict()
    assert sd["snr_state"]["steps"] == 1 and sd["snr_state"]["last_stats_step"] == 1
    assert all("_numels" not in g for g in sd["param_groups"])
    assert "_numels" in opt.param_groups[0]  # the live group keeps it


# ---------------------------------------------------------------------------------------------
# 7. validation
# ---------------------------------------------------------------------------------------------
BAD = [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), "tensor lr must have one element, got shape (2,)"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.2)), "Invalid beta parameter at index 1: 1.2"),
    (dict(betas=(0.9,)), "Invalid betas: (0.9,)"),
    (dict(rho=1.0), "Invalid rho value: 1.0"),
    (dict(rho=-0.5), "Invalid rho value: -0.5"),
    (dict(eps=0.0), "Invalid epsilon value: 0.0"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(weight_decay=-0.01), "Invalid weight_decay value: -0.01"),
    (dict(softness=-1.0), "Invalid softness value: -1.0"),
    (dict(softness=float("inf")), "Invalid softness value: inf"),
    (dict(alpha=-0.5), "Invalid alpha value: -0.5"),
    (dict(mask="medium"), "Invalid mask: 'medium' (accepted: one of snr, soft, hard, none)"),
    (dict(reduction="layer"), "Invalid reduction: 'layer' (accepted: one of element, row, tensor)"),
    (dict(noise="batch"), "Invalid noise: 'batch' (accepted: one of step, ema)"),
    (dict(signal="mean"), "Invalid signal: 'mean' (accepted: one of ema, step)"),
    (dict(variance="rank"), "Invalid variance: 'rank' (accepted: one of ema, microbatch)"),
    (dict(decay_to="ref"), "Invalid decay_to: 'ref' (accepted: one of zero, init)"),
    (dict(signal="step", noise="ema"), "Invalid combination signal='step' with noise='ema'"),
    (dict(nonfinite="ignore"), "Invalid nonfinite value: 'ignore' (accepted: one of skip, raise, propagate)"),
    (dict(warmup_steps=-1), "Invalid warmup_steps value: -1"),
    (dict(warmup_steps=2.5), "Invalid warmup_steps value: 2.5"),
    (dict(warmup_steps=True), "Invalid warmup_steps value: True"),
    (dict(snr="yes"), "Invalid snr value: 'yes'"),
    (dict(foreach="fast"), "Invalid foreach value: 'fast'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_invalid_hyperparameters_are_refused_naming_the_value(kwargs, message):
    p = _params([((3,), torch.float32)])
    with pytest.raises(ValueError, match=re.escape(message)):
        SNRAdamW(p, **kwargs)


@pytest.mark.parametrize("kwargs,message", [b for b in BAD if "nonfinite" not in b[0]],
                         ids=[m.split(":")[0] + "-" + str(i) for i, (k, m) in enumerate(BAD) if "nonfinite" not in k])
def test_invalid_per_group_values_are_refused_naming_value_and_group(kwargs, message):
    a, b = _params([((3,), torch.float32), ((2,), torch.float32)])
    opt = SNRAdamW([a])
    with pytest.raises(ValueError, match=re.escape(message) + r".* in parameter group 1"):
        opt.add_param_group({"params": [b], **kwargs})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=re.escape(message) + r".* in parameter group 1"):
        SNRAdamW([{"params": [a]}, {"params": [b], **kwargs}])


def test_valid_edge_values_are_accepted():
    p = _params([((3,), torch.float32)])
    SNRAdamW(p, lr=0.0, betas=[0.0, 0.0], rho=0.0, weight_decay=0.0, softness=0.0, alpha=0.0, warmup_steps=0)
    opt = SNRAdamW(p, lr=torch.tensor(1e-3))
    _set_grads(p, 0)
    opt.step()
    assert isinstance(opt.param_groups[0]["betas"], tuple)


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "propagate"])
def test_sparse_gradients_give_a_clear_error(nonfinite):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SNRAdamW(emb.parameters(), nonfinite=nonfinite)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


# ---------------------------------------------------------------------------------------------
# 8. non-finite gradients
# ---------------------------------------------------------------------------------------------
def _assert_skipped_step_changes_nothing(opt, params):
    """Step 2 on a non-finite gradient, a statistics request pending: one warning, parameters and state as they
    were, the step counted as skipped, and the request carried over (nothing moved, nothing to measure)."""
    snap = _snapshot(opt, params)
    opt.request_stats()
    with pytest.warns(RuntimeWarning, match=r"skipped step 2: non-finite gradient \(1 skipped so far"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    assert opt.snr_state["skipped_steps"] == 1 and opt.snr_state["steps"] == 1
    assert opt.last_stats == {}


def _nonfinite_setup(policy, foreach):
    params = _params([((4, 3), torch.float32), ((5,), torch.bfloat16)])
    opt = SNRAdamW(params, nonfinite=policy, foreach=foreach, warmup_steps=1)
    _set_grads(params, 0)
    opt.step()
    _set_grads(params, 1)
    return params, opt


@FOREACH
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_skip_leaves_everything_unchanged_and_counts(bad, foreach):
    params, opt = _nonfinite_setup("skip", foreach)
    params[1].grad[2] = bad
    _assert_skipped_step_changes_nothing(opt, params)
    # training continues as if the bad batch had never come
    ref_params, ref_opt = _nonfinite_setup("skip", foreach)
    for ps in (params, ref_params):
        _set_grads(ps, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        ref_opt.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    assert opt.last_stats["skipped_steps"] == 1.0 and opt.last_stats["signal"] > 0


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                         ids=["per_tensor", "foreach", "fused"])
def test_a_skipped_first_step_creates_no_state(impl):
    """A non-finite gradient on a tensor's first step: no state is created for any tensor (not even an
    empty entry), and the next finite step is everyone's first, as on a fresh optimizer."""
    if impl.get("fused"):
        from hf_snr import fused_cpu

        if not fused_cpu.available():
            pytest.skip(f"no fused CPU kernel: {fused_cpu.unavailable_reason()}")
    shapes = [((4, 3), torch.float32), ((5,), torch.bfloat16), ((6,), torch.float32)]
    params, fresh = _params(shapes), _params(shapes)
    opt, ref = SNRAdamW(params, warmup_steps=0, **impl), SNRAdamW(fresh, warmup_steps=0, **impl)
    params[2].requires_grad_(False)  # no gradient: skipped by both
    fresh[2].requires_grad_(False)
    _set_grads(params[:2], 0)
    params[1].grad[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert len(opt.state) == 0 and opt.snr_state["skipped_steps"] == 1 and opt.snr_state["steps"] == 0
    for ps, o in ((params, opt), (fresh, ref)):
        _set_grads(ps[:2], 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o.step()
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    assert [opt.state[p]["step"].item() for p in params[:2]] == [1.0, 1.0] and params[2] not in opt.state


def test_large_finite_gradients_are_not_mistaken_for_overflow():
    params = _params([((2,), torch.float32), ((2,), torch.float32), ((2,), torch.float32)])
    opt = SNRAdamW(params)
    for p in params:
        p.grad = torch.tensor([3.0e38, -3.0e38])  # finite, though their sum is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.snr_state["skipped_steps"] == 0 and opt.snr_state["steps"] == 1


@FOREACH
def test_nonfinite_raise_changes_nothing(foreach):
    params, opt = _nonfinite_setup("raise", foreach)
    params[0].grad[1, 1] = float("nan")
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"non-finite \(inf/nan\) gradient at optimizer step 2"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    assert opt.snr_state["steps"] == 1 and opt.snr_state["skipped_steps"] == 0


@FOREACH
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagate_behaves_like_adamw(bad, foreach):
    shapes = [((4, 3), torch.float32), ((5,), torch.float32)]
    ours, ref = _params(shapes), _params(shapes)
    opt = SNRAdamW(ours, nonfinite="propagate", foreach=foreach)  # in warm-up: q = 1
    adamw = torch.optim.AdamW(ref, foreach=False)
    for ps in (ours, ref):
        _set_grads(ps, 0)
        ps[0].grad[1, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    adamw.step()
    assert not torch.isfinite(ours[0][1, 2])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(opt.state[a]["exp_avg"], adamw.state[b]["exp_avg"], equal_nan=True)
    assert not torch.isfinite(opt.state[ours[0]]["exp_var"][1, 2])
    assert opt.snr_state["skipped_steps"] == 0


# ---------------------------------------------------------------------------------------------
# 9. risk statistics
# ---------------------------------------------------------------------------------------------
def _stats_from_state(opt):
    (
        "The logged statistics (docs/algorithm.md), computed directly (float64) from the optimizer's state "
        "after a step."
    )
    mask_sum = count = active = signal = noise = 0.0
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        rho, lr, eps, alpha, sf = group["rho"], group["lr"], group["eps"], group["alpha"], group["softness"]
        for p in group["params"]:
            st = opt.state[p]
            t = st["step"].item()
            m_hat = st["exp_avg"].double() / (1 - b1**t)
            mu2 = m_hat**2
            sig2 = st["exp_var"].double() / (1 - rho**t)
            if not group["snr"] or t <= group["warmup_steps"]:
                q = torch.ones_like(mu2)
            else:
                if group["reduction"] == "tensor":
                    mu2_g, sig2_g = mu2.sum(), sig2.sum()
                else:
                    mu2_g, sig2_g = mu2, sig2
                if group["mask"] == "snr":
                    q = mu2_g / (mu2_g + sf * alpha * sig2_g)
                elif group["mask"] == "soft":
                    ex = (mu2_g - alpha * sig2_g).clamp_min(0)
                    q = ex / (ex + sf * sig2_g)
                else:
                    q = (mu2_g > alpha * sig2_g).double()
                q = q.expand_as(mu2)
            u = lr * q / ((st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + eps)
            if group["snr"]:  # plain-AdamW groups have no gate to report
                mask_sum += q.sum().item()
                count += q.numel()
                active += (q > 0.5).sum().item()
            signal += (u * mu2).sum().item()
            noise += alpha * (u * sig2).sum().item()
    return {"mask_mean": mask_sum / count, "active_fraction": active / count, "signal": signal,
            "noise": noise, "population_gain": signal - noise}


@pytest.mark.parametrize("block_numel", [None, 7], ids=["block_default", "block_7"], indirect=True)
@FOREACH
@pytest.mark.parametrize("reduction", ["element", "tensor"])
@pytest.mark.parametrize("mask", MASKS)
def test_risk_stats_match_direct_computation_from_state(mask, reduction, foreach, block_numel):
    params = _params([((5, 4), torch.float32), ((6,), torch.float32), ((3, 2), torch.bfloat16), ((4,), torch.float32)])
    groups = [{"params": params[:2]},
              {"params": params[2:3], "alpha": 0.3, "softness": 2.0, "lr": 5e-3},
              {"params": params[3:], "snr": False}]
    opt = SNRAdamW(groups, mask=mask, reduction=reduction, warmup_steps=1, foreach=foreach)
    gated = False
    for step in range(5):
        _set_grads(params, step)
        opt.request_stats()
        opt.step()
        expected = _stats_from_state(opt)
        for k, v in expected.items():
            scale = abs(expected["signal"]) + abs(expected["noise"]) if k == "population_gain" else abs(v)
            assert opt.last_stats[k] == pytest.approx(v, rel=0, abs=1e-5 * scale + 1e-12), (step, k)
        if step == 0:  # warm-up: the gate is open
            assert opt.last_stats["mask_mean"] == 1.0 and opt.last_stats["active_fraction"] == 1.0
        else:
            gated |= opt.last_stats["mask_mean"] < 1.0
    assert gated  # the example exercised a closing gate, not only the open one


@FOREACH
def test_stats_only_when_requested_and_cumulative_noise(foreach, monkeypatch):
    params = _params([((5, 4), torch.float32)])
    opt = SNRAdamW(params, warmup_steps=0, foreach=foreach)
    calls = []
    import hf_snr._stats as stats_module  # where statistics are finished

    real = stats_module.finish
    monkeypatch.setattr(stats_module, "finish",
                        lambda total, steps, **kw: calls.append(total) or real(total, steps, **kw))
    noises = {}
    for step in range(1, 8):
        _set_grads(params, step)
        if step in (3, 7):
            opt.request_stats()
        before = dict(opt.last_stats)
        opt.step()
        if step in (3, 7):
            noises[step] = opt.last_stats["noise"]
            assert opt.last_stats["noise"] > 0
        else:
            assert opt.last_stats == before  # untouched: nothing computed
    assert len(calls) == 2  # one reduction per requested step, none otherwise
    # noise is held constant between requests at the later value: 3 steps of n3, 4 of n7
    assert opt.snr_state["cumulative_noise"] == pytest.approx(3 * noises[3] + 4 * noises[7], rel=1e-12)
    assert opt.last_stats["cumulative_noise"] == opt.snr_state["cumulative_noise"]
    assert opt.last_stats["population_gain"] == pytest.approx(opt.last_stats["signal"] - opt.last_stats["noise"])
