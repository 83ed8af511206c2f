"""The one place where SNRAdamW's user-facing options are named, typed, defaulted and validated.

Used by the `optim="snr_adamw"` handler (``optim_args="mask=soft,softness=3"``), the explicit
factory :func:`hf_snr.snr_optimizer_cls_and_kwargs`, the DPO trainer and the recipes. Imports only
the optimizer module (no transformers), so it can be used anywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .optimizer import DEFAULT_WARMUP_STEPS, MASKS, NONFINITE_POLICIES, REDUCTIONS, _validate_hparams

SNR_OPTIM_NAME = "snr_adamw"


def _to_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _to_foreach(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "none", ""):
        return None
    if isinstance(value, str):
        return _to_bool(value)
    raise TypeError(f"expected true, false or auto, got {value!r}")


def _to_alpha(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):  # float(True) == 1.0 would hide a mistake
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value.strip()


def _to_regex(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a regular expression string, got {value!r}")
    re.compile(value)  # raises re.error with the position of the problem
    return value


@dataclass(frozen=True)
class _Option:
    convert: Callable[[Any], Any]
    accepted: str
    default: Any
    help: str


# key -> how to read it from an optim_args string, what is accepted, the default, what it means
OPTIONS: dict[str, _Option] = {
    "mask": _Option(_to_str, f"one of {', '.join(MASKS)}", "snr", "gate shape: snr (never closes), soft, hard"),
    "softness": _Option(_to_float, "a finite number >= 0", 1.0, "scales the noise term; tune over 0.3, 1, 3, 10"),
    "alpha": _Option(_to_alpha, "a finite number >= 0, or 'auto'", 1.0,
                     "noise tolerance; 'auto' = 1 for one pass, b/(n-b) for several epochs over n examples"),
    "rho": _Option(_to_float, "[0, 1)", 0.99, "decay of the variance EMA"),
    "reduction": _Option(_to_str, f"one of {', '.join(REDUCTIONS)}", "element",
                         "one gate per scalar (element) or per parameter tensor (tensor)"),
    "warmup_steps": _Option(_to_int, "an integer >= 0", DEFAULT_WARMUP_STEPS, "first steps with the gate open"),
    "nonfinite": _Option(_to_str, f"one of {', '.join(NONFINITE_POLICIES)}", "skip", "what a nan/inf gradient does"),
    "foreach": _Option(_to_foreach, "true, false or auto", None, "multi-tensor (foreach) path; default: automatic"),
    "exclude": _Option(_to_regex, "a regular expression (no commas; use | for alternatives)", None,
                       "parameters whose name matches (re.search) get plain AdamW (gate always open)"),
}
ALIASES = {"warmup": "warmup_steps", "beta3": "rho"}


def accepted_options() -> str:
    return "; ".join(f"{k} ({o.accepted})" for k, o in OPTIONS.items())


@dataclass
class SNROptions:
    """Typed SNR options (the knobs beyond AdamW's lr/betas/eps/weight_decay)."""

    mask: str = "snr"
    softness: float = 1.0
    alpha: float | str = 1.0
    rho: float = 0.99
    reduction: str = "element"
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    nonfinite: str = "skip"
    foreach: bool | None = None
    exclude: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor keywords for SNRAdamW ('auto' alpha becomes 1.0 until the trainer resolves it)."""
        return dict(
            mask=self.mask, softness=self.softness, alpha=1.0 if self.alpha == "auto" else self.alpha,
            rho=self.rho, reduction=self.reduction, warmup_steps=self.warmup_steps,
            nonfinite=self.nonfinite, foreach=self.foreach,
        )


def parse_optim_args(optim_args: str | dict[str, Any] | None) -> SNROptions:
    """Parse and validate ``"mask=soft,softness=3"`` (or a dict) into :class:`SNROptions`.

    Raises ValueError naming the bad key or value and listing what is accepted.
    """
    if optim_args is None or optim_args == "":
        raw: dict[str, Any] = {}
    elif isinstance(optim_args, dict):
        raw = dict(optim_args)
    elif isinstance(optim_args, str):
        raw = {}
        for item in optim_args.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ValueError(
                    f"Invalid optim_args entry {item!r} for optim='{SNR_OPTIM_NAME}': expected key=value "
                    f"pairs separated by commas. Accepted keys: {accepted_options()}"
                )
            key, value = item.split("=", 1)
            key = key.strip()
            if key in raw:
                raise ValueError(f"optim_args key {key!r} is given twice in {optim_args!r} for optim='{SNR_OPTIM_NAME}'")
            raw[key] = value.strip()
    else:
        raise ValueError(f"optim_args must be a string like 'mask=soft,softness=3' or a dict, got {optim_args!r}")

    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name not in OPTIONS:
            raise ValueError(
                f"Unknown optim_args key {key!r} for optim='{SNR_OPTIM_NAME}'. Accepted keys: {accepted_options()}. "
                "(lr, betas, eps and weight_decay come from TrainingArguments: learning_rate, adam_beta1/2, "
                "adam_epsilon, weight_decay.)"
            )
        opt = OPTIONS[name]
        try:
            if name in values:
                raise ValueError(f"given twice (as {key!r} and under another name)")
            values[name] = opt.convert(value)
        except (ValueError, TypeError, re.error) as err:
            raise ValueError(
                f"Invalid optim_args value {key}={value!r} for optim='{SNR_OPTIM_NAME}' (accepted: {opt.accepted}): {err}"
            ) from None
    options = SNROptions(**values)
    validate_options(options)
    return options


def validate_options(options: SNROptions) -> None:
    """Run the optimizer's own checks now, at argument-construction time, not at the first step."""
    alpha = options.alpha
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"Invalid alpha value: {alpha!r} (accepted: a finite number >= 0, or 'auto')")
    kw = options.optimizer_kwargs()
    nonfinite = kw.pop("nonfinite")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite value: {nonfinite!r} (accepted: one of {', '.join(NONFINITE_POLICIES)})")
    if isinstance(alpha, float) and not math.isfinite(alpha):
        raise ValueError(f"Invalid alpha value: {alpha!r} (accepted: a finite number >= 0, or 'auto')")
    _validate_hparams(dict(lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, snr=True, **kw),
                      where=f"optim_args for optim='{SNR_OPTIM_NAME}'")


def finite_data_alpha(n_examples: int | None, effective_batch: int, epochs: float) -> tuple[float, str]:
    """alpha for 'auto' and the reason, to be logged.

    One pass (or a stream of unknown length): every batch is a fresh draw, alpha = 1. Several passes over
    n examples with effective batch b: the paper's finite-data value b / (n - b). Full-batch training
    (b >= n) has no sampling noise and the formula diverges; alpha = 1 is kept and the reason says so.
    """
    if n_examples is None:
        return 1.0, "unknown data set size (iterable data set): one pass assumed, alpha = 1"
    if epochs <= 1.0:
        return 1.0, f"one pass over n={n_examples} examples: alpha = 1"
    if effective_batch >= n_examples:
        return 1.0, f"full-batch training (b={effective_batch} >= n={n_examples}): b/(n-b) diverges, alpha = 1 kept"
    alpha = effective_batch / (n_examples - effective_batch)
    return alpha, f"{epochs:g} passes over n={n_examples} examples with effective batch b={effective_batch}: alpha = b/(n-b) = {alpha:.4g}"
