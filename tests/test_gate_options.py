"""The gate-estimator options (noise, signal, variance, reduction="row", decay_to), the AdamW warm start and
complex parameters: hand math, both code paths, resume, pure-noise and constant-gradient behaviour."""

import copy
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from hf_snr import SNRAdamW
from hf_snr.optimizer import ema_noise_scale

OPTION_SETS = {
    "default": {},
    "noise_ema": dict(noise="ema"),
    "signal_step": dict(signal="step"),
    "microbatch": dict(variance="microbatch"),
    "microbatch_noise_ema": dict(variance="microbatch", noise="ema"),
    "row": dict(reduction="row"),
    "row_noise_ema": dict(reduction="row", noise="ema"),
    "decay_init": dict(decay_to="init"),
    "all": dict(noise="ema", variance="microbatch", reduction="row", decay_to="init"),
}
MASKS = ("snr", "soft", "hard")
K_MICRO = 3  # micro-batches per step in these tests


def _grads(step: int, shape, k: int, seed: int = 0):
    """k micro-batch gradients of one step: a signal per row plus noise (deterministic)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    signal = torch.linspace(-0.3, 0.5, shape[0]).view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return [signal + 0.7 * torch.randn(shape, generator=gen) for _ in range(k)]


def _feed(params, step, k, seed=0):
    """One step's backward passes: k micro-batches, each loss divided by k (standard accumulation)."""
    for p in params:
        p.grad = None
    per = [_grads(step, p.shape, k, seed + j) for j, p in enumerate(params)]
    for i in range(k):
        loss = sum((p * per[j][i]).sum() for j, p in enumerate(params)) / k
        loss.backward()
    return per


# -- the reference: the equations in float64, one tensor at a time ------------------------------------
def reference_run(p0, micro, hp, steps):
    """Returns the parameter after each step, and per step the coordinates within 1e-4 of a gate kink."""
    b1, b2 = hp.get("betas", (0.9, 0.999))
    rho, lr, eps, wd = hp.get("rho", 0.99), hp["lr"], hp.get("eps", 1e-8), hp.get("weight_decay", 0.01)
    alpha, soft, warm = hp.get("alpha", 1.0), hp.get("softness", 1.0), hp.get("warmup_steps", 10)
    mask, red = hp.get("mask", "snr"), hp.get("reduction", "element")
    p = p0.double().clone()
    m, v, s = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    out, nears = [], []
    for t in range(1, steps + 1):
        gs = [g.double() for g in micro[t - 1]]
        g = sum(gs) / len(gs)
        if hp.get("variance", "ema") == "ema":
            s = rho * s + (1 - rho) * (g - m) ** 2
        else:
            K = len(gs)
            s = rho * s + (1 - rho) * sum((gi - g) ** 2 for gi in gs) / (K * (K - 1))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat, s_hat = m / (1 - b1**t), v / (1 - b2**t), s / (1 - rho**t)
        mu2 = m_hat**2 if hp.get("signal", "ema") == "ema" else g**2
        cn = (1 - b1) * (1 + b1**t) / ((1 + b1) * (1 - b1**t)) if hp.get("noise", "step") == "ema" else 1.0
        sig2 = s_hat * cn
        if red == "row" and p.dim() >= 2:
            mu2, sig2 = (x.sum(1, keepdim=True).expand_as(p) for x in (mu2, sig2))
        elif red != "element":
            mu2, sig2 = (x.sum().expand_as(p) for x in (mu2, sig2))
        near = (mu2 - alpha * sig2).abs() <= 1e-4 * (mu2 + alpha * sig2)
        if t <= warm:
            q, near = torch.ones_like(p), torch.zeros_like(near)
        elif mask == "snr":
            q = mu2 / (mu2 + soft * alpha * sig2)
            near = torch.zeros_like(near)
        elif mask == "soft":
            e = (mu2 - alpha * sig2).clamp_min(0)
            q = e / (e + soft * sig2)
        else:
            q = (mu2 > alpha * sig2).double()
        if hp.get("decay_to", "zero") == "init":
            p = p - lr * wd * (p - p0.double())
        else:
            p = p * (1 - lr * wd)
        p = p - lr * q * m_hat / (v_hat.sqrt() + eps)
        out.append(p.clone())
        nears.append(near)
    return out, nears


def _run(hp, foreach, steps=6, shape=(5, 8), k=K_MICRO, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape))
    p0 = p.detach().clone()
    opt = SNRAdamW([p], foreach=foreach, **hp)
    traj, micro = [], []
    for t in range(1, steps + 1):
        (per,) = _feed([p], t, k, seed)
        micro.append(per)
        opt.step()
        traj.append(p.detach().clone())
    return p0, micro, traj, opt


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", OPTION_SETS)
def test_first_steps_match_the_equations(name, mask, foreach):
    hp = dict(OPTION_SETS[name], mask=mask, lr=3e-2, weight_decay=0.1, warmup_steps=2, alpha=0.8, softness=2.0,
              rho=0.9)
    p0, micro, traj, _ = _run(hp, foreach)
    ref, nears = reference_run(p0, micro, hp, len(traj))
    ever_near = torch.zeros_like(nears[0])
    for t, (got, want, near) in enumerate(zip(traj, ref, nears), start=1):
        ever_near |= near  # a coordinate within rounding of a kink may fall either way, and stays different
        keep = ~ever_near
        assert keep.float().mean() > 0.8
        torch.testing.assert_close(got[keep].double(), want[keep], rtol=1e-5, atol=1e-6, msg=f"{name} step {t}")


def _mixed(hp_a, hp_b):
    bf16, f32 = torch.bfloat16, torch.float32
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in
              [((6, 5), f32), ((5,), f32), ((4, 3), bf16), ((7, 2), f32), ((9,), bf16)]]
    return params, [{"params": params[:3], **hp_a}, {"params": params[3:], **hp_b}]


@pytest.mark.parametrize("name", OPTION_SETS)
def test_foreach_path_equals_per_tensor_path(name):
    runs = []
    for foreach in (False, True):
        hp = dict(OPTION_SETS[name], warmup_steps=2, mask="soft", alpha=0.5)
        other = dict(OPTION_SETS[name], warmup_steps=0, mask="snr", lr=3e-3, weight_decay=0.2)
        params, groups = _mixed(hp, other)
        opt = SNRAdamW(groups, foreach=foreach)
        stats = []
        for t in range(1, 9):
            if t % 3 == 0:
                opt.request_stats()
            _feed(params, t, K_MICRO)
            opt.step()
            stats.append(dict(opt.last_stats))
        runs.append((params, opt, stats))
    (pa, oa, sa), (pb, ob, sb) = runs
    for a, b in zip(pa, pb):
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "exp_var"):
            torch.testing.assert_close(oa.state[a][key], ob.state[b][key], rtol=1e-6, atol=1e-9)
    for x, y in zip(sa, sb):
        for key in x:
            scale = abs(y["signal"]) + abs(y["noise"]) if key == "population_gain" else abs(y[key])
            assert x[key] == pytest.approx(y[key], abs=1e-5 * scale + 1e-12), key


def resume_matches_straight(hp, tmp_path, shape=(4, 6)):
    """8 steps straight vs 4 steps, save, load into a fresh optimizer, 4 more: the parameters are equal.

    Returns (the optimizer saved at step 4 with its parameter, the resumed optimizer with its parameter)."""
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        return p, SNRAdamW([p], **hp)

    p, opt = make()
    for t in range(1, 9):
        _feed([p], t, K_MICRO)
        opt.step()
    straight = p.detach().clone()

    p, opt = make()
    for t in range(1, 5):
        _feed([p], t, K_MICRO)
        opt.step()
    torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    p2, opt2 = make()
    with torch.no_grad():
        p2.copy_(saved["p"])
    opt2.load_state_dict(saved["opt"])
    loaded = {k: v.clone() for k, v in opt2.state[p2].items()}  # as loaded, before the remaining steps
    for t in range(5, 9):
        _feed([p2], t, K_MICRO)
        opt2.step()
    assert torch.equal(p2.detach(), straight)
    return (p, opt), (p2, loaded)


@pytest.mark.parametrize("name", OPTION_SETS)
def test_resume_equals_a_straight_run(name, tmp_path):
    hp = dict(OPTION_SETS[name], warmup_steps=2, mask="soft", alpha=0.5, lr=1e-2, weight_decay=0.1)
    _, (_, loaded) = resume_matches_straight(hp, tmp_path)
    if hp.get("decay_to") == "init":
        assert "param_init" in loaded  # p0 travels with the checkpoint


# -- pure noise and a constant gradient -----------------------------------------------------------------
# The pure-noise cases, their derived values and the measurement live in benchmarks/pure_noise_gate.py (the
# README's table); this test holds the measurement to the derivation.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from pure_noise_gate import CASES as PURE_NOISE_CASES  # noqa: E402
from pure_noise_gate import C  # noqa: E402
from pure_noise_gate import mask_mean as _mask_mean_on  # noqa: E402

# tolerances: the gate's mean over 100 steps x 4000 coordinates; the EMA estimates of sigma^2 are themselves noisy
# (rho = 0.99), which moves the mean by up to ~0.005 for the snr gate at c-scale and ~0.01 at Z^2-scale
PURE_NOISE = {name: (opts, derived, 0.01 if derived < 0.1 else 0.02) for name, opts, _, derived in PURE_NOISE_CASES}


def test_the_derived_values_are_the_documented_ones():
    assert PURE_NOISE["mask=snr (default)"][1] == pytest.approx(0.044, abs=0.001)
    assert PURE_NOISE["noise=ema"][1] == pytest.approx(0.34, abs=0.005)
    assert ema_noise_scale(1, 0.9) == pytest.approx(1.0)
    assert ema_noise_scale(1e6, 0.9) == pytest.approx(C)


@pytest.mark.parametrize("name", PURE_NOISE)
def test_pure_noise_gate_mean_matches_its_derived_value(name):
    opts, expected, tol = PURE_NOISE[name]
    got = _mask_mean_on(lambda gen, shape: torch.randn(shape, generator=gen), opts)
    assert got == pytest.approx(expected, abs=tol), (name, got, expected)


@pytest.mark.parametrize("name", [*OPTION_SETS, "signal_step_microbatch"])
def test_constant_gradient_opens_every_option(name):
    opts = {k: v for k, v in (OPTION_SETS.get(name) or dict(signal="step", variance="microbatch")).items()
            if k != "decay_to"}
    const = torch.linspace(0.5, 1.5, 200).expand(20, 200)
    got = _mask_mean_on(lambda gen, shape: const, opts, steps=300)
    assert got > 0.99, (name, got)


# -- the micro-batch variance -----------------------------------------------------------------------------
def test_microbatch_variance_is_the_unbiased_variance_of_the_mean():
    k, shape = 4, (300, 50)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SNRAdamW([p], variance="microbatch", rho=0.9, weight_decay=0.0)
    sigma = 2.0
    gen = torch.Generator().manual_seed(5)
    micro = [sigma * torch.randn(shape, generator=gen) + 1.0 for _ in range(k)]
    for g in micro:
        ((p * g).sum() / k).backward()
    opt.step()
    assert opt.last_microbatch_count == k
    s_hat = opt.state[p]["exp_var"] / (1 - 0.9)
    exact = torch.stack(micro).var(dim=0, unbiased=True) / k  # the sample variance of the mean, per coordinate
    torch.testing.assert_close(s_hat, exact, rtol=1e-4, atol=1e-6)
    # and it estimates sigma^2 / k within sampling error (mean over 15000 coordinates: chi^2 with k-1 d.o.f.)
    sd = (sigma**2 / k) * math.sqrt(2 / (k - 1)) / math.sqrt(s_hat.numel())
    assert s_hat.mean().item() == pytest.approx(sigma**2 / k, abs=5 * sd)


def test_microbatch_refuses_a_single_micro_batch_with_the_reason():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SNRAdamW([p], variance="microbatch")
    (p * torch.ones(3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"needs k >= 2 micro-batch gradients.*got 1.*gradient_accumulation_steps"):
        opt.step()


def test_microbatch_counts_reset_each_step_and_after_a_skipped_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SNRAdamW([p], variance="microbatch")
    for k in (2, 5, 3):
        p.grad = None
        for _ in range(k):
            ((p * torch.randn(3)).sum() / k).backward()
        opt.step()
        assert opt.last_microbatch_count == k
    p.grad = None
    ((p * torch.tensor([1.0, float("nan"), 0.0])).sum()).backward()
    ((p * torch.randn(3)).sum()).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    p.grad = None
    for _ in range(2):
        ((p * torch.randn(3)).sum() / 2).backward()
    opt.step()
    assert opt.last_microbatch_count == 2


# -- decay toward the initial values ---------------------------------------------------------------------
def test_decay_to_init_with_zero_gradient_converges_geometrically_to_p0():
    target = torch.tensor([1.0, -2.0, 3.0])
    p = torch.nn.Parameter(torch.tensor([4.0, 0.0, -1.0]))
    opt = SNRAdamW([p], lr=0.1, weight_decay=0.5, decay_to="init")
    opt.set_decay_anchors({p: target})
    start = p.detach().clone()
    for t in range(1, 31):
        p.grad = torch.zeros(3)
        opt.step()
        torch.testing.assert_close(p.detach() - target, (1 - 0.05) ** t * (start - target), rtol=1e-5, atol=1e-6)
    assert "param_init" not in opt.state[p]  # the anchor is used as it is: no copy


def test_decay_to_init_anchor_zero_equals_adamw_decay():
    def run(**kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(7, 3))
        opt = SNRAdamW([p], lr=1e-2, weight_decay=0.3, warmup_steps=3, **kw)
        if kw.get("decay_to") == "init":
            opt.set_decay_anchors({p: torch.zeros(7, 3)})
        for t in range(1, 11):
            _feed([p], t, 2)
            opt.step()
        return p.detach()

    torch.testing.assert_close(run(decay_to="init"), run(), rtol=1e-6, atol=1e-7)


def test_decay_to_init_keeps_one_fp32_copy_of_the_first_step_value():
    p = torch.nn.Parameter(torch.randn(5, 4).to(torch.bfloat16))
    first = p.detach().float().clone()
    opt = SNRAdamW([p], decay_to="init", weight_decay=0.1)
    _feed([p], 1, 1)
    opt.step()
    init = opt.state[p]["param_init"]
    assert init.dtype == torch.float32 and torch.equal(init, first)
    # no weight decay: nothing to anchor, no copy
    q = torch.nn.Parameter(torch.randn(3))
    opt2 = SNRAdamW([q], decay_to="init", weight_decay=0.0)
    q.grad = torch.ones(3)
    opt2.step()
    assert "param_init" not in opt2.state[q]


def test_set_decay_anchors_checks_what_it_is_given():
    p = torch.nn.Parameter(torch.randn(3))
    opt = SNRAdamW([p], decay_to="init")
    with pytest.raises(ValueError, match="anchor shape"):
        opt.set_decay_anchors({p: torch.zeros(4)})
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_decay_anchors({torch.nn.Parameter(torch.zeros(3)): torch.zeros(3)})


# -- switching optimizers: an AdamW checkpoint ---------------------------------------------------------------
def test_loading_an_adamw_state_carries_the_moments_and_restarts_the_variance(caplog):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    adamw = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    for t in range(1, 6):
        _feed([p], t, 1)
        adamw.step()
    saved = copy.deepcopy(adamw.state_dict())
    ref = copy.deepcopy(p)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    ref_opt.load_state_dict(copy.deepcopy(saved))

    opt = SNRAdamW([p], lr=1e-2, weight_decay=0.1, warmup_steps=3, mask="hard", rho=0.5)
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        opt.load_state_dict(saved)
    assert "without exp_var" in caplog.text and "gate stays open" in caplog.text
    group = opt.param_groups[0]
    assert group["mask"] == "hard" and group["rho"] == 0.5 and "amsgrad" not in group  # our settings kept
    assert opt.state[p]["step"].item() == 5 and torch.count_nonzero(opt.state[p]["exp_var"]) == 0
    for t in range(6, 9):  # the gate's own warm-up: AdamW exactly
        for q in (p, ref):
            _feed([q], t, 1)
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    closed = []
    for t in range(9, 15):  # then the gate applies, with the variance's own bias correction (3 + t - 8 steps)
        _feed([p], t, 1)
        opt.request_stats()
        opt.step()
        closed.append(opt.last_stats["mask_mean"])
    assert min(closed) < 1.0
    assert math.isfinite(sum(closed))
    sd = opt.state_dict()  # and it round-trips as an SNRAdamW state
    opt3 = SNRAdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    opt3.load_state_dict(sd)
    assert "exp_var_start" in next(iter(opt3.state.values()))


def test_complex_parameters_are_refused_at_construction():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"does not support complex parameters.*complex64.*view_as_real"):
        SNRAdamW([z])
    opt = SNRAdamW([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
