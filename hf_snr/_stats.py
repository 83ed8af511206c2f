"""SNRAdamW's statistics: requested before a step, summed during it on the device, finished when read.

One logical step's sums may come from several ``step()`` calls (DeepSpeed ZeRO steps one parameter group
per call): the partial sums collect in ``pending`` until the statistics are read, which finishes them with
one all-reduce (under sharding) and one host sync.

Imports only torch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._distributed import all_reduce
from ._step_args import STAT_KEYS

__all__ = ["Statistics", "finish"]


class Statistics:
    """The request / pending / finished statistics of an optimizer (see :attr:`SNRAdamW.last_stats`)."""

    def __init__(self):
        self.requested = False
        self.step: int | None = None          # the logical step whose sums are pending (or were finished last)
        self.pending: torch.Tensor | None = None
        self.last: dict[str, float] = {}

    def snapshot(self):
        return self.requested, self.step, self.pending

    def restore(self, snapshot) -> None:
        """Undo :meth:`begin` and :meth:`add` of a step that did not happen (a request stays a request)."""
        requested, step, pending = snapshot
        if requested:
            self.requested, self.step, self.pending = True, step, None
        else:
            self.step, self.pending = step, pending

    def begin(self, step_now: int, read: Callable[[], Any]) -> bool:
        """At the step that reached ``step_now``: take a pending request; whether this call sums statistics."""
        if self.requested:
            self.requested = False
            read()  # finish an older pending step first
            self.step, self.pending = step_now, None
        want = self.step == step_now and self.step is not None
        if want and self.pending is None:
            self.pending = torch.zeros(len(STAT_KEYS))
        return want

    def add(self, part: torch.Tensor | None) -> None:
        if part is not None:
            self.pending = self.pending.to(part.device) + part


def finish(total: torch.Tensor, steps: int, *, group, snr_state: dict, read_device_skips: Callable[[], int]
           ) -> dict[str, float]:
    """Reduce the per-rank sums of logical step ``steps`` (one all-reduce over ``group`` when sharded, one host
    sync) into the logged statistics; the running sum of noise in ``snr_state`` moves on to this step."""
    if group is not None:
        total = all_reduce(total, group)
    steps -= read_device_skips()  # with the statistics: the one host sync
    s = dict(zip(STAT_KEYS, total.tolist()))
    snr = snr_state
    interval = max(steps - snr["last_stats_step"], 0)
    snr["cumulative_noise"] += s["noise"] * interval
    snr["last_stats_step"] = steps
    count = s["mask_count"]
    out = {
        "mask_mean": s["mask_sum"] / count if count > 0 else 1.0,
        "active_fraction": s["active_count"] / count if count > 0 else 1.0,
        "signal": s["signal"],
        "noise": s["noise"],
        "population_gain": s["signal"] - s["noise"],
        "cumulative_noise": snr["cumulative_noise"],
        "skipped_steps": float(snr["skipped_steps"]),
    }
    if s["signal"] > 0:  # (undefined when no coordinate moved: absent then, never nan)
        # the learning rate cancels (both carry u = lr q / denom): comparable across a schedule's steps
        out["noise_to_signal"] = s["noise"] / s["signal"]
    return out
