"""What every path of the SNRAdamW step takes: one group's tensor lists and its resolved arguments.

The calling contract of the three implementations (:mod:`hf_snr._reference`, :mod:`hf_snr._foreach`,
:mod:`hf_snr._fused`) is the same, in two phases because row and tensor gates need their sums (all-reduced
under sharding) before any gate::

    phase = path.moments(tensors, args=args, mb=mb, found_inf=found_inf, check=check)
    part = path.update(tensors, phase, args=args, want_stats=want_stats, check=check)

``tensors`` (:class:`GroupTensors`) are the lists of one parameter group; ``args`` (:class:`StepArgs`) its
options resolved once per step; ``mb`` the micro-batch variance scales (a, b) or None; ``found_inf`` a
device flag (the CUDA fused skip) and ``check`` a one-element list of gradients for the first fused CPU
kernel call to check (both None on the other paths, which refuse them). ``phase.sums`` holds the per-row
sums of (mu^2, sigma^2) for row / tensor gates (float64, rows back to back per tensor), None otherwise;
the rest of the phase is the path's own. ``update`` returns the step's 5 statistics sums (see
:data:`STAT_KEYS`) when ``want_stats``, else None.

Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FP32_MAX = torch.finfo(torch.float32).max
STAT_KEYS = ("mask_sum", "mask_count", "active_count", "signal", "noise")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = ["StepArgs", "GroupTensors", "Phase", "ema_noise_scale", "tensor_scalars", "row_view", "row_sums",
           "q_shape", "STAT_KEYS", "STATE_DTYPES", "FP32_MAX"]


@dataclass(frozen=True)
class StepArgs:
    """One parameter group's options for one step, resolved and typed (see :meth:`from_group`)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    rho: float
    mask: str
    alpha: float       # clamped to fp32's largest value: a Python float above it is inf in fp32, and inf * 0 = nan
    softness: float    # clamped likewise
    c: float           # softness * alpha, clamped likewise
    reduction: str
    noise: str
    signal: str
    variance: str
    warmup_steps: int
    gated: bool        # the group's snr= (False: plain AdamW, the gate always open, no mask statistics)
    ungated: bool      # mask="none": the gate always open (AdamW's step), the statistics still computed
    anchored: bool     # decay_to="init" with a non-zero weight decay: decay toward p0

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> "StepArgs":
        beta1, beta2 = group["betas"]
        alpha = min(float(group["alpha"]), FP32_MAX)
        softness = min(float(group["softness"]), FP32_MAX)
        return cls(
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            rho=group["rho"], mask=group["mask"], alpha=alpha, softness=softness,
            c=min(group["softness"] * group["alpha"], FP32_MAX), reduction=group["reduction"],
            noise=group["noise"], signal=group["signal"], variance=group["variance"],
            warmup_steps=group["warmup_steps"], gated=group["snr"], ungated=group["mask"] == "none",
            anchored=group["decay_to"] == "init" and group["weight_decay"] != 0.0,
        )

    @property
    def reduced(self) -> bool:
        """Row or tensor gates: the moments phase returns sums, the gate comes from them."""
        return self.gated and not self.ungated and self.reduction in ("tensor", "row")

    @property
    def kernel_mask(self) -> str:
        """The mask the fused kernels are told (mask="none" runs them with the gate open: the kind is never read)."""
        return "snr" if self.ungated else self.mask


@dataclass
class GroupTensors:
    """The aligned lists of one parameter group's tensors that have a gradient (and their state)."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    exp_avgs: list = field(default_factory=list)
    exp_avg_sqs: list = field(default_factory=list)
    exp_vars: list = field(default_factory=list)
    steps: list = field(default_factory=list)        # 0-d fp32 CPU tensors, incremented by the moments phase
    var_starts: list = field(default_factory=list)   # floats: the step the variance EMA started at (0: the first)
    anchors: list = field(default_factory=list)      # decay_to="init": the tensor holding p0, else None
    mb_sqs: list = field(default_factory=list)       # variance="microbatch": the sum of squares, else None
    states: list = field(default_factory=list)       # the state dicts (the CUDA fused path keeps counters there)


@dataclass
class Phase:
    """What the moments phase hands the update phase: the sums (row / tensor gates) and the path's own data."""

    sums: list | None = None
    data: Any = None


def ema_noise_scale(t: float, beta1: float) -> float:
    """c_t: Var(m_hat) / Var(g) for a stationary gradient after t steps of the bias-corrected EMA."""
    if beta1 == 0.0:
        return 1.0
    return (1 - beta1) * (1 + beta1**t) / ((1 + beta1) * (1 - beta1**t))


def tensor_scalars(args: StepArgs, t: float, var_start: float) -> dict[str, Any]:
    """Per-tensor scalars of one step: bias corrections, the noise scale, whether the gate is open."""
    var_t = t - var_start  # steps of the variance EMA (fewer than t after a warm start from AdamW)
    return dict(
        bc1=1 - args.beta1**t, bc2=1 - args.beta2**t, bcr=1 - args.rho ** var_t,
        noise_scale=ema_noise_scale(t, args.beta1) if args.noise == "ema" else 1.0,
        open=(not args.gated) or args.ungated or var_t <= args.warmup_steps,
    )


def row_view(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """x as (rows, -1) for a per-row sum (1-D and 0-D tensors: one row)."""
    if reduction == "row" and x.dim() >= 2:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for an empty FSDP2 shard (0 rows)
    return x.reshape(1, x.numel())


def row_sums(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row sums of fp32 x, accumulated in float64 as the fused kernels do (so every path reaches the same
    gate decision where the sums of mu^2 and sigma^2 nearly tie, e.g. at t = 1 where they are equal)."""
    return row_view(x, reduction).sum(1, dtype=torch.float64)


def q_shape(x: torch.Tensor, reduction: str) -> tuple[int, ...]:
    """The shape of a row / tensor gate that broadcasts over x."""
    if reduction == "row" and x.dim() >= 2:
        return (x.shape[0],) + (1,) * (x.dim() - 1)
    return ()
