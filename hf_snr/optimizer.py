"""SNRAdamW: AdamW with a per-coordinate signal-to-noise gate ("population-risk training").

Litman & Guo 2026, arXiv 2605.01172. With the defaults (the options that change a line on its right; the
derivations and pitfalls are in the repository's ``docs/algorithm.md``)::

    p <- p * (1 - lr * weight_decay)                 decoupled decay, never masked     decay_to="init"
    d  = g - m                                       m: the previous, uncorrected first moment
    s <- rho * s + (1 - rho) * d^2                   variance EMA: the one extra state  variance="microbatch"
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    mu^2 = (m / (1 - beta1^t))^2                                                        signal="step"
    sigma^2 = s / (1 - rho^t)                                                           noise="ema"
    q = mask(mu^2, sigma^2) in [0, 1]                per element                        reduction="row"/"tensor"
    p <- p - lr * q * m_hat / (sqrt(v_hat) + eps)

Where each part lives (every module imports only torch):

* :mod:`hf_snr._reference` — the reference step, equation by equation (the test oracle);
* :mod:`hf_snr._foreach` — the same math with ``torch._foreach_*`` kernels, over cache-sized blocks;
* :mod:`hf_snr._fused` — the fused kernels' dispatch (C on CPU, Triton on CUDA);
* :mod:`hf_snr._step_args` — the one calling contract of those three, and the per-step arguments;
* :mod:`hf_snr._nonfinite` — the non-finite decision (checks, device skips, skip and raise);
* :mod:`hf_snr._stats` — statistics (request, pending, finish); :mod:`hf_snr._microbatch` — micro-batch hooks;
* :mod:`hf_snr._checkpoint` — what a loaded state must satisfy, the resume rule; :mod:`hf_snr._distributed`.

This module holds the class: options, parameter groups, decay anchors, checkpoints, state init, the path
choice and the step, which reads as the algorithm.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import _foreach, _fused, _nonfinite, _reference, _stats
from ._agreement import AgreementFilter
from ._checkpoint import apply_resume_rule, check_loaded_state
from ._distributed import all_reduce, local, shard_group
from ._microbatch import MicrobatchGradients
from ._step_args import STATE_DTYPES, GroupTensors, StepArgs, ema_noise_scale  # noqa: F401  (ema_noise_scale: public)
from .fused_cpu import NonFiniteGradient
from .options import (
    DEFAULT_WARMUP_STEPS,
    DEFAULTS,
    GROUP_DEFAULTS,
    MASKS,
    NONFINITE_POLICIES,
    REDUCTIONS,
    _to_agreement,
    options_docstring,
    validate_hparams,
    validate_value,
)

logger = logging.getLogger("hf_snr")

__all__ = ["SNRAdamW", "MASKS", "REDUCTIONS", "NONFINITE_POLICIES", "DEFAULT_WARMUP_STEPS", "ema_noise_scale"]

D = DEFAULTS  # every default below comes from the one options table (hf_snr.options.OPTIONS)

_SPARSE_MSG = "SNRAdamW does not support sparse gradients (use dense gradients, e.g. nn.Embedding(sparse=False))"

_DOC = r"""AdamW whose step is gated, per coordinate, by a signal-to-noise test.

    For every scalar parameter the optimizer compares the squared (bias-corrected) mean gradient
    mu^2 with an estimate sigma^2 of the variance of the minibatch-mean gradient. Coordinates whose
    signal beats their noise get the ordinary AdamW step; the others are shrunk (``mask="snr"``,
    ``"soft"``) or frozen (``"hard"``). Cost: one extra fp32 state tensor per parameter (optimizer
    state is exactly 1.5x AdamW's); no extra forward or backward pass. The gate makes the step smaller
    than AdamW's at the same ``lr``: compare arms at their own tuned learning rates.

    Args:
        params: parameters or parameter groups. Every per-group option below may be set per group; a group
            with ``snr=False`` is plain AdamW (its variance EMA is still tracked for the statistics).
{options}
        process_group: the process group whose ranks hold *disjoint* shards of the parameters
            (DeepSpeed ZeRO's data-parallel group). Statistics are summed over it. Leave None under
            DDP (replicas: nothing to sum) and under FSDP2 (the shard group is read from DTensors).

    Loading a ``torch.optim.AdamW`` state dict (switching optimizers on resume) carries ``exp_avg``,
    ``exp_avg_sq`` and ``step`` over and starts ``exp_var`` fresh, with the gate open for its
    ``warmup_steps`` (a log line says so). Complex parameters are refused at construction.

    Statistics: call :meth:`request_stats` before a step; after it :attr:`last_stats` holds
    ``mask_mean``, ``active_fraction``, ``signal``, ``noise``, ``population_gain``, ``cumulative_noise``
    (a running sum of noise; between two requested steps noise is taken as constant at the later value)
    and ``skipped_steps``. They are reduced on device with a single host sync when ``last_stats`` is read
    (a collective under sharding: every rank reads it). ``mask_mean`` and ``active_fraction`` cover the
    gated coordinates that have had a gradient (v > 0), so ZeRO's zero padding and never-used rows do
    not count as closed gates. :attr:`skipped_steps` counts the steps skipped for a non-finite gradient.
    """


class SNRAdamW(Optimizer):
    __doc__ = _DOC.format(options=options_docstring())

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
        agreement: float | None = D["agreement"],
        agreement_scope: str = D["agreement_scope"],
        agreement_reference: str = D["agreement_reference"],
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
        if isinstance(agreement, str):
            try:
                agreement = _to_agreement(agreement)
            except ValueError:
                pass  # refused just below, with the accepted range
        agreement = validate_value("agreement", agreement)
        agreement_scope = validate_value("agreement_scope", agreement_scope)
        agreement_reference = validate_value("agreement_reference", agreement_reference)
        self._agree = AgreementFilter(agreement, agreement_scope, agreement_reference) \
            if agreement is not None else None
        self.process_group = process_group
        self.snr_state = {"steps": 0, "skipped_steps": 0, "consecutive_skips": 0, "cumulative_noise": 0.0,
                          "last_stats_step": 0}  # saved in state_dict
        self.last_step_skipped = False  # whether the latest step() call skipped its step (non-finite gradient)
        self._stats = _stats.Statistics()
        self._micro = MicrobatchGradients()
        self._device_skips = _nonfinite.DeviceSkips()
        self._anchors: dict[torch.Tensor, torch.Tensor] = {}  # decay_to="init": p -> tensor holding p0
        self._fused_fallback_warned = False
        super().__init__(params, defaults)

    # -- parameter groups -----------------------------------------------------------------------
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
                self._micro.watch(p)

    # Not carried by copy.deepcopy / pickle: hook handles (registered again on the copy's parameters) and process
    # groups (not copyable: set process_group / microbatch_group on the copy; a warning says so).
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups
        state.update({k: v for k, v in self.__dict__.items() if k not in state and k != "process_group"
                      and not k.startswith("_optimizer_")})  # (torch's hook dicts: re-created empty)
        state["_had_process_group"] = self.__dict__.get("process_group") is not None or \
            ("_micro" in self.__dict__ and self._micro.group not in ("auto", None)) or \
            (self.__dict__.get("_agree") is not None and self._agree.group not in ("auto", None))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        had_group = state.pop("_had_process_group", False)
        copying = "_micro" in state  # (torch's own load_state_dict calls __setstate__ on a live optimizer)
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():  # (not torch's "differentiable" default: it is not ours)
                group.setdefault(key, value)
        if not copying:
            return
        self.process_group = None
        for group in self.param_groups:  # a copy (deepcopy / unpickling): hooks on the copy's own parameters
            if group["variance"] == "microbatch":
                for p in group["params"]:
                    self._micro.watch(p)
        if had_group:
            warnings.warn("SNRAdamW: a copied or unpickled optimizer does not carry process groups; set "
                          "process_group / microbatch_group on the copy before stepping it in a distributed run",
                          RuntimeWarning, stacklevel=2)

    # -- decay anchors, micro-batch gradients ---------------------------------------------------
    def set_decay_anchors(self, anchors: dict[torch.Tensor, torch.Tensor]) -> None:
        """For ``decay_to="init"``: decay each parameter toward the given tensor instead of a copy of its
        first-step value (no extra memory). The tensor must have the parameter's (local) shape and must not
        change during training; a reference model's weights are the natural anchor for fine-tuning. Anchors
        are not saved in ``state_dict`` (set them again before resuming)."""
        known = {p for g in self.param_groups for p in g["params"]}
        for p, anchor in anchors.items():
            if p not in known:
                raise ValueError("set_decay_anchors: a tensor that is not a parameter of this optimizer")
            if local(anchor).shape != local(p).shape:
                raise ValueError(f"set_decay_anchors: anchor shape {tuple(local(anchor).shape)} != parameter "
                                 f"shape {tuple(local(p).shape)}")
            self._anchors[p] = anchor.detach()
            self.state[p].pop("param_init", None)

    @property
    def microbatch_group(self) -> Any:
        """variance="microbatch": the data-parallel group whose ranks' micro-batch gradients are pooled ("auto":
        the default group when torch.distributed runs and the parameters are not sharded; None: this process)."""
        return self._micro.group

    @microbatch_group.setter
    def microbatch_group(self, group: Any) -> None:
        self._micro.group = group

    @property
    def last_microbatch_count(self) -> int | None:
        """K of the latest variance="microbatch" step (micro-batches x data-parallel ranks)."""
        return self._micro.last_count

    # -- micro-batch gradient agreement ---------------------------------------------------------
    @property
    def agreement(self) -> float | None:
        """The agreement filter's cosine threshold (None: off)."""
        return None if self._agree is None else self._agree.threshold

    def end_microbatch(self, *, flipped: Any = None, synced: bool | None = None) -> float:
        """agreement=<threshold>: call after each backward pass (the Trainer integration does). Decides whether the
        micro-batch whose gradient the backward just added is kept, and leaves ``p.grad`` = the mean of the kept
        micro-batch gradients so far. Returns the share kept (1.0 / 0.0; per tensor with agreement_scope="tensor").

        ``flipped``: optional per-example flags (True: a swapped label) of this rank's micro-batch, counted in
        :meth:`agreement_stats`. ``synced=True``: the backend already averaged this micro-batch's gradient over
        the data-parallel ranks (saves one all-reduce under DDP); None: not known.
        """
        if self._agree is None:
            raise RuntimeError("end_microbatch() needs SNRAdamW(agreement=<threshold>); agreement is off")
        params = self._all_params()
        momentum = None
        if self._agree.reference == "momentum":  # the first moment of every parameter with a gradient, once it exists
            states = [self.state.get(p, {}) for p in params if p.grad is not None]
            if states and all("exp_avg" in st for st in states):
                momentum = {p: self.state[p]["exp_avg"] for p in params if p.grad is not None}
        return self._agree.end_microbatch(params, flipped=flipped, synced=synced, momentum=momentum)

    def agreement_stats(self, reset: bool = True) -> dict[str, float]:
        """The agreement filter's shares since the last read (see :meth:`AgreementFilter.read`); {} when off."""
        return {} if self._agree is None else self._agree.read(reset)

    @property
    def agreement_group(self) -> Any:
        """The data-parallel group over which micro-batch gradients are averaged before the agreement test ("auto":
        the default group when torch.distributed runs and the parameters are not sharded; None: local)."""
        return None if self._agree is None else self._agree.group

    @agreement_group.setter
    def agreement_group(self, group: Any) -> None:
        if self._agree is not None:
            self._agree.group = group

    # -- statistics -----------------------------------------------------------------------------
    def request_stats(self) -> None:
        """Compute risk statistics during the next optimizer step (read them from :attr:`last_stats`).

        "The next step" is the next logical step: when a wrapper calls :meth:`step` once per
        parameter group for one training step (DeepSpeed ZeRO), every call of that step contributes.
        """
        self._stats.requested = True

    @property
    def last_stats(self) -> dict[str, float]:
        """The statistics of the latest requested step ({} before the first, and after a requested step that was
        skipped, until a later requested step is taken).

        Reading finalizes them: one all-reduce over the statistics group (when sharded) and one
        host sync. Under sharding every rank must read it (it is a collective), as the Trainer
        integration does at each logging step.
        """
        self._finish_pending()
        return self._stats.last

    def _finish_pending(self) -> None:
        """Finish the pending statistics sums, if any (the all-reduce and the host sync of :attr:`last_stats`)."""
        st = self._stats
        if st.pending is not None:
            pending, st.pending = st.pending, None
            st.last = _stats.finish(pending, st.step, group=self._stats_group(), snr_state=self.snr_state,
                                    read_device_skips=self._read_device_skips)

    @last_stats.setter
    def last_stats(self, value: dict[str, float]) -> None:
        self._stats.pending = None
        self._stats.last = dict(value)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for a non-finite gradient (device skips folded in: a host sync if any)."""
        self._read_device_skips()
        return int(self.snr_state["skipped_steps"])

    def _stats_group(self):
        """The group statistics (and the non-finite flag) are summed over: the ranks holding disjoint shards."""
        if self.process_group is not None:
            return self.process_group
        for group in self.param_groups:
            for p in group["params"]:
                pg = shard_group(p)
                if pg is not None:
                    return pg
        return None

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._finish_pending()  # fold pending statistics into snr_state (cumulative noise) before saving
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
        check_loaded_state(saved_groups, saved_state, self.param_groups)
        apply_resume_rule(saved_groups, self.param_groups, foreign, alpha_auto=getattr(self, "alpha_auto", False))
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
                want = STATE_DTYPES[group["state_dtype"]]  # this run's state_dtype (the resume rule)
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

    # -- the step -------------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], create: bool = True) -> GroupTensors | None:
        """Lazily create state for the tensors now in the group (FSDP2/ZeRO re-point params).

        create=False: gather the lists only if every tensor with a gradient has its state already; return
        None at the first one that has none, creating none for it (the non-finite check must come before a
        tensor's first state is created).
        """
        t = GroupTensors()
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
                state["exp_var"] = torch.zeros_like(p, dtype=STATE_DTYPES[group["state_dtype"]],
                                                    memory_format=torch.preserve_format)
            anchor = None
            if anchored:
                anchor = self._anchors.get(p)
                if anchor is None:
                    if "param_init" not in state:  # p0: the value at the first step this tensor takes
                        state["param_init"] = p.detach().to(torch.float32, copy=True)
                    anchor = state["param_init"]
            t.params.append(p)
            t.grads.append(p.grad)
            t.exp_avgs.append(state["exp_avg"])
            t.exp_avg_sqs.append(state["exp_avg_sq"])
            t.exp_vars.append(state["exp_var"])
            t.steps.append(state["step"])
            t.states.append(state)
            start = state.get("exp_var_start")
            t.var_starts.append(0.0 if start is None else float(start))
            t.anchors.append(anchor)
            t.mb_sqs.append(self._micro.buffer(p) if microbatch else None)
        return t


    def _path(self, group: dict[str, Any], t: GroupTensors):
        """The implementation for this group's tensors: fused where the kernel can run them, else foreach (where
        torch supports it) or the reference step; a fused=True that cannot run warns once."""
        if group["fused"]:
            reason = _fused.unavailable(t)
            if reason is None:
                return _fused
            if not self._fused_fallback_warned:
                warnings.warn(f"SNRAdamW(fused=True) runs the foreach path instead: {reason}", RuntimeWarning,
                              stacklevel=3)
                self._fused_fallback_warned = True
            return _foreach
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in t.params)
        return _foreach if foreach else _reference

    def _prepare(self, create: bool = True):
        """[(args, tensors, path)] of every group with gradients; create=False: None when a tensor has no state
        yet (gathered without writing anything, so the non-finite check can still come first)."""
        prepared = []
        for group in self.param_groups:
            t = self._init_group(group, create=create)
            if t is None:
                return None
            if t.params:
                prepared.append((StepArgs.from_group(group), t, self._path(group, t)))
        return prepared

    def _decide_nonfinite(self):
        """(prepared or None, found_inf, check) of this step, or None when it is skipped (nothing was written)."""
        if self.nonfinite == "propagate":
            return None, None, None
        if self.nonfinite == "skip" and _nonfinite.all_fused_on_cuda(self.param_groups):
            # decided on the device (as torch's fused optimizers do with found_inf): the kernels read the flag and
            # leave parameters and m, v, s untouched; the count is read with the statistics, no host sync per step
            flag = _nonfinite.device_found_inf(self.param_groups, self._stats_group())
            self._device_skips.add(flag)
            return None, flag, None
        prepared = self._prepare(create=False)
        group = self._stats_group()
        check = _nonfinite.kernel_check(prepared, group is not None, _fused)  # folded into the first kernel call
        if check is None and not _nonfinite.all_finite(self.param_groups, group):
            return None
        return prepared, None, check

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # before the non-finite check, which cannot read sparse tensors
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(_SPARSE_MSG)
        if self._agree is not None:  # the accumulation is over: p.grad holds the mean of the kept micro-batches
            self._agree.finish_step()

        decision = self._decide_nonfinite()
        if decision is None:
            return self._skip(loss)
        prepared, found_inf, check = decision
        prepared = prepared if prepared is not None else self._prepare()
        check = [check] if check is not None else None  # popped by the first kernel call, which reads it
        before = self._stats.snapshot()
        phases = []
        try:
            # Phase 1: the moments of every group (and, for row / tensor gates, the sums of mu^2 and sigma^2).
            for args, t, path in prepared:
                mb = self._micro.scales(t.params, self._all_params()) if args.variance == "microbatch" else None
                phases.append(path.moments(t, args=args, mb=mb, found_inf=found_inf, check=check))
            # The logical step this call belongs to: the step count its tensors just reached.
            step_now = max((int(x.item()) for _, t, _ in prepared for x in t.steps), default=self.snr_state["steps"])
            want_stats = self._stats.begin(step_now, self._finish_pending)
            self._all_reduce_sums(prepared, phases)
            # Phase 2: the gate and the parameter update (plus, when requested, this call's statistics sums).
            for (args, t, path), phase in zip(prepared, phases):
                self._stats.add(path.update(t, phase, args=args, want_stats=want_stats, check=check))
        except NonFiniteGradient:
            # the first kernel call found a non-finite gradient and wrote nothing: undo the step counts the groups
            # before it took (a group's own moments undid its count) and the statistics request
            for (_, t, _), _ in zip(prepared, phases):
                torch._foreach_sub_(t.steps, 1.0)
            self._stats.restore(before)
            return self._skip(loss)

        self.snr_state["steps"] = max(self.snr_state["steps"], step_now)
        if found_inf is None:  # (on the device path the skip is known only when the counters are read)
            self.snr_state["consecutive_skips"] = 0
            self.last_step_skipped = False
        return loss

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _all_reduce_sums(self, prepared, phases) -> None:
        """One batched all-reduce of the per-tensor sums of every sharded tensor (reduction="tensor", and the 1-D
        tensors of reduction="row"); row sums of matrices are local: FSDP2 shards whole rows."""
        sharded = [(i, j) for i, ((args, t, _), ph) in enumerate(zip(prepared, phases)) if ph.sums is not None
                   for j, p in enumerate(t.params)
                   if (args.reduction == "tensor" or p.dim() < 2)  # one gate over the whole tensor
                   and (shard_group(p) is not None or self.process_group is not None)]
        if sharded:
            flat = torch.stack([phases[i].sums[j] for i, j in sharded])  # (n, 2)
            flat = all_reduce(flat, self._stats_group())
            for k, (i, j) in enumerate(sharded):
                phases[i].sums[j] = flat[k]

    def _skip(self, loss):
        """A step with a non-finite gradient, nothing updated: raise (nonfinite="raise") or count and warn."""
        _nonfinite.count_skip(self.snr_state, self.nonfinite, self.max_consecutive_skips)
        self.last_step_skipped = True
        self._micro.reset()  # the skipped step's micro-batches do not count toward the next
        if self._stats.requested:
            # the statistics asked for this step do not exist: no stale values in its log row. The request carries
            # over to the next step that is taken.
            self._finish_pending()  # (an older requested step first)
            self._stats.last = {}
        return loss

    def _read_device_skips(self) -> int:
        """Fold the steps skipped on the device (CUDA fused) since the last read into the host counts.

        Returns how many logical steps were skipped. A host sync when the device decided any step.
        """
        taken = self._device_skips.take()
        if taken is None:
            return 0
        skipped = _nonfinite.fold_device_skips(self.snr_state, taken, self.state.values(), self.max_consecutive_skips)
        if taken[0]:
            self.last_step_skipped = taken[2] > 0
        if skipped and self._stats.step is not None:
            self._stats.step -= skipped
        return skipped
