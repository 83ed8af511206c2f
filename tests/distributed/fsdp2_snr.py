"""Worker: SNRAdamW on a 2-process FSDP2 (fully_shard, gloo, CPU) model == one process, full batch.

Launched by tests/test_fsdp2.py as ``torchrun --nproc_per_node 2 tests/distributed/fsdp2_snr.py``.
Each rank holds a Shard(0) DTensor slice of every parameter (uneven shards included, and an empty
one: a (1, 7) weight leaves rank 1 nothing) and trains on its half of the batch; FSDP2 averages
the gradients. Rank 0 also trains a plain single-process copy (same seed, same full batch) with no
process group at all. After every step the full parameters, the optimizer state and, at requested
steps, last_stats must agree; with reduction="tensor" that only holds if the per-tensor sums are
all-reduced over the shard group, and the statistics only if they are summed over it.

Cases: element and tensor reductions, all three masks, both code paths (the foreach one also with
blocks that cut the local shards into views), and both ways an optimizer
meets FSDP2: constructed after fully_shard (on the DTensor parameters), and accelerate's way
(constructed on the original parameters, then its param_groups re-pointed to the sharded ones).
A gradient that is nan on rank 1 only must make *both* ranks skip the step. Prints one
``FSDP2-SNR-OK <case>`` line per case; any mismatch raises (non-zero exit).

Rounding. The sharded gradient is a sum in another order than the single-process one, so it differs
by a few ulps. The soft and hard gates have a kink (and every gate a threshold, q = 1/2, for
active_fraction): a coordinate (or, per tensor, a whole tensor) within rounding of it may fall either
way, on one CPU and not another. So each step is compared from a common start (after the
comparison the reference takes the sharded run's parameters and state), a coordinate whose gate came
within 1e-4 (relative) of its kink in the reference is left out of that step's comparison, and the
count-based statistics get a tolerance of the share of coordinates that were that close.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import hf_snr._foreach as foreach_module  # the foreach path's block size
from hf_snr.optimizer import SNRAdamW

STEPS = 7
NAN_STEP = 5          # rank 1 alone sees a nan gradient here: every rank must skip
STATS_STEPS = {3, 4, 6, 7}
BATCH = 32
CASES = [
    # (reduction, mask, foreach, construct, CPU block size of the foreach path: None = default, other options)
    ("element", "snr", True, "after", 5, {}),
    ("element", "soft", False, "repoint", None, {}),
    ("tensor", "soft", True, "after", None, {}),
    ("tensor", "hard", False, "after", None, {}),
    ("tensor", "snr", True, "repoint", 5, {}),
    # the gate estimators: row sums are local to a Shard(0) shard; decay_to=init keeps a sharded p0
    ("row", "soft", True, "after", None, {"noise": "ema"}),
    ("row", "snr", False, "repoint", None, {"decay_to": "init"}),
    ("element", "snr", True, "repoint", 5, {"noise": "ema", "decay_to": "init"}),
    ("element", "soft", False, "after", None, {"signal": "step"}),
]
HP = dict(lr=2e-2, weight_decay=0.05, warmup_steps=2, alpha=0.5, softness=2.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(12, 16)
        self.l2 = nn.Linear(16, 7)   # 7 rows: shards of 4 and 3
        self.l3 = nn.Linear(7, 1)    # 1 row: rank 1's shard is empty

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def batch(step):
    """A noisy linear teacher: gradients carry signal, so the gates neither all open nor all close."""
    teacher = torch.randn(12, 1, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 12, generator=gen)
    return x, x @ teacher + 0.5 * torch.randn(BATCH, 1, generator=gen)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close(a, b, what, rtol=1e-5, atol=1e-6, keep=None):
    if keep is not None:
        a, b = a[keep], b[keep]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


KINK_RTOL = 1e-4


def near_kinks(opt, mask, reduction):
    """Per parameter of ``opt``: (coordinates near the gate's kink, coordinates near q = 1/2), from its state."""
    from hf_snr.optimizer import ema_noise_scale

    out = []
    for group in opt.param_groups:
        alpha, c = group["alpha"], group["alpha"] * group["softness"]
        for p in group["params"]:
            st = opt.state[p]
            t = st["step"].item()
            if group["signal"] == "ema":
                mu2 = (st["exp_avg"] / (1 - group["betas"][0] ** t)).square()
            else:
                mu2 = p.grad.float().square()
            sig2 = st["exp_var"] / (1 - group["rho"] ** t)
            if group["noise"] == "ema":
                sig2 = sig2 * ema_noise_scale(t, group["betas"][0])
            if reduction == "tensor" or (reduction == "row" and mu2.dim() < 2):
                mu2, sig2 = mu2.sum().expand_as(mu2), sig2.sum().expand_as(sig2)
            elif reduction == "row":
                mu2, sig2 = (x.sum(1, keepdim=True).expand_as(x) for x in (mu2, sig2))

            def near(a, b):
                return (a - b).abs() <= KINK_RTOL * (a + b)

            kink = near(mu2, alpha * sig2) if mask in ("soft", "hard") else torch.zeros_like(mu2, dtype=torch.bool)
            if t <= group["warmup_steps"]:
                out.append((torch.zeros_like(kink), torch.zeros_like(kink)))
                continue
            # q = 1/2: snr at mu2 = c sig2; hard on the kink itself; soft where excess = softness sig2
            half = {"snr": near(mu2, c * sig2), "hard": kink,
                    "soft": near(mu2, (alpha + group["softness"]) * sig2)}[mask]
            out.append((kink, half | kink))
    return out


def run_case(rank, mesh, reduction, mask, foreach, construct, block, extra):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    # a block of 5 elements cuts the local shards into views (the reference keeps the default)
    default_block = foreach_module._CPU_BLOCK_NUMEL

    hp = dict(HP, reduction=reduction, mask=mask, foreach=foreach, **extra)
    torch.manual_seed(0)
    model = Net()
    ref = None
    if rank == 0:
        ref = Net()
        ref.load_state_dict(model.state_dict())
        ref_opt = SNRAdamW(ref.parameters(), **hp)

    if construct == "repoint":  # accelerate: optimizer first, on the original parameters
        opt = SNRAdamW(model.parameters(), **hp)
        before = list(model.parameters())
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = list(model.parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in sharded)
    assert model.l3.weight.to_local().numel() == (7 if rank == 0 else 0)
    if construct == "repoint":
        mapping = {id(old): new for old, new in zip(before, sharded)}
        for group in opt.param_groups:
            group["params"] = [mapping[id(p)] for p in group["params"]]
    else:
        opt = SNRAdamW(model.parameters(), **hp)

    half = BATCH // 2
    mask_means = []
    for step in range(1, STEPS + 1):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
        if step == NAN_STEP and rank == 1:
            model.l2.weight.grad.to_local()[0, 0] = float("nan")
        if step in STATS_STEPS:
            opt.request_stats()
        foreach_module._CPU_BLOCK_NUMEL = block or default_block
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        foreach_module._CPU_BLOCK_NUMEL = default_block
        skipped = any("non-finite gradient" in str(w.message) for w in caught)
        assert skipped == (step == NAN_STEP), (rank, step, skipped)

        if rank == 0:
            ref_opt.zero_grad()
            nn.functional.mse_loss(ref(x), y).backward()
            if step == NAN_STEP:
                ref.l2.weight.grad[0, 0] = float("nan")
            if step in STATS_STEPS:
                ref_opt.request_stats()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref_opt.step()

        # full_tensor() and reading last_stats (its all-reduce) are collectives: every rank takes
        # part, rank 0 compares
        stats = dict(opt.last_stats) if step in STATS_STEPS else None
        got = [full(p.detach()) for p in model.parameters()]
        keys = ("exp_avg", "exp_avg_sq", "exp_var") + (("param_init",) if extra.get("decay_to") == "init" else ())
        got_state = [{k: full(opt.state[p][k]) for k in keys} if opt.state[p] else None for p in model.parameters()]
        if rank == 0:
            where = f"{reduction}/{mask}/foreach={foreach}/{construct}/{extra} step {step}"
            near = near_kinks(ref_opt, mask, reduction)
            n_kink = sum(int(k.sum()) for k, _ in near)
            n_half = sum(int(h.sum()) for _, h in near)
            n_all = sum(p.numel() for p in ref.parameters())
            assert n_kink <= 0.05 * n_all, (where, n_kink, n_all)  # the comparison still covers nearly everything
            for (name, r), g, s, (kink, _) in zip(ref.named_parameters(), got, got_state, near):
                close(g, r.detach(), f"{where} param {name}", keep=~kink)
                close(s["exp_var"], ref_opt.state[r]["exp_var"], f"{where} exp_var {name}", atol=1e-8)
            if step in STATS_STEPS:
                mask_means.append(stats["mask_mean"])
                for key, value in ref_opt.last_stats.items():
                    mine = stats[key]
                    tol = 1e-4 * abs(value) + 1e-9
                    if key in ("mask_mean", "active_fraction"):
                        tol += n_half / n_all  # a coordinate within rounding of a threshold may fall either way
                    elif n_kink and key in ("signal", "noise", "population_gain", "cumulative_noise"):
                        tol += 1e-2 * abs(value)  # a few coordinates' share of the sums
                    assert abs(mine - value) <= tol, (where, key, mine, value)
            assert opt.snr_state == {**ref_opt.snr_state, "cumulative_noise": opt.snr_state["cumulative_noise"]}
            # the next step starts from the same point: rounding differences do not compound through the kinks
            with torch.no_grad():
                for r, g, s in zip(ref.parameters(), got, got_state):
                    r.copy_(g)
                    if s is not None:
                        for k in keys:
                            ref_opt.state[r][k].copy_(s[k])
    # both ranks hold the same (all-reduced) statistics
    mine = torch.tensor([opt.last_stats[k] for k in sorted(opt.last_stats)], dtype=torch.float64)
    other = mine.clone()
    dist.broadcast(other, src=0)
    assert torch.equal(mine, other), (rank, mine, other)
    assert opt.snr_state["skipped_steps"] == 1 and opt.snr_state["steps"] == STEPS - 1
    if rank == 0:  # the case exercised a gate that was not simply open
        print("mask means", reduction, mask, mask_means, flush=True)
        assert min(mask_means) < 0.99, mask_means


def main():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"this check needs exactly 2 processes, got world size {world}"
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    for case in CASES:
        run_case(rank, mesh, *case)
        dist.barrier()
        if rank == 0:
            print("FSDP2-SNR-OK", "/".join(map(str, case)), flush=True)
    dist.destroy_process_group()
    _common.exit_after_teardown(0)


if __name__ == "__main__":
    sys.exit(main())
