"""Which checkpoint to keep, and when to stop, without a validation set: a rule on the logged SNR statistics.

    from hf_snr import MemorizationStoppingCallback
    trainer = Trainer(..., args=TrainingArguments(..., optim="snr_adamw", optim_args="mask=none",
                                                  save_strategy="steps", save_steps=50, logging_steps=50),
                      callbacks=[MemorizationStoppingCallback(stop=True)])

The statistic is ``snr/noise_to_signal`` = memorization_rate / signal: the share of the step's first-order
drop of the training loss that is noise. The learning rate cancels in the ratio (both terms carry
u = lr q / denom), so it means the same under a constant rate and under the Trainer's linear decay to zero.
It works with every ``optim="snr_adamw"`` mask, ``mask="none"`` (AdamW's own step) included.

The rule (:class:`MemorizationRule`): the statistic is smoothed with an EMA over logging steps; a
checkpoint is a candidate once ``min_fraction`` of training has passed; the kept checkpoint is the candidate
with the lowest smoothed value; memorization "dominates" when the smoothed value has stayed above
``(1 + rise)`` times its running minimum for ``patience`` logs in a row, and ``stop=True`` then stops
training. The same code scores logged runs offline (:func:`choose`), which is how the defaults were
chosen (README: "Which checkpoint to keep").

Imports transformers (the callback); :class:`MemorizationRule` and :func:`choose` need nothing else.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from transformers import TrainerCallback

logger = logging.getLogger("hf_snr")

__all__ = ["MemorizationRule", "RuleState", "choose", "MemorizationStoppingCallback"]

METRIC = "snr/noise_to_signal"


@dataclass(frozen=True)
class MemorizationRule:
    """The checkpoint / stopping rule.

    Defaults: the rule chosen on seeds 0-1 of ``recipes/configs/checkpoint_study.yaml`` (``python
    recipes/checkpoint_choice.py docs/checkpoint_study``). On the seeds it never saw it did NOT beat keeping the last
    checkpoint (README, "Which checkpoint to keep"): it is not recommended.
    """

    metric: str = METRIC
    smoothing: float = 1.0      # EMA weight of the newest logged value (1: no smoothing)
    rise: float = 4.0           # memorization dominates above (1 + rise) x the running minimum ...
    patience: int = 3           # ... for this many logs in a row
    min_fraction: float = 0.1   # checkpoints before this share of max_steps are not candidates
    keep: str = "before_rise"   # "before_rise": the last checkpoint before memorization dominated (the last one
                                # if it never did); "min": the lowest smoothed value

    def __post_init__(self):
        if not (isinstance(self.smoothing, (int, float)) and 0.0 < self.smoothing <= 1.0):
            raise ValueError(f"Invalid smoothing: {self.smoothing!r} (accepted: (0, 1])")
        if not (isinstance(self.rise, (int, float)) and math.isfinite(self.rise) and self.rise >= 0.0):
            raise ValueError(f"Invalid rise: {self.rise!r} (accepted: a finite number >= 0)")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"Invalid patience: {self.patience!r} (accepted: an integer >= 1)")
        if not (isinstance(self.min_fraction, (int, float)) and 0.0 <= self.min_fraction < 1.0):
            raise ValueError(f"Invalid min_fraction: {self.min_fraction!r} (accepted: [0, 1))")
        if self.keep not in ("before_rise", "min"):
            raise ValueError(f"Invalid keep: {self.keep!r} (accepted: before_rise, min)")


@dataclass
class RuleState:
    """The rule's running state over one run's logged values."""

    rule: MemorizationRule
    ema: float | None = None
    best: float | None = None       # lowest smoothed value among the candidates
    best_step: int | None = None
    above: int = 0                  # logs in a row above (1 + rise) x best
    last_ok_step: int | None = None  # the latest candidate step not above (1 + rise) x best
    stop_step: int | None = None    # the step at which the rule said memorization dominates
    scores: dict[int, float] = field(default_factory=dict)  # step -> smoothed value
    candidates: set[int] = field(default_factory=set)       # scored steps past min_fraction, up to the stop

    def update(self, step: int, value: float, max_steps: int | None) -> bool:
        """Take the value logged at ``step``; returns True when memorization dominates (from then on)."""
        if value is None or not math.isfinite(value):
            return self.stop_step is not None
        a = self.rule.smoothing
        self.ema = value if self.ema is None else a * value + (1 - a) * self.ema
        self.scores[step] = self.ema
        candidate = not max_steps or step >= self.rule.min_fraction * max_steps
        if not candidate or self.stop_step is not None:
            return self.stop_step is not None
        self.candidates.add(step)
        if self.best is None or self.ema < self.best:
            self.best, self.best_step, self.above = self.ema, step, 0
        elif self.ema > (1 + self.rule.rise) * self.best:
            self.above += 1
        else:
            self.above = 0
        if self.above == 0:
            self.last_ok_step = step
        if self.above >= self.rule.patience:
            self.stop_step = step
        return self.stop_step is not None

    def kept_step(self) -> int | None:
        """The step the rule keeps (among the scored candidate steps)."""
        if self.rule.keep == "min":
            return self.best_step
        return self.last_ok_step if self.stop_step is not None else max(self.candidates, default=None)

    def keeps(self, saved: Sequence[int]) -> int | None:
        """Among the saved checkpoint steps: the one the rule keeps (the latest saved at or before its step)."""
        target = self.kept_step()
        if target is None:
            return None
        if self.rule.keep == "min":
            ok = [s for s in saved if s in self.candidates]
            return min(ok, key=lambda s: self.scores[s]) if ok else None
        ok = [s for s in saved if s <= target]
        return max(ok) if ok else None


def choose(rule: MemorizationRule, steps: Sequence[int], values: Sequence[float], max_steps: int) -> tuple[int | None,
                                                                                                           int | None]:
    """Offline: (the step the rule keeps, the step it would stop at or None) for one run's logged values."""
    st = RuleState(rule)
    for s, v in zip(steps, values):
        if st.update(s, v, max_steps):
            break
    return st.kept_step(), st.stop_step


class MemorizationStoppingCallback(TrainerCallback):
    """Keep (and at the end restore) the checkpoint the memorization rule scores best; optionally stop training.

    Args:
        rule: a :class:`MemorizationRule` (default: the chosen rule); or its fields as keywords.
        stop: stop training once memorization dominates (``patience`` logs in a row; as EarlyStoppingCallback).
        restore: at the end, load the kept checkpoint's weights into the model (needs ``save_strategy`` with
            checkpoints at logging steps; else the kept step is only named).

    The kept checkpoint is in :attr:`best_checkpoint` (a folder, or None) and logged. The state is rebuilt from
    ``state.log_history`` at train start, so a resumed run (``resume_from_checkpoint``) continues the rule where it
    was. Needs the ``snr/*`` statistics in the log: ``optim="snr_adamw"`` (any mask; ``mask="none"`` for AdamW's
    step).
    """

    def __init__(self, rule: MemorizationRule | None = None, *, stop: bool = False, restore: bool = True, **fields):
        self.rule = rule if rule is not None else MemorizationRule(**fields)
        if rule is not None and fields:
            raise ValueError("pass either rule= or its fields, not both")
        self.stop, self.restore = bool(stop), bool(restore)
        self.best_checkpoint: str | None = None
        self.kept_step: int | None = None
        self._state = RuleState(self.rule)
        self._saved: dict[int, str] = {}
        self._warned = False

    # -- events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._state = RuleState(self.rule)
        for entry in state.log_history:  # a resumed run: replay what the checkpoint's trainer state logged
            if self.rule.metric in entry:
                self._state.update(int(entry["step"]), entry[self.rule.metric], state.max_steps)
        self._saved = {}
        if os.path.isdir(args.output_dir):
            for name in os.listdir(args.output_dir):
                m = re.fullmatch(r"checkpoint-(\d+)", name)
                if m and int(m.group(1)) <= state.global_step:
                    self._saved[int(m.group(1))] = os.path.join(args.output_dir, name)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.rule.metric not in logs:
            if "loss" in logs and not self._warned:
                logger.warning("hf_snr: MemorizationStoppingCallback sees no %s in the log: it needs optim='snr_adamw' "
                               "(mask='none' for AdamW's own step)", self.rule.metric)
                self._warned = True
            return control
        dominated = self._state.update(state.global_step, logs[self.rule.metric], state.max_steps)
        if dominated and self.stop and not control.should_training_stop:
            logger.warning("hf_snr: memorization dominates at step %d (%s %.4g > (1 + %g) x its minimum %.4g at step "
                           "%s for %d logs): stopping", state.global_step, self.rule.metric, self._state.ema,
                           self.rule.rise, self._state.best, self._state.best_step, self.rule.patience)
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._saved[state.global_step] = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        saved = {s: p for s, p in self._saved.items() if os.path.isdir(p)}
        self.kept_step = self._state.kept_step()
        step = self._state.keeps(sorted(saved))
        if step is not None:
            self.kept_step, self.best_checkpoint = step, saved[step]
        logger.warning("hf_snr: MemorizationStoppingCallback keeps step %s (%s)%s", self.kept_step,
                       self.best_checkpoint or "no checkpoint saved at that step",
                       "" if self._state.stop_step is None else f"; memorization dominated from step "
                                                               f"{self._state.stop_step}")
        if self.restore and self.best_checkpoint and model is not None:
            _load_weights(model, self.best_checkpoint)
        return control

    def summary(self) -> dict[str, Any]:
        """What the rule decided: kept step and checkpoint, stop step, the rule."""
        return {"kept_step": self.kept_step, "best_checkpoint": self.best_checkpoint,
                "stop_step": self._state.stop_step, "rule": asdict(self.rule)}


def _load_weights(model, folder: str) -> None:
    """Load a Trainer checkpoint's weights into ``model`` (full model or PEFT adapter, safetensors or bin)."""
    import torch

    for name in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if name.startswith("adapter"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, sd)
        else:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected or len(missing) > len(sd) // 2:  # (a few missing keys: tied weights a checkpoint omits)
                raise RuntimeError(f"hf_snr: the kept checkpoint {folder} does not fit the model (missing "
                                   f"{missing[:3]}, unexpected {unexpected[:3]})")
        logger.warning("hf_snr: restored the weights of %s", folder)
        return
    logger.warning("hf_snr: no weights found in %s; the model is left as trained", folder)
