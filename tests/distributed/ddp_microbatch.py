"""Worker: variance="microbatch" under 2-process DDP (gloo, CPU) == one process seeing the same micro-batches.

Launched by tests/test_fsdp2.py as ``torchrun --nproc_per_node 2 tests/distributed/ddp_microbatch.py``. Each
rank accumulates GA = 2 micro-batches (the first under ``no_sync``), so a step's gradient is the mean of
K = 4 micro-batch gradients. Rank 0 also runs a plain single-process copy that accumulates the same 4
micro-batches (GA = 4). The hooks see rank-local contributions (g_i / 2 on each rank, g_i / 4 in the single
process); SNRAdamW pools the squared contributions over the ranks with one all-reduce and scales them by the
local count, so both estimate the same unbiased variance of the 4-micro-batch mean: the parameters, the
variance state and the statistics must agree. Prints ``DDP-MICROBATCH-OK``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hf_snr.optimizer import SNRAdamW  # noqa: E402

GA, WORLD, MICRO, STEPS = 2, 2, 8, 6
HP = dict(lr=2e-2, weight_decay=0.05, warmup_steps=2, variance="microbatch", noise="ema", mask="soft", alpha=0.5)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def micro_batch(step: int, i: int):
    gen = torch.Generator().manual_seed(100 * step + i)
    x = torch.randn(MICRO, 6, generator=gen)
    return x, x[:, :3] * 0.5 + 0.3 * torch.randn(MICRO, 3, generator=gen)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"this check needs exactly {WORLD} processes, got world size {world}"
    torch.set_num_threads(1)
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = SNRAdamW(model.parameters(), **HP)
    if rank == 0:
        ref = net()
        ref_opt = SNRAdamW(ref.parameters(), **HP)
        ref_opt.microbatch_group = None  # a plain single-process run that happens to live in rank 0
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        for j in range(GA):
            x, y = micro_batch(step, rank * GA + j)
            if j < GA - 1:
                with ddp.no_sync():
                    (nn.functional.mse_loss(ddp(x), y) / GA).backward()
            else:
                (nn.functional.mse_loss(ddp(x), y) / GA).backward()
        opt.request_stats()
        opt.step()
        stats = dict(opt.last_stats)
        assert opt.last_microbatch_count == GA * WORLD, opt.last_microbatch_count
        if rank == 0:
            ref_opt.zero_grad()
            for i in range(GA * WORLD):
                x, y = micro_batch(step, i)
                (nn.functional.mse_loss(ref(x), y) / (GA * WORLD)).backward()
            ref_opt.request_stats()
            ref_opt.step()
            assert ref_opt.last_microbatch_count == GA * WORLD
            for (name, a), b in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
                torch.testing.assert_close(opt.state[a]["exp_var"], ref_opt.state[b]["exp_var"], rtol=1e-4,
                                           atol=1e-9, msg=f"step {step} exp_var {name}")
            for key, value in ref_opt.last_stats.items():
                assert abs(stats[key] - value) <= 1e-4 * abs(value) + 1e-8, (step, key, stats[key], value)
    # the replicas stay identical (the pooled variance is the same on every rank)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    other = flat.clone()
    dist.broadcast(other, src=0)
    assert torch.equal(flat, other)
    if rank == 0:
        print("DDP-MICROBATCH-OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    _common.exit_after_teardown(0)


if __name__ == "__main__":
    main()
