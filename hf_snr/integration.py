"""SNRAdamW inside transformers' Trainer: the public factory, the risk-logging callback, the guards.

Public, internals-free route::

    trainer = Trainer(..., optimizer_cls_and_kwargs=snr_optimizer_cls_and_kwargs(args, "mask=soft"))

By-name route (``optim="snr_adamw"``): see :mod:`hf_snr.registration`, which routes to the same
factory. Either way, once the Trainer has built an SNRAdamW, :class:`SNRCallback` is attached: it
resolves ``alpha=auto``, requests the optimizer's statistics on logging steps only, writes the
``snr/*`` metrics into the Trainer's own log (so log_history and every reporter see them) and
refuses to train if a backend replaced the optimizer.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .checks import check_args, check_deepspeed_config
from .optimizer import SNRAdamW
from .options import SNROptions, finite_data_alpha, parse_optim_args

logger = logging.getLogger("hf_snr")

__all__ = [
    "snr_optimizer_cls_and_kwargs",
    "SNRAdamWFactory",
    "SNRCallback",
    "attach_snr",
    "unwrap_optimizer",
    "deepspeed_partition_group",
    "check_deepspeed_config",
    "SNR_METRICS",
]

# What lands in the log on every logging step, and what it means (the README's metrics table says the same).
# No population-risk estimate is logged: the specified one (training loss + running sum of the per-step noise) ranked
# against the held-out loss on both recipes (grokking -0.93, DPO -0.99; README "Risk metrics"). The per-step terms
# stay, named for what they are.
SNR_METRICS = {
    "snr/mask_mean": "mean gate q over gated coordinates that have had a gradient (1 = plain AdamW, 0 = frozen)",
    "snr/active_fraction": "share of those coordinates with q > 1/2 (signal beats noise)",
    "snr/signal": "sum_k u_k mu_k^2: first-order drop of the training loss along this step",
    "snr/memorization_rate": "alpha sum_k u_k sigma_k^2: the part of that drop that is noise, per step (a diagnostic, "
                             "not a population-risk estimate)",
    "snr/signal_minus_noise": "signal - memorization_rate, per step",
    "snr/noise_to_signal": "memorization_rate / signal: the noise share of the step's first-order loss drop (the "
                           "learning rate cancels, so it is comparable across a schedule)",
}


def unwrap_optimizer(optimizer: Any) -> Any:
    """Follow .optimizer links (AcceleratedOptimizer, DeepSpeed wrappers) down to the real optimizer."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def deepspeed_partition_group(optimizer: Any, real: Any) -> Any:
    """The process group over which DeepSpeed partitions ``real``'s parameters, or None.

    Walks the wrapper chain (accelerate's DeepSpeedOptimizerWrapper -> DeepSpeed's ZeRO / BF16
    optimizer -> ``real``) and returns the ``dp_process_group`` of the wrapper that steps ``real``
    on flat partitions. That is the group ZeRO-1/2/3 (and the bf16 optimizer) really partition
    over, also with sequence parallelism (where it is data x sequence parallel and
    ``deepspeed.utils.groups._get_data_parallel_group()`` is None). None when nothing partitions
    the parameters (ZeRO stage 0 in fp32/fp16: every rank holds a full replica, and summing
    statistics over ranks would multiply them by the world size).
    """
    seen = set()
    opt = optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None)
        if inner is real:
            return getattr(opt, "dp_process_group", None)
        opt = inner
    return None


def _decay_parameter_names(model: torch.nn.Module) -> set[str]:
    # The Trainer's own rule (bias and norm weights get no decay); it does not use `self`.
    return set(Trainer.get_decay_parameter_names(None, model))


class SNRAdamWFactory:
    """transformers' optimizer-factory protocol: ``SNRAdamWFactory()(model, **kwargs)``.

    Builds the Trainer's decay / no-decay groups from the model, and with ``exclude=regex`` moves the
    matching parameters to groups with ``snr=False`` (plain AdamW). Used when the groups depend on
    parameter names; otherwise the plain class is returned and the Trainer builds the groups.
    """

    def __call__(self, model: torch.nn.Module, *, exclude: str | None = None, weight_decay: float = 0.0,
                 alpha_auto: bool = False, **kwargs: Any) -> SNRAdamW:
        pattern = re.compile(exclude) if exclude else None
        decay = _decay_parameter_names(model)
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        excluded_names = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            gated = not (pattern and pattern.search(name))
            if not gated:
                excluded_names.append(name)
            groups.setdefault((name in decay, gated), []).append(p)
        if pattern is not None and not excluded_names:
            raise ValueError(f"exclude={exclude!r} matches no trainable parameter of {type(model).__name__}")
        if excluded_names:
            logger.info("hf_snr: %d parameter tensors use plain AdamW (exclude=%r), e.g. %s",
                        len(excluded_names), exclude, excluded_names[:3])
        param_groups = [
            {"params": ps, "weight_decay": weight_decay if is_decay else 0.0, "snr": gated}
            for (is_decay, gated), ps in groups.items()
        ]
        opt = SNRAdamW(param_groups, **kwargs)
        opt.alpha_auto = alpha_auto
        return opt


def snr_optimizer_cls_and_kwargs(
    args: TrainingArguments | None = None,
    options: str | dict[str, Any] | SNROptions | None = None,
    **overrides: Any,
) -> tuple[Any, dict[str, Any]]:
    """``(cls_or_factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    lr, betas and eps come from ``args`` (learning_rate, adam_beta1/2, adam_epsilon) like the Trainer's
    AdamW; weight_decay too (per decay / no-decay group). ``options`` are the SNR knobs, as an
    ``optim_args``-style string, a dict or :class:`SNROptions`; ``overrides`` are extra keywords.
    The result validates now, not at the first step.
    """
    base_keys = {"lr", "betas", "eps", "weight_decay"}
    opts = parse_optim_args(options)  # an SNROptions passes through; a string is parsed once (cached)
    snr_overrides = {k: v for k, v in overrides.items() if k not in base_keys}
    if snr_overrides:
        opts = parse_optim_args({**opts.as_dict(), **snr_overrides})
    overrides = {k: v for k, v in overrides.items() if k in base_keys}
    kwargs: dict[str, Any] = opts.optimizer_kwargs()
    if args is not None:
        kwargs.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(overrides)
    if args is not None:
        # The explicit route never passes TrainingArguments.__post_init__'s checks for optim="snr_adamw":
        # refuse here a DeepSpeed config that would never build (or would swap out) this optimizer.
        check_args(args, opts)
    alpha_auto = opts.alpha == "auto"
    if opts.exclude is not None or alpha_auto:
        kwargs.update(exclude=opts.exclude, alpha_auto=alpha_auto)
        if args is not None:
            kwargs.setdefault("weight_decay", args.weight_decay)
        return SNRAdamWFactory, kwargs
    return SNRAdamW, kwargs


class SNRCallback(TrainerCallback):
    """Attached to a Trainer whose optimizer is SNRAdamW (done automatically; see :func:`attach_snr`).

    - at train start: checks that SNRAdamW is really the optimizer that steps (DeepSpeed may swap
      it), resolves ``alpha=auto`` from the data set size, effective batch and epochs, logs it once;
      under DeepSpeed ZeRO hands the optimizer the data-parallel group so statistics are global;
    - before a step that will be logged: asks the optimizer for statistics (computed on device,
      one host sync, only on those steps);
    - at log time (through the Trainer's own ``log``): adds the ``snr/*`` metrics, and
      ``snr/skipped_steps`` (steps skipped for a non-finite gradient) at every training log and in the
      end-of-training summary whenever it is > 0.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._alpha_note: float | None = None
        self._updates_per_epoch: int | None = None  # optimizer steps per pass over the dataloader
        self._stats_step: int | None = None  # global step whose statistics were requested last
        self._warned_stale = False

    # -- helpers --------------------------------------------------------------------------------
    def optimizer(self) -> SNRAdamW | None:
        opt = unwrap_optimizer(self.trainer.optimizer)
        return opt if isinstance(opt, SNRAdamW) else None

    def _will_log(self, args: TrainingArguments, state, step: int) -> bool:
        """Whether the Trainer will log at the end of optimizer step ``step`` (DefaultFlowCallback's rule)."""
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if step == 1 and args.logging_first_step:
            return True
        if strategy == "steps":
            every = state.logging_steps or args.logging_steps
            return every > 0 and step % int(every) == 0
        if strategy == "epoch":
            # logged at on_epoch_end: after the last step of every pass, and when max_steps ends a pass early
            per_epoch = self._updates_per_epoch or state.max_steps
            return (per_epoch and step % per_epoch == 0) or step == state.max_steps
        return False

    # -- events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        real = unwrap_optimizer(self.trainer.optimizer)
        if not isinstance(real, SNRAdamW):
            raise RuntimeError(
                f"hf_snr: SNRAdamW was built, but the optimizer that will step is {type(real).__name__}: a backend "
                "replaced it (DeepSpeed with an \"optimizer\" section, or ZeRO offload without "
                "\"zero_force_ds_cpu_optimizer\": false). Fix the DeepSpeed config; refusing to train silently with "
                "another optimizer."
            )
        self._set_process_group(real)
        self._check_agreement(real, args)
        self._updates_per_epoch = self._steps_per_epoch(args, kwargs.get("train_dataloader"))
        if getattr(real, "alpha_auto", False):
            alpha, reason = self._auto_alpha(args, state)
            for group in real.param_groups:
                group["alpha"] = alpha
            real.defaults["alpha"] = alpha
            self._alpha_note = alpha
            logger.warning("hf_snr: alpha=auto -> %.6g (%s)", alpha, reason)
        return control

    def _check_agreement(self, opt: SNRAdamW, args) -> None:
        """agreement=<threshold>: the backend must expose each micro-batch's gradient (checked again here: the
        launcher, not the arguments, may have chosen the backend)."""
        if opt.agreement is None:
            return
        from .checks import check_agreement

        acc = getattr(self.trainer, "accelerator", None)
        kind = str(getattr(getattr(acc, "distributed_type", None), "value", "")) if acc is not None else ""
        backend = "DeepSpeed" if kind == "DEEPSPEED" else "FSDP" if kind == "FSDP" else None
        sync_each = bool(acc.gradient_state.plugin_kwargs.get("sync_each_batch", False)) if acc is not None else False
        check_agreement(agreement=opt.agreement, grad_accum=args.gradient_accumulation_steps, backend=backend,
                        sync_each_batch=sync_each)

    def _set_process_group(self, opt: SNRAdamW) -> None:
        acc = getattr(self.trainer, "accelerator", None)
        if acc is None or opt.process_group is not None:
            return
        if getattr(acc.state, "deepspeed_plugin", None) is not None and acc.num_processes > 1:
            # the group ZeRO partitions over (None under stage 0: replicas, nothing to sum)
            opt.process_group = deepspeed_partition_group(self.trainer.optimizer, opt)

    @staticmethod
    def _steps_per_epoch(args, dataloader) -> int | None:
        """Optimizer steps per pass over the (per-rank) dataloader, as the Trainer counts them."""
        try:
            batches = len(dataloader)
        except TypeError:
            return None
        ga = max(1, args.gradient_accumulation_steps)
        return max(1, math.ceil(batches / ga))

    def _auto_alpha(self, args, state) -> tuple[float, str]:
        """alpha for 'auto' from the data set size n, the effective batch b and the number of passes."""
        dataset = self.trainer.train_dataset
        try:
            n = len(dataset)
        except TypeError:  # IterableDataset: every batch is a fresh draw
            n = None
        b = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        if n is None:
            epochs = 1.0
        elif state.max_steps and state.max_steps > 0:
            # passes over the data: optimizer steps / steps per pass (a short last batch still ends a pass)
            per_epoch = self._updates_per_epoch or max(1, math.ceil(n / b))
            epochs = state.max_steps / per_epoch
        else:
            epochs = float(args.num_train_epochs)
        return finite_data_alpha(n, b, epochs)

    def on_step_begin(self, args, state, control, **kwargs):
        opt = self.optimizer()
        if opt is not None and self._will_log(args, state, state.global_step + 1):
            opt.request_stats()
            self._stats_step = state.global_step + 1
        return control

    def skip_metrics(self) -> dict[str, int]:
        """``{"snr/skipped_steps": n}`` when the optimizer has skipped n > 0 steps (non-finite gradient), else {}.

        Read from the optimizer's own counter (device skips folded in), not from its latest statistics: the count
        is current at every log, including a log at a skipped step and the end-of-training summary.
        """
        opt = self.optimizer()
        skipped = int(opt.skipped_steps) if opt is not None else 0
        return {"snr/skipped_steps": skipped} if skipped > 0 else {}

    def metrics(self, loss: float | None) -> dict[str, float]:
        """The snr/* metrics for a log at the current step.

        ``snr/skipped_steps`` whenever the optimizer has skipped steps; the statistics (``snr/signal`` ...) only
        when they are this step's: none before the first statistics, and none at a step the optimizer skipped
        (its statistics were not computed; the request carries over to the next step taken).
        """
        opt = self.optimizer()
        if opt is None:
            return {}
        out: dict[str, float] = {}
        s = {} if opt.last_step_skipped else opt.last_stats
        if s:
            step = self.trainer.state.global_step
            if self._stats_step != step and not self._warned_stale:
                # the Trainer logs at a step the callback did not foresee (e.g. a callback set should_log)
                logger.warning(
                    "hf_snr: logging at step %d, but SNR statistics were last requested for step %s; the snr/* "
                    "values logged now are the latest available, not this step's.", step, self._stats_step)
                self._warned_stale = True
            out.update({
                "snr/mask_mean": s["mask_mean"],
                "snr/active_fraction": s["active_fraction"],
                "snr/signal": s["signal"],
                "snr/memorization_rate": s["noise"],
                "snr/signal_minus_noise": s["population_gain"],
            })
            if "noise_to_signal" in s:  # (absent when the step moved nothing: signal 0)
                out["snr/noise_to_signal"] = s["noise_to_signal"]
        out.update(self.skip_metrics())
        # the agreement filter's shares since the previous log (its first micro-batch of each step included)
        out.update({f"snr/agreement_{k}": v for k, v in opt.agreement_stats().items()})
        if out and self._alpha_note is not None:
            out["snr/alpha"] = self._alpha_note
            self._alpha_note = None
        return out


def attach_snr(trainer: Trainer) -> SNRCallback:
    """Attach :class:`SNRCallback` to ``trainer`` once and route its metrics through ``trainer.log``.

    Idempotent. The Trainer's ``log`` is wrapped on the instance: editing ``logs`` in a callback's
    ``on_log`` would reach neither ``log_history`` nor the reporters (they run before user callbacks).
    """
    existing = getattr(trainer, "_snr_callback", None)
    if existing is not None:
        return existing
    callback = SNRCallback(trainer)
    trainer.add_callback(callback)
    trainer._snr_callback = callback
    original_log = trainer.log

    def log(logs: dict[str, float], *a: Any, **kw: Any) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(callback.metrics(logs.get("loss")))
        elif "train_runtime" in logs:  # the end-of-training summary: a skip on the last steps must show somewhere
            logs.update(callback.skip_metrics())
        return original_log(logs, *a, **kw)

    trainer.log = log
    original_training_step = trainer.training_step

    def training_step(model, inputs, *a: Any, **kw: Any):
        # agreement=<threshold>: decide each micro-batch right after its backward, before clipping and the step
        column = getattr(trainer, "flipped_column", None)
        flipped = inputs.get(column) if column and isinstance(inputs, dict) else None
        flipped = flipped.detach().cpu() if isinstance(flipped, torch.Tensor) else flipped
        loss = original_training_step(model, inputs, *a, **kw)
        opt = callback.optimizer()
        if opt is not None and opt.agreement is not None:
            acc = trainer.accelerator
            synced = bool(acc.sync_gradients or acc.gradient_state.plugin_kwargs.get("sync_each_batch", False))
            opt.end_microbatch(flipped=flipped, synced=synced)
        return loss

    trainer.training_step = training_step
    return callback
