"""The one table of SNRAdamW's options: name, type, default, accepted values, help.

Everything that names, defaults, validates or documents an option reads :data:`OPTIONS`:

* :class:`hf_snr.optimizer.SNRAdamW` takes its signature's defaults from it and validates every
  parameter group with :func:`validate_hparams`;
* ``optim_args`` strings (``"mask=soft,softness=3"``) are parsed by :func:`parse_optim_args`, once per
  distinct string (the result is cached), into :class:`SNROptions`;
* ``--help`` of every argument parser (the ``optim_args`` field's help, see
  :mod:`hf_snr.registration`) and the README's options table come from :func:`options_help` /
  :func:`options_markdown`.

This module imports only the standard library (no torch, no transformers), so anything can use it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

SNR_OPTIM_NAME = "snr_adamw"

MASKS = ("snr", "soft", "hard", "none")
REDUCTIONS = ("element", "row", "tensor")
NONFINITE_POLICIES = ("skip", "raise", "propagate")
NOISE_SCALES = ("step", "ema")
SIGNALS = ("ema", "step")
VARIANCES = ("ema", "microbatch")
DECAY_TARGETS = ("zero", "init")
STATE_DTYPES = ("float32", "bfloat16")
AGREEMENT_SCOPES = ("model", "tensor")
AGREEMENT_REFERENCES = ("kept", "momentum")

# At t = 1 the variance EMA equals mu^2 exactly (d = g because m starts at 0), so "soft"/"hard"
# start closed and "snr" at 1/2. More generally d = g - m measures the start-up bias of the
# uncorrected m, not gradient noise, until m has warmed up: that takes about 1 / (1 - beta1) = 10
# steps at the default beta1 = 0.9. The gate stays open (q = 1, plain AdamW) for those steps.
DEFAULT_WARMUP_STEPS = 10
# nonfinite="skip": a few isolated non-finite steps are normal (a bad batch); this many in a row is a broken run
DEFAULT_MAX_CONSECUTIVE_SKIPS = 20


class OptionError(ValueError):
    """A bad option value; the message names the value and what is accepted."""


# -- converters: an optim_args string (or a Python value) -> the typed value --------------------------
def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    raise TypeError(f"expected a boolean (true/false), got {value!r}")


def _to_auto_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "none", ""):
        return None
    return _to_bool(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):  # float(True) == 1.0 would hide a mistake
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _to_alpha(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _to_float(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _to_str(value: Any) -> str:
    """A choice word. Case rule, for every option: words are case-insensitive ('SNR', 'Auto', 'TRUE'), in
    optim_args strings and in Python keywords alike (:func:`normalize`); regular expressions keep their case."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value.strip().lower()


def _to_agreement(value: Any) -> float | None:
    """'off' / None: no filter; a number: the cosine threshold."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none", "")):
        return None
    if isinstance(value, str):
        return float(value)
    return _to_float(value)


def _agreement_ok(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                         and -1.0 <= x <= 1.0)


def _to_regex(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a regular expression string, got {value!r}")
    re.compile(value)  # raises re.error with the position of the problem
    return value


# -- checks: the typed value -> ok or not -------------------------------------------------------------
def _finite_ge0(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0.0


def _unit(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x < 1.0


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda x: x in choices


def _lr_ok(x: Any) -> bool:
    if hasattr(x, "numel") and hasattr(x, "item"):  # a tensor lr (schedulers that keep lr on device)
        return x.numel() == 1 and _finite_ge0(float(x.item()))
    return _finite_ge0(x)


def _betas_ok(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_unit(b) for b in x)


@dataclass(frozen=True)
class Option:
    name: str
    type: str            # as shown in --help and the README
    default: Any
    accepted: str        # in words, for messages and docs
    check: Callable[[Any], bool]
    help: str
    convert: Callable[[Any], Any] | None = None  # None: not settable through optim_args
    per_group: bool = True                        # lives in every parameter group (else: optimizer-wide)
    label: str = ""                               # the noun used in error messages (default: "<name> value")
    shown: str = ""                               # how the default reads in docs (default: the value)


def _opt(name, type_, default, accepted, check, help_, convert=None, per_group=True, label="", shown=""):
    return Option(name, type_, default, accepted, check, help_, convert, per_group, label, shown)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    # AdamW's own: set from TrainingArguments (learning_rate, adam_beta1/2, adam_epsilon, weight_decay)
    _opt("lr", "float", 1e-3, "a finite number >= 0", _lr_ok, "learning rate, as AdamW", label="learning rate"),
    _opt("betas", "(float, float)", (0.9, 0.999), "a pair (beta1, beta2), each in [0, 1)", _betas_ok,
         "AdamW's moment decays", label="betas"),
    _opt("eps", "float", 1e-8, "a finite number > 0", lambda x: _finite_ge0(x) and x > 0,
         "AdamW's epsilon (never used in the gate)", label="epsilon value"),
    _opt("weight_decay", "float", 0.01, "a finite number >= 0", _finite_ge0,
         "decoupled weight decay, never gated"),
    # the SNR knobs: also settable through optim_args
    _opt("mask", "str", "snr", f"one of {', '.join(MASKS)}", _one_of(MASKS),
         "gate shape: snr q = mu2/(mu2 + softness*alpha*sigma2), never closed; soft (the paper's Algorithm 1) "
         "zero below mu2 = alpha*sigma2; hard 0/1; none: no gate, AdamW's exact step, the statistics still logged "
         "(a memorization monitor on a plain AdamW run)", _to_str, label="mask"),
    _opt("softness", "float", 1.0, "a finite number >= 0", _finite_ge0,
         "scales the noise term; tune over 0.3, 1, 3, 10", _to_float),
    _opt("alpha", "float | 'auto'", 1.0, "a finite number >= 0, or 'auto'", _finite_ge0,
         "noise tolerance: 1 when every batch is a fresh draw; 'auto' (Trainer only) = 1 for one pass, b/(n-b) "
         "for several epochs over n examples with effective batch b", _to_alpha),
    _opt("rho", "float", 0.99, "[0, 1)", _unit, "decay of the variance EMA", _to_float),
    _opt("reduction", "str", "element", f"one of {', '.join(REDUCTIONS)}", _one_of(REDUCTIONS),
         "one gate per scalar (element), per output row of a matrix (row: sums over each row; 1-D tensors get one "
         "gate), or per parameter tensor from sums (tensor)", _to_str, label="reduction"),
    _opt("noise", "str", "step", f"one of {', '.join(NOISE_SCALES)}", _one_of(NOISE_SCALES),
         "noise the gate compares with: step = the variance of one step's gradient (as specified); ema = scaled "
         "to the variance of the EMA m_hat the step moves along, c_t = (1-b1)(1+b1^t)/((1+b1)(1-b1^t))",
         _to_str, label="noise"),
    _opt("signal", "str", "ema", f"one of {', '.join(SIGNALS)}", _one_of(SIGNALS),
         "signal the gate tests: ema = m_hat^2 (as specified); step = this step's gradient g^2 against one "
         "step's variance (the update still moves along m_hat)", _to_str, label="signal"),
    _opt("variance", "str", "ema", f"one of {', '.join(VARIANCES)}", _one_of(VARIANCES),
         "variance estimate: ema of (g - m)^2 (as specified); microbatch = the unbiased variance of this "
         "step's mean gradient from its k >= 2 micro-batch (and data-parallel) gradients, smoothed with rho",
         _to_str, label="variance"),
    _opt("decay_to", "str", "zero", f"one of {', '.join(DECAY_TARGETS)}", _one_of(DECAY_TARGETS),
         "decoupled weight decay pulls toward zero (AdamW) or toward the parameters' values at the first step "
         "(init: p <- p - lr*wd*(p - p0); one more fp32 tensor per decayed parameter, or none where a "
         "reference model's weights are the anchor)", _to_str, label="decay_to"),
    _opt("warmup_steps", "int", DEFAULT_WARMUP_STEPS, "an integer >= 0",
         lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
         "first steps with the gate open (plain AdamW) while the moments warm up", _to_int),
    _opt("snr", "bool", True, "True or False", lambda x: isinstance(x, bool),
         "False makes a parameter group plain AdamW (set per group; exclude= does it by name)", label="snr value"),
    _opt("foreach", "bool | None", None, "true, false or auto", lambda x: x in (None, True, False),
         "multi-tensor (torch._foreach_*) path; auto picks it where supported", _to_auto_bool, shown="auto"),
    _opt("fused", "bool", False, "true or false", lambda x: isinstance(x, bool),
         "one fused pass per group (a C kernel on CPU, compiled at first use with the system C compiler; Triton "
         "on CUDA); falls back to foreach with one warning where it cannot run", _to_bool, label="fused value"),
    _opt("state_dtype", "str", "float32", f"one of {', '.join(STATE_DTYPES)}", _one_of(STATE_DTYPES),
         "dtype of the variance state exp_var (bfloat16: state 1.25x AdamW's fp32 state instead of 1.5x; the "
         "arithmetic stays fp32)", _to_str, label="state_dtype"),
    _opt("nonfinite", "str", "skip", f"one of {', '.join(NONFINITE_POLICIES)}", _one_of(NONFINITE_POLICIES),
         "what a nan/inf gradient does: skip the whole step (counted, warned), raise, or propagate as AdamW",
         _to_str, per_group=False),
    _opt("max_consecutive_skips", "int", DEFAULT_MAX_CONSECUTIVE_SKIPS, "an integer >= 0 (0: no limit)",
         lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
         "with nonfinite=skip, the run stops with an error once more than this many steps in a row were skipped "
         "(a run whose every step is non-finite would otherwise burn its budget and save untrained weights)",
         _to_int, per_group=False),
    _opt("agreement", "float | 'off'", None, "off, or a cosine threshold in [-1, 1]", _agreement_ok,
         "micro-batch gradient agreement filter: with k >= 2 gradient-accumulation micro-batches, each one after "
         "the first is kept only if the cosine of its gradient with the sum kept so far (one number over the whole "
         "model) is >= the threshold; the step uses the mean of the kept ones (one gradient-sized buffer). Under "
         "DDP a micro-batch is all ranks' j-th micro-batch together; FSDP2 needs sync_each_batch; not under "
         "DeepSpeed", _to_agreement, per_group=False, shown="off"),
    _opt("agreement_scope", "str", "model", f"one of {', '.join(AGREEMENT_SCOPES)}", _one_of(AGREEMENT_SCOPES),
         "agreement decided once over the whole model, or per parameter tensor (a per-tensor cosine)", _to_str,
         per_group=False, label="agreement_scope"),
    _opt("agreement_reference", "str", "kept", f"one of {', '.join(AGREEMENT_REFERENCES)}",
         _one_of(AGREEMENT_REFERENCES),
         "what each micro-batch gradient is compared with: kept = the sum kept so far in this step (the first "
         "micro-batch is kept untested); momentum = the optimizer's first moment m (the filtered mean of past "
         "steps; every micro-batch tested, no extra memory; the kept rule on the first step)", _to_str,
         per_group=False, label="agreement_reference"),
    # integration only (the factory, not the optimizer)
    _opt("exclude", "regex", None, "a regular expression (no commas; use | for alternatives)",
         lambda x: x is None or isinstance(x, str),
         "parameters whose name matches (re.search) get plain AdamW (gate always open)", _to_regex,
         per_group=False, shown="none"),
)}

ALIASES = {"warmup": "warmup_steps", "beta3": "rho"}
OPTIM_ARGS_KEYS = tuple(k for k, o in OPTIONS.items() if o.convert is not None)
# keyword arguments of SNRAdamW that live in every parameter group, with their defaults
GROUP_DEFAULTS = {k: o.default for k, o in OPTIONS.items() if o.per_group}
DEFAULTS = {k: o.default for k, o in OPTIONS.items()}


def _message(opt: Option, value: Any) -> str:
    label = opt.label or f"{opt.name} value"
    return f"Invalid {label}: {value!r} (accepted: {opt.accepted})"


def normalize(name: str, value: Any) -> Any:
    """The case rule of every option: a word (a choice, 'auto', a boolean word) is case-insensitive; a word
    option given as a string is stripped and lower-cased, anything else is returned as it is."""
    opt = OPTIONS.get(name)
    if opt is not None and opt.convert in (_to_str, _to_alpha) and isinstance(value, str):
        return value.strip().lower()
    return value


def _auto_outside_trainer(name: str, value: Any, loc: str) -> None:
    if name == "alpha" and isinstance(value, str) and value.strip().lower() == "auto":
        raise OptionError(
            f"alpha='auto'{loc} needs the Trainer: it is resolved at train start from the data set size, the "
            "effective batch and the number of epochs (optim='snr_adamw' with optim_args='alpha=auto', or "
            "snr_optimizer_cls_and_kwargs). Outside a Trainer pass a number, e.g. "
            "hf_snr.options.finite_data_alpha(n_examples, effective_batch, epochs)[0]."
        )


def validate_hparams(hp: dict[str, Any], where: str = "") -> None:
    """Check every per-group option present in ``hp``; the message names the bad value and the accepted range.

    Word values are normalized in place (:func:`normalize`: ``mask="SNR"`` becomes ``"snr"``)."""
    loc = f" in {where}" if where else ""
    for name, opt in OPTIONS.items():
        if not opt.per_group or name not in hp:
            continue
        value = hp[name] = normalize(name, hp[name])
        _auto_outside_trainer(name, value, loc)
        if name == "lr" and hasattr(value, "numel") and value.numel() != 1:
            raise OptionError(
                f"Invalid learning rate: tensor lr must have one element, got shape {tuple(value.shape)}{loc}"
            )
        if name == "betas" and isinstance(value, (tuple, list)) and len(value) == 2:
            for i, b in enumerate(value):
                if not _unit(b):
                    raise OptionError(f"Invalid beta parameter at index {i}: {b!r} (accepted: [0, 1)){loc}")
        if not opt.check(value):
            raise OptionError(_message(opt, value) + loc)
    check_combination(hp, where)


def check_combination(hp: dict[str, Any], where: str = "") -> None:
    """Checks between options: the one place for them."""
    loc = f" in {where}" if where else ""
    if hp.get("fused") and hp.get("foreach"):
        raise OptionError("Invalid combination fused=True with foreach=True" + loc + ": choose one implementation "
                          "(fused=True, or foreach=True/None with fused=False)")
    if hp.get("mask") == "none" and hp.get("reduction", "element") != "element":
        raise OptionError(
            f"Invalid combination mask='none' with reduction={hp.get('reduction')!r}" + loc + ": mask='none' has no "
            "gate to reduce (the step is AdamW's); leave reduction at 'element'"
        )
    if hp.get("signal") == "step" and hp.get("noise") == "ema":
        raise OptionError(
            "Invalid combination signal='step' with noise='ema'" + loc + ": signal='step' tests one step's gradient, "
            "whose variance is sigma^2 itself; noise='ema' scales sigma^2 to the variance of the EMA m_hat. "
            "Use signal='step' with noise='step', or signal='ema' with either noise."
        )


def validate_value(name: str, value: Any) -> Any:
    """Check one option's value; returns it normalized (:func:`normalize`)."""
    opt = OPTIONS[name]
    value = normalize(name, value)
    if not opt.check(value):
        raise OptionError(_message(opt, value))
    return value


def accepted_options() -> str:
    return "; ".join(f"{k} ({OPTIONS[k].accepted})" for k in OPTIM_ARGS_KEYS)


def options_help() -> str:
    """The optim_args keys with type, default and accepted values: what --help prints."""
    rows = [f"{k}: {o.type}, default {_show(o)}, accepted {o.accepted}. {o.help}."
            for k, o in ((k, OPTIONS[k]) for k in OPTIM_ARGS_KEYS)]
    return (f"SNR options for optim='{SNR_OPTIM_NAME}', as key=value pairs separated by commas "
            f"(e.g. 'mask=soft,softness=3'): " + " | ".join(rows))


def options_markdown() -> str:
    """The README's optim_args table (a test checks the README holds exactly this)."""
    alias = {v: k for k, v in ALIASES.items()}
    lines = ["| key | type | default | accepted | meaning |", "|---|---|---|---|---|"]
    for k in OPTIM_ARGS_KEYS:
        o = OPTIONS[k]
        key = f"`{k}`" + (f" (alias `{alias[k]}`)" if k in alias else "")
        lines.append(f"| {key} | {o.type.replace('|', 'or')} | {_show(o)} | {o.accepted.replace('|', chr(92) + '|')} | "
                     f"{o.help.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def options_docstring(indent: str = "        ") -> str:
    """The ``Args`` entries of SNRAdamW's docstring, one per option of the optimizer (a test holds them equal)."""
    lines = []
    for name, o in OPTIONS.items():
        if name == "exclude":  # the factory's, not the optimizer's
            continue
        text = f"{name} ({o.type}): {o.help}. Default {_show(o)}; accepted: {o.accepted}."
        where = "" if o.per_group else " Optimizer-wide (not per group)."
        words, line = (text + where).split(), indent
        for w in words:  # wrap at 110 columns, continuation lines indented once more
            if len(line) + len(w) + 1 > 110 and line.strip():
                lines.append(line.rstrip())
                line = indent + "    "
            line += w + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


def _show(opt: Option) -> str:
    if opt.shown:
        return opt.shown
    return opt.default if isinstance(opt.default, str) else repr(opt.default)


@dataclass
class SNROptions:
    """Typed SNR options (the knobs beyond AdamW's lr/betas/eps/weight_decay); defaults from :data:`OPTIONS`."""

    mask: str = DEFAULTS["mask"]
    softness: float = DEFAULTS["softness"]
    alpha: float | str = DEFAULTS["alpha"]
    rho: float = DEFAULTS["rho"]
    reduction: str = DEFAULTS["reduction"]
    noise: str = DEFAULTS["noise"]
    signal: str = DEFAULTS["signal"]
    variance: str = DEFAULTS["variance"]
    decay_to: str = DEFAULTS["decay_to"]
    warmup_steps: int = DEFAULTS["warmup_steps"]
    nonfinite: str = DEFAULTS["nonfinite"]
    max_consecutive_skips: int = DEFAULTS["max_consecutive_skips"]
    agreement: float | None = DEFAULTS["agreement"]
    agreement_scope: str = DEFAULTS["agreement_scope"]
    agreement_reference: str = DEFAULTS["agreement_reference"]
    foreach: bool | None = DEFAULTS["foreach"]
    fused: bool = DEFAULTS["fused"]
    state_dtype: str = DEFAULTS["state_dtype"]
    exclude: str | None = DEFAULTS["exclude"]
    extra: dict[str, Any] = field(default_factory=dict)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor keywords for SNRAdamW ('auto' alpha becomes 1.0 until the trainer resolves it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "exclude")}
        if out["alpha"] == "auto":
            out["alpha"] = 1.0
        return out

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


assert set(f.name for f in fields(SNROptions)) - {"extra"} == set(OPTIM_ARGS_KEYS), "SNROptions must mirror OPTIONS"


def _split(optim_args: str) -> dict[str, str]:
    raw: dict[str, str] = {}
    for item in optim_args.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise OptionError(
                f"Invalid optim_args entry {item!r} for optim='{SNR_OPTIM_NAME}': expected key=value "
                f"pairs separated by commas. Accepted keys: {accepted_options()}"
            )
        key, value = item.split("=", 1)
        key = key.strip()
        if key in raw:
            raise OptionError(f"optim_args key {key!r} is given twice in {optim_args!r} for optim='{SNR_OPTIM_NAME}'")
        raw[key] = value.strip()
    return raw


def _parse(raw: dict[str, Any]) -> SNROptions:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name not in OPTIM_ARGS_KEYS:
            raise OptionError(
                f"Unknown optim_args key {key!r} for optim='{SNR_OPTIM_NAME}'. Accepted keys: {accepted_options()}. "
                "(lr, betas, eps and weight_decay come from TrainingArguments: learning_rate, adam_beta1/2, "
                "adam_epsilon, weight_decay.)"
            )
        opt = OPTIONS[name]
        try:
            if name in values:
                raise ValueError(f"given twice (as {key!r} and under another name)")
            typed = opt.convert(value)
            if not (name == "alpha" and typed == "auto") and not opt.check(typed):
                raise ValueError("out of range")
            values[name] = typed
        except (ValueError, TypeError, re.error) as err:
            raise OptionError(
                f"Invalid optim_args value {key}={value!r} for optim='{SNR_OPTIM_NAME}' "
                f"(accepted: {opt.accepted}): {err}"
            ) from None
    options = SNROptions(**values)
    check_combination(options.optimizer_kwargs(), where=f"optim_args for optim='{SNR_OPTIM_NAME}'")
    return options


@functools.lru_cache(maxsize=64)
def _parse_string(optim_args: str) -> SNROptions:
    return _parse(_split(optim_args))


def parse_optim_args(optim_args: str | dict[str, Any] | SNROptions | None) -> SNROptions:
    """Parse and validate ``"mask=soft,softness=3"`` (or a dict) into :class:`SNROptions`.

    A string is parsed once (the typed result is cached and a copy returned). Raises
    :class:`OptionError` (a ValueError) naming the bad key or value and listing what is accepted.
    """
    if isinstance(optim_args, SNROptions):
        return optim_args
    if optim_args is None or optim_args == "":
        return SNROptions()
    if isinstance(optim_args, str):
        cached = _parse_string(optim_args)
        return SNROptions(**cached.as_dict())
    if isinstance(optim_args, dict):
        return _parse(dict(optim_args))
    raise OptionError(f"optim_args must be a string like 'mask=soft,softness=3' or a dict, got {optim_args!r}")


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
    return alpha, (
        f"{epochs:g} passes over n={n_examples} examples with effective batch b={effective_batch}: "
        f"alpha = b/(n-b) = {alpha:.4g}"
    )
