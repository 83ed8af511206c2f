"""SNRAdamW: AdamW with a per-coordinate signal-to-noise gate ("population-risk training").

The math (see ALGORITHM.md in the project's shared notes, Litman & Guo 2026, arXiv 2605.01172),
with the defaults (the options that change a line are named on its right):

    p <- p * (1 - lr * weight_decay)                 decoupled decay, never masked     decay_to="init"
    d  = g - m                                       m: the previous, uncorrected first moment
    s <- rho * s + (1 - rho) * d^2                   variance EMA: the one extra state  variance="microbatch"
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    mu^2 = (m / (1 - beta1^t))^2                                                        signal="step"
    sigma^2 = s / (1 - rho^t)                                                           noise="ema"
    q = mask(mu^2, sigma^2) in [0, 1]                per element                        reduction="row"/"tensor"
    p <- p - lr * q * m_hat / (sqrt(v_hat) + eps)

Why the options (derivations; the README's "gate estimators" section says the same):

* Under pure noise (zero-mean gradients of variance V per step) the bias-corrected EMA has
  E[m_hat^2] = c_t V with c_t = (1 - b1)(1 + b1^t) / ((1 + b1)(1 - b1^t)) (1 at t = 1, then
  (1 - b1)/(1 + b1) = 0.053 at b1 = 0.9), while s tends to V (1 + c): the default gate compares the
  EMA's signal with the noise of *one* step, so a coordinate passes only when its single-step SNR
  exceeds 1 and ``mask="snr"`` averages E[c Z^2 / (c Z^2 + 1 + c)] = 0.044 on noise.
  ``noise="ema"`` multiplies sigma^2 by c_t: the leave-one-out-consistent test for a step along
  m_hat (pure noise then gives E[Z^2 / (Z^2 + 1 + c)] = 0.34).
* ``signal="step"`` tests this step's gradient against one step's variance, mu^2 = g^2 (pure noise:
  E[Z^2 / (Z^2 + 1 + c)] = 0.34 too); the update still moves along m_hat.
* ``variance="microbatch"``: with the step's gradient the mean of K micro-batch gradients g_i
  (K = gradient-accumulation steps x data-parallel ranks), (sum g_i^2 - K g^2) / (K (K - 1)) is an
  unbiased estimate of the variance of that mean, free of the EMA's lag behind a drifting mean. It
  replaces (g - m)^2 in s (smoothed with rho). Hooks on the parameters keep a running sum of the
  squared micro-batch contributions (one more fp32 buffer per parameter; under DDP one extra
  parameter-sized all-reduce per step); the pure-noise gate then averages E[c Z^2 / (c Z^2 + 1)].
* ``reduction="row"``: one gate per output row (a linear layer's output channel, an embedding
  row) from sums over the row; ``"tensor"``: one per tensor. Single coordinates of minibatch LLM
  gradients carry almost no visible signal; sums over many do.
* ``decay_to="init"``: the ungated decoupled decay pulls toward the parameters' first-step values
  p0 (p <- p - lr wd (p - p0)), the fine-tuning analogue of weight decay toward zero.

This module imports only torch. It holds two implementations of the same math, as torch.optim
does: ``_single_tensor`` (a plain per-tensor loop that reads like the equations and serves as the
test oracle) and ``_multi_tensor`` (``torch._foreach_*`` kernels), chosen by ``foreach``.

This module imports only torch. It holds two implementations of the same math, as torch.optim
does: ``_single_tensor_*`` (a plain per-tensor loop that reads like the equations and serves as
the test oracle) and ``_multi_tensor_*`` (``torch._foreach_*`` kernels), chosen by ``foreach``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

try:  # DTensor (FSDP2) support; optional so that older torch builds still import us.
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard
except Exception:  # pragma: no cover
    DTensor = None
    Shard = None

from ._fused_common import mask as _mask  # the gate formula, shared with the fused kernels' gate()
from .options import (DEFAULT_WARMUP_STEPS, DEFAULTS, GROUP_DEFAULTS, MASKS, NONFINITE_POLICIES, OPTIONS,
                      REDUCTIONS, validate_hparams, validate_value)

logger = logging.getLogger("hf_snr")

__all__ = ["SNRAdamW", "MASKS", "REDUCTIONS", "NONFINITE_POLICIES", "DEFAULT_WARMUP_STEPS"]

D = DEFAULTS  # every default below comes from the one options table (hf_snr.options.OPTIONS)

# Largest finite fp32 value: softness * alpha is clamped to it so that (huge) * 0 stays 0, not nan.
_FP32_MAX = torch.finfo(torch.float32).max
# Guard for 0/0 in the mask (a coordinate with mu^2 = sigma^2 = 0 gets q = 0; its step is 0 anyway).
_TINY = torch.finfo(torch.float32).tiny

_SPARSE_MSG = "SNRAdamW does not support sparse gradients (use dense gradients, e.g. nn.Embedding(sparse=False))"

_STAT_KEYS = ("mask_sum", "mask_count", "active_count", "signal", "noise")
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


_is_contiguous = torch.Tensor.is_contiguous
_device_of = torch.Tensor.device.__get__
_dtype_of = torch.Tensor.dtype.__get__


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (FSDP2 shard); the tensor itself otherwise."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def _shard_group(p: torch.Tensor):
    """The process group over which a DTensor parameter is sharded, or None if it is not."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    if not any(isinstance(pl, Shard) for pl in p.placements):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"SNRAdamW cannot infer the shard group of a DTensor on a {mesh.ndim}-D device mesh; "
            "pass process_group= (the group whose ranks hold disjoint shards)"
        )
    return mesh.get_group()


class SNRAdamW(Optimizer):
    r"""AdamW whose step is gated, per coordinate, by a signal-to-noise test.

    For every scalar parameter the optimizer compares the squared (bias-corrected) mean gradient
    mu^2 with an estimate sigma^2 of the variance of the minibatch-mean gradient. Coordinates whose
    signal beats their noise get the ordinary AdamW step; the others are shrunk (``mask="snr"``,
    ``"soft"``) or frozen (``"hard"``). Cost: one extra fp32 state tensor per parameter (optimizer
    state is exactly 1.5x AdamW's); no extra forward or backward pass.

    Args:
        params: parameters or parameter groups. Every keyword below may be set per group; a group
            with ``snr=False`` is plain AdamW (its variance EMA is still tracked for the statistics).
        lr (float): learning rate, as AdamW. Note that the gate makes the effective step smaller
            than AdamW's at the same ``lr``: compare arms at their own tuned learning rates.
        betas (tuple): AdamW's (beta1, beta2), each in [0, 1).
        eps (float): AdamW's epsilon, > 0. It is *not* used in the gate (LLM gradients are tiny).
        weight_decay (float): decoupled weight decay, >= 0, never masked.
        rho (float): decay of the variance EMA, in [0, 1). 0.99 (the default) remembers about 100
            steps; use a shorter memory than beta2.
        mask (str): ``"snr"`` (default) q = mu^2 / (mu^2 + softness*alpha*sigma^2), never fully
            closed; ``"soft"`` (the paper's Algorithm 1) zero below the boundary mu^2 = alpha*sigma^2;
            ``"hard"`` the 0/1 rule 1[mu^2 > alpha*sigma^2].
        softness (float): scales the noise term, >= 0. Usual tuning grid: 0.3, 1, 3, 10.
        alpha (float): how much noise a step may carry, >= 0. 1 when each batch is a fresh draw (one
            epoch, streaming); b / (n - b) for many epochs over n examples with effective batch b.
            0 opens every gate of ``mask="snr"`` and ``"hard"`` (plain AdamW); ``"soft"`` then
            still gives q = mu^2 / (mu^2 + softness * sigma^2) (its softness term is not scaled by
            alpha), so set ``softness=0`` too, or ``snr=False``, for plain AdamW.
        reduction (str): ``"element"`` (default) one gate per scalar; ``"row"`` one gate per output
            row (sums over every dimension but the first; 1-D tensors get one gate), local to each
            FSDP2 shard (Shard(0)); ``"tensor"`` one gate per parameter tensor from sum(mu^2) vs
            alpha * sum(sigma^2), under FSDP2 with one batched all-reduce per step. Both are
            refused on flat partitions that mix tensors (DeepSpeed ZeRO).
        noise (str): ``"step"`` (default, as specified) or ``"ema"`` (sigma^2 scaled by c_t to the
            variance of m_hat); see the module docstring.
        signal (str): ``"ema"`` (default: mu^2 = m_hat^2) or ``"step"`` (mu^2 = g^2).
        variance (str): ``"ema"`` (default: s is an EMA of (g - m)^2) or ``"microbatch"`` (s is an
            EMA of the unbiased variance of this step's mean gradient from its micro-batch
            gradients; needs k >= 2 micro-batches per step counted over accumulation and
            data-parallel ranks; hooks on the parameters see them, so not under FSDP2 or DeepSpeed).
        decay_to (str): ``"zero"`` (default, AdamW) or ``"init"`` (decay toward the first-step
            values, kept as one more fp32 state tensor per decayed parameter unless
            :meth:`set_decay_anchors` points it at tensors that already hold them, such as a
            reference model's weights).
        warmup_steps (int): the gate stays open (q = 1) for this many first steps, while the
            moments warm up. Default 10 (= 1 / (1 - beta1) at beta1 = 0.9).
        snr (bool): False makes a group plain AdamW.
        foreach (bool | None): use the multi-tensor ``torch._foreach_*`` path. None picks it unless
            a parameter lives on a device it does not support.
        nonfinite (str): what to do when a gradient holds inf or nan. ``"skip"`` (default): the
            whole step is skipped (parameters and state untouched, ``skipped_steps`` counts it, a
            warning is issued); ``"raise"``: RuntimeError before anything changes; ``"propagate"``:
            no check, as torch's AdamW (the nan reaches parameters and state). The check costs one
            read of the gradients and one host sync per step; "propagate" avoids both.
        max_consecutive_skips (int): with ``nonfinite="skip"``, a RuntimeError once more than this many
            steps in a row were skipped (default 20; 0: no limit). Skip warnings are rate-limited (at 1, 2,
            4, ... skipped steps) and name the optimizer step; :attr:`skipped_steps` counts them.
        process_group: the process group whose ranks hold *disjoint* shards of the parameters
            (DeepSpeed ZeRO's data-parallel group). Statistics are summed over it. Leave None under
            DDP (replicas: nothing to sum) and under FSDP2 (the shard group is read from DTensors).

    Loading a ``torch.optim.AdamW`` state dict (switching optimizers on resume) carries ``exp_avg``,
    ``exp_avg_sq`` and ``step`` over and starts ``exp_var`` fresh, with the gate open for its
    ``warmup_steps`` (a log line says so). Complex parameters are refused at construction.

    Statistics: call :meth:`request_stats` before a step; after it :attr:`last_stats` holds
    ``mask_mean``, ``active_fraction``, ``signal``, ``noise``, ``population_gain`` and
    ``cumulative_noise`` (a running sum of noise; between two requested steps noise is taken as
    constant at the later value). They are reduced on device with a single host sync when
    ``last_stats`` is read (a collective under sharding: every rank reads it). ``mask_mean`` and
    ``active_fraction`` cover the gated coordinates that have had a gradient (v > 0), so ZeRO's
    zero padding and never-used rows do not count as closed gates.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = D["lr"],
        betas: tuple[float, float] = D["betas"],
        eps: float = D["eps"],
        weight_decay: float = D["weight_decay"],
        rho: float = D["rho"],
        mask: str = D["mask"],
        softness: float = D["softness"],
        alpha: float = D["alpha"],
        reduction: str = D["reduction"],
        warmup_steps: int = D["warmup_steps"],
        snr: bool = D["snr"],
        foreach: bool | None = D["foreach"],
        *,
        noise: str = D["noise"],
        signal: str = D["signal"],
        variance: str = D["variance"],
        decay_to: str = D["decay_to"],
        fused: bool = D["fused"],
        state_dtype: str = D["state_dtype"],
        nonfinite: str = D["nonfinite"],
        max_consecutive_skips: int = D["max_consecutive_skips"],
        process_group: Any = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, rho=rho, mask=mask, softness=softness, alpha=alpha,
            reduction=reduction, warmup_steps=warmup_steps, snr=snr, foreach=foreach,
            noise=noise, signal=signal, variance=variance, decay_to=decay_to, fused=fused, state_dtype=state_dtype,
        )
        assert defaults.keys() == GROUP_DEFAULTS.keys()
        validate_hparams(defaults)
        self.nonfinite = validate_value("nonfinite", nonfinite)
        self.max_consecutive_skips = validate_value("max_consecutive_skips", max_consecutive_skips)
        self.last_step_skipped = False  # whether the latest step() call skipped its step (non-finite gradient)
        self.process_group = process_group
        # variance="microbatch": the data-parallel group whose ranks' micro-batch gradients are pooled
        # ("auto": the default group when torch.distributed runs and the parameters are not sharded)
        self.microbatch_group: Any = "auto"
        self._stats_requested = False
        # Statistics of one logical step may come from several step() calls (DeepSpeed ZeRO steps one
        # parameter group per call): their partial sums collect in _pending until last_stats is read.
        self._stats_step: int | None = None
        self._pending: torch.Tensor | None = None
        self._last_stats: dict[str, float] = {}
        self.snr_state = {"steps": 0, "skipped_steps": 0, "consecutive_skips": 0, "cumulative_noise": 0.0,
                          "last_stats_step": 0}
        self._anchors: dict[torch.Tensor, torch.Tensor] = {}       # decay_to="init": p -> tensor holding p0
        self._mb_sq: dict[torch.Tensor, torch.Tensor] = {}         # variance="microbatch": p -> sum of squares
        self._mb_count: dict[torch.Tensor, int] = {}               # ... and the number of contributions seen
        self._mb_hooks: dict[torch.Tensor, Any] = {}
        self.last_microbatch_count: int | None = None              # K of the latest micro-batch step
        self._fused_fallback_warned = False
        self._device_skips: torch.Tensor | None = None  # steps skipped on the device (CUDA fused), read lazily
        self._device_run: torch.Tensor | None = None    # ... of which the latest in a row
        self._device_attempts = 0                       # steps decided on the device since the last read
        super().__init__(params, defaults)

    # -- parameter groups ---------------------------------------------------------------------
    # keys a parameter group may hold besides the options: torch's own, and what LR schedulers add
    _GROUP_EXTRA_KEYS = ("params", "param_names", "initial_lr", "_numels")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"parameter group {len(self.param_groups)}"
        unknown = [k for k in param_group if k not in self.defaults and k not in self._GROUP_EXTRA_KEYS]
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, list(self.defaults), 1))
                     else repr(k) for k in unknown]
            raise ValueError(f"SNRAdamW: unknown key(s) {', '.join(hints)} in {where} (accepted: params, "
                             f"{', '.join(self.defaults)})")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        validate_hparams(param_group, where=where)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor):
                if id(p) in seen:
                    raise ValueError(f"SNRAdamW: parameter {i} of {where} (shape {tuple(p.shape)}) is listed twice; "
                                     "it would take two steps per step. Pass each parameter once.")
                seen.add(id(p))
        param_group["params"] = params
        for p in params:
            if isinstance(p, torch.Tensor) and torch.is_complex(p):
                raise ValueError(
                    f"SNRAdamW does not support complex parameters (got a {p.dtype} tensor of shape "
                    f"{tuple(p.shape)} in {where}): the gate compares squared real gradients. Optimize "
                    "torch.view_as_real(p) as a real parameter instead."
                )
        super().add_param_group(param_group)
        # Remember the shapes the group was built with: reduction="tensor"/"row" check at step time that
        # they still see those whole tensors (DeepSpeed ZeRO swaps in flat partitions).
        param_group["_numels"] = [p.numel() for p in param_group["params"]]
        if param_group["variance"] == "microbatch":
            for p in param_group["params"]:
                self._watch_microbatches(p)

    # Not carried by copy.deepcopy / pickle: hook handles (re-registered on the copy's parameters) and process
    # groups (not copyable: set process_group / microbatch_group on the copy; a warning says so).
    _UNCOPIED = ("_mb_hooks", "process_group", "microbatch_group")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups
        state.update({k: v for k, v in self.__dict__.items() if k not in state and k not in self._UNCOPIED
                      and not k.startswith("_optimizer_")})  # (torch's hook dicts: re-created empty)
        state["_had_process_group"] = self.__dict__.get("process_group") is not None or \
            self.__dict__.get("microbatch_group") not in ("auto", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        had_group = state.pop("_had_process_group", False)
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():  # (not torch's "differentiable" default: it is not ours)
                group.setdefault(key, value)
        self.__dict__.setdefault("nonfinite", D["nonfinite"])
        self.__dict__.setdefault("max_consecutive_skips", D["max_consecutive_skips"])
        if "_mb_hooks" in self.__dict__:
            return  # torch's own load_state_dict calls __setstate__ on a live optimizer
        self.process_group = None
        self.microbatch_group = "auto"
        self._mb_hooks = {}
        for group in self.param_groups:  # a copy (deepcopy / unpickling): hooks on the copy's own parameters
            if group["variance"] == "microbatch":
                for p in group["params"]:
                    self._watch_microbatches(p)
        if had_group:
            warnings.warn("SNRAdamW: a copied or unpickled optimizer does not carry process groups; set "
                          "process_group / microbatch_group on the copy before stepping it in a distributed run",
                          RuntimeWarning, stacklevel=2)

    # -- decay anchors and micro-batch gradients ------------------------------------------------
    def set_decay_anchors(self, anchors: dict[torch.Tensor, torch.Tensor]) -> None:
        """For ``decay_to="init"``: decay each parameter toward the given tensor instead of a copy of its
        first-step value (no extra memory). The tensor must have the parameter's (local) shape and must not
        change during training; a reference model's weights are the natural anchor for fine-tuning. Anchors
        are not saved in ``state_dict`` (set them again before resuming)."""
        known = {p for g in self.param_groups for p in g["params"]}
        for p, anchor in anchors.items():
            if p not in known:
                raise ValueError("set_decay_anchors: a tensor that is not a parameter of this optimizer")
            if _local(anchor).shape != _local(p).shape:
                raise ValueError(f"set_decay_anchors: anchor shape {tuple(_local(anchor).shape)} != parameter "
                                 f"shape {tuple(_local(p).shape)}")
            self._anchors[p] = anchor.detach()
            self.state[p].pop("param_init", None)

    def _watch_microbatches(self, p: torch.Tensor) -> None:
        if p in self._mb_hooks or not p.requires_grad:
            return

        def hook(grad: torch.Tensor) -> None:
            g = _local(grad).detach().float()
            sq = self._mb_sq.get(p)
            if sq is None or sq.shape != g.shape or sq.device != g.device:
                sq = self._mb_sq[p] = torch.zeros_like(g)
                self._mb_count[p] = 0
            sq.addcmul_(g, g)
            self._mb_count[p] += 1

        self._mb_hooks[p] = p.register_hook(hook)

    def _microbatch_group(self):
        group = self.microbatch_group
        if group != "auto":
            return group
        import torch.distributed as dist

        params = [p for g in self.param_groups for p in g["params"]]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and not any(_shard_group(p) is not None for p in params):
            logger.warning("hf_snr: variance='microbatch' pools the micro-batch gradients of all %d ranks of the "
                           "default process group (data-parallel replicas, as DDP); set "
                           "optimizer.microbatch_group to change it", dist.get_world_size())
            self.microbatch_group = dist.group.WORLD
        else:
            self.microbatch_group = None
        return self.microbatch_group

    def _microbatch_scales(self, tensors) -> tuple[float, float]:
        """(a, b) with est = a * sum(sq) - b * g^2, after pooling the squares over data-parallel ranks."""
        params = tensors["params"]
        local_k = max((self._mb_count.get(p, 0) for p in params), default=0)
        group = self._microbatch_group()
        sqs = [self._mb_sq[p] for p in params if self._mb_count.get(p, 0) > 0]
        world = 1
        if group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(group)
            flat = torch.cat([x.reshape(-1) for x in sqs] + [torch.tensor([float(local_k)], device=sqs[0].device
                                                                            if sqs else "cpu")])
            flat = _all_reduce(flat, group)
            if int(round(flat[-1].item())) != local_k * world:
                raise RuntimeError(f"variance='microbatch': ranks saw different numbers of micro-batches "
                                   f"({flat[-1].item():g} in all, {local_k} here, {world} ranks)")
            offset = 0
            for x in sqs:
                x.copy_(flat[offset:offset + x.numel()].view_as(x))
                offset += x.numel()
        K = local_k * world
        if K < 2:
            raise RuntimeError(
                f"variance='microbatch' needs k >= 2 micro-batch gradients per optimizer step, got {K} "
                f"({local_k} backward pass(es) x {world} rank(s)). Use gradient accumulation "
                "(gradient_accumulation_steps >= 2) or several data-parallel processes. If you do, the hooks on "
                "the parameters never saw the micro-batches: FSDP2 and DeepSpeed hide them (not supported there)."
            )
        self.last_microbatch_count = K
        # hook values are the micro-batch gradients divided by k (the loss of each micro-batch is divided
        # by the accumulation count): sum_i g_i^2 = k^2 * sum(sq); est = (sum g_i^2 - K g^2) / (K (K - 1))
        return local_k * local_k / (K * (K - 1)), 1.0 / (K - 1)

    # -- statistics ---------------------------------------------------------------------------
    def request_stats(self) -> None:
        """Compute risk statistics during the next optimizer step (read them from :attr:`last_stats`).

        "The next step" is the next logical step: when a wrapper calls :meth:`step` once per
        parameter group for one training step (DeepSpeed ZeRO), every call of that step contributes.
        """
        self._stats_requested = True

    @property
    def last_stats(self) -> dict[str, float]:
        """The statistics of the latest requested step ({} before the first).

        Reading finalizes them: one all-reduce over the statistics group (when sharded) and one
        host sync. Under sharding every rank must read it (it is a collective), as the Trainer
        integration does at each logging step.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._last_stats = self._finish_stats(pending, self._stats_step)
        return self._last_stats

    @last_stats.setter
    def last_stats(self, value: dict[str, float]) -> None:
        self._pending = None
        self._last_stats = dict(value)

    def _stats_group(self):
        if self.process_group is not None:
            return self.process_group
        for group in self.param_groups:
            for p in group["params"]:
                pg = _shard_group(p)
                if pg is not None:
                    return pg
        return None

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.last_stats  # fold pending statistics into snr_state (cumulative noise) before saving
        self._read_device_skips()  # and the steps skipped on the device into the step counts
        sd = super().state_dict()
        if any(isinstance(st, dict) and "device_skips" in st for st in sd["state"].values()):
            # (zeros now; not part of the checkpoint). Entries that are not dicts (a user's state_dict pre-hook may
            # add them) pass through as they are.
            sd["state"] = {k: {n: v for n, v in st.items() if n != "device_skips"} if isinstance(st, dict) else st
                           for k, st in sd["state"].items()}
        for g in sd["param_groups"]:
            g.pop("_numels", None)
        sd["snr_state"] = dict(self.snr_state)
        return sd

    _ADAMW_ONLY_KEYS = ("amsgrad", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by SNRAdamW (or by ``torch.optim.AdamW``: see the class docstring).

        The state is checked before anything is loaded, and refused with the tensor's place and the reason:
        every floating tensor finite, ``exp_avg_sq`` / ``exp_var`` >= 0, every tensor of its parameter's shape,
        ``step`` a finite count >= 0 (a Python number, as older checkpoints hold, is made a tensor).

        Resume rule: the SNR options this optimizer was built with (the ``optim_args`` of this run: mask,
        softness, alpha, ..., snr) win over the checkpoint's; AdamW's own (lr, betas, eps, weight_decay) are
        the checkpoint's, as in torch. One log line names every option that differs, and which value is used.
        """
        state_dict = dict(state_dict)
        snr_state = state_dict.pop("snr_state", None)
        saved_groups = [dict(g) for g in state_dict["param_groups"]]
        saved_state = state_dict["state"]
        foreign = [i for i, g in enumerate(saved_groups) if "rho" not in g]  # e.g. torch.optim.AdamW's groups
        for i in foreign:
            if saved_groups[i].get("amsgrad") or saved_groups[i].get("maximize"):
                raise ValueError("SNRAdamW cannot continue an AdamW state saved with amsgrad=True or maximize=True")
            for key in self._ADAMW_ONLY_KEYS + ("foreach",):
                saved_groups[i].pop(key, None)
            if i < len(self.param_groups):  # keep this optimizer's SNR settings (the user switched optimizers)
                for key in GROUP_DEFAULTS:
                    saved_groups[i].setdefault(key, self.param_groups[i][key])
        self._check_loaded_state(saved_groups, saved_state)
        self._apply_resume_rule(saved_groups, foreign)
        state_dict["param_groups"] = saved_groups
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load; ours has its own dtypes by design (fp32
        # moments, exp_var in state_dtype), so put back the saved tensors as they were saved.
        fresh = 0
        for saved_group, group in zip(saved_groups, self.param_groups):
            group["_numels"] = [p.numel() for p in group["params"]]
            for idx, p in zip(saved_group["params"], group["params"]):
                if not isinstance(saved_state.get(idx), dict):
                    continue
                for key, value in saved_state[idx].items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=value.dtype)
                state = self.state[p]
                state.pop("max_exp_avg_sq", None)
                for key in ("step", "exp_var_start"):  # an older checkpoint's Python numbers: tensors, as torch's AdamW
                    if key in state and not isinstance(state[key], torch.Tensor):
                        state[key] = torch.tensor(float(state[key]), dtype=torch.float32)
                if isinstance(state.get("step"), torch.Tensor) and state["step"].device.type != "cpu":
                    # torch puts a fused group's step on the parameter's device; ours is read on the host
                    # every step (the bias corrections), so it stays on the CPU: no sync per tensor per step
                    state["step"] = state["step"].to("cpu", torch.float32)
                if "exp_avg" in state and "exp_var" not in state:
                    # an AdamW state: keep m, v and step; the variance starts now, its gate warms up again
                    state["exp_var"] = torch.zeros_like(state["exp_avg"], dtype=torch.float32)
                    state["exp_var_start"] = state["step"].detach().clone().float().cpu()
                    fresh += 1
                want = _STATE_DTYPES[group["state_dtype"]]  # this run's state_dtype (the resume rule)
                if "exp_var" in state and state["exp_var"].dtype != want:
                    state["exp_var"] = state["exp_var"].to(want)
                if group["decay_to"] != "init":
                    state.pop("param_init", None)
        if fresh:
            logger.warning(
                "hf_snr: SNRAdamW loaded an optimizer state without exp_var (an AdamW checkpoint?) for %d parameter "
                "tensors: exp_avg, exp_avg_sq and step carried over; exp_var starts at zero and the gate stays open "
                "for its first warmup_steps steps from here.", fresh)
        if snr_state is not None:
            self.snr_state = {"consecutive_skips": 0, **snr_state}

    # the options whose value in this run wins over the checkpoint's on resume (the optim_args knobs, and snr=)
    _RESUME_OWN = tuple(k for k in GROUP_DEFAULTS if OPTIONS[k].convert is not None) + ("snr",)
    _RESUME_CHECKPOINT = ("betas", "eps", "weight_decay")  # AdamW's own: the checkpoint's (lr: the scheduler's)

    def _apply_resume_rule(self, saved_groups: list[dict[str, Any]], foreign: list[int]) -> None:
        """This run's SNR options replace the checkpoint's in ``saved_groups``; one log line names the differences."""
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict refuses it
        notes = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if i in foreign:
                continue
            where = f"group {i} " if len(saved_groups) > 1 else ""
            for key in self._RESUME_OWN:
                if key in saved and saved[key] != group[key] and not (key == "alpha" and getattr(self, "alpha_auto", 0)):
                    notes.append(f"{where}{key}: checkpoint {saved[key]!r}, this run {group[key]!r} (used)")
                saved[key] = group[key]
            for key in self._RESUME_CHECKPOINT:
                if key in saved and _differs(saved[key], group[key]):
                    notes.append(f"{where}{key}: checkpoint {saved[key]!r} (used, as torch does), this run {group[key]!r}")
        if notes:
            logger.warning("hf_snr: resuming with options that differ from the checkpoint's: %s", "; ".join(notes))
            if any("decay_to" in n for n in notes):
                logger.warning("hf_snr: decay_to changed on resume: decay_to='init' anchors on the weights at the "
                               "next step (or on set_decay_anchors), not on the ones the run started from")

    def _check_loaded_state(self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]) -> None:
        """Refuse (ValueError, nothing loaded) a state with non-finite values, negative second moments or wrong shapes."""
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict refuses it, with its own message
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                return
            for pi, (idx, p) in enumerate(zip(saved["params"], group["params"])):
                st = saved_state.get(idx)
                if not isinstance(st, dict):
                    continue
                where = (f"SNRAdamW.load_state_dict: refusing the saved state of parameter {pi} of group {gi} "
                         f"(shape {tuple(p.shape)}; state key {idx!r})")
                for key, value in st.items():
                    if key in ("step", "exp_var_start"):
                        try:
                            n = float(value.item() if isinstance(value, torch.Tensor) else value)
                        except (TypeError, ValueError, RuntimeError):
                            raise ValueError(f"{where}: {key} must be a number or a one-element tensor, got "
                                             f"{value!r}") from None
                        if not (math.isfinite(n) and n >= 0):
                            raise ValueError(f"{where}: {key} = {n!r} (accepted: a finite count >= 0)")
                        continue
                    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or key == "device_skips":
                        continue
                    same_kind = (DTensor is not None) and (isinstance(value, DTensor) == isinstance(p, DTensor))
                    expected = p.shape if same_kind or DTensor is None else _local(p).shape
                    if value.shape != expected:
                        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the parameter "
                                         f"{tuple(expected)} (a checkpoint of another model or layout?)")
                    local = _local(value)
                    bad = int((~torch.isfinite(local)).sum())
                    if bad:
                        raise ValueError(f"{where}: {key} holds {bad} nan/inf value(s) of {local.numel()} (a corrupt "
                                         "checkpoint, e.g. saved after a non-finite step with nonfinite='propagate'); "
                                         "resume from an earlier checkpoint")
                    if key in ("exp_avg_sq", "exp_var", "max_exp_avg_sq"):
                        neg = int((local < 0).sum())
                        if neg:
                            raise ValueError(f"{where}: {key} holds {neg} negative value(s) (a second moment is "
                                             ">= 0: a corrupt checkpoint)")

    # -- the step -----------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], create: bool = True) -> dict[str, list] | None:
        """Lazily create state for the tensors now in the group (FSDP2/ZeRO re-point params).

        create=False: gather the lists only if every tensor with a gradient has its state already; return
        None at the first one that has none, creating none for it (the non-finite check must come before a
        tensor's first state is created).
        """
        t: dict[str, list] = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_vars", "steps",
                                               "var_starts", "anchors", "mb_sqs", "states")}
        if group["reduction"] in ("tensor", "row") and [p.numel() for p in group["params"]] != group.get("_numels"):
            raise ValueError(
                f"reduction={group['reduction']!r} needs whole parameter tensors, but this optimizer is being stepped "
                f"on different tensors (numels {[p.numel() for p in group['params']][:4]} instead of "
                f"{group['_numels'][:4]}): flat partitions that mix tensors, as DeepSpeed ZeRO makes. "
                f"Use reduction='element' (exact under ZeRO) or FSDP2/DDP for reduction={group['reduction']!r}."
            )
        anchored = group["decay_to"] == "init" and group["weight_decay"] != 0.0
        microbatch = group["variance"] == "microbatch"
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(_SPARSE_MSG)
            state = self.state[p] if create else self.state.get(p)  # (get: no empty entry for p)
            if state is None or "step" not in state:
                if not create:
                    return None
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                fp32 = dict(dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg"] = torch.zeros_like(p, **fp32)
                state["exp_avg_sq"] = torch.zeros_like(p, **fp32)
                state["exp_var"] = torch.zeros_like(p, dtype=_STATE_DTYPES[group["state_dtype"]],
                                                    memory_format=torch.preserve_format)
            anchor = None
            if anchored:
                anchor = self._anchors.get(p)
                if anchor is None:
                    if "param_init" not in state:  # p0: the value at the first step this tensor takes
                        state["param_init"] = p.detach().to(torch.float32, copy=True)
                    anchor = state["param_init"]
            sq = None
            if microbatch:
                sq = self._mb_sq.get(p)
                if sq is None:  # no micro-batch seen: its gradient contributions are all zero
                    sq = self._mb_sq[p] = torch.zeros_like(_local(p), dtype=torch.float32)
                    self._mb_count[p] = 0
            t["params"].append(p)
            t["grads"].append(p.grad)
            t["exp_avgs"].append(state["exp_avg"])
            t["exp_avg_sqs"].append(state["exp_avg_sq"])
            t["exp_vars"].append(state["exp_var"])
            t["steps"].append(state["step"])
            t["states"].append(state)
            start = state.get("exp_var_start")
            t["var_starts"].append(0.0 if start is None else float(start))
            t["anchors"].append(anchor)
            t["mb_sqs"].append(sq)
        return t

    def _all_finite(self) -> bool:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [g for g in grads if g.numel() > 0]
        if grads and all(g.device.type == "cpu" and g.is_contiguous() and g.dtype in (torch.float32, torch.bfloat16)
                         for g in grads) and _cpu_kernel_ready():
            from . import fused_cpu

            flag = torch.tensor(float(fused_cpu.any_nonfinite(grads)))  # one read of the gradients in C
        elif grads:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            dev0 = grads[0].device
            flag = torch.zeros((), device=dev0)
            for dev, dev_grads in by_device.items():
                # per-tensor extremes: finite iff the tensor is (their sum could overflow fp32). On CPU
                # aminmax reads a tensor several times faster than the inf-norm kernel does.
                if dev.type == "cpu":
                    ext = torch.stack([e.float() for g in dev_grads for e in torch.aminmax(g)])
                else:
                    ext = torch.stack([n.float() for n in torch._foreach_norm(dev_grads, ord=math.inf)])
                flag = flag + (~torch.isfinite(ext)).any().float().to(dev0)
        else:
            flag = torch.zeros(())
        group = self._stats_group()
        if group is not None:
            flag = _all_reduce(flag, group, op="max")
        return flag.item() == 0

    def _implementation(self, group, tensors):
        if group["fused"]:
            reason = _fused.unavailable(tensors)
            if reason is None:
                return _fused
            if not self._fused_fallback_warned:
                warnings.warn(f"SNRAdamW(fused=True) runs the foreach path instead: {reason}", RuntimeWarning,
                              stacklevel=3)
                self._fused_fallback_warned = True
            return _multi_tensor
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in tensors["params"])
        return _multi_tensor if foreach else _single_tensor

    def _all_fused_on_cuda(self) -> bool:
        """Every group runs the fused CUDA kernel this step (then the non-finite skip is decided on the device)."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params or not all(g["fused"] for g in self.param_groups):
            return False
        if not all(_local(p).device.type == "cuda" and _local(p).is_contiguous()
                   and _local(p).dtype in (torch.float32, torch.bfloat16) for p in params):
            return False  # (the conditions of _fused.unavailable: every group then runs the fused kernel)
        from . import fused_triton

        return fused_triton.available()

    def _device_found_inf(self) -> torch.Tensor:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        norms = torch._foreach_norm(grads, ord=math.inf)
        flag = (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float().reshape(1)
        group = self._stats_group()
        if group is not None:
            flag = _all_reduce(flag, group, op="max")
        self._device_skips = flag if self._device_skips is None else self._device_skips + flag
        self._device_run = flag if self._device_run is None else self._device_run * flag + flag  # skips in a row
        self._device_attempts += 1
        return flag

    def _reset_microbatches(self) -> None:
        for p, sq in self._mb_sq.items():
            if self._mb_count.get(p):
                sq.zero_()
                self._mb_count[p] = 0

    def _nonfinite_step(self, loss):
        """A step with a non-finite gradient, nothing updated: raise (nonfinite="raise") or count and warn."""
        st = self.snr_state
        attempt = st["steps"] + st["skipped_steps"] + 1  # the optimizer step this call was (the Trainer's global step)
        if self.nonfinite == "raise":
            raise RuntimeError(
                f"SNRAdamW: non-finite (inf/nan) gradient at optimizer step {attempt}; "
                "nothing was updated (nonfinite='raise')"
            )
        st["skipped_steps"] += 1
        st["consecutive_skips"] = st.get("consecutive_skips", 0) + 1
        self.last_step_skipped = True
        self._reset_microbatches()  # the skipped step's micro-batches do not count toward the next
        if self._stats_requested:
            # the statistics asked for this step do not exist: no stale values in its log row. The request carries
            # over to the next step that is taken.
            self.last_stats  # (finalize an older requested step first)
            self._last_stats = {}
        self._check_consecutive_skips(attempt)
        n = st["skipped_steps"]
        if n & (n - 1) == 0:  # rate-limited: at 1, 2, 4, 8, ... skipped steps
            warnings.warn(
                f"SNRAdamW skipped step {attempt}: non-finite gradient ({n} skipped so far, "
                f"{st['consecutive_skips']} in a row; nonfinite='skip'). Further skips are warned at 2^k skipped "
                "steps; the count is logged as snr/skipped_steps.",
                RuntimeWarning,
                stacklevel=3,
            )
        return loss

    def _check_consecutive_skips(self, attempt: int) -> None:
        limit, run = self.max_consecutive_skips, self.snr_state.get("consecutive_skips", 0)
        if limit and run > limit:
            raise RuntimeError(
                f"SNRAdamW: {run} optimizer steps in a row had a non-finite gradient (up to step {attempt}); "
                f"nonfinite='skip' skipped them all, leaving parameters and state as they were at step "
                f"{attempt - run}, and max_consecutive_skips={limit} stops the run here instead of letting it burn "
                "its budget. Look for the cause (learning rate, loss scale, a corrupt batch or checkpoint); "
                "max_consecutive_skips=0 removes the limit."
            )

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for a non-finite gradient (device skips folded in: a host sync if any)."""
        self._read_device_skips()
        return int(self.snr_state["skipped_steps"])

    def _prepare_existing(self):
        """(group, tensors, implementation) of every group with gradients, or None when a tensor has no state yet.

        Gathers the lists without writing anything (the state exists already), so the non-finite check can be
        folded into the first kernel call; a first step checks first, then creates the state, as before.
        """
        prepared = []
        for group in self.param_groups:
            tensors = self._init_group(group, create=False)
            if tensors is None:
                return None
            if tensors["params"]:
                prepared.append((group, tensors, self._implementation(group, tensors)))
        return prepared

    def _kernel_check(self, prepared):
        """The gradients for the fused CPU kernel to check (nonfinite skip / raise folded into its first call).

        Only when every group runs that kernel (then no group writes before the check) and the decision is
        local: no statistics group (sharded runs all-reduce it), no micro-batch variance (its sums are reset
        on a skip before the kernel runs). None: the separate check runs first.
        """
        if not prepared or self._stats_group() is not None:
            return None
        grads = []
        for group, tensors, impl in prepared:
            if impl is not _fused or group["variance"] == "microbatch" or \
                    _local(tensors["params"][0]).device.type != "cpu":
                return None
            grads.extend(tensors["grads"])
        return grads

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Before the non-finite check, which cannot read sparse tensors (and would fail obscurely).
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(_SPARSE_MSG)

        found_inf = None
        check = None  # the gradients the step's first fused CPU kernel call reads for inf / nan before writing
        prepared = None
        if self.nonfinite == "skip" and self._all_fused_on_cuda():
            # decided on the device (as torch's fused optimizers do with found_inf): the kernels read the flag and
            # leave parameters and m, v, s untouched; the count is read with the statistics, no host sync per step
            found_inf = self._device_found_inf()
        elif self.nonfinite != "propagate":
            prepared = self._prepare_existing()
            check = self._kernel_check(prepared)
            if check is None and not self._all_finite():
                return self._nonfinite_step(loss)
        if prepared is None:
            prepared = []
            for group in self.param_groups:
                tensors = self._init_group(group)
                if tensors["params"]:
                    prepared.append((group, tensors, self._implementation(group, tensors)))
        pending_check = [check] if check is not None else []  # consumed by the first kernel call
        if check is not None:
            from .fused_cpu import NonFiniteGradient as skip_error
        else:
            skip_error = ()  # catches nothing

        work = []
        stats_before = (self._stats_requested, self._stats_step, self._pending)
        try:
            # Phase 1: moments of every group (and, for reduction="tensor"/"row", the local sums).
            for group, tensors, impl in prepared:
                mb = None
                if group["variance"] == "microbatch":
                    mb = self._microbatch_scales(tensors)
                    for p in tensors["params"]:  # the moments zero the sums; the counts restart with them
                        self._mb_count[p] = 0
                if found_inf is not None:
                    ctx = impl.moments(group, tensors, mb, found_inf)
                elif pending_check:
                    ctx = impl.moments(group, tensors, mb, check=pending_check)
                else:
                    ctx = impl.moments(group, tensors, mb)
                work.append((group, impl, tensors, ctx))

            # The logical step this call belongs to: the step count its tensors just reached.
            step_now = max((int(t.item()) for w in work for t in w[2]["steps"]), default=self.snr_state["steps"])
            if self._stats_requested:
                self._stats_requested = False
                self.last_stats  # finalize an older pending step first
                self._stats_step, self._pending = step_now, None
            want_stats = self._stats_step == step_now and self._stats_step is not None

            # One batched all-reduce of the per-tensor sums of every sharded tensor (reduction="tensor", and the
            # 1-D tensors of reduction="row"); row sums of matrices are local: FSDP2 shards whole rows.
            sharded = [(i, j) for i, (group, _, tensors, ctx) in enumerate(work) if ctx.get("sums") is not None
                       for j, p in enumerate(tensors["params"])
                       if (group["reduction"] == "tensor" or p.dim() < 2)  # one gate over the whole tensor
                       and (_shard_group(p) is not None or self.process_group is not None)]
            if sharded:
                flat = torch.stack([work[i][3]["sums"][j] for i, j in sharded])  # (n, 2)
                flat = _all_reduce(flat, self._stats_group())
                for k, (i, j) in enumerate(sharded):
                    work[i][3]["sums"][j] = flat[k]

            # Phase 2: the gate and the parameter update (plus, when requested, this call's partial sums).
            if want_stats and self._pending is None:
                self._pending = torch.zeros(len(_STAT_KEYS))
            for group, impl, tensors, ctx in work:
                part = impl.update(group, tensors, ctx, want_stats, check=pending_check) if pending_check \
                    else impl.update(group, tensors, ctx, want_stats)
                if part is not None:
                    self._pending = self._pending.to(part.device) + part
        except skip_error:
            # the first kernel call found a non-finite gradient and wrote nothing: undo the step counts the
            # groups before it took (a group's own moments undid its count) and the statistics request
            for _, _, tensors, _ in work:
                torch._foreach_sub_(tensors["steps"], 1.0)
            requested, stats_step, pending = stats_before
            if requested:
                self._stats_requested, self._stats_step, self._pending = True, stats_step, None
            else:
                self._stats_step, self._pending = stats_step, pending
            return self._nonfinite_step(loss)

        self.snr_state["steps"] = max(self.snr_state["steps"], step_now)
        if found_inf is None:  # (on the device path the skip is known only when the counters are read)
            self.snr_state["consecutive_skips"] = 0
            self.last_step_skipped = False
        return loss

    def _read_device_skips(self) -> int:
        """Fold the steps skipped on the device (CUDA fused) since the last read into the host counts.

        Returns how many logical steps were skipped. Each tensor's step count loses the skips it saw (its
        device counter), so the counts are the steps taken, as on the other paths. A host sync when any.
        """
        if self._device_skips is None:
            return 0
        attempts, self._device_attempts = self._device_attempts, 0
        skipped, self._device_skips = int(self._device_skips.item()), None
        run, self._device_run = int(self._device_run.item()), None
        snr = self.snr_state
        if attempts:
            snr["consecutive_skips"] = snr.get("consecutive_skips", 0) + skipped if skipped == attempts else run
            self.last_step_skipped = run > 0
        if not skipped:
            return 0
        states = [st for st in self.state.values() if "device_skips" in st]
        counts = torch.cat([st["device_skips"] for st in states]).cpu().tolist() if states else []
        for st, n in zip(states, counts):
            if n:
                st["step"].sub_(n)
                st["device_skips"].zero_()
        self.snr_state["steps"] -= skipped
        if self._stats_step is not None:
            self._stats_step -= skipped
        self.snr_state["skipped_steps"] += skipped
        warnings.warn(f"SNRAdamW skipped {skipped} of the last {attempts} optimizer step(s) on the device: non-finite "
                      f"gradient ({snr['skipped_steps']} skipped so far, the last "
                      f"{snr['consecutive_skips']} in a row; nonfinite='skip')", RuntimeWarning)
        self._check_consecutive_skips(snr["steps"] + snr["skipped_steps"])
        return skipped

    def _finish_stats(self, total: torch.Tensor, steps: int) -> dict[str, float]:
        """Reduce the per-rank sums (one all-reduce, one host sync) into the logged statistics."""
        pg = self._stats_group()
        if pg is not None:
            total = _all_reduce(total, pg)
        steps -= self._read_device_skips()  # with the statistics: the one host sync
        s = dict(zip(_STAT_KEYS, total.tolist()))
        interval = max(steps - self.snr_state["last_stats_step"], 0)
        self.snr_state["cumulative_noise"] += s["noise"] * interval
        self.snr_state["last_stats_step"] = steps
        count = s["mask_count"]
        return {
            "mask_mean": s["mask_sum"] / count if count > 0 else 1.0,
            "active_fraction": s["active_count"] / count if count > 0 else 1.0,
            "signal": s["signal"],
            "noise": s["noise"],
            "population_gain": s["signal"] - s["noise"],
            "cumulative_noise": self.snr_state["cumulative_noise"],
            "skipped_steps": float(self.snr_state["skipped_steps"]),
        }


def _differs(a: Any, b: Any) -> bool:
    """Whether two option values differ (tuples and lists alike; a tensor lr by value)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return float(a) != float(b)
    return a != b


def _cpu_kernel_ready() -> bool:
    """Whether the C kernel is already loaded (never builds it: only fused=True asks for a build)."""
    from . import fused_cpu

    return fused_cpu._state.get("lib") is not None


def _all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """All-reduce over ``group`` on the device its backend needs (gloo: CPU), back on the tensor's device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo" or not torch.cuda.is_available():
        comm = torch.device("cpu")
    else:
        comm = torch.device("cuda", torch.cuda.current_device())
    out = tensor.to(comm)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out.to(tensor.device)


def _gate_knobs(group) -> tuple[float, float, float]:
    """alpha, softness and c = softness * alpha, each clamped to the largest finite fp32 value.

    The validator accepts any finite value, but a Python float above fp32's range becomes inf once
    it meets an fp32 tensor, and inf * 0 (a coordinate with no variance) is nan. Clamped, "huge"
    still closes every gate and no nan can appear.
    """
    alpha = min(float(group["alpha"]), _FP32_MAX)
    softness = min(float(group["softness"]), _FP32_MAX)
    return alpha, softness, min(group["softness"] * group["alpha"], _FP32_MAX)


def ema_noise_scale(t: float, beta1: float) -> float:
    """c_t: Var(m_hat) / Var(g) for a stationary gradient after t steps of the bias-corrected EMA."""
    if beta1 == 0.0:
        return 1.0
    return (1 - beta1) * (1 + beta1**t) / ((1 + beta1) * (1 - beta1**t))


def _scalars(group, t: float, var_start: float) -> dict[str, Any]:
    """Per-tensor scalars of one step: bias corrections, the noise scale, whether the gate is open."""
    beta1, beta2 = group["betas"]
    var_t = t - var_start  # steps of the variance EMA (fewer than t after a warm start from AdamW)
    return dict(
        bc1=1 - beta1**t, bc2=1 - beta2**t, bcr=1 - group["rho"] ** var_t,
        noise_scale=ema_noise_scale(t, beta1) if group["noise"] == "ema" else 1.0,
        open=(not group["snr"]) or var_t <= group["warmup_steps"],
    )


def _row_view(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """x as (rows, -1) for a per-row sum (1-D and 0-D tensors: one row)."""
    if reduction == "row" and x.dim() >= 2:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for an empty FSDP2 shard (0 rows)
    return x.reshape(1, x.numel())


def _row_sums(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row sums of fp32 x, accumulated in float64 as the fused kernels do (so every path reaches the same
    gate decision where the sums of mu^2 and sigma^2 nearly tie, e.g. at t = 1 where they are equal)."""
    return _row_view(x, reduction).sum(1, dtype=torch.float64)


def _q_shape(x: torch.Tensor, reduction: str) -> tuple[int, ...]:
    if reduction == "row" and x.dim() >= 2:
        return (x.shape[0],) + (1,) * (x.dim() - 1)
    return ()


class _single_tensor:
    """The oracle: one parameter at a time, in the order of the equations."""

    @staticmethod
    def moments(group, t, mb):
        beta1, beta2 = group["betas"]
        rho = group["rho"]
        reduced = group["reduction"] in ("tensor", "row") and group["snr"]
        sums = []
        for i, p in enumerate(t["params"]):
            g = _local(t["grads"][i]).float()
            m, v, s_store = _local(t["exp_avgs"][i]), _local(t["exp_avg_sqs"][i]), _local(t["exp_vars"][i])
            s = s_store.float() if s_store.dtype != torch.float32 else s_store  # state_dtype: math in fp32
            t["steps"][i] += 1
            if mb is None:
                d = g - m                                   # deviation from the previous, uncorrected mean
                s.mul_(rho).addcmul_(d, d, value=1 - rho)  # s <- rho s + (1 - rho) d^2
            else:
                sq = t["mb_sqs"][i]
                est = (sq * mb[0] - g * g * mb[1]).clamp_min_(0.0)  # unbiased variance of the step's mean
                s.mul_(rho).add_(est, alpha=1 - rho)
                sq.zero_()
            if s is not s_store:
                s_store.copy_(s)
                s = s_store.float()  # what the gate reads is the stored (rounded) value
            m.lerp_(g, 1 - beta1)                       # m <- beta1 m + (1 - beta1) g
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if reduced:
                k = _scalars(group, t["steps"][i].item(), t["var_starts"][i])
                mu2 = ((m / k["bc1"]).square() if group["signal"] == "ema" else g.square()).clamp_max_(_FP32_MAX)
                sig2 = (s / k["bcr"] * k["noise_scale"]).clamp_max_(_FP32_MAX)
                sums.append(torch.stack([_row_sums(mu2, group["reduction"]),
                                         _row_sums(sig2, group["reduction"])], dim=1))
        return {"sums": sums if reduced else None}

    @staticmethod
    def update(group, t, ctx, want_stats):
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        alpha, softness, c = _gate_knobs(group)
        part = None
        for i, p_full in enumerate(t["params"]):
            p = _local(p_full)
            m, v, s = _local(t["exp_avgs"][i]), _local(t["exp_avg_sqs"][i]), _local(t["exp_vars"][i]).float()
            k = _scalars(group, t["steps"][i].item(), t["var_starts"][i])
            m_hat = m / k["bc1"]
            mu2 = m_hat.square() if group["signal"] == "ema" else _local(t["grads"][i]).float().square()
            mu2 = mu2.clamp_max_(_FP32_MAX)             # a huge finite gradient: inf^2 would make q nan
            sig2 = (s / k["bcr"] * k["noise_scale"]).clamp_max_(_FP32_MAX)
            if k["open"]:
                q = torch.ones_like(m)
            elif group["reduction"] in ("tensor", "row"):
                sums = ctx["sums"][i]
                q = _mask(group["mask"], sums[:, 0].float(), sums[:, 1].float(), alpha, softness, c)
                q = q.reshape(_q_shape(m, group["reduction"])).expand_as(m)
            else:
                q = _mask(group["mask"], mu2, sig2, alpha, softness, c)
            denom = (v / k["bc2"]).sqrt() + eps
            p32 = p.float() if p.dtype != torch.float32 else p
            anchor = t["anchors"][i]
            if anchor is None:
                p32.mul_(1 - lr * wd)                   # decoupled weight decay, never masked
            else:
                p32.sub_(p32 - _local(anchor).float(), alpha=lr * wd)  # ... toward p0
            p32.addcdiv_(q * m_hat, denom, value=-lr)   # the gated AdamW step
            if p32 is not p:
                p.copy_(p32)
            if want_stats:
                u = q * lr / denom                      # effective per-coordinate step size
                masked = group["snr"]
                seen = v > 0  # coordinates that have had a gradient (not ZeRO's zero padding)
                row = torch.stack([
                    torch.where(seen, q, 0.0).sum() if masked else q.new_zeros(()),
                    seen.sum().float() if masked else q.new_zeros(()),
                    ((q > 0.5) & seen).sum().float() if masked else q.new_zeros(()),
                    (u * mu2).sum(),
                    alpha * (u * sig2).sum(),
                ])
                part = row if part is None else part + row
        return part


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


class _multi_tensor:
    """The same math with torch._foreach_* kernels, in the oracle's order of operations.

    Element reduction runs moments, gate and update in one sweep over the blocks. Row and tensor
    reductions need their sums (tensor: all-reduced under FSDP2) before any gate, so they sweep twice,
    over whole tensors.
    """

    @staticmethod
    def _split(group, t):
        lists = [[None if x is None else _local(x) for x in t[k]]
                 for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_vars", "anchors", "mb_sqs")]
        on_cpu = all(x.device.type == "cpu" for x in lists[0])
        block = _CPU_BLOCK_NUMEL * min(torch.get_num_threads(), 4) if on_cpu else None
        return _blocks(lists, block, cut=group["reduction"] == "element")

    @staticmethod
    def _moments(group, block, mb) -> None:
        """m, v, s of one block, in place."""
        beta1, beta2 = group["betas"]
        rho = group["rho"]
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
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)

    @staticmethod
    def moments(group, t, mb):
        torch._foreach_add_(t["steps"], 1.0)
        blocks = _multi_tensor._split(group, t)
        scal = [_scalars(group, x.item(), vs) for x, vs in zip(t["steps"], t["var_starts"])]
        ctx = {"blocks": blocks, "sums": None, "moments_done": False, "scalars": scal, "mb": mb}
        if group["reduction"] in ("tensor", "row") and group["snr"]:
            sums: list[torch.Tensor | None] = [None] * len(t["params"])
            for block in blocks:
                _multi_tensor._moments(group, block, mb)
                idx = [i for i, _ in block]
                if group["signal"] == "ema":
                    mu2 = torch._foreach_div([x[1][_M] for x in block], [scal[i]["bc1"] for i in idx])
                    torch._foreach_mul_(mu2, mu2)
                else:
                    mu2 = [x[1][_G].float().square() for x in block]
                sig2 = torch._foreach_div([x[1][_S].float() for x in block], [scal[i]["bcr"] for i in idx])
                torch._foreach_mul_(sig2, [scal[i]["noise_scale"] for i in idx])
                torch._foreach_clamp_max_(mu2, _FP32_MAX)
                torch._foreach_clamp_max_(sig2, _FP32_MAX)
                for i, a, b in zip(idx, mu2, sig2):
                    red = group["reduction"]
                    sums[i] = torch.stack([_row_sums(a, red), _row_sums(b, red)], dim=1)
            ctx["sums"] = sums
            ctx["moments_done"] = True
        return ctx

    @staticmethod
    def update(group, t, ctx, want_stats):
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        alpha, softness, c = _gate_knobs(group)
        kind = group["mask"]
        scal = ctx["scalars"]
        gated = not all(k["open"] for k in scal)
        red = group["reduction"]
        reduced_q = None
        if gated and red in ("tensor", "row"):
            reduced_q = [_mask(kind, sm[:, 0].float(), sm[:, 1].float(), alpha, softness, c) for sm in ctx["sums"]]
        masked = group["snr"]
        acc = None

        for block in ctx["blocks"]:
            if not ctx["moments_done"]:
                _multi_tensor._moments(group, block, ctx["mb"])
            idx = [i for i, _ in block]
            m = [x[1][_M] for x in block]
            v = [x[1][_V] for x in block]
            s = [x[1][_S] if x[1][_S].dtype == torch.float32 else x[1][_S].float() for x in block]
            m_hat = torch._foreach_div(m, [scal[i]["bc1"] for i in idx])
            mu2 = sig2 = q = None
            if gated or want_stats:
                if group["signal"] == "ema":
                    mu2 = torch._foreach_mul(m_hat, m_hat)
                else:
                    g = [x[1][_G].float() for x in block]
                    mu2 = torch._foreach_mul(g, g)
                sig2 = torch._foreach_div(s, [scal[i]["bcr"] for i in idx])
                if group["noise"] == "ema":
                    torch._foreach_mul_(sig2, [scal[i]["noise_scale"] for i in idx])
                torch._foreach_clamp_max_(mu2, _FP32_MAX)  # a huge finite gradient: inf^2 would make q nan
                torch._foreach_clamp_max_(sig2, _FP32_MAX)
            if gated:
                if reduced_q is not None:
                    q = [reduced_q[i].reshape(_q_shape(x, red)).expand_as(x) for i, x in zip(idx, m)]
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


class _fused:
    """One fused pass per group and dtype signature: the C kernel of :mod:`hf_snr.fused_cpu` on CPU.

    Same math and order of operations as the oracle (m, v, s equal it bit for bit; p within a few ulps:
    torch's CPU sqrt is MKL's, the kernel's IEEE). Element gates take one pass over p, g, m, v, s; row and
    tensor gates take the two passes the reductions need (sums, then the gated update).
    """

    @staticmethod
    def unavailable(t) -> str | None:
        """Why the fused kernel cannot run these tensors (None: it can)."""
        params = t["params"]
        plain = DTensor is None or not any(isinstance(p, DTensor) for p in params)
        if plain:  # no shards: the tensors themselves (C-level map, ~5x faster than going through _local)
            local = params
            devices = {d.type for d in map(_device_of, params)}
        else:
            local = [_local(p) for p in params]
            devices = {p.device.type for p in local}
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
        for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_vars"):
            ts = t[key] if plain else [_local(x) for x in t[key]]  # (the lists hold no None: params with grads)
            if not all(map(_is_contiguous, ts)):
                return "a parameter, gradient or state tensor is not contiguous"
        if not {_dtype_of(p) for p in local} <= {torch.float32, torch.bfloat16}:
            return "parameters other than float32 / bfloat16"
        return None

    @staticmethod
    def _kernel(t):
        if _local(t["params"][0]).device.type == "cuda":
            from . import fused_triton

            return fused_triton
        from . import fused_cpu

        return fused_cpu

    @staticmethod
    def _lists(t):
        keys = ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_vars")
        if DTensor is None or not any(isinstance(p, DTensor) for p in t["params"]):
            return tuple(t[k] for k in keys)  # no shards: the lists as they are
        return tuple([_local(x) for x in t[k]] for k in keys)

    @staticmethod
    def _device_scalars(group, t, found_inf):
        """The per-tensor scalars of a step whose skip is decided on the device, computed there.

        Each tensor's step count t is its host count (steps attempted, no sync) minus the skips its own
        device counter (state["device_skips"]) has seen, so a skipped step does not advance the bias
        corrections, the noise scale or the warm-up; the counters fold into the host counts when the
        skip count is read (statistics, state_dict). As :func:`_scalars`, in float64, then fp32.
        """
        from .fused_triton import _to_dev

        dev = found_inf.device
        counters = []
        for st in t["states"]:
            c = st.get("device_skips")
            if c is None:
                c = st["device_skips"] = torch.zeros(1, dtype=torch.float32, device=dev)
            counters.append(c)
        torch._foreach_add_(counters, [found_inf.reshape(1)] * len(counters))
        host = _to_dev([[x.item() for x in t["steps"]], list(t["var_starts"])], torch.float64, dev)
        te = host[0] - torch.cat(counters).double()
        beta1, beta2 = group["betas"]
        var_t = te - host[1]
        cols = {"bc1": 1 - torch.pow(beta1, te), "bc2": 1 - torch.pow(beta2, te),
                "bcr": 1 - torch.pow(group["rho"], var_t)}
        if group["noise"] == "ema" and beta1 != 0.0:
            b1t = torch.pow(beta1, te)
            cols["noise_scale"] = (1 - beta1) * (1 + b1t) / ((1 + beta1) * (1 - b1t))
        else:
            cols["noise_scale"] = 1.0
        cols["open"] = (var_t <= group["warmup_steps"]).float() if group["snr"] else True
        return cols

    @staticmethod
    def moments(group, t, mb, found_inf=None, check=None):
        """check: [gradients] for the first kernel call of the step to check (popped by the call that does)."""
        kernel = _fused._kernel(t)
        flag = {} if found_inf is None else {"found_inf": found_inf}
        torch._foreach_add_(t["steps"], 1.0)
        if found_inf is None:
            steps, starts = [x.item() for x in t["steps"]], t["var_starts"]
            if min(steps) == max(steps) and min(starts) == max(starts):  # the usual case: one set for the group
                cols = _scalars(group, steps[0], starts[0])
            else:
                scal = [_scalars(group, x, vs) for x, vs in zip(steps, starts)]
                cols = {name: [k[name] for k in scal] for name in ("bc1", "bc2", "bcr", "noise_scale", "open")}
        else:
            cols = _fused._device_scalars(group, t, found_inf)
        ctx = {"cols": cols, "mb": mb, "sums": None, "flag": flag}
        if group["reduction"] in ("tensor", "row") and group["snr"]:
            beta1, beta2 = group["betas"]
            lists = _fused._lists(t)
            if check:
                flag = dict(flag, check_finite=check.pop())
            try:
                flat = kernel.moments(
                    *lists, **flag, beta1=beta1, beta2=beta2, rho=group["rho"], bc1=cols["bc1"],
                    bcr=cols["bcr"], row_lens=group["reduction"], signal=group["signal"],
                    noise_scale=cols["noise_scale"], variance=group["variance"],
                    sq_sums=t["mb_sqs"] if mb else None, sq_scale=mb[0] if mb else 1.0,
                    g2_scale=mb[1] if mb else 0.0)
            except ArithmeticError:  # fused_cpu.NonFiniteGradient: nothing written; this step did not happen
                torch._foreach_sub_(t["steps"], 1.0)
                raise
            sums, row = [], 0
            for p in lists[0]:
                n = p.shape[0] if group["reduction"] == "row" and p.dim() >= 2 else 1
                sums.append(flat[row:row + n])
                row += n
            ctx["sums"] = sums
        return ctx

    @staticmethod
    def update(group, t, ctx, want_stats, check=None):
        kernel = _fused._kernel(t)
        beta1, beta2 = group["betas"]
        cols, mb = ctx["cols"], ctx["mb"]
        alpha, softness, c = _gate_knobs(group)
        lists = _fused._lists(t)
        anchors = None if all(a is None for a in t["anchors"]) else [_local(a) for a in t["anchors"]]
        common = dict(lr=float(group["lr"]), eps=group["eps"], weight_decay=group["weight_decay"],
                      bc1=cols["bc1"], bc2=cols["bc2"], bcr=cols["bcr"],
                      alpha=alpha, softness=softness, c=c, mask=group["mask"], signal=group["signal"],
                      noise_scale=cols["noise_scale"], anchors=anchors,
                      gate_open=cols["open"], want_stats=want_stats, **ctx["flag"])
        if check:
            common["check_finite"] = check.pop()
        if ctx["sums"] is None:
            out = kernel.step(*lists, beta1=beta1, beta2=beta2, rho=group["rho"], variance=group["variance"],
                                 sq_sums=t["mb_sqs"] if mb else None, sq_scale=mb[0] if mb else 1.0,
                                 g2_scale=mb[1] if mb else 0.0, **common)
        else:
            q_rows = torch.cat([_mask(group["mask"], sm[:, 0].float(), sm[:, 1].float(), alpha, softness, c)
                                for sm in ctx["sums"]]).contiguous()
            out = kernel.update(*lists, q_rows=q_rows, row_lens=group["reduction"], **common)
        if ctx["flag"] and mb:  # a step skipped on the device left the micro-batch sums: they do not carry over
            torch._foreach_zero_([x for x in t["mb_sqs"] if x is not None])
        if not want_stats:
            return None
        # CPU: 5 Python floats; CUDA: a (5,) float64 device tensor (no host sync until last_stats is read)
        part = out.float() if isinstance(out, torch.Tensor) else torch.tensor(out, dtype=torch.float64).float()
        if not group["snr"]:
            part[:3] = 0.0
        return part


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
