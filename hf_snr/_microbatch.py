"""variance="microbatch": the hooks that see each micro-batch gradient, and the scales of the unbiased estimate.

A hook on each parameter adds the square of every gradient contribution (one per backward pass) to a
buffer; under DDP the buffers are pooled over the data-parallel ranks at the step (one parameter-sized
all-reduce). With K = k accumulation steps x ranks micro-batch gradients g_i of mean g, the moments phase
takes est = a * sum(sq) - b * g^2 with the scales from :meth:`MicrobatchGradients.scales`, which is
(sum g_i^2 - K g^2) / (K (K - 1)): the unbiased variance of the mean (derivation in docs/algorithm.md).

Imports only torch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ._distributed import all_reduce, local, shard_group

logger = logging.getLogger("hf_snr")

__all__ = ["MicrobatchGradients"]


class MicrobatchGradients:
    """The per-parameter sums of squared micro-batch gradients, their counts and the hooks that fill them.

    ``group``: the data-parallel group whose ranks' micro-batches are pooled; "auto" resolves at the first
    step (the default group when torch.distributed runs and the parameters are not sharded), None: local.
    """

    def __init__(self):
        self.sq: dict[torch.Tensor, torch.Tensor] = {}     # p -> sum of squares of its gradient contributions
        self.count: dict[torch.Tensor, int] = {}           # ... and the number of contributions seen
        self.hooks: dict[torch.Tensor, Any] = {}
        self.group: Any = "auto"
        self.last_count: int | None = None                 # K of the latest micro-batch step

    def __getstate__(self):  # (copies: the hooks are registered again on the copy's parameters)
        state = dict(self.__dict__, hooks={})
        if state["group"] is not None:
            state["group"] = "auto"
        return state

    def watch(self, p: torch.Tensor) -> None:
        if p in self.hooks or not p.requires_grad:
            return

        def hook(grad: torch.Tensor) -> None:
            g = local(grad).detach().float()
            sq = self.sq.get(p)
            if sq is None or sq.shape != g.shape or sq.device != g.device:
                sq = self.sq[p] = torch.zeros_like(g)
                self.count[p] = 0
            sq.addcmul_(g, g)
            self.count[p] += 1

        self.hooks[p] = p.register_hook(hook)

    def buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's sum of squares (zeros when no micro-batch was seen: its contributions are all zero)."""
        sq = self.sq.get(p)
        if sq is None:
            sq = self.sq[p] = torch.zeros_like(local(p), dtype=torch.float32)
            self.count[p] = 0
        return sq

    def _resolve_group(self, all_params):
        if self.group != "auto":
            return self.group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and not any(shard_group(p) is not None for p in all_params):
            logger.warning("hf_snr: variance='microbatch' pools the micro-batch gradients of all %d ranks of the "
                           "default process group (data-parallel replicas, as DDP); set "
                           "optimizer.microbatch_group to change it", dist.get_world_size())
            self.group = dist.group.WORLD
        else:
            self.group = None
        return self.group

    def scales(self, params, all_params) -> tuple[float, float]:
        """(a, b) with est = a * sum(sq) - b * g^2, after pooling the squares over data-parallel ranks; the counts
        restart (the moments phase zeroes the sums)."""
        local_k = max((self.count.get(p, 0) for p in params), default=0)
        group = self._resolve_group(all_params)
        sqs = [self.sq[p] for p in params if self.count.get(p, 0) > 0]
        world = 1
        if group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(group)
            flat = torch.cat([x.reshape(-1) for x in sqs] + [torch.tensor([float(local_k)], device=sqs[0].device
                                                                            if sqs else "cpu")])
            flat = all_reduce(flat, group)
            if int(round(flat[-1].item())) != local_k * world:
                raise RuntimeError(f"variance='microbatch': ranks saw different numbers of micro-batches "
                                   f"({flat[-1].item():g} in all, {local_k} here, {world} ranks)")
            offset = 0
            for x in sqs:
                x.copy_(flat[offset:offset + x.numel()].view_as(x))
                offset += x.numel()
        K = local_k * world
        if K < 2:
            raise RuntimeError(
                f"variance='microbatch' needs k >= 2 micro-batch gradients per optimizer step, got {K} "
                f"({local_k} backward pass(es) x {world} rank(s)). Use gradient accumulation "
                "(gradient_accumulation_steps >= 2) or several data-parallel processes. If you do, the hooks on "
                "the parameters never saw the micro-batches: FSDP2 and DeepSpeed hide them (not supported there)."
            )
        self.last_count = K
        for p in params:
            self.count[p] = 0
        # hook values are the micro-batch gradients divided by k (the loss of each micro-batch is divided
        # by the accumulation count): sum_i g_i^2 = k^2 * sum(sq); est = (sum g_i^2 - K g^2) / (K (K - 1))
        return local_k * local_k / (K * (K - 1)), 1.0 / (K - 1)

    def reset(self) -> None:
        """Forget the micro-batches seen (a skipped step's do not count toward the next)."""
        for p, sq in self.sq.items():
            if self.count.get(p):
                sq.zero_()
                self.count[p] = 0
