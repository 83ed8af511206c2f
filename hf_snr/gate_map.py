"""Where the gate closes: the mean gate q of every parameter tensor over training, from the optimizer's state.

:func:`tensor_gates` recomputes, for each tensor of an :class:`hf_snr.SNRAdamW`, the gate its last step
used, from the state that step left (``exp_avg`` = m, ``exp_var`` = s, ``step`` = t, ``exp_var_start``)
and the group's options, with the optimizer's own functions: :class:`hf_snr._step_args.StepArgs` (the
options resolved as the step resolves them), :func:`hf_snr._step_args.tensor_scalars` (bias corrections,
the ``noise="ema"`` scale c_t, whether the gate is still open in its warm-up),
:func:`hf_snr._reference._signal_noise` (mu^2 and sigma^2) and :func:`hf_snr._fused_common.mask` (q from
them, per element or from the per-row / per-tensor sums of :func:`hf_snr._step_args.row_sums`).
``mask="none"``, ``snr=False`` and the warm-up give q = 1.

The mean is over the coordinates that have had a gradient (``exp_avg_sq`` > 0), as the optimizer's
``last_stats["mask_mean"]`` counts them, so never-seen embedding rows do not read as closed gates; the
count of those coordinates is kept too, so the numel-weighted mean of the per-tensor means over all
tensors is the optimizer's ``mask_mean`` of that step.

:class:`GateMapCallback` writes ``OUTPUT_DIR/gate_map.jsonl``, one line per recorded optimizer step::

    {"step": 10, "gates": {"model.layers.0.self_attn.q_proj.weight": 0.71, ...}, "seen": {name: count}}

every ``every`` optimizer steps and at the last one. It reads the state right after the optimizer step
(``on_optimizer_step``, before the Trainer clears the gradients, which ``signal="step"`` needs).
``recipes/plot_gate_map.py`` groups the tensors by layer and module type and plots them.

Under sharding (FSDP2, ZeRO) each rank sees its shard: element and row gates are exact (FSDP2 shards
whole rows), a tensor gate is recomputed from the local shard's sums, not the all-reduced ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import TrainerCallback

from ._distributed import local
from ._fused_common import mask as gate_mask
from ._reference import _signal_noise
from ._step_args import GroupTensors, StepArgs, q_shape, row_sums, tensor_scalars

GATE_MAP_FILE = "gate_map.jsonl"

__all__ = ["tensor_gates", "GateMapCallback", "unwrap_optimizer", "parameter_names", "GATE_MAP_FILE"]


def unwrap_optimizer(optimizer):
    """The SNRAdamW inside accelerate's / the Trainer's wrappers (``.optimizer`` chains)."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "snr_state") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 10:
            break
    return optimizer


def parameter_names(model) -> dict[int, str]:
    """id(parameter) -> its first name in ``model.named_parameters`` (tied weights: the first name), with a
    DDP wrapper's ``module.`` prefix dropped."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("module."):
            name = name[len("module."):]
        names.setdefault(id(p), name)
    return names


def _gate(p: torch.Tensor, state: dict[str, Any], args: StepArgs) -> torch.Tensor:
    """The gate q of the last step of one tensor (the shape of its local shard)."""
    m = local(state["exp_avg"])
    t = float(state["step"])
    start = state.get("exp_var_start")
    k = tensor_scalars(args, t, 0.0 if start is None else float(start))
    if k["open"]:  # snr=False, mask="none", or the warm-up: the step was AdamW's
        return torch.ones_like(m)
    if args.signal == "step" and p.grad is None:
        raise RuntimeError("gate_map: signal='step' gates need the step's gradient, and this parameter has none "
                           "(read the gates right after optimizer.step(), before zero_grad)")
    s = local(state["exp_var"]).float()
    mu2, sig2 = _signal_noise(GroupTensors(grads=[p.grad]), 0, args, m, s, k)
    if args.reduced:
        q = gate_mask(args.mask, row_sums(mu2, args.reduction).float(), row_sums(sig2, args.reduction).float(),
                      args.alpha, args.softness, args.c)
        return q.reshape(q_shape(m, args.reduction)).expand_as(m)
    return gate_mask(args.mask, mu2, sig2, args.alpha, args.softness, args.c)


@torch.no_grad()
def tensor_gates(optimizer, names: dict[int, str] | None = None) -> dict[str, tuple[float | None, int]]:
    """{name: (mean gate over the coordinates that have had a gradient, their count)} of every tensor with state.

    ``names``: id(parameter) -> name (:func:`parameter_names`); tensors without one are called
    ``group<g>.param<i>``. A tensor none of whose coordinates has had a gradient has mean None.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not hasattr(optimizer, "snr_state"):
        raise TypeError(f"gate_map: needs an hf_snr.SNRAdamW optimizer, got {type(optimizer).__name__}")
    names = names or {}
    out: dict[str, tuple[float | None, int]] = {}
    for g, group in enumerate(optimizer.param_groups):
        args = StepArgs.from_group(group)
        for i, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state or "step" not in state or "exp_avg" not in state:
                continue  # no step yet (no gradient so far)
            seen = local(state["exp_avg_sq"]) > 0
            count = int(seen.sum())
            q = _gate(p, state, args)
            mean = float(torch.where(seen, q.float(), 0.0).sum(dtype=torch.float64)) / count if count else None
            out[names.get(id(p), f"group{g}.param{i}")] = (mean, count)
    return out


class GateMapCallback(TrainerCallback):
    """Every ``every`` optimizer steps (and at the last one) append the per-tensor mean gates to
    ``output_dir/gate_map.jsonl`` (``output_dir``: the Trainer's, unless given). Main process only."""

    def __init__(self, every: int, output_dir: str | None = None, filename: str = GATE_MAP_FILE):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid gate map interval: {every!r} (accepted: an integer >= 1 optimizer steps)")
        self.every = every
        self.output_dir = output_dir
        self.filename = filename
        self.path: str | None = None
        self._names: dict[int, str] | None = None
        self._last = -1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.path = os.path.join(self.output_dir or args.output_dir, self.filename)
        self._names = parameter_names(model) if model is not None else {}
        if state.is_world_process_zero:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            if state.global_step == 0:  # a fresh run starts a fresh file; a resumed one appends
                open(self.path, "w").close()
        self._last = state.global_step

    def record(self, step: int, optimizer) -> dict[str, Any]:
        gates = tensor_gates(optimizer, self._names)
        entry = {"step": int(step), "gates": {k: v[0] for k, v in gates.items()},
                 "seen": {k: v[1] for k, v in gates.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self._last = step
        return entry

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step + 1  # the Trainer counts this step after on_optimizer_step
        if state.is_world_process_zero and (step % self.every == 0 or step == state.max_steps):
            self.record(step, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        # a run that stopped before max_steps (early stopping): its last state, when the gradient is not needed
        if state.is_world_process_zero and self._last < state.global_step and optimizer is not None:
            opt = unwrap_optimizer(optimizer)
            if all(g.get("signal") != "step" for g in getattr(opt, "param_groups", [])):
                self.record(state.global_step, optimizer)
