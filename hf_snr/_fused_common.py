"""What the fused kernels' host sides (:mod:`hf_snr.fused_cpu`, :mod:`hf_snr.fused_triton`) and the optimizer
share: the gate formula, the row layout, option lookups and the tensor description in error messages.

Imports only torch. ``prefix`` ("fused_cpu" / "fused_triton") starts each error message, so an error names
the module the caller used.
"""

from __future__ import annotations

from array import array

import torch

_data_ptr = torch.Tensor.data_ptr

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
