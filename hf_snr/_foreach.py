"""The foreach SNRAdamW step: the reference math with ``torch._foreach_*`` kernels, in its order of operations.

Element gates run moments, gate and update in one sweep over cache-sized blocks; row and tensor gates need
their sums (all-reduced under sharding) before any gate, so they sweep twice, over whole tensors. The
calling contract (``moments`` then ``update``) is in :mod:`hf_snr._step_args`.

Imports only torch.
"""

from __future__ import annotations

import torch

from ._distributed import local
from ._fused_common import TINY as _TINY
from ._fused_common import mask as gate_mask
from ._step_args import FP32_MAX, GroupTensors, Phase, StepArgs, q_shape, row_sums, tensor_scalars

__all__ = ["moments", "update"]


# On CPU the foreach sequence runs over blocks of about this many elements per intra-op thread (up
# to 4 threads; large tensors are cut into flat views, small ones packed together): a block's ~8
# fp32 intermediates then stay in the last-level cache and are recycled by malloc, whereas
# whole-group temporaries are fresh pages, page-faulted on every step, and each of the ~20 ops
# streams the whole model through memory. Measured on one core: 0.85x AdamW-foreach's step time
# blocked, 2x unblocked. Other devices take one block of whole tensors (few kernel launches; their
# caching allocators recycle memory).
_CPU_BLOCK_NUMEL = 1 << 17


def _blocks(tensors: list[list[torch.Tensor]], block_numel: int | None, cut: bool = True):
    """Split aligned lists of tensors (params, grads, m, v, s, ...) into blocks of aligned pieces.

    Returns a list of blocks; a block is a list of (i, views) with i the tensor's index and views
    one piece of each list (None stays None). Tensors that are not all contiguous, and every tensor
    when ``cut`` is False, are never cut.
    """
    n = len(tensors[0])
    if block_numel is None:
        return [[(i, [ts[i] for ts in tensors]) for i in range(n)]]
    blocks, current, size = [], [], 0
    for i in range(n):
        row = [ts[i] for ts in tensors]
        numel = row[0].numel()
        if not cut or numel <= block_numel or not all(x is None or x.is_contiguous() for x in row):
            pieces = [row]
        else:
            flat = [None if x is None else x.view(-1) for x in row]
            pieces = [[None if f is None else f[a:a + block_numel] for f in flat] for a in range(0, numel, block_numel)]
        for views in pieces:
            k = views[0].numel()
            if current and size + k > block_numel:
                blocks.append(current)
                current, size = [], 0
            current.append((i, views))
            size += k
    if current:
        blocks.append(current)
    return blocks


_P, _G, _M, _V, _S, _A, _Q = range(7)  # positions in a block's views: param, grad, m, v, s, anchor, sq


def _split(args: StepArgs, t: GroupTensors):
    lists = [[None if x is None else local(x) for x in ts]
             for ts in (t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.exp_vars, t.anchors, t.mb_sqs)]
    on_cpu = all(x.device.type == "cpu" for x in lists[0])
    block = _CPU_BLOCK_NUMEL * min(torch.get_num_threads(), 4) if on_cpu else None
    return _blocks(lists, block, cut=args.reduction == "element")


def _moments(args: StepArgs, block, mb) -> None:
    """m, v, s of one block, in place."""
    rho = args.rho
    g = [x[1][_G] if x[1][_G].dtype == torch.float32 else x[1][_G].float() for x in block]
    m = [x[1][_M] for x in block]
    v = [x[1][_V] for x in block]
    s_store = [x[1][_S] for x in block]
    s = [x if x.dtype == torch.float32 else x.float() for x in s_store]  # state_dtype: math in fp32
    torch._foreach_mul_(s, rho)
    if mb is None:
        d = torch._foreach_sub(g, m)                # deviation from the previous, uncorrected mean
        torch._foreach_addcmul_(s, d, d, value=1 - rho)
    else:
        sq = [x[1][_Q] for x in block]
        est = torch._foreach_mul(sq, mb[0])
        torch._foreach_addcmul_(est, g, g, value=-mb[1])
        torch._foreach_clamp_min_(est, 0.0)
        torch._foreach_add_(s, est, alpha=1 - rho)
        torch._foreach_zero_(sq)
    for a, b in zip(s_store, s):
        if a is not b:
            a.copy_(b)
    torch._foreach_lerp_(m, g, 1 - args.beta1)
    torch._foreach_mul_(v, args.beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - args.beta2)


class _Sweep:
    """The foreach path's part of a phase: the blocks, the per-tensor scalars, whether the moments are done."""
    __slots__ = ("blocks", "scalars", "mb", "moments_done")

    def __init__(self, blocks, scalars, mb, moments_done):
        self.blocks, self.scalars, self.mb, self.moments_done = blocks, scalars, mb, moments_done


def moments(t: GroupTensors, *, args: StepArgs, mb=None, found_inf=None, check=None) -> Phase:
    """The step counts; for row / tensor gates also m, v, s and the sums (element gates do them in update's
    sweep, block by block, while the block is in cache)."""
    assert found_inf is None and not check, "device skips and kernel checks are the fused path's"
    torch._foreach_add_(t.steps, 1.0)
    blocks = _split(args, t)
    scal = [tensor_scalars(args, x.item(), vs) for x, vs in zip(t.steps, t.var_starts)]
    if not args.reduced:
        return Phase(None, _Sweep(blocks, scal, mb, False))
    sums: list[torch.Tensor | None] = [None] * len(t.params)
    for block in blocks:
        _moments(args, block, mb)
        idx = [i for i, _ in block]
        if args.signal == "ema":
            mu2 = torch._foreach_div([x[1][_M] for x in block], [scal[i]["bc1"] for i in idx])
            torch._foreach_mul_(mu2, mu2)
        else:
            mu2 = [x[1][_G].float().square() for x in block]
        sig2 = torch._foreach_div([x[1][_S].float() for x in block], [scal[i]["bcr"] for i in idx])
        torch._foreach_mul_(sig2, [scal[i]["noise_scale"] for i in idx])
        torch._foreach_clamp_max_(mu2, FP32_MAX)
        torch._foreach_clamp_max_(sig2, FP32_MAX)
        for i, a, b in zip(idx, mu2, sig2):
            sums[i] = torch.stack([row_sums(a, args.reduction), row_sums(b, args.reduction)], dim=1)
    return Phase(sums, _Sweep(blocks, scal, mb, True))


def update(t: GroupTensors, phase: Phase, *, args: StepArgs, want_stats: bool = False, check=None):
    """The gate and the update, block by block (and the moments first, for element gates)."""
    assert not check, "kernel checks are the fused path's"
    lr, eps, wd = args.lr, args.eps, args.weight_decay
    alpha, softness, c = args.alpha, args.softness, args.c
    kind = args.mask
    sweep = phase.data
    scal = sweep.scalars
    gated = not all(k["open"] for k in scal)
    red = args.reduction
    reduced_q = None
    if gated and args.reduced:
        reduced_q = [gate_mask(kind, sm[:, 0].float(), sm[:, 1].float(), alpha, softness, c) for sm in phase.sums]
    masked = args.gated
    acc = None

    for block in sweep.blocks:
        if not sweep.moments_done:
            _moments(args, block, sweep.mb)
        idx = [i for i, _ in block]
        m = [x[1][_M] for x in block]
        v = [x[1][_V] for x in block]
        s = [x[1][_S] if x[1][_S].dtype == torch.float32 else x[1][_S].float() for x in block]
        m_hat = torch._foreach_div(m, [scal[i]["bc1"] for i in idx])
        mu2 = sig2 = q = None
        if gated or want_stats:
            if args.signal == "ema":
                mu2 = torch._foreach_mul(m_hat, m_hat)
            else:
                g = [x[1][_G].float() for x in block]
                mu2 = torch._foreach_mul(g, g)
            sig2 = torch._foreach_div(s, [scal[i]["bcr"] for i in idx])
            if args.noise == "ema":
                torch._foreach_mul_(sig2, [scal[i]["noise_scale"] for i in idx])
            torch._foreach_clamp_max_(mu2, FP32_MAX)  # a huge finite gradient: inf^2 would make q nan
            torch._foreach_clamp_max_(sig2, FP32_MAX)
        if gated:
            if reduced_q is not None:
                q = [reduced_q[i].reshape(q_shape(x, red)).expand_as(x) for i, x in zip(idx, m)]
            elif kind == "hard" or want_stats:
                q = list(_foreach_mask(kind, mu2, sig2, alpha, softness, c))
            else:  # q computed in the buffers of mu2 and sigma^2, which nothing needs after
                q = _foreach_mask_(kind, mu2, sig2, alpha, softness, c)
            for j, i in enumerate(idx):
                if scal[i]["open"]:  # a tensor still in its own warm-up (first gradient came late)
                    q[j] = torch.ones_like(m[j])

        denom = torch._foreach_div(v, [scal[i]["bc2"] for i in idx])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)

        local_p = [x[1][_P] for x in block]
        p32 = [p if p.dtype == torch.float32 else p.float() for p in local_p]
        anchors = [x[1][_A] for x in block]
        if all(a is None for a in anchors):
            torch._foreach_mul_(p32, 1 - lr * wd)   # decoupled weight decay, never masked
        else:                                      # ... toward p0 (decay_to="init")
            diff = torch._foreach_sub(p32, [a if a.dtype == torch.float32 else a.float() for a in anchors])
            torch._foreach_sub_(p32, diff, alpha=lr * wd)
        if q is None:
            step_dir = m_hat
        elif want_stats or reduced_q is not None:
            step_dir = torch._foreach_mul(m_hat, q)
        else:
            torch._foreach_mul_(q, m_hat)
            step_dir = q
        torch._foreach_addcdiv_(p32, step_dir, denom, value=-lr)
        for p, p_f in zip(local_p, p32):
            if p_f is not p:
                p.copy_(p_f)

        if want_stats:
            if q is None:
                q = [torch.ones_like(x) for x in m]
            u = torch._foreach_div(q, denom)
            torch._foreach_mul_(u, lr)
            signal = torch._foreach_mul(u, mu2)
            noise = torch._foreach_mul(u, sig2)
            zero = m[0].new_zeros(())
            # coordinates that have had a gradient (not ZeRO's zero padding) count in the mask mean
            seen = [x > 0 for x in v] if masked else None
            rows = torch.stack([
                torch.stack([
                    torch.where(seen[j], q[j], 0.0).sum() if masked else zero,
                    seen[j].sum().float() if masked else zero,
                    ((q[j] > 0.5) & seen[j]).sum().float() if masked else zero,
                    signal[j].sum(),
                    alpha * noise[j].sum(),
                ])
                for j in range(len(block))
            ]).sum(0)
            acc = rows if acc is None else acc + rows
    return acc


def _foreach_mask(kind, mu2, sig2, alpha, softness, c):
    if kind == "snr":
        denom = torch._foreach_mul(sig2, c)
        torch._foreach_add_(denom, mu2)
        torch._foreach_clamp_min_(denom, _TINY)
        return torch._foreach_div(mu2, denom)
    if kind == "soft":
        excess = torch._foreach_mul(sig2, -alpha)
        torch._foreach_add_(excess, mu2)
        torch._foreach_clamp_min_(excess, 0.0)
        denom = torch._foreach_mul(sig2, softness)
        torch._foreach_add_(denom, excess)
        torch._foreach_clamp_min_(denom, _TINY)
        return torch._foreach_div(excess, denom)
    return [(a > alpha * b).float() for a, b in zip(mu2, sig2)]


def _foreach_mask_(kind, mu2, sig2, alpha, softness, c):
    """_foreach_mask for "snr" and "soft", overwriting mu2 and sig2 (returns q in mu2's buffers).

    The same operations in the same order as _mask, so the same rounding: only the buffers differ.
    """
    if kind == "snr":
        torch._foreach_mul_(sig2, c)
        torch._foreach_add_(sig2, mu2)
        torch._foreach_clamp_min_(sig2, _TINY)
        torch._foreach_div_(mu2, sig2)
        return list(mu2)
    excess = torch._foreach_mul(sig2, -alpha)
    torch._foreach_add_(excess, mu2)
    torch._foreach_clamp_min_(excess, 0.0)
    torch._foreach_mul_(sig2, softness)
    torch._foreach_add_(sig2, excess)
    torch._foreach_clamp_min_(sig2, _TINY)
    torch._foreach_div_(excess, sig2)
    return list(excess)
