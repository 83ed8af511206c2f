"""The reference SNRAdamW step: one parameter at a time, in the order of the equations (the test oracle).

Kept deliberately plain: the foreach path (:mod:`hf_snr._foreach`) and the fused kernels
(:mod:`hf_snr._fused`) must give the same numbers, and the tests hold them to it. The math is in
``docs/algorithm.md``; the calling contract (``moments`` then ``update``) in :mod:`hf_snr._step_args`.
Row and tensor gates need the sums of mu^2 and sigma^2 over a row (all-reduced under sharding) before any
gate, so the moments phase returns them and the update phase turns them into gates.

Imports only torch.
"""

from __future__ import annotations

import torch

from ._distributed import local
from ._fused_common import mask as gate_mask
from ._step_args import FP32_MAX, GroupTensors, Phase, StepArgs, q_shape, row_sums, tensor_scalars


def moments(t: GroupTensors, *, args: StepArgs, mb=None, found_inf=None, check=None) -> Phase:
    """s, m, v of every tensor (and the step counts); for row / tensor gates the per-row sums of mu^2, sigma^2."""
    assert found_inf is None and not check, "device skips and kernel checks are the fused path's"
    sums = []
    for i in range(len(t.params)):
        g = local(t.grads[i]).float()
        m, v, s_store = local(t.exp_avgs[i]), local(t.exp_avg_sqs[i]), local(t.exp_vars[i])
        s = s_store.float() if s_store.dtype != torch.float32 else s_store  # state_dtype: math in fp32
        t.steps[i] += 1
        if mb is None:                                   # variance="ema"
            d = g - m                                    # deviation from the previous, uncorrected mean
            s.mul_(args.rho).addcmul_(d, d, value=1 - args.rho)  # s <- rho s + (1 - rho) d^2
        else:                                            # variance="microbatch": unbiased variance of the mean
            sq = t.mb_sqs[i]
            est = (sq * mb[0] - g * g * mb[1]).clamp_min_(0.0)
            s.mul_(args.rho).add_(est, alpha=1 - args.rho)
            sq.zero_()
        if s is not s_store:
            s_store.copy_(s)
            s = s_store.float()                          # what the gate reads is the stored (rounded) value
        m.lerp_(g, 1 - args.beta1)                       # m <- beta1 m + (1 - beta1) g
        v.mul_(args.beta2).addcmul_(g, g, value=1 - args.beta2)
        if args.reduced:                                 # reduction="row" / "tensor": sums for the gate
            k = tensor_scalars(args, t.steps[i].item(), t.var_starts[i])
            mu2, sig2 = _signal_noise(t, i, args, m, s, k)
            sums.append(torch.stack([row_sums(mu2, args.reduction), row_sums(sig2, args.reduction)], dim=1))
    return Phase(sums=sums if args.reduced else None)


def _signal_noise(t: GroupTensors, i: int, args: StepArgs, m: torch.Tensor, s: torch.Tensor, k: dict):
    """mu^2 and sigma^2 of tensor i (k: its scalars), clamped to fp32's max (a huge finite gradient squares to inf)."""
    if args.signal == "ema":
        mu2 = (m / k["bc1"]).square()                    # mu^2 = m_hat^2
    else:
        mu2 = local(t.grads[i]).float().square()         # signal="step": mu^2 = g^2
    sig2 = s / k["bcr"] * k["noise_scale"]               # sigma^2 = s_hat (x c_t with noise="ema")
    return mu2.clamp_max_(FP32_MAX), sig2.clamp_max_(FP32_MAX)


def update(t: GroupTensors, phase: Phase, *, args: StepArgs, want_stats: bool = False, check=None):
    """The gate and the decoupled-decay AdamW update of every tensor; the statistics' sums when asked."""
    assert not check, "kernel checks are the fused path's"
    lr, wd = args.lr, args.weight_decay
    part = None
    for i in range(len(t.params)):
        p = local(t.params[i])
        m, v, s = local(t.exp_avgs[i]), local(t.exp_avg_sqs[i]), local(t.exp_vars[i]).float()
        k = tensor_scalars(args, t.steps[i].item(), t.var_starts[i])
        m_hat = m / k["bc1"]
        mu2, sig2 = _signal_noise(t, i, args, m, s, k)
        if k["open"]:                                    # warm-up, or snr=False: plain AdamW
            q = torch.ones_like(m)
        elif args.reduced:                               # one gate per row / tensor, from the sums
            sums = phase.sums[i]
            q = gate_mask(args.mask, sums[:, 0].float(), sums[:, 1].float(), args.alpha, args.softness, args.c)
            q = q.reshape(q_shape(m, args.reduction)).expand_as(m)
        else:                                            # one gate per coordinate
            q = gate_mask(args.mask, mu2, sig2, args.alpha, args.softness, args.c)
        denom = (v / k["bc2"]).sqrt() + args.eps
        p32 = p.float() if p.dtype != torch.float32 else p
        anchor = t.anchors[i]
        if anchor is None:
            p32.mul_(1 - lr * wd)                        # decoupled weight decay, never masked
        else:
            p32.sub_(p32 - local(anchor).float(), alpha=lr * wd)  # decay_to="init": toward p0
        p32.addcdiv_(q * m_hat, denom, value=-lr)        # the gated AdamW step
        if p32 is not p:
            p.copy_(p32)
        if want_stats:
            row = _stats(q, v, denom, mu2, sig2, args)
            part = row if part is None else part + row
    return part


def _stats(q, v, denom, mu2, sig2, args: StepArgs) -> torch.Tensor:
    """(mask_sum, mask_count, active_count, signal, noise) of one tensor; u = lr q / denom is the step size."""
    u = q * args.lr / denom
    seen = v > 0  # coordinates that have had a gradient (not ZeRO's zero padding)
    zero = q.new_zeros(())
    return torch.stack([
        torch.where(seen, q, 0.0).sum() if args.gated else zero,
        seen.sum().float() if args.gated else zero,
        ((q > 0.5) & seen).sum().float() if args.gated else zero,
        (u * mu2).sum(),
        args.alpha * (u * sig2).sum(),
    ])
