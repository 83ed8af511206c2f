"""SNRDPOTrainer: TRL's DPOTrainer with SNRAdamW by default and the metrics that tell signal from noise.

    from hf_snr import SNRDPOConfig, SNRDPOTrainer, swap_preferences

    args = SNRDPOConfig("out", beta=0.1, learning_rate=3e-3)          # optim="snr_adamw" by default
    trainer = SNRDPOTrainer(model, args=args, train_dataset=swap_preferences(train, 0.3),
                            eval_dataset=test, processing_class=tokenizer)
    trainer.train()

The constructor is DPOTrainer's. ``optim="adamw_torch"`` (or any other optimizer name) gives that
optimizer with the same trainer and the same metrics minus ``snr/*``: an A/B comparison changes one
flag. Reference models work as in TRL (explicit ``ref_model``, PEFT with the adapter disabled,
``precompute_ref_log_probs``), and so does DDP.

Metrics (train and eval, through DPOTrainer's own ``self._metrics[mode]``, so they get ``eval_``
prefixes and reach ``log_history`` and every reporter). See :data:`DPO_METRICS` for the list.

* ``rewards/drift``: mean over chosen and rejected completions of ``|beta * (log pi - log pi_ref)|``
  (per-sequence summed log-probs, exactly TRL's ``rewards/chosen`` / ``rewards/rejected`` before
  the sign is kept): the distance from the reference that the paper calls reward drift.
* ``noise/flipped_fit``, ``noise/clean_fit``: when the training data carries the boolean column
  ``args.flipped_column`` (default ``label_flipped``, as written by
  :func:`hf_snr.data.swap_preferences`), the share of swapped (resp. unswapped) pairs on which the
  policy prefers the training label, i.e. the implicit reward margin
  ``beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected))`` is > 0, as in TRL's
  ``rewards/accuracies``. On swapped pairs the training label is the wrong one, so flipped fit is
  memorization of noise. **Ties** (margin exactly 0: every pair before the first update, when the
  policy equals its reference) count 1/2: the policy has no preference, which is chance level, so
  both fits start at 0.5. TRL's ``rewards/accuracies`` counts a tie as 0 and starts at 0.
  ``noise/flipped_margin`` and ``noise/clean_margin`` are the mean margins on the same pairs.
  Absent when no pair of that kind was seen (e.g. flipped_* with 0 % noise, or an eval set
  without the column).
* ``pref/policy_accuracy``, ``pref/reference_accuracy``: the share of pairs on which the policy (resp. the
  reference) itself gives the chosen completion the higher summed log-probability (tie = 1/2). On clean
  evaluation pairs of a task with a known truth this is the task accuracy, what the model now prefers; TRL's
  ``rewards/accuracies`` instead asks whether training moved each pair the right way relative to the reference,
  which says nothing of what a pretrained reference already knew.
* ``snr/*``: the optimizer's statistics (:data:`hf_snr.integration.SNR_METRICS`), from the
  SNRCallback that :mod:`hf_snr.registration` attaches to any Trainer whose optimizer is SNRAdamW.
  At evaluation the latest statistics are reported again as ``eval_snr/*`` (they describe the last
  logged optimizer step, not the eval data). Absent when the optimizer is not SNRAdamW, and before its
  first statistics.

Pooling and DDP: every metric above is a ratio of sums over all pairs seen on all ranks since the
last log (per-pair values gathered with ``accelerator.gather_for_metrics``, so the duplicate pairs
that pad the last batch under DDP are dropped), never an average of per-batch ratios. An average of
ratios would weight a batch holding one swapped pair like one holding ten, and is undefined on a
batch holding none.

Where the numbers come from (the seam). TRL 1.16 computes the per-sequence log-probs, the loss and
its metrics inside one ``_compute_loss`` and exposes only batch means. Rather than copying that
method, this trainer overrides the public ``compute_loss``, calls TRL's, and observes the policy's
and the reference's per-token log-probs with forward hooks on the two modules (the fused LM head's
``log_probs`` output, which TRL sums per sequence). No forward pass is added. With PEFT the
reference is the second call of the policy module (adapter disabled); with
``precompute_ref_log_probs`` it is read from the batch. Once per mode the recomputed rewards are
checked against TRL's own ``rewards/chosen`` and ``rewards/rejected``; a mismatch (TRL changed how
it computes them) raises instead of logging wrong numbers.

The flipped column. TRL's tokenisation keeps extra columns, but the Trainer drops every column
outside ``_signature_columns`` before batching, and ``DataCollatorForPreference`` ignores keys it
does not use. This trainer adds the column to the signature columns and wraps the data collator so
that the flag travels inside each batch, aligned with its pair through shuffling, DDP sharding and
gradient accumulation (no index bookkeeping). The flag is taken out of the batch before TRL sees
it, so it never reaches the model. Flags are bools or 0/1 integers (numpy / torch scalars too); any
other value (the strings "True"/"False", floats, lists, None) is refused, not coerced: when the
trainer is built for a ``datasets.Dataset`` (from the column's Arrow type, vectorised; the error
names the data set, the row and the value), and by the collator for data it could not check then.

Conservative DPO (cDPO) baseline: ``loss_type="cdpo"`` with ``label_smoothing=eps`` in [0, 0.5)
(validated when the config is built) is the label-smoothed sigmoid loss
``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``; TRL 1.16 ignores
``label_smoothing`` for ``"sigmoid"``. Since ``log sigmoid(-x) = log sigmoid(x) - x`` this is the
sigmoid loss plus ``eps * beta * d`` (its gradient vanishes where sigmoid(beta d) = 1 - eps instead
of pushing the margin to infinity): TRL computes the sigmoid term and this trainer adds the linear
one from the hooked log-probs. It compares on equal terms with TRL's robust DPO
(``loss_type="robust"``, same ``label_smoothing``), plain DPO, and either optimizer.
"""

import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers.training_args import OptimizerNames
from trl import DPOConfig, DPOTrainer

from .options import SNR_OPTIM_NAME

__all__ = ["SNRDPOConfig", "SNRDPOTrainer", "DPO_METRICS", "CDPO_LOSS", "DEFAULT_FLIPPED_COLUMN", "cdpo_loss"]

logger = logging.getLogger("hf_snr")

CDPO_LOSS = "cdpo"
DEFAULT_FLIPPED_COLUMN = "label_flipped"

# Losses of TRL 1.16 that read label_smoothing (plus ours); with none of them it is silently unused.
_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired", CDPO_LOSS}

# What this trainer adds to DPOTrainer's metrics, and what it means (with eval_ prefix at evaluation).
DPO_METRICS = {
    "rewards/drift": "mean over chosen and rejected of |beta (log pi - log pi_ref)|: reward drift from the reference",
    "noise/flipped_fit": "share of swapped pairs where the policy prefers the (wrong) training label (tie = 1/2)",
    "noise/clean_fit": "share of unswapped pairs where the policy prefers the training label (tie = 1/2)",
    "noise/flipped_margin": "mean implicit reward margin (chosen - rejected, training labels) on swapped pairs",
    "noise/clean_margin": "mean implicit reward margin (chosen - rejected, training labels) on unswapped pairs",
    "pref/policy_accuracy": "share of pairs where the policy gives the chosen completion the higher summed log-prob "
                            "(tie = 1/2): on clean eval pairs, the share of questions the model now answers right",
    "pref/reference_accuracy": "the same share for the reference model (constant on a fixed eval set)",
}


def cdpo_loss(delta: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """Per-pair cDPO loss ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``.

    ``delta`` = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected). With ``smoothing``
    0 it is DPO's sigmoid loss. The reference formula for tests and docs; the trainer uses the
    equivalent ``sigmoid loss + smoothing * beta * delta``.
    """
    x = beta * delta
    return -(1.0 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


def validate_dpo_args(args: DPOConfig, warn: bool = True) -> None:
    """Checks for the options this module adds; run by SNRDPOConfig and again by SNRDPOTrainer."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    eps = args.label_smoothing
    if CDPO_LOSS in loss_types:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < 0.5):  # nan fails too
            raise ValueError(
                f"Invalid label_smoothing for loss_type='{CDPO_LOSS}': {eps!r} (accepted: [0, 0.5), the assumed share "
                "of flipped labels; 0 gives the sigmoid loss)"
            )
        if args.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"loss_type='{CDPO_LOSS}' supports only f_divergence_type='reverse_kl', got {args.f_divergence_type!r}"
            )
        if args.use_weighting:
            raise ValueError(f"loss_type='{CDPO_LOSS}' does not support use_weighting=True (WPO weights)")
    elif warn and eps and "sigmoid" in loss_types and not _SMOOTHING_LOSSES & set(loss_types):
        warnings.warn(
            f"label_smoothing={eps} has no effect: TRL's 'sigmoid' loss ignores it. For conservative DPO (cDPO) use "
            f"loss_type='{CDPO_LOSS}'; for robust DPO loss_type='robust'.",
            UserWarning,
            stacklevel=3,
        )
    column = getattr(args, "flipped_column", DEFAULT_FLIPPED_COLUMN)
    if column is not None and (not isinstance(column, str) or not column):
        raise ValueError(f"Invalid flipped_column: {column!r} (accepted: a column name, or None to disable)")


@dataclass
class SNRDPOConfig(DPOConfig):
    """DPOConfig with ``optim="snr_adamw"`` by default, the flipped-pair column and cDPO.

    Every DPOConfig / TrainingArguments field keeps its meaning. The SNR knobs go through
    ``optim_args`` (e.g. ``optim_args="mask=snr,softness=3,alpha=auto"``, see
    :mod:`hf_snr.options`). Additions:

    * ``optim``: default ``"snr_adamw"``; any transformers optimizer name for the A/B arm.
    * ``flipped_column``: name of the boolean column marking swapped pairs (default
      ``"label_flipped"``, what :func:`hf_snr.data.swap_preferences` writes). Data without it
      trains as usual, without ``noise/*`` metrics. ``None`` turns the feature off.
    * ``loss_type="cdpo"``: conservative DPO with ``label_smoothing`` in [0, 0.5), validated here.
    """

    optim: OptimizerNames | str = field(
        default=SNR_OPTIM_NAME,
        metadata={"help": f"The optimizer to use. Default '{SNR_OPTIM_NAME}' (SNRAdamW; knobs in optim_args). Any "
                          "transformers optimizer name (e.g. 'adamw_torch') gives that optimizer with the same "
                          "trainer and metrics."},
    )
    flipped_column: str | None = field(
        default=DEFAULT_FLIPPED_COLUMN,
        metadata={"help": "Boolean data set column marking pairs whose chosen/rejected were swapped (label noise). "
                          "When present, noise/flipped_fit and noise/clean_fit are logged. None disables."},
    )

    def __post_init__(self):
        super().__post_init__()
        validate_dpo_args(self)


def _flag_value(value: Any) -> bool | None:
    """``value`` as a flag, or None if it is not one.

    Accepted: Python bool, the integers 0 and 1, and their numpy / 0-d torch counterparts (numpy.bool_,
    numpy integers 0/1, a one-element bool or integer tensor holding 0/1: what a ``with_format("numpy")`` or
    ``"torch"`` data set yields). Anything else (the strings "True"/"False", floats, lists, None) is refused
    rather than coerced: ``bool("False")`` is True, and every such pair would count as swapped.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        item = value.item()  # a Python bool, int or float
        return _flag_value(item) if isinstance(item, int) else None
    return None


def _bad_flag_error(column: str, value: Any, where: str) -> ValueError:
    return ValueError(
        f"Invalid value in the flipped column {column!r} {where}: {value!r} ({type(value).__name__}). Accepted: "
        "True/False, 0/1 (Python, numpy or torch scalars), one per pair. A string such as 'False' would count as "
        "a swapped pair; cast the column, e.g. dataset.cast_column(name, datasets.Value('bool')), or pass "
        "flipped_column=None."
    )


def check_flipped_column(dataset: Any, column: str | None, name: str = "train_dataset") -> None:
    """Refuse a ``datasets.Dataset`` whose flipped column holds anything but flags (see :func:`_flag_value`).

    The column's Arrow type decides without a Python loop over the rows: a bool column is fine by construction
    (only nulls are checked), an integer column is checked for values outside {0, 1} with vectorised compute;
    any other type (strings, floats, lists) is refused at its first row. A data set without the column, an
    ``IterableDataset`` or any other kind passes here: the collator refuses a bad value in the batch.
    """
    from datasets import Dataset

    if isinstance(dataset, dict):
        for key, split in dataset.items():
            check_flipped_column(split, column, f"{name}[{key!r}]")
        return
    if not column or not isinstance(dataset, Dataset) or column not in dataset.column_names or len(dataset) == 0:
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]  # follows select()/shuffle() indices, vectorised
    kind = values.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        wrong = pc.is_null(values)  # a missing flag is no flag (bool(None) would say "clean")
        if pa.types.is_integer(kind):
            wrong = pc.or_kleene(wrong, pc.or_(pc.less(values, 0), pc.greater(values, 1)))
        first = pc.index(pc.fill_null(wrong, True), True).as_py()
        bad = None if first < 0 else first
    else:  # neither bool nor integer: no value of this type is a flag, so the first row is the first bad one
        bad = 0
    if bad is not None:
        value = dataset[bad][column]
        raise _bad_flag_error(column, value, f"of {name}, row {bad} (column type {kind})")


class _FlagCollator:
    """Wraps a data collator so that a per-pair column reaches the batch as a bool tensor.

    The column is removed from the examples before the wrapped collator sees them (a user's
    collator need not know it) and added back as ``batch[column]``, shape (pairs,). A value that
    is not a flag (see :func:`_flag_value`) raises: the trainer checks map-style data sets when it
    is built, this catches the rest (an iterable data set, a data set passed to ``evaluate`` later).
    """

    def __init__(self, collator: Callable, column: str):
        self.collator = collator
        self.column = column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or self.column not in examples[0]:
            return self.collator(examples)
        flags = []
        for i, example in enumerate(examples):
            value = example.get(self.column)
            flag = _flag_value(value)
            if flag is None:
                raise _bad_flag_error(self.column, value, f"(example {i} of a batch)")
            flags.append(flag)
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column} for ex in examples])
        batch[self.column] = torch.tensor(flags, dtype=torch.bool)
        return batch

    def __getattr__(self, name: str) -> Any:  # e.g. Trainer reads data_collator.tokenizer
        if name.startswith("__") or name in ("collator", "column"):
            raise AttributeError(name)
        return getattr(self.collator, name)


class SNRDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with SNRAdamW by default, reward-drift and noise-fit metrics, and cDPO.

    Same constructor as :class:`trl.DPOTrainer`; without ``args`` it builds an
    :class:`SNRDPOConfig`. A plain ``DPOConfig`` works too (then the optimizer is whatever its
    ``optim`` says). See the module docstring for the metrics and how they are computed.
    """

    _tag_names = [*DPOTrainer._tag_names, "hf_snr"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *more, **kwargs):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SNRDPOConfig(f"{name.split('/')[-1]}-DPO")
        validate_dpo_args(args, warn=not isinstance(args, SNRDPOConfig))  # SNRDPOConfig warned when it was built
        self.flipped_column = getattr(args, "flipped_column", DEFAULT_FLIPPED_COLUMN)  # read during super().__init__
        # Refuse a mistyped flag column now, on the data as given (row numbers are the user's), not mid-training.
        for i, key in ((1, "train_dataset"), (2, "eval_dataset")):  # *more: data_collator, train, eval, ...
            check_flipped_column(kwargs.get(key, more[i] if len(more) > i else None), self.flipped_column, key)
        super().__init__(model, ref_model, args, *more, **kwargs)

        # cDPO: TRL computes the sigmoid term (it rejects unknown loss names), compute_loss adds the rest.
        self._cdpo_weight = sum(w for t, w in zip(args.loss_type, self.loss_weights) if t == CDPO_LOSS)
        self.loss_types = ["sigmoid" if t == CDPO_LOSS else t for t in self.loss_types]  # a copy: args keeps "cdpo"

        if self.flipped_column:
            self.data_collator = _FlagCollator(self.data_collator, self.flipped_column)

        # Per mode: metric name -> [numerator, denominator] (0-d tensors on device until the log).
        self._pair_sums: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}
        self._verified_modes: set[str] = set()
        self._captured: list[tuple[str, torch.Tensor]] | None = None
        self._capture_hooks = [self.model.register_forward_hook(self._capture_hook("policy"), with_kwargs=True)]
        if self.ref_model is not None:
            ref_module = self.accelerator.unwrap_model(self.ref_model)
            self._capture_hooks.append(ref_module.register_forward_hook(self._capture_hook("ref"), with_kwargs=True))

    # -- decay_to="init": anchor on the reference model's own weights ------------------------------
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._anchor_decay_on_reference(optimizer)
        return optimizer

    def _anchor_decay_on_reference(self, optimizer) -> None:
        """With decay_to="init", the decoupled decay pulls toward the reference policy. When this trainer holds a
        reference model with the policy's parameter names and shapes, its weights are the anchor (no copy);
        otherwise SNRAdamW keeps a copy of the first-step values (under PEFT the adapters start at zero for B, so
        plain decay_to="zero" already pulls toward the reference)."""
        from .integration import unwrap_optimizer
        from .optimizer import SNRAdamW

        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, SNRAdamW) or not any(g["decay_to"] == "init" and g["weight_decay"]
                                                     for g in opt.param_groups):
            return
        why = None
        if self.ref_model is None:
            why = "no separate reference model (PEFT or precomputed reference log-probs)"
        elif self.is_deepspeed_enabled or self.is_fsdp_enabled:
            why = "DeepSpeed/FSDP hand the optimizer other tensors than the model's parameters"
        anchors = {}
        if why is None:
            ref = dict(self.accelerator.unwrap_model(self.ref_model).named_parameters())
            in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
            for name, p in self.accelerator.unwrap_model(self.model).named_parameters():
                r = ref.get(name)
                if id(p) in in_opt and r is not None and r.shape == p.shape:
                    anchors[p] = r
        if anchors:
            opt.set_decay_anchors(anchors)
        n = sum(len(g["params"]) for g in opt.param_groups)
        logger.warning("hf_snr: decay_to='init' anchors %d of %d parameter tensors on the reference model's weights%s",
                       len(anchors), n, "" if why is None and len(anchors) == n else
                       f"; the others keep a copy of their first-step values ({why or 'no matching reference weight'})")

    # -- the flipped column: keep it through column removal; never hand it to the model ------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        column = self.flipped_column
        if column and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def compute_ref_log_probs(self, model, inputs):
        # Used by precompute (also for a data set passed to evaluate() later, through our collator).
        if self.flipped_column in inputs:
            inputs = {k: v for k, v in inputs.items() if k != self.flipped_column}
        return super().compute_ref_log_probs(model, inputs)

    # -- observing TRL's per-sequence log-probs -----------------------------------------------------
    def _capture_hook(self, role: str):
        trainer_ref = weakref.ref(self)

        def hook(module, args, kwargs, output):
            trainer = trainer_ref()
            if trainer is None or trainer._captured is None or not kwargs.get("fused_lm_head"):
                return
            log_probs = getattr(output, "log_probs", None)
            if log_probs is not None:
                trainer._captured.append((role, log_probs))

        return hook

    def _sequence_logps(self, per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """TRL's reduction of per-token log-probs to one number per sequence (sum, or LD-DPO's weighting)."""
        shift_mask = completion_mask[..., 1:]
        per_token_logps = per_token_logps[:, -shift_mask.size(1):]  # prompt-learning PEFT prepends virtual tokens
        if self.ld_alpha is None:
            return per_token_logps.sum(dim=1)
        comp_pos = shift_mask.cumsum(dim=1)
        chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
        shared = torch.minimum(chosen_lens, rejected_lens)
        shared = torch.cat([shared, shared], dim=0).to(comp_pos.device).unsqueeze(1)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared)
        tail_mask = comp_pos > shared
        return (per_token_logps * shared_mask).sum(dim=1) + self.ld_alpha * (per_token_logps * tail_mask).sum(dim=1)

    def _logratios(self, captured, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi - log pi_ref) for chosen and rejected, per pair (differentiable through the policy), and the
        policy's and the reference's own margins log pi(chosen) - log pi(rejected) (detached, for pref/*)."""
        policy = [lp for role, lp in captured if role == "policy"]
        ref = [lp for role, lp in captured if role == "ref"]
        mask = inputs["completion_mask"]
        if not policy:
            raise RuntimeError(
                "SNRDPOTrainer could not observe the policy's log-probs: DPOTrainer no longer calls the model with "
                "fused_lm_head=True, or a wrapper bypasses the module's forward hooks. Please report this with your "
                "trl version."
            )
        logps = self._sequence_logps(policy[0], mask)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        else:
            ref_lp = ref[0] if self.ref_model is not None and ref else (policy[1] if len(policy) > 1 else None)
            if ref_lp is None:
                raise RuntimeError(
                    "SNRDPOTrainer could not observe the reference log-probs (no reference forward seen). Please "
                    "report this with your trl version."
                )
            ref_logps = self._sequence_logps(ref_lp, mask)
        ratios = logps - ref_logps  # dtype promotion as in TRL
        chosen, rejected = ratios.chunk(2, dim=0)  # TRL's batch layout: [all chosen; all rejected]
        policy_c, policy_r = logps.detach().chunk(2, dim=0)
        ref_c, ref_r = ref_logps.detach().chunk(2, dim=0)
        return chosen, rejected, policy_c - policy_r, ref_c - ref_r

    def _verify_against_trl(self, mode: str, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Our rewards must reproduce TRL's logged means (same gather); otherwise TRL changed under us."""
        gathered = self.accelerator.gather(torch.stack([chosen_rewards, rejected_rewards], dim=1))
        ours = gathered.float().mean(dim=0).tolist()
        # TRL averages in the rewards' dtype: allow for its rounding in half precision
        rel = 1e-4 if gathered.dtype in (torch.float32, torch.float64) else 4 * torch.finfo(gathered.dtype).eps
        for key, value in zip(("rewards/chosen", "rewards/rejected"), ours):
            logged = self._metrics[mode].get(key)
            if not logged:
                warnings.warn(f"SNRDPOTrainer: TRL logged no {key!r}; cannot cross-check rewards/drift and noise/*")  # noqa: B028 (stacklevel would move the reported location)
                return
            if not abs(value - logged[-1]) <= rel * (1.0 + abs(logged[-1])):
                raise RuntimeError(
                    f"SNRDPOTrainer: recomputed {key} = {value:.6g} but TRL logged {logged[-1]:.6g}; TRL's DPO "
                    "internals changed, so rewards/drift and noise/* would be wrong. Please report this with your "
                    "trl version."
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        flags = None
        if self.flipped_column and self.flipped_column in inputs:
            flags = inputs[self.flipped_column]
            inputs = {k: v for k, v in inputs.items() if k != self.flipped_column}
        self._captured = []
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            captured = self._captured
        finally:
            self._captured = None
        chosen, rejected, policy_margin, ref_margin = self._logratios(captured, inputs)

        if self._cdpo_weight and self.label_smoothing:
            # cDPO = sigmoid loss + eps * beta * delta (log sigmoid(-x) = log sigmoid(x) - x); mean over pairs as TRL.
            linear = self.label_smoothing * self.beta * (chosen - rejected).mean() * self._cdpo_weight
            result = (result[0] + linear, *result[1:]) if return_outputs else result + linear

        chosen_rewards = self.beta * chosen.detach()
        rejected_rewards = self.beta * rejected.detach()
        if mode not in self._verified_modes:
            self._verify_against_trl(mode, chosen_rewards, rejected_rewards)
            self._verified_modes.add(mode)
        self._accumulate(mode, chosen_rewards, rejected_rewards, flags, policy_margin, ref_margin)
        return result

    # -- metrics ------------------------------------------------------------------------------------
    def _accumulate(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor, flags: torch.Tensor | None,
                    policy_margin: torch.Tensor | None = None, ref_margin: torch.Tensor | None = None) -> None:
        """Add this batch's sums (all ranks, padding duplicates dropped) to the interval's totals.

        ``chosen`` / ``rejected``: the implicit rewards; ``policy_margin`` / ``ref_margin``: log pi(chosen) -
        log pi(rejected) of the policy and of the reference (the pref/* metrics; both or neither)."""
        columns = [chosen.float(), rejected.float()]
        if policy_margin is not None:
            columns += [policy_margin.to(chosen.device).float(), ref_margin.to(chosen.device).float()]
        if flags is not None:
            columns.append(flags.to(chosen.device).float())
        pairs = self.accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        chosen, rejected = pairs[:, 0], pairs[:, 1]
        margin = chosen - rejected

        def fit_of(m):
            return (m > 0).float() + 0.5 * (m == 0).float()  # a tie is no preference: counts 1/2

        fit = fit_of(margin)
        count = pairs.new_tensor(float(pairs.size(0)))
        terms = {"rewards/drift": ((chosen.abs() + rejected.abs()).sum(), 2.0 * count)}
        if policy_margin is not None:
            terms["pref/policy_accuracy"] = (fit_of(pairs[:, 2]).sum(), count)
            terms["pref/reference_accuracy"] = (fit_of(pairs[:, 3]).sum(), count)
        if flags is not None:
            flipped = pairs[:, -1]
            clean = 1.0 - flipped
            terms["noise/flipped_fit"] = ((fit * flipped).sum(), flipped.sum())
            terms["noise/clean_fit"] = ((fit * clean).sum(), clean.sum())
            terms["noise/flipped_margin"] = ((margin * flipped).sum(), flipped.sum())
            terms["noise/clean_margin"] = ((margin * clean).sum(), clean.sum())
        sums = self._pair_sums[mode]
        for name, (num, den) in terms.items():
            if name in sums:
                sums[name][0] = sums[name][0] + num
                sums[name][1] = sums[name][1] + den
            else:
                sums[name] = [num, den]

    def _eval_snr_metrics(self) -> dict[str, float]:
        callback = getattr(self, "_snr_callback", None)
        if callback is None:
            return {}
        alpha_note = callback._alpha_note  # metrics() consumes the one-off alpha note; it belongs to the train log
        metrics = callback.metrics(None)
        callback._alpha_note = alpha_note
        metrics.pop("snr/alpha", None)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._pair_sums[mode]
        # An evaluation just ran iff it left metrics; the train summary logged after a final evaluation also
        # arrives in eval mode, and must not get eval_snr/*.
        evaluated = mode == "eval" and bool(self._metrics["eval"] or sums)
        if sums:
            names = list(sums)
            values = torch.stack([v.double() for n in names for v in sums[n]]).tolist()  # one host sync
            for i, name in enumerate(names):
                num, den = values[2 * i], values[2 * i + 1]
                if den > 0:
                    self._metrics[mode][name] = [num / den]  # one pooled value; DPOTrainer.log averages the list
            sums.clear()
        if evaluated:
            for name, value in self._eval_snr_metrics().items():
                self._metrics[mode][name] = [value]
        super().log(logs, start_time)
