"""SNRAdamW: AdamW with a per-coordinate signal-to-noise gate ("population-risk training").

The math (see ALGORITHM.md in the project's shared notes, Litman & Guo 2026, arXiv 2605.01172):

    p <- p * (1 - lr * weight_decay)                 decoupled decay, never masked
    d  = g - m                                       m: the previous, uncorrected first moment
    s <- rho * s + (1 - rho) * d^2                   variance EMA: the one extra state tensor
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    mu^2 = (m / (1 - beta1^t))^2 ; sigma^2 = s / (1 - rho^t)
    q = mask(mu^2, sigma^2) in [0, 1]
    p <- p - lr * q * m_hat / (sqrt(v_hat) + eps)

This module imports only torch. It holds two implementations of the same math, as torch.optim
does: ``_single_tensor_*`` (a plain per-tensor loop that reads like the equations and serves as
the test oracle) and ``_multi_tensor_*`` (``torch._foreach_*`` kernels), chosen by ``foreach``.
"""

from __future__ import annotations

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

from .options import (DEFAULT_WARMUP_STEPS, DEFAULTS, GROUP_DEFAULTS, MASKS, NONFINITE_POLICIES, REDUCTIONS,
                      validate_hparams, validate_value)

__all__ = ["SNRAdamW", "MASKS", "REDUCTIONS", "NONFINITE_POLICIES", "DEFAULT_WARMUP_STEPS"]

D = DEFAULTS  # every default below comes from the one options table (hf_snr.options.OPTIONS)

# Largest finite fp32 value: softness * alpha is clamped to it so that (huge) * 0 stays 0, not nan.
_FP32_MAX = torch.finfo(torch.float32).max
# Guard for 0/0 in the mask (a coordinate with mu^2 = sigma^2 = 0 gets q = 0; its step is 0 anyway).
_TINY = torch.finfo(torch.float32).tiny

_SPARSE_MSG = "SNRAdamW does not support sparse gradients (use dense gradients, e.g. nn.Embedding(sparse=False))"

_STAT_KEYS = ("mask_sum", "mask_count", "active_count", "signal", "noise")


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
            0 opens every gate (plain AdamW).
        reduction (str): ``"element"`` (default) one gate per scalar; ``"tensor"`` one gate per
            parameter tensor from sum(mu^2) vs alpha * sum(sigma^2). Under FSDP2 the sums cover the
            whole tensor (one batched all-reduce per step). Refused on flat partitions that mix
            tensors (DeepSpeed ZeRO).
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
        process_group: the process group whose ranks hold *disjoint* shards of the parameters
            (DeepSpeed ZeRO's data-parallel group). Statistics are summed over it. Leave None under
            DDP (replicas: nothing to sum) and under FSDP2 (the shard group is read from DTensors).

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
        nonfinite: str = D["nonfinite"],
        process_group: Any = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, rho=rho, mask=mask, softness=softness, alpha=alpha,
            reduction=reduction, warmup_steps=warmup_steps, snr=snr, foreach=foreach,
        )
        assert defaults.keys() == GROUP_DEFAULTS.keys()
        validate_hparams(defaults)
        validate_value("nonfinite", nonfinite)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self._stats_requested = False
        # Statistics of one logical step may come from several step() calls (DeepSpeed ZeRO steps one
        # parameter group per call): their partial sums collect in _pending until last_stats is read.
        self._stats_step: int | None = None
        self._pending: torch.Tensor | None = None
        self._last_stats: dict[str, float] = {}
        self.snr_state = {"steps": 0, "skipped_steps": 0, "cumulative_noise": 0.0, "last_stats_step": 0}
        super().__init__(params, defaults)

    # -- parameter groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        validate_hparams(param_group, where=f"parameter group {len(self.param_groups)}")
        super().add_param_group(param_group)
        # Remember the shapes the group was built with: reduction="tensor" checks at step time that
        # it still sees those whole tensors (DeepSpeed ZeRO swaps in flat partitions).
        param_group["_numels"] = [p.numel() for p in param_group["params"]]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

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
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("_numels", None)
        sd["snr_state"] = dict(self.snr_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        snr_state = state_dict.pop("snr_state", None)
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load; ours is fp32 by design, so
        # put back the saved fp32 tensors for bf16/fp16 parameters (the cast would round them).
        for saved_group, group in zip(saved_groups, self.param_groups):
            group["_numels"] = [p.numel() for p in group["params"]]
            for idx, p in zip(saved_group["params"], group["params"]):
                if idx not in saved_state or p.dtype == torch.float32:
                    continue
                for key, value in saved_state[idx].items():
                    if key != "step" and isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
        if snr_state is not None:
            self.snr_state = dict(snr_state)

    # -- the step -----------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any]):
        """Lazily create state for the tensors now in the group (FSDP2/ZeRO re-point params)."""
        params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps = [], [], [], [], [], []
        if group["reduction"] == "tensor" and [p.numel() for p in group["params"]] != group.get("_numels"):
            raise ValueError(
                "reduction='tensor' needs whole parameter tensors, but this optimizer is being stepped "
                f"on different tensors (numels {[p.numel() for p in group['params']][:4]} instead of "
                f"{group['_numels'][:4]}): flat partitions that mix tensors, as DeepSpeed ZeRO makes. "
                "Use reduction='element' (exact under ZeRO) or FSDP2/DDP for reduction='tensor'."
            )
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(_SPARSE_MSG)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                fp32 = dict(dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg"] = torch.zeros_like(p, **fp32)
                state["exp_avg_sq"] = torch.zeros_like(p, **fp32)
                state["exp_var"] = torch.zeros_like(p, **fp32)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            exp_vars.append(state["exp_var"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps

    def _all_finite(self) -> bool:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [g for g in grads if g.numel() > 0]
        if grads:
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

        if self.nonfinite != "propagate" and not self._all_finite():
            if self.nonfinite == "raise":
                raise RuntimeError(
                    f"SNRAdamW: non-finite (inf/nan) gradient at optimizer step {self.snr_state['steps'] + 1}; "
                    "nothing was updated (nonfinite='raise')"
                )
            self.snr_state["skipped_steps"] += 1
            warnings.warn(
                f"SNRAdamW skipped step {self.snr_state['steps'] + 1}: non-finite gradient "
                f"({self.snr_state['skipped_steps']} skipped so far; nonfinite='skip')",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss  # a pending stats request carries over to the next step that happens

        # Phase 1: moments of every group (and, for reduction="tensor", the local sums).
        work = []
        for group in self.param_groups:
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in tensors[0])
            impl = _multi_tensor if foreach else _single_tensor
            ctx = impl.moments(group, *tensors)
            work.append((group, impl, tensors, ctx))

        # The logical step this call belongs to: the step count its tensors just reached.
        step_now = max((int(t.item()) for w in work for t in w[2][5]), default=self.snr_state["steps"])
        if self._stats_requested:
            self._stats_requested = False
            self.last_stats  # finalize an older pending step first
            self._stats_step, self._pending = step_now, None
        want_stats = self._stats_step == step_now and self._stats_step is not None

        # One batched all-reduce of the per-tensor sums of every sharded tensor-reduction group.
        sharded = [(i, j) for i, (group, _, tensors, ctx) in enumerate(work) if ctx.get("sums") is not None
                   for j, p in enumerate(tensors[0]) if _shard_group(p) is not None or self.process_group is not None]
        if sharded:
            flat = torch.stack([work[i][3]["sums"][j] for i, j in sharded])  # (n, 2)
            flat = _all_reduce(flat, self._stats_group())
            for k, (i, j) in enumerate(sharded):
                work[i][3]["sums"][j] = flat[k]

        # Phase 2: the gate and the parameter update (plus, when requested, this call's partial sums).
        if want_stats and self._pending is None:
            self._pending = torch.zeros(len(_STAT_KEYS))
        for group, impl, tensors, ctx in work:
            part = impl.update(group, *tensors, ctx, want_stats)
            if part is not None:
                self._pending = self._pending.to(part.device) + part

        self.snr_state["steps"] = max(self.snr_state["steps"], step_now)
        return loss

    def _finish_stats(self, total: torch.Tensor, steps: int) -> dict[str, float]:
        """Reduce the per-rank sums (one all-reduce, one host sync) into the logged statistics."""
        pg = self._stats_group()
        if pg is not None:
            total = _all_reduce(total, pg)
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


def _bias_corrections(step: float, beta1: float, beta2: float, rho: float):
    return 1.0 - beta1**step, 1.0 - beta2**step, 1.0 - rho**step


def _gate_knobs(group) -> tuple[float, float, float]:
    """alpha, softness and c = softness * alpha, each clamped to the largest finite fp32 value.

    The validator accepts any finite value, but a Python float above fp32's range becomes inf once
    it meets an fp32 tensor, and inf * 0 (a coordinate with no variance) is nan. Clamped, "huge"
    still closes every gate and no nan can appear.
    """
    alpha = min(float(group["alpha"]), _FP32_MAX)
    softness = min(float(group["softness"]), _FP32_MAX)
    return alpha, softness, min(group["softness"] * group["alpha"], _FP32_MAX)


class _single_tensor:
    """The oracle: one parameter at a time, in the order of the equations."""

    @staticmethod
    def moments(group, params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps):
        beta1, beta2 = group["betas"]
        rho = group["rho"]
        tensor_mode = group["reduction"] == "tensor" and group["snr"]
        sums = []
        for i, p in enumerate(params):
            g = _local(grads[i]).float()
            m, v, s = _local(exp_avgs[i]), _local(exp_avg_sqs[i]), _local(exp_vars[i])
            steps[i] += 1
            d = g - m                                   # deviation from the previous, uncorrected mean
            s.mul_(rho).addcmul_(d, d, value=1 - rho)  # s <- rho s + (1 - rho) d^2
            m.lerp_(g, 1 - beta1)                       # m <- beta1 m + (1 - beta1) g
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if tensor_mode:
                bc1, _, bcr = _bias_corrections(steps[i].item(), beta1, beta2, rho)
                mu2 = (m / bc1).square()
                sig2 = s / bcr
                sums.append(torch.stack([mu2.sum(), sig2.sum()]))
        return {"sums": sums if tensor_mode else None}

    @staticmethod
    def update(group, params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps, ctx, want_stats):
        beta1, beta2 = group["betas"]
        lr, eps, wd, rho = group["lr"], group["eps"], group["weight_decay"], group["rho"]
        lr = float(lr)
        alpha, softness, c = _gate_knobs(group)
        part = None
        for i, p_full in enumerate(params):
            p = _local(p_full)
            m, v, s = _local(exp_avgs[i]), _local(exp_avg_sqs[i]), _local(exp_vars[i])
            t = steps[i].item()
            bc1, bc2, bcr = _bias_corrections(t, beta1, beta2, rho)
            m_hat = m / bc1
            mu2 = m_hat.square()
            sig2 = s / bcr
            if not group["snr"] or t <= group["warmup_steps"]:
                q = torch.ones_like(m)
            elif group["reduction"] == "tensor":
                sum_mu2, sum_sig2 = ctx["sums"][i][0], ctx["sums"][i][1]
                q = _mask(group["mask"], sum_mu2, sum_sig2, alpha, softness, c).expand_as(m)
            else:
                q = _mask(group["mask"], mu2, sig2, alpha, softness, c)
            denom = (v / bc2).sqrt() + eps
            p32 = p.float() if p.dtype != torch.float32 else p
            p32.mul_(1 - lr * wd)                       # decoupled weight decay, never masked
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


def _mask(kind: str, mu2: torch.Tensor, sig2: torch.Tensor, alpha: float, softness: float, c: float):
    """q in [0, 1] from mu^2 and sigma^2 (tensors or 0-d sums). No eps: only 0/0 is guarded."""
    if kind == "snr":
        return mu2 / (mu2 + c * sig2).clamp_min(_TINY)
    if kind == "soft":
        excess = (mu2 - alpha * sig2).clamp_min(0.0)
        return excess / (excess + softness * sig2).clamp_min(_TINY)
    return (mu2 > alpha * sig2).to(mu2.dtype)


# On CPU the foreach sequence runs over blocks of about this many elements per intra-op thread (up
# to 4 threads; large tensors are cut into flat views, small ones packed together): a block's ~8
# fp32 intermediates then stay in the last-level cache and are recycled by malloc, whereas
# whole-group temporaries are fresh pages, page-faulted on every step, and each of the ~20 ops
# streams the whole model through memory. Measured on one core: 0.85x AdamW-foreach's step time
# blocked, 2x unblocked. Other devices take one block of whole tensors (few kernel launches; their
# caching allocators recycle memory).
_CPU_BLOCK_NUMEL = 1 << 17


def _blocks(tensors: list[list[torch.Tensor]], block_numel: int | None):
    """Split aligned lists of tensors (params, grads, m, v, s) into blocks of aligned pieces.

    Returns a list of blocks; a block is a list of (i, views) with i the tensor's index and views
    one piece of each list. Tensors that are not all contiguous are never cut.
    """
    n = len(tensors[0])
    if block_numel is None:
        return [[(i, [ts[i] for ts in tensors]) for i in range(n)]]
    blocks, current, size = [], [], 0
    for i in range(n):
        row = [ts[i] for ts in tensors]
        numel = row[0].numel()
        if numel <= block_numel or not all(t.is_contiguous() for t in row):
            pieces = [row]
        else:
            flat = [t.view(-1) for t in row]
            pieces = [[f[a:a + block_numel] for f in flat] for a in range(0, numel, block_numel)]
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


class _multi_tensor:
    """The same math with torch._foreach_* kernels, in the oracle's order of operations.

    Element reduction runs moments, gate and update in one sweep over the blocks. Tensor reduction
    needs whole-tensor sums (all-reduced under FSDP2) before any gate, so it sweeps twice.
    """

    @staticmethod
    def _split(params, grads, exp_avgs, exp_avg_sqs, exp_vars):
        lists = [[_local(x) for x in xs] for xs in (params, grads, exp_avgs, exp_avg_sqs, exp_vars)]
        on_cpu = all(x.device.type == "cpu" for x in lists[0])
        return _blocks(lists, _CPU_BLOCK_NUMEL * min(torch.get_num_threads(), 4) if on_cpu else None)

    @staticmethod
    def _moments(group, block) -> None:
        """m, v, s of one block, in place."""
        beta1, beta2 = group["betas"]
        rho = group["rho"]
        g = [x[1][1] if x[1][1].dtype == torch.float32 else x[1][1].float() for x in block]
        m = [x[1][2] for x in block]
        v = [x[1][3] for x in block]
        s = [x[1][4] for x in block]
        d = torch._foreach_sub(g, m)                    # deviation from the previous, uncorrected mean
        torch._foreach_mul_(s, rho)
        torch._foreach_addcmul_(s, d, d, value=1 - rho)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)

    @staticmethod
    def moments(group, params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps):
        torch._foreach_add_(steps, 1.0)
        blocks = _multi_tensor._split(params, grads, exp_avgs, exp_avg_sqs, exp_vars)
        ctx = {"blocks": blocks, "sums": None, "moments_done": False}
        if group["reduction"] == "tensor" and group["snr"]:
            beta1, rho = group["betas"][0], group["rho"]
            ts = [x.item() for x in steps]
            parts: list[list[torch.Tensor]] = [[] for _ in params]
            for block in blocks:
                _multi_tensor._moments(group, block)
                idx = [i for i, _ in block]
                mu2 = torch._foreach_div([x[1][2] for x in block], [1 - beta1**ts[i] for i in idx])
                torch._foreach_mul_(mu2, mu2)
                sig2 = torch._foreach_div([x[1][4] for x in block], [1 - rho**ts[i] for i in idx])
                for i, a, b in zip(idx, mu2, sig2):
                    parts[i].append(torch.stack([a.sum(), b.sum()]))
            ctx["sums"] = [torch.stack(p).sum(0) if len(p) > 1 else p[0] for p in parts]
            ctx["moments_done"] = True
        return ctx

    @staticmethod
    def update(group, params, grads, exp_avgs, exp_avg_sqs, exp_vars, steps, ctx, want_stats):
        beta1, beta2 = group["betas"]
        lr, eps, wd, rho = float(group["lr"]), group["eps"], group["weight_decay"], group["rho"]
        alpha, softness, c = _gate_knobs(group)
        kind = group["mask"]
        ts = [x.item() for x in steps]
        warm = [t <= group["warmup_steps"] for t in ts]
        gated = group["snr"] and not all(warm)
        tensor_q = None
        if gated and group["reduction"] == "tensor":
            tensor_q = [_mask(kind, sm[0], sm[1], alpha, softness, c) for sm in ctx["sums"]]
        bc1 = [1 - beta1**t for t in ts]
        bc2 = [1 - beta2**t for t in ts]
        bcr = [1 - rho**t for t in ts]
        masked = group["snr"]
        acc = None

        for block in ctx["blocks"]:
            if not ctx["moments_done"]:
                _multi_tensor._moments(group, block)
            idx = [i for i, _ in block]
            m = [x[1][2] for x in block]
            v = [x[1][3] for x in block]
            s = [x[1][4] for x in block]
            m_hat = torch._foreach_div(m, [bc1[i] for i in idx])
            mu2 = sig2 = q = None
            if gated or want_stats:
                mu2 = torch._foreach_mul(m_hat, m_hat)
                sig2 = torch._foreach_div(s, [bcr[i] for i in idx])
            if gated:
                if tensor_q is not None:
                    q = [tensor_q[i].expand_as(x) for i, x in zip(idx, m)]
                elif kind == "hard" or want_stats:
                    q = list(_foreach_mask(kind, mu2, sig2, alpha, softness, c))
                else:  # q computed in the buffers of mu2 and sigma^2, which nothing needs after
                    q = _foreach_mask_(kind, mu2, sig2, alpha, softness, c)
                for j, i in enumerate(idx):
                    if warm[i]:  # a tensor still in its own warm-up (first gradient came late)
                        q[j] = torch.ones_like(m[j])

            denom = torch._foreach_div(v, [bc2[i] for i in idx])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)

            local_p = [x[1][0] for x in block]
            p32 = [p if p.dtype == torch.float32 else p.float() for p in local_p]
            torch._foreach_mul_(p32, 1 - lr * wd)       # decoupled weight decay, never masked
            if q is None:
                step_dir = m_hat
            elif want_stats or tensor_q is not None:
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
