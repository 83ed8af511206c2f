"""Make ``optim="snr_adamw"`` a name transformers accepts. The only module that touches internals.

transformers has no public registry for optimizer names: ``OptimizerNames`` is a closed enum that
``TrainingArguments.__post_init__`` (and ``HfArgumentParser``'s ``choices``) validate against, and
the name -> optimizer table ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` is private.
:func:`register` therefore

1. adds a ``snr_adamw`` member to ``OptimizerNames`` (so TrainingArguments, DPOConfig, SFTConfig,
   any subclass, HfArgumentParser and TrlParser accept it, and training_args.bin pickles it);
2. maps it to a handler in ``_OPTIMIZER_HANDLERS`` that returns our public factory's result;
3. wraps ``TrainingArguments.__post_init__`` so ``optim_args`` and the DeepSpeed config are
   validated when the arguments are built (an unknown key or bad value fails there);
4. wraps ``Trainer.create_optimizer`` (and ``create_scheduler``, which every path calls after it,
   also for subclasses that override ``create_optimizer`` without ``super()``) so that any Trainer
   that ends up with an SNRAdamW (by name, through ``optimizer_cls_and_kwargs`` or ``optimizers=``)
   gets :class:`hf_snr.integration.SNRCallback`;
5. wraps ``TrainingArguments.set_optimizer`` so that ``args.set_optimizer("snr_adamw", args=...)``
   validates like the constructor.

It is idempotent, guarded by the supported transformers range, and raises
:class:`SNRRegistrationError` (never a silent fallback to AdamW) if those internals change.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from packaging.version import Version

from .integration import attach_snr, check_args, snr_optimizer_cls_and_kwargs, unwrap_optimizer
from .optimizer import SNRAdamW
from .options import SNR_OPTIM_NAME, parse_optim_args

SUPPORTED_TRANSFORMERS = (Version("5.0.0"), Version("6.0.0"))  # [min, max)

_registered = False


class SNRRegistrationError(RuntimeError):
    """transformers' internals no longer look as hf_snr expects; optim='snr_adamw' is unavailable."""


def _fail(what: str) -> None:
    raise SNRRegistrationError(
        f"hf_snr cannot register optim='{SNR_OPTIM_NAME}' with transformers {transformers.__version__}: {what}. "
        "The explicit route still works: Trainer(..., optimizer_cls_and_kwargs="
        "hf_snr.snr_optimizer_cls_and_kwargs(args, 'mask=snr')). Please report this with your transformers version."
    )


def _handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """transformers' handler protocol: OptimizerContext -> (class or factory, kwargs)."""
    args = ctx.args
    options = parse_optim_args(args.optim_args)
    cls, kwargs = snr_optimizer_cls_and_kwargs(args, options)
    return cls, kwargs


def _enum_member(OptimizerNames: Any) -> Any:
    existing = OptimizerNames._value2member_map_.get(SNR_OPTIM_NAME)
    if existing is not None:
        return existing
    member = str.__new__(OptimizerNames, SNR_OPTIM_NAME)
    member._name_ = "SNR_ADAMW"
    member._value_ = SNR_OPTIM_NAME
    member.__objclass__ = OptimizerNames
    member.__init__(SNR_OPTIM_NAME)
    member._sort_order_ = len(OptimizerNames._member_names_)  # Python >= 3.12 Enum reads it
    OptimizerNames._member_map_["SNR_ADAMW"] = member
    OptimizerNames._value2member_map_[SNR_OPTIM_NAME] = member
    OptimizerNames._member_names_.append("SNR_ADAMW")
    return member


def register() -> None:
    """Register ``optim="snr_adamw"`` with transformers (idempotent). Called by ``import hf_snr``."""
    global _registered
    if _registered:
        return
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= Version(version.base_version) < high):
        _fail(f"supported versions are >={low},<{high}")
    try:
        from transformers import trainer_optimizer
        from transformers.trainer import Trainer
        from transformers.training_args import OptimizerNames, TrainingArguments
    except ImportError as err:  # pragma: no cover - depends on the installed transformers
        _fail(f"an internal module moved ({err})")
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        _fail("transformers.trainer_optimizer._OPTIMIZER_HANDLERS (the name -> optimizer table) is gone")
    for attr in ("_value2member_map_", "_member_map_", "_member_names_"):
        if attr not in vars(OptimizerNames):  # its own, not the one inherited from Enum
            _fail(f"OptimizerNames has no {attr} (enum internals changed)")
    for attr in ("create_optimizer", "create_scheduler"):
        if not callable(getattr(Trainer, attr, None)):
            _fail(f"Trainer.{attr} is gone")
    if not callable(getattr(TrainingArguments, "set_optimizer", None)):
        _fail("TrainingArguments.set_optimizer is gone")

    member = _enum_member(OptimizerNames)
    if OptimizerNames(SNR_OPTIM_NAME) is not member:
        _fail("OptimizerNames did not accept the new member")
    handlers[member] = _handler

    if not getattr(TrainingArguments.__post_init__, "_hf_snr", False):
        original_post_init = TrainingArguments.__post_init__

        @functools.wraps(original_post_init)
        def __post_init__(self, *a: Any, **kw: Any) -> None:
            original_post_init(self, *a, **kw)
            if self.optim == SNR_OPTIM_NAME:
                check_args(self, parse_optim_args(self.optim_args))

        __post_init__._hf_snr = True
        TrainingArguments.__post_init__ = __post_init__

    if not getattr(Trainer.create_optimizer, "_hf_snr", False):
        original_create = Trainer.create_optimizer

        @functools.wraps(original_create)
        def create_optimizer(self, *a: Any, **kw: Any):
            optimizer = original_create(self, *a, **kw)
            if isinstance(unwrap_optimizer(optimizer), SNRAdamW):
                attach_snr(self)
            return optimizer

        create_optimizer._hf_snr = True
        Trainer.create_optimizer = create_optimizer

    if not getattr(Trainer.create_scheduler, "_hf_snr", False):
        original_create_scheduler = Trainer.create_scheduler

        @functools.wraps(original_create_scheduler)
        def create_scheduler(self, *a: Any, **kw: Any):
            scheduler = original_create_scheduler(self, *a, **kw)
            optimizer = kw.get("optimizer", a[1] if len(a) > 1 else None) or self.optimizer
            if isinstance(unwrap_optimizer(optimizer), SNRAdamW):
                attach_snr(self)  # idempotent
            return scheduler

        create_scheduler._hf_snr = True
        Trainer.create_scheduler = create_scheduler

    if not getattr(TrainingArguments.set_optimizer, "_hf_snr", False):
        original_set_optimizer = TrainingArguments.set_optimizer

        @functools.wraps(original_set_optimizer)
        def set_optimizer(self, *a: Any, **kw: Any):
            result = original_set_optimizer(self, *a, **kw)
            if self.optim == SNR_OPTIM_NAME:
                check_args(self, parse_optim_args(self.optim_args))
            return result

        set_optimizer._hf_snr = True
        TrainingArguments.set_optimizer = set_optimizer

    _registered = True


def is_registered() -> bool:
    return _registered
