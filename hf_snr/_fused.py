"""The fused SNRAdamW step's dispatch: one kernel pass per group, the C kernel on CPU, Triton on CUDA.

Same math and order of operations as the reference step (m, v, s equal it bit for bit; p within a few
ulps: torch's CPU sqrt is MKL's, the kernel's IEEE). Element gates take one pass over p, g, m, v, s (the
moments phase only advances the step counts and resolves the scalars); row and tensor gates take the two
passes the reductions need (sums, then the gated update). The calling contract is in
:mod:`hf_snr._step_args`; the kernels' own APIs in :mod:`hf_snr.fused_cpu` and :mod:`hf_snr.fused_triton`.

Imports only torch (each kernel module on first use).
"""

from __future__ import annotations

import torch

from ._distributed import any_dtensor, local
from ._fused_common import mask as gate_mask
from ._fused_common import to_device
from ._step_args import GroupTensors, Phase, StepArgs, tensor_scalars

__all__ = ["unavailable", "kernel", "moments", "update"]

_is_contiguous = torch.Tensor.is_contiguous
_device_of = torch.Tensor.device.__get__
_dtype_of = torch.Tensor.dtype.__get__
_SCALARS = ("bc1", "bc2", "bcr", "noise_scale", "open")


def unavailable(t: GroupTensors) -> str | None:
    """Why the fused kernel cannot run these tensors (None: it can)."""
    params = t.params
    plain = not any_dtensor(params)
    if plain:  # no shards: the tensors themselves (C-level map, ~5x faster than going through local)
        local_params = params
        devices = {d.type for d in map(_device_of, params)}
    else:
        local_params = [local(p) for p in params]
        devices = {p.device.type for p in local_params}
    if devices == {"cuda"}:
        from . import fused_triton

        if not fused_triton.available():
            return f"the CUDA kernel is unavailable: {fused_triton.unavailable_reason()}"
    elif devices == {"cpu"}:
        from . import fused_cpu

        if not fused_cpu.available():
            return f"the CPU kernel could not be built: {fused_cpu.unavailable_reason()}"
    else:
        return "no fused kernel for " + ", ".join(sorted(devices)) + " tensors (CPU: C, CUDA: Triton)"
    for ts in (t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.exp_vars):
        ts = ts if plain else [local(x) for x in ts]  # (the lists hold no None: params with grads)
        if not all(map(_is_contiguous, ts)):
            return "a parameter, gradient or state tensor is not contiguous"
    if not {_dtype_of(p) for p in local_params} <= {torch.float32, torch.bfloat16}:
        return "parameters other than float32 / bfloat16"
    return None


def kernel(t: GroupTensors):
    """The kernel module for these tensors' device."""
    if local(t.params[0]).device.type == "cuda":
        from . import fused_triton

        return fused_triton
    from . import fused_cpu

    return fused_cpu


def _lists(t: GroupTensors):
    lists = (t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.exp_vars)
    if not any_dtensor(t.params):
        return lists  # no shards: the lists as they are
    return tuple([local(x) for x in ts] for ts in lists)


def _host_scalars(args: StepArgs, t: GroupTensors) -> dict:
    """The kernels' per-tensor scalars: one shared set when the group's tensors share a step count (the usual
    case), else one column per scalar."""
    steps, starts = [x.item() for x in t.steps], t.var_starts
    if min(steps) == max(steps) and min(starts) == max(starts):
        return tensor_scalars(args, steps[0], starts[0])
    scal = [tensor_scalars(args, x, vs) for x, vs in zip(steps, starts)]
    return {name: [k[name] for k in scal] for name in _SCALARS}


def _device_scalars(args: StepArgs, t: GroupTensors, found_inf: torch.Tensor) -> dict:
    """The per-tensor scalars of a step whose skip is decided on the device, computed there.

    Each tensor's step count t is its host count (steps attempted, no sync) minus the skips its own
    device counter (state["device_skips"]) has seen, so a skipped step does not advance the bias
    corrections, the noise scale or the warm-up; the counters fold into the host counts when the
    skip count is read (statistics, state_dict). As :func:`tensor_scalars`, in float64, then fp32.
    """
    dev = found_inf.device
    counters = []
    for st in t.states:
        c = st.get("device_skips")
        if c is None:
            c = st["device_skips"] = torch.zeros(1, dtype=torch.float32, device=dev)
        counters.append(c)
    torch._foreach_add_(counters, [found_inf.reshape(1)] * len(counters))
    host = to_device([[x.item() for x in t.steps], list(t.var_starts)], torch.float64, dev)
    te = host[0] - torch.cat(counters).double()
    beta1 = args.beta1
    var_t = te - host[1]
    cols = {"bc1": 1 - torch.pow(beta1, te), "bc2": 1 - torch.pow(args.beta2, te),
            "bcr": 1 - torch.pow(args.rho, var_t)}
    if args.noise == "ema" and beta1 != 0.0:
        b1t = torch.pow(beta1, te)
        cols["noise_scale"] = (1 - beta1) * (1 + b1t) / ((1 + beta1) * (1 - b1t))
    else:
        cols["noise_scale"] = 1.0
    cols["open"] = (var_t <= args.warmup_steps).float() if args.gated and not args.ungated else True
    return cols


def _micro(t: GroupTensors, mb) -> dict:
    return dict(sq_sums=t.mb_sqs if mb else None, sq_scale=mb[0] if mb else 1.0, g2_scale=mb[1] if mb else 0.0)


def moments(t: GroupTensors, *, args: StepArgs, mb=None, found_inf=None, check=None) -> Phase:
    """The step counts and scalars; for row / tensor gates the first kernel pass (m, v, s and the row sums).

    check: [gradients] for the step's first kernel call to check for inf / nan before it writes anything
    (popped by the call that does); found_inf: the device flag of a skip decided on the device (CUDA).
    """
    torch._foreach_add_(t.steps, 1.0)
    cols = _host_scalars(args, t) if found_inf is None else _device_scalars(args, t, found_inf)
    flag = {} if found_inf is None else {"found_inf": found_inf}
    if not args.reduced:
        return Phase(None, (cols, mb, flag))
    lists = _lists(t)
    checked = dict(flag, check_finite=check.pop()) if check else flag
    try:
        flat = kernel(t).moments(
            *lists, **checked, beta1=args.beta1, beta2=args.beta2, rho=args.rho, bc1=cols["bc1"], bcr=cols["bcr"],
            row_lens=args.reduction, signal=args.signal, noise_scale=cols["noise_scale"], variance=args.variance,
            **_micro(t, mb))
    except ArithmeticError:  # fused_cpu.NonFiniteGradient: nothing written; this step did not happen
        torch._foreach_sub_(t.steps, 1.0)
        raise
    sums, row = [], 0
    for p in lists[0]:
        n = p.shape[0] if args.reduction == "row" and p.dim() >= 2 else 1
        sums.append(flat[row:row + n])
        row += n
    return Phase(sums, (cols, mb, flag))


def update(t: GroupTensors, phase: Phase, *, args: StepArgs, want_stats: bool = False, check=None):
    """The kernel's full step (element gates) or its second pass (the gated update from the row gates)."""
    cols, mb, flag = phase.data
    k = kernel(t)
    lists = _lists(t)
    anchors = None if all(a is None for a in t.anchors) else [local(a) for a in t.anchors]
    common = dict(lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, bc1=cols["bc1"], bc2=cols["bc2"],
                  bcr=cols["bcr"], alpha=args.alpha, softness=args.softness, c=args.c, mask=args.kernel_mask,
                  signal=args.signal, noise_scale=cols["noise_scale"], anchors=anchors, gate_open=cols["open"],
                  want_stats=want_stats, **flag)
    if check:
        common["check_finite"] = check.pop()
    if phase.sums is None:
        out = k.step(*lists, beta1=args.beta1, beta2=args.beta2, rho=args.rho, variance=args.variance,
                     **_micro(t, mb), **common)
    else:
        q_rows = torch.cat([gate_mask(args.kernel_mask, sm[:, 0].float(), sm[:, 1].float(), args.alpha, args.softness,
                                      args.c) for sm in phase.sums]).contiguous()
        out = k.update(*lists, q_rows=q_rows, row_lens=args.reduction, **common)
    if flag and mb:  # a step skipped on the device left the micro-batch sums: they do not carry over
        torch._foreach_zero_([x for x in t.mb_sqs if x is not None])
    if not want_stats:
        return None
    # CPU: 5 Python floats; CUDA: a (5,) float64 device tensor (no host sync until last_stats is read)
    part = out.float() if isinstance(out, torch.Tensor) else torch.tensor(out, dtype=torch.float64).float()
    if not args.gated:
        part[:3] = 0.0
    return part
