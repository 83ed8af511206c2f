"""Worker: agreement=<threshold> under 2-process DDP and 2-process FSDP2 (gloo, CPU) == one process seeing the
same micro-batches.

Launched by tests/test_agreement.py as ``torchrun --nproc_per_node 2 tests/distributed/agreement.py``. A step
accumulates GA = 4 global micro-batches; global micro-batch j is the j-th backward pass of both ranks together
(MICRO examples on each rank). Its targets are negated for some (step, j): those micro-batches point against
the others, so the filter must drop some of them and keep the rest. Rank 0 also runs a plain single-process
copy whose micro-batch j holds both ranks' examples (2 x MICRO). The keep/drop decisions, the parameters and
the optimizer state must agree with it, and the ranks must stay identical.

Cases: DDP with no_sync on the non-final micro-batches (synced=True on the last one only, as the Trainer
passes it), DDP with synced unknown (None), FSDP2 with a gradient sync on every micro-batch (model and tensor
scopes, and the momentum reference). Prints ``AGREEMENT-OK <case>`` per case.
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

GA, WORLD, MICRO, STEPS = 4, 2, 3, 5
HP = dict(lr=2e-2, weight_decay=0.05, warmup_steps=1, mask="snr", agreement=0.0)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def examples(step: int, j: int, rank: int):
    """Rank ``rank``'s share of global micro-batch j of ``step``; some micro-batches have negated targets."""
    gen = torch.Generator().manual_seed(1000 * step + 10 * j + rank)
    x = torch.randn(MICRO, 6, generator=gen)
    y = x[:, :3] * 0.8 + 0.1 * torch.randn(MICRO, 3, generator=gen)
    if (step + j) % 3 == 2:  # a "noisy" micro-batch: the opposite target
        y = -y
    return x, y


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y) / GA


def reference(steps: int, scope: str, ref: str = "kept"):
    """One process; micro-batch j = both ranks' examples. Returns (model, optimizer, decisions)."""
    model = net()
    opt = SNRAdamW(model.parameters(), **HP, agreement_scope=scope, agreement_reference=ref)
    opt.agreement_group = None
    decisions = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        for j in range(GA):
            parts = [examples(step, j, r) for r in range(WORLD)]
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            loss_of(model, x, y).backward()
            decisions.append(opt.end_microbatch())
        opt.step()
    return model, opt, decisions


def check_decisions(case, decisions, ref_decisions):
    assert decisions == ref_decisions, f"{case}: decisions {decisions} != single process {ref_decisions}"
    assert 0.0 in decisions and decisions.count(1.0) > STEPS, f"{case}: the check needs drops and keeps: {decisions}"


def run_ddp(rank: int, synced_known: bool):
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = SNRAdamW(model.parameters(), **HP)
    decisions = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        for j in range(GA):
            x, y = examples(step, j, rank)
            last = j == GA - 1
            if last:
                loss_of(ddp, x, y).backward()
            else:
                with ddp.no_sync():
                    loss_of(ddp, x, y).backward()
            decisions.append(opt.end_microbatch(synced=last if synced_known else None))
        opt.step()
    return model, opt, decisions


def run_fsdp2(rank: int, scope: str, ref: str = "kept"):
    from torch.distributed.fsdp import fully_shard

    model = net()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = SNRAdamW(model.parameters(), **HP, agreement_scope=scope, agreement_reference=ref)
    decisions = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        for j in range(GA):
            x, y = examples(step, j, rank)
            model.set_requires_gradient_sync(True)  # sync_each_batch: each micro-batch reduce-scattered
            loss_of(model, x, y).backward()
            decisions.append(opt.end_microbatch(synced=True))
        opt.step()
    return model, opt, decisions


def full(t):
    from hf_snr._distributed import DTensor

    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def compare(case, rank, model, opt, decisions, scope, ref="kept"):
    ok = torch.tensor([1])
    names = [n for n, _ in model.named_parameters()]
    params = [full(p.detach()) for p in model.parameters()]
    states = [full(opt.state[p]["exp_avg"]) for p in model.parameters()]
    decisions_all = [None] * WORLD
    dist.all_gather_object(decisions_all, decisions)
    assert decisions_all[0] == decisions_all[1], f"{case}: ranks decided differently: {decisions_all}"
    if rank == 0:
        ref_model, ref_opt, ref_decisions = reference(STEPS, scope, ref)
        check_decisions(case, decisions, ref_decisions)
        for name, a, s, b in zip(names, params, states, ref_model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
            torch.testing.assert_close(s, ref_opt.state[b]["exp_avg"], rtol=1e-5, atol=1e-7, msg=f"{case} {name}")
    # the replicas (DDP) / the gathered parameters (FSDP2) are the same on every rank
    flat = torch.cat([p.reshape(-1) for p in params])
    other = flat.clone()
    dist.broadcast(other, src=0)
    assert torch.equal(flat, other), f"{case}: ranks differ"
    dist.all_reduce(ok)
    if rank == 0:
        print(f"AGREEMENT-OK {case}", flush=True)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"this check needs exactly {WORLD} processes, got world size {world}"
    torch.set_num_threads(1)
    for case, fn, scope, ref in (("ddp", lambda: run_ddp(rank, True), "model", "kept"),
                                 ("ddp-synced-unknown", lambda: run_ddp(rank, False), "model", "kept"),
                                 ("fsdp2", lambda: run_fsdp2(rank, "model"), "model", "kept"),
                                 ("fsdp2-tensor-scope", lambda: run_fsdp2(rank, "tensor"), "tensor", "kept"),
                                 ("fsdp2-momentum", lambda: run_fsdp2(rank, "model", "momentum"), "model",
                                  "momentum")):
        model, opt, decisions = fn()
        compare(case, rank, model, opt, decisions, scope, ref)
        del model, opt
    dist.barrier()
    dist.destroy_process_group()
    _common.exit_after_teardown(0)


if __name__ == "__main__":
    main()
