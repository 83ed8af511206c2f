"""Checks of the training arguments for optim="snr_adamw" that can run when the arguments are built.

DeepSpeed configurations under which DeepSpeed or accelerate would silently swap SNRAdamW out, and
options that cannot work on a backend. Imports neither torch nor transformers: the wrapped
``TrainingArguments.__post_init__`` (see :mod:`hf_snr.registration`) calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import SNROptions

if TYPE_CHECKING:  # annotations only: this module must not import transformers at import time
    from transformers import TrainingArguments


def check_deepspeed_config(config: dict[str, Any] | None) -> None:
    """Refuse DeepSpeed configs under which DeepSpeed or accelerate would silently swap SNRAdamW out."""
    if not config:
        return
    if "optimizer" in config:
        raise ValueError(
            "optim='snr_adamw' with a DeepSpeed config that has an \"optimizer\" section: DeepSpeed would build "
            f"its own {config['optimizer'].get('type', '?')} optimizer and SNRAdamW would never run. "
            "Remove the \"optimizer\" section from the DeepSpeed JSON (keep \"zero_optimization\"); the Trainer "
            "then hands SNRAdamW to DeepSpeed as a client optimizer."
        )
    zero = config.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f"optim='snr_adamw' with ZeRO optimizer offload (device={offload!r}): accelerate would silently replace "
            "SNRAdamW with DeepSpeedCPUAdam. Add \"zero_force_ds_cpu_optimizer\": false to the DeepSpeed JSON to keep "
            "SNRAdamW (its step then runs in PyTorch on the CPU copy), or turn offload_optimizer off."
        )


def _deepspeed_config_of(args: TrainingArguments) -> dict[str, Any] | None:
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is not None:
        return hf_ds.config
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        cfg = getattr(plugin, "deepspeed_config", None)
        if isinstance(cfg, dict):
            return cfg
    return None


def _uses_fsdp(args: TrainingArguments) -> bool:
    import os

    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _sync_each_batch(args: TrainingArguments) -> bool:
    cfg = getattr(args, "accelerator_config", None)
    kwargs = cfg.get("gradient_accumulation_kwargs") if isinstance(cfg, dict) else \
        getattr(cfg, "gradient_accumulation_kwargs", None)
    return bool((kwargs or {}).get("sync_each_batch", False))


AGREEMENT_FSDP_FIX = (
    "FSDP2 under gradient accumulation keeps the non-final micro-batches' gradients unsharded and unreduced "
    "(no_sync), so no rank sees a micro-batch's whole gradient. Set "
    "accelerator_config={'gradient_accumulation_kwargs': {'sync_each_batch': True}} (each micro-batch is then "
    "reduce-scattered into the sharded gradient, and the agreement test costs three scalars of all-reduce)."
)
AGREEMENT_DEEPSPEED = (
    "DeepSpeed accumulates micro-batch gradients in its own partition buffers and hands the optimizer only the "
    "sum at the accumulation boundary: no micro-batch gradient reaches it. Use DDP or FSDP2."
)


def check_agreement(*, agreement: float | None, grad_accum: int, backend: str | None, sync_each_batch: bool) -> None:
    """agreement=<threshold> needs k >= 2 micro-batches per step and a backend that exposes their gradients."""
    if agreement is None:
        return
    if backend == "DeepSpeed":
        raise ValueError(f"optim_args agreement={agreement:g} cannot run under DeepSpeed: " + AGREEMENT_DEEPSPEED)
    if grad_accum < 2:
        raise ValueError(
            f"optim_args agreement={agreement:g} needs gradient_accumulation_steps >= 2, got {grad_accum}: it compares "
            "the gradients of the micro-batches of one optimizer step (a micro-batch is the j-th backward pass of "
            "all data-parallel ranks together, so ranks do not add micro-batches). Split the batch, e.g. "
            "per_device_train_batch_size=1 with gradient_accumulation_steps=8."
        )
    if backend == "FSDP" and not sync_each_batch:
        raise ValueError(f"optim_args agreement={agreement:g} under FSDP: " + AGREEMENT_FSDP_FIX)


def check_args(args: TrainingArguments, options: SNROptions) -> None:
    """Checks that can run when the arguments are built: DeepSpeed swaps, flat-partition and backend limits."""
    ds = _deepspeed_config_of(args)
    check_agreement(agreement=options.agreement, grad_accum=args.gradient_accumulation_steps,
                    backend="DeepSpeed" if ds is not None else "FSDP" if _uses_fsdp(args) else None,
                    sync_each_batch=_sync_each_batch(args))
    if options.variance == "microbatch":
        backend = "DeepSpeed" if ds is not None else "FSDP" if _uses_fsdp(args) else None
        if backend:
            raise ValueError(
                f"optim_args variance='microbatch' cannot run under {backend}: it reads each micro-batch's gradient "
                "with hooks on the parameters, and the backend accumulates and reduces gradients in its own buffers "
                "(the hooks never see them). Use variance='ema', or DDP / a single process."
            )
        k = args.gradient_accumulation_steps * max(1, args.world_size)
        if k < 2:
            raise ValueError(
                f"optim_args variance='microbatch' needs k >= 2 micro-batches per optimizer step, got "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps} x world_size={args.world_size} = {k}. "
                "Set gradient_accumulation_steps >= 2 (or launch several data-parallel processes)."
            )
    if ds is None:
        return
    check_deepspeed_config(ds)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if options.reduction in ("tensor", "row") and stage in (1, 2, 3):
        raise ValueError(
            f"optim_args reduction={options.reduction!r} cannot run under DeepSpeed ZeRO stage {stage}: the optimizer "
            "sees flat partitions that mix slices of many tensors. Use reduction='element' (exact under ZeRO) or FSDP2."
        )
