"""What the fused kernels' host sides (:mod:`hf_snr.fused_cpu`, :mod:`hf_snr.fused_triton`) and the optimizer
share: the gate formula, the row layout, option lookups and the tensor description in error messages.

Imports only torch. ``prefix`` ("fused_cpu" / "fused_triton") starts each error message, so an error names
the module the caller used.
"""

from __future__ import annotations

from array import array

import torch

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_contig = torch.Tensor.is_contiguous
_dtype = torch.Tensor.dtype.__get__

PASS_FULL, PASS_MOMENTS, PASS_UPDATE = 0, 1, 2  # the kernels' passes: the whole step; moments + sums; update

FP32_MAX = torch.finfo(torch.float32).max
TINY = torch.finfo(torch.float32).tiny
MASKS = {"snr": 0, "soft": 1, "hard": 2}
SIGNALS = {"ema": 0, "step": 1}
VARIANCES = {"ema": 0, "microbatch": 1}


def mask(kind: str, mu2: torch.Tensor, sig2: torch.Tensor, alpha: float, softness: float, c: float):
    """q in [0, 1] from mu^2 and sigma^2 (tensors or sums). No eps: only 0/0 is guarded.

    mu^2 and sigma^2 are clamped to fp32's largest value first: a huge but finite gradient squares to inf,
    and inf / (inf + inf) or 0 * inf would make q (and the parameter) nan. The clamp is an identity on
    finite values and keeps nan.
    """
    mu2, sig2 = mu2.clamp_max(FP32_MAX), sig2.clamp_max(FP32_MAX)
    if kind == "snr":
        return mu2 / (mu2 + c * sig2).clamp_min(TINY)
    if kind == "soft":
        excess = (mu2 - alpha * sig2).clamp_min(0.0)
        return excess / (excess + softness * sig2).clamp_min(TINY)
    return (mu2 > alpha * sig2).to(mu2.dtype)


def to_device(values, dtype, device):
    """A small host list as a device tensor, without waiting (pinned memory, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def choice(prefix: str, name: str, value, table: dict):
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{prefix}: {name} must be one of {', '.join(table)}, not {value!r}") from None


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {t.device} shape {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}"


def rows(prefix: str, row_lens, params, numels):
    """(row length, number of rows) per tensor."""
    if isinstance(row_lens, str):
        if row_lens == "tensor":
            nrows = [1] * len(numels)
        elif row_lens == "row":  # as the optimizer's oracle: x.reshape(x.shape[0], -1) for 2+ dims
            nrows = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
        else:
            raise ValueError(f"{prefix}: row_lens must be 'tensor', 'row' or a list of ints, not {row_lens!r}")
        return [n // r if r else 0 for n, r in zip(numels, nrows)], nrows
    rl = [int(r) for r in row_lens]
    if len(rl) != len(numels):
        raise ValueError(f"{prefix}: row_lens has {len(rl)} entries for {len(numels)} tensors")
    for i, (r, n) in enumerate(zip(rl, numels)):
        if r <= 0 and n > 0 or r > 0 and n % r != 0:
            raise ValueError(f"{prefix}: row_lens[{i}] = {r} does not divide the tensor's {n} elements")
    return rl, [n // r if r > 0 else 0 for n, r in zip(numels, rl)]


def state_pointers(prefix: str, typecode: str, params, exp_avgs, exp_avg_sqs, exp_vars, anchors, sq_sums,
                   use_p0: bool, use_sq: bool, check_list):
    """The kernel's pointer array for p, m, v, s, p0, sq (0 where absent), n entries each, in that order.

    Its bytes also key the cache of validated groups. A non-tensor or a list of another length anywhere:
    ``check_list(name, tensors, n, dtypes, numels)`` names the culprit, else a ValueError.
    """
    n = len(params)
    try:
        ptrs = array(typecode, map(_data_ptr, params))
        for ts, use in ((exp_avgs, True), (exp_avg_sqs, True), (exp_vars, True), (anchors, use_p0),
                        (sq_sums, use_sq)):
            if use:
                if len(ts) != n:
                    raise TypeError
                ptrs.extend(map(_data_ptr, ts))
            else:
                ptrs.frombytes(bytes(8 * n))
    except TypeError:
        for name, ts in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("exp_vars", exp_vars), ("anchors", anchors), ("sq_sums", sq_sums)):
            if ts is not None:
                check_list(name, ts, n, (torch.float32, torch.bfloat16), None)
        raise ValueError(f"{prefix}: the tensor lists must be lists of tensors") from None
    return ptrs


def gate(prefix: str, sums: torch.Tensor, kind: str, alpha: float, softness: float, c: float | None) -> torch.Tensor:
    """One gate per row from (rows, 2) sums of (mu2, sig2): the sums rounded to fp32, the mask in fp32, on their
    device (torch ops: no synchronisation). alpha, softness and c are clamped to fp32's largest value."""
    choice(prefix, "mask", kind, MASKS)
    alpha, softness = min(float(alpha), FP32_MAX), min(float(softness), FP32_MAX)
    c = min(softness * alpha, FP32_MAX) if c is None else min(float(c), FP32_MAX)
    return mask(kind, sums[:, 0].float(), sums[:, 1].float(), alpha, softness, c).contiguous()


def grads_match(prefix: str, grads, plan, n: int, placed) -> bool:
    """Whether this step's gradients fit the validated plan (device via ``placed(grads, plan)``, contiguous,
    numels, dtypes): the per-step check of both kernels' host sides (C-level maps over the list)."""
    if grads is None or len(grads) != n:
        raise ValueError(f"{prefix}: grads must be a list of {n} tensors")
    try:
        if not (placed(grads, plan) and all(map(_contig, grads)) and list(map(_numel, grads)) == plan.numels):
            return False
        if plan.pdtype is not None:
            return set(map(_dtype, grads)) <= {plan.pdtype}
        return list(map(_dtype, grads)) == plan.pdtypes
    except (TypeError, AttributeError):  # not a tensor
        return False


class Call:
    """One kernel call's validated arguments (:func:`prepare`)."""
    __slots__ = ("n", "use_p0", "use_sq", "ptrs", "key", "plan", "variance", "signal", "mask", "with_g")


def prepare(prefix: str, typecode: str, pass_: int, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors, sq_sums,
            row_lens, variance: str, signal: str, mask: str, *, make_plan, plans: dict, grads_ok, check_list,
            name_bad_grad) -> Call:
    """What both kernels' host sides do before a call: the pointer array (p, m, v, s, p0, sq), the option codes,
    the plan validated once per set of state tensors (cached in ``plans``) and this step's gradients checked
    against it (a mismatch re-validates; ``name_bad_grad(grads, plan)`` names the culprit)."""
    call = Call()
    call.n = n = len(params)
    call.use_p0 = anchors is not None and pass_ != PASS_MOMENTS
    call.use_sq = sq_sums is not None and pass_ != PASS_UPDATE
    # the pointer arrays, in the kernel's order p, m, v, s, p0, sq (0: absent); they key the cache of plans
    call.ptrs = state_pointers(prefix, typecode, params, exp_avgs, exp_avg_sqs, exp_vars, anchors, sq_sums,
                               call.use_p0, call.use_sq, check_list)
    call.variance = choice(prefix, "variance", variance, VARIANCES)
    call.signal = choice(prefix, "signal", signal, SIGNALS)
    call.mask = choice(prefix, "mask", mask, MASKS)
    if pass_ != PASS_UPDATE and call.variance == 1 and sq_sums is None:
        raise ValueError(f"{prefix}: variance='microbatch' needs sq_sums")
    call.with_g = with_g = pass_ != PASS_UPDATE or call.signal == 1
    call.key = key = call.ptrs.tobytes()
    p0 = anchors if call.use_p0 else None
    sq = sq_sums if call.use_sq else None
    plan = make_plan(params, exp_avgs, exp_avg_sqs, exp_vars, p0, sq, row_lens, key, not with_g)
    if with_g and not grads_ok(grads, plan, n):
        plans.clear()  # a resized parameter, or a wrong gradient: check everything again
        plan = make_plan(params, exp_avgs, exp_avg_sqs, exp_vars, p0, sq, row_lens, key, False)
        if not grads_ok(grads, plan, n):
            name_bad_grad(grads, plan)  # raises, naming the culprit
            raise ValueError(f"{prefix}: grads do not match the parameters")  # pragma: no cover
    call.plan = plan
    return call


def check_list(prefix: str, name: str, ts, n: int, dtypes, numels, device_problem) -> list:
    """Check a list of tensors for a kernel call (``device_problem(t)``: why t's device is wrong, or None);
    the message names the list, the position and what is wrong. Returns their dtypes."""
    if ts is None or len(ts) != n:
        raise ValueError(f"{prefix}: {name} must be a list of {n} tensors (got {None if ts is None else len(ts)})")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{prefix}: {name}[{i}] is {type(t).__name__}, not a tensor")
        problem = device_problem(t)
        if problem:
            raise ValueError(f"{prefix}: {name}[{i}] is on {t.device}, {problem}")
        wanted = dtypes[i] if isinstance(dtypes, list) else dtypes
        if t.dtype not in wanted:
            raise ValueError(f"{prefix}: {name}[{i}] has dtype {t.dtype}, expected "
                             f"{' or '.join(str(d) for d in wanted)}")
        if t.layout != torch.strided or t.is_quantized:
            raise ValueError(f"{prefix}: {name}[{i}] must be a dense tensor")
        if not t.is_contiguous():
            raise ValueError(f"{prefix}: {name}[{i}] is not contiguous (shape {tuple(t.shape)}, "
                             f"stride {t.stride()})")
        if numels is not None and t.numel() != numels[i]:
            raise ValueError(f"{prefix}: {name}[{i}] has {t.numel()} elements, its parameter {numels[i]}")
    return [t.dtype for t in ts]


def plan_layout(prefix: str, plan, params, numels, pdtypes, sdtypes, p0dtypes, row_lens):
    """Fill the part of a kernel plan both host sides share: numels, the parameters' dtype(s), the row layout;
    returns (row lengths, rows per tensor, first row per tensor, or Nones) and the tensors grouped by dtype
    signature (p/g, s, p0 bf16 or not), in order of first appearance: one kernel call or launch each."""
    plan.numels = numels
    plan.pdtypes = pdtypes
    plan.pdtype = pdtypes[0] if len(set(pdtypes)) == 1 else None
    plan.has_rows = row_lens is not None
    if row_lens is not None:
        rl, nrows = rows(prefix, row_lens, params, numels)
        off = [0]
        for r in nrows:
            off.append(off[-1] + r)
        plan.rows = off[-1]
    else:
        rl = nrows = off = None
        plan.rows = 0
    bf16 = torch.bfloat16
    sigs: dict = {}
    for i in range(len(params)):
        sigs.setdefault((pdtypes[i] == bf16, sdtypes[i] == bf16, p0dtypes[i] == bf16), []).append(i)
    return (rl, nrows, off), sigs
