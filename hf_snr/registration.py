"""Make ``optim="snr_adamw"`` a name transformers accepts. The only module that touches internals.

transformers has no public registry for optimizer names: ``OptimizerNames`` is a closed enum that
``TrainingArguments.__post_init__`` (and ``HfArgumentParser``'s ``choices``) validate against, and
the name -> optimizer table ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` is private.
Registration comes in three parts, each run by :mod:`hf_snr._hooks` right after the module it
touches has been imported (or all at once by :func:`register`):

* :func:`register_training_args` (``transformers.training_args``): adds a ``snr_adamw`` member to
  ``OptimizerNames`` (so TrainingArguments, DPOConfig, SFTConfig, any subclass, HfArgumentParser and
  TrlParser accept it, and training_args.bin pickles it); wraps ``TrainingArguments.__post_init__``
  and ``set_optimizer`` so ``optim_args`` and the DeepSpeed config are validated when the arguments
  are built; writes every SNR option (type, default, accepted values) into the ``optim_args``
  field's help, so ``--help`` of every parser lists them;
* :func:`register_handler` (``transformers.trainer_optimizer``): maps the name to a handler that
  returns the public factory's result;
* :func:`register_trainer` (``transformers.trainer``): wraps ``Trainer.create_optimizer`` (and
  ``create_scheduler``, which every path calls after it, also for subclasses that override
  ``create_optimizer`` without ``super()``) so any Trainer that ends up with an SNRAdamW (by name,
  through ``optimizer_cls_and_kwargs`` or ``optimizers=``) gets :class:`hf_snr.integration.SNRCallback`.

Each part is idempotent, guarded by the supported transformers range, and raises
:class:`SNRRegistrationError` (never a silent fallback to AdamW) if those internals change.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from packaging.version import Version

from .checks import check_args
from .options import SNR_OPTIM_NAME, options_help, parse_optim_args

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
    from .integration import snr_optimizer_cls_and_kwargs

    args = ctx.args
    return snr_optimizer_cls_and_kwargs(args, parse_optim_args(args.optim_args))


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


def _check_version() -> None:
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= Version(version.base_version) < high):
        _fail(f"supported versions are >={low},<{high}")


def _member():
    from transformers.training_args import OptimizerNames

    for attr in ("_value2member_map_", "_member_map_", "_member_names_"):
        if attr not in vars(OptimizerNames):  # its own, not the one inherited from Enum
            _fail(f"OptimizerNames has no {attr} (enum internals changed)")
    member = _enum_member(OptimizerNames)
    if OptimizerNames(SNR_OPTIM_NAME) is not member:
        _fail("OptimizerNames did not accept the new member")
    return member


def _add_help(TrainingArguments) -> None:
    """Append the SNR options to the optim_args field's help (dataclass subclasses share the Field object)."""
    import types

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    f = fields.get("optim_args")
    text = options_help()
    if f is None or text in (f.metadata.get("help") or ""):
        return
    meta = dict(f.metadata)  # every metadata key becomes an argparse keyword: add none, extend "help"
    meta["help"] = (meta.get("help") or "Optional arguments for the optimizer.") + " " + text
    f.metadata = types.MappingProxyType(meta)


def register_training_args(module: Any = None) -> None:
    """The name, the argument-time checks and the --help text (needs transformers.training_args only)."""
    _check_version()
    from transformers.training_args import TrainingArguments

    if not callable(getattr(TrainingArguments, "set_optimizer", None)):
        _fail("TrainingArguments.set_optimizer is gone")
    _member()
    _add_help(TrainingArguments)

    if not getattr(TrainingArguments.__post_init__, "_hf_snr", False):
        original_post_init = TrainingArguments.__post_init__

        @functools.wraps(original_post_init)
        def __post_init__(self, *a: Any, **kw: Any) -> None:
            original_post_init(self, *a, **kw)
            if self.optim == SNR_OPTIM_NAME:
                check_args(self, parse_optim_args(self.optim_args))

        __post_init__._hf_snr = True
        TrainingArguments.__post_init__ = __post_init__

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


def register_handler(module: Any = None) -> None:
    """The name -> optimizer handler (needs transformers.trainer_optimizer, which imports training_args)."""
    _check_version()
    from transformers import trainer_optimizer

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        _fail("transformers.trainer_optimizer._OPTIMIZER_HANDLERS (the name -> optimizer table) is gone")
    handlers[_member()] = _handler


def register_trainer(module: Any = None) -> None:
    """Risk logging for every Trainer that ends up with an SNRAdamW (needs transformers.trainer)."""
    _check_version()
    from transformers.trainer import Trainer

    for attr in ("create_optimizer", "create_scheduler"):
        if not callable(getattr(Trainer, attr, None)):
            _fail(f"Trainer.{attr} is gone")

    if not getattr(Trainer.create_optimizer, "_hf_snr", False):
        original_create = Trainer.create_optimizer

        @functools.wraps(original_create)
        def create_optimizer(self, *a: Any, **kw: Any):
            optimizer = original_create(self, *a, **kw)
            _attach_if_snr(self, optimizer)
            return optimizer

        create_optimizer._hf_snr = True
        Trainer.create_optimizer = create_optimizer

    if not getattr(Trainer.create_scheduler, "_hf_snr", False):
        original_create_scheduler = Trainer.create_scheduler

        @functools.wraps(original_create_scheduler)
        def create_scheduler(self, *a: Any, **kw: Any):
            scheduler = original_create_scheduler(self, *a, **kw)
            _attach_if_snr(self, kw.get("optimizer", a[1] if len(a) > 1 else None) or self.optimizer)  # idempotent
            return scheduler

        create_scheduler._hf_snr = True
        Trainer.create_scheduler = create_scheduler


def _attach_if_snr(trainer: Any, optimizer: Any) -> None:
    from .integration import attach_snr, unwrap_optimizer
    from .optimizer import SNRAdamW

    if isinstance(unwrap_optimizer(optimizer), SNRAdamW):
        attach_snr(trainer)


def register() -> None:
    """Register ``optim="snr_adamw"`` with transformers now, every part (idempotent); raises on failure.

    ``import hf_snr`` does the same lazily, part by part, as transformers' modules are imported.
    """
    global _registered
    if _registered:
        return
    _check_version()
    try:
        import transformers.trainer  # noqa: F401  (imports training_args and trainer_optimizer too)
    except ImportError as err:  # pragma: no cover - depends on the installed transformers
        _fail(f"an internal module moved ({err})")
    register_training_args()
    register_handler()
    register_trainer()
    _registered = True


def is_registered() -> bool:
    """True once every part is registered (by :func:`register` or by the import hooks)."""
    if _registered:
        return True
    try:
        from transformers import trainer_optimizer
        from transformers.trainer import Trainer
        from transformers.training_args import OptimizerNames, TrainingArguments
    except ImportError:  # pragma: no cover
        return False
    member = OptimizerNames._value2member_map_.get(SNR_OPTIM_NAME)
    return (member is not None and getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", {}).get(member) is _handler
            and getattr(TrainingArguments.__post_init__, "_hf_snr", False)
            and getattr(Trainer.create_optimizer, "_hf_snr", False))
