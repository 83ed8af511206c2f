"""SNRAdamW checkpoints: what a loaded state must satisfy, and which options win on resume.

Used by :meth:`hf_snr.optimizer.SNRAdamW.load_state_dict`; imports only torch and the options table.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ._distributed import DTensor, local
from .options import GROUP_DEFAULTS, OPTIONS

logger = logging.getLogger("hf_snr")

__all__ = ["check_loaded_state", "apply_resume_rule", "RESUME_OWN", "RESUME_CHECKPOINT"]

# the options whose value in this run wins over the checkpoint's on resume (the optim_args knobs, and snr=)
RESUME_OWN = tuple(k for k in GROUP_DEFAULTS if OPTIONS[k].convert is not None) + ("snr",)
RESUME_CHECKPOINT = ("betas", "eps", "weight_decay")  # AdamW's own: the checkpoint's (lr: the scheduler's)


def apply_resume_rule(saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]], foreign: list[int],
                      alpha_auto: bool = False) -> None:
    """This run's SNR options replace the checkpoint's in ``saved_groups``; one log line names the differences."""
    if len(saved_groups) != len(param_groups):
        return  # torch's load_state_dict refuses it
    notes = []
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if i in foreign:
            continue
        where = f"group {i} " if len(saved_groups) > 1 else ""
        for key in RESUME_OWN:
            if key in saved and saved[key] != group[key] and not (key == "alpha" and alpha_auto):
                notes.append(f"{where}{key}: checkpoint {saved[key]!r}, this run {group[key]!r} (used)")
            saved[key] = group[key]
        for key in RESUME_CHECKPOINT:
            if key in saved and _differs(saved[key], group[key]):
                notes.append(f"{where}{key}: checkpoint {saved[key]!r} (used, as torch does), this run {group[key]!r}")
    if notes:
        logger.warning("hf_snr: resuming with options that differ from the checkpoint's: %s", "; ".join(notes))
        if any("decay_to" in n for n in notes):
            logger.warning("hf_snr: decay_to changed on resume: decay_to='init' anchors on the weights at the "
                           "next step (or on set_decay_anchors), not on the ones the run started from")


def check_loaded_state(saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any],
                       param_groups: list[dict[str, Any]]) -> None:
    """Refuse (ValueError, nothing loaded) a state with non-finite values, negative second moments or wrong shapes."""
    if len(saved_groups) != len(param_groups):
        return  # torch's load_state_dict refuses it, with its own message
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            return
        for pi, (idx, p) in enumerate(zip(saved["params"], group["params"])):
            st = saved_state.get(idx)
            if not isinstance(st, dict):
                continue
            where = (f"SNRAdamW.load_state_dict: refusing the saved state of parameter {pi} of group {gi} "
                     f"(shape {tuple(p.shape)}; state key {idx!r})")
            for key, value in st.items():
                if key in ("step", "exp_var_start"):
                    try:
                        n = float(value.item() if isinstance(value, torch.Tensor) else value)
                    except (TypeError, ValueError, RuntimeError):
                        raise ValueError(f"{where}: {key} must be a number or a one-element tensor, got "
                                         f"{value!r}") from None
                    if not (math.isfinite(n) and n >= 0):
                        raise ValueError(f"{where}: {key} = {n!r} (accepted: a finite count >= 0)")
                    continue
                if not isinstance(value, torch.Tensor) or not value.is_floating_point() or key == "device_skips":
                    continue
                same_kind = (DTensor is not None) and (isinstance(value, DTensor) == isinstance(p, DTensor))
                expected = p.shape if same_kind or DTensor is None else local(p).shape
                if value.shape != expected:
                    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(expected)} (a checkpoint of another model or layout?)")
                shard = local(value)
                bad = int((~torch.isfinite(shard)).sum())
                if bad:
                    raise ValueError(f"{where}: {key} holds {bad} nan/inf value(s) of {shard.numel()} (a corrupt "
                                     "checkpoint, e.g. saved after a non-finite step with nonfinite='propagate'); "
                                     "resume from an earlier checkpoint")
                if key in ("exp_avg_sq", "exp_var", "max_exp_avg_sq"):
                    neg = int((shard < 0).sum())
                    if neg:
                        raise ValueError(f"{where}: {key} holds {neg} negative value(s) (a second moment is "
                                         ">= 0: a corrupt checkpoint)")


def _differs(a: Any, b: Any) -> bool:
    """Whether two option values differ (tuples and lists alike; a tensor lr by value)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return float(a) != float(b)
    return a != b
