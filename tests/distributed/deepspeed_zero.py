"""Raw DeepSpeed ZeRO (stages 0-3) with SNRAdamW as client optimizer, 2 CPU ranks, one launch.

    torchrun --nproc_per_node 2 deepspeed_zero.py OUT

Every case builds a fresh TinyNet, wraps SNRAdamW with ``deepspeed.initialize`` (gloo,
DS_ACCELERATOR=cpu, fp32) and trains on a fixed sequence of global batches: 2 ranks x gradient
accumulation 2 x micro-batch 4 = the global batch of 16 that the single-process reference (built
on the pytest side from the same _common functions) steps on. Statistics are requested on every
step; the optimizer's process_group is the one hf_snr's integration picks for a DeepSpeed
optimizer chain (the ZeRO optimizer's own partition group; none for unpartitioned stage 0).

Rank 0 writes OUT/zero_results.pt: {case name: {"params", "stats", "calls_per_step",
"local_numel", "total_numel", ...}} or {"error": ...} for the cases that must raise.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

WORLD = 2
GA = 2
MICRO = 4
STEPS = 6
OPT_KWARGS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, rho=0.9, mask="snr",
                  warmup_steps=2)


def cases() -> list[dict]:
    """name, ZeRO stage, optimizer options, whether the Trainer's decay / no-decay groups are used."""
    out = []
    for stage in (0, 1, 2, 3):
        out.append(dict(name=f"zero{stage}", stage=stage, split=False))
    for stage in (1, 2, 3):
        # the Trainer's layout: two parameter groups, i.e. ZeRO calls step() once per group
        out.append(dict(name=f"zero{stage}_two_groups", stage=stage, split=True))
    # ZeRO-3 splits a group into sub-groups of sub_group_size elements; step() runs once per sub-group
    out.append(dict(name="zero3_sub_groups", stage=3, split=False, ds_extra={"sub_group_size": 100}))
    for stage in (2, 3):
        # an odd-sized parameter: ZeRO pads the flat partitions with zeros the optimizer also steps on
        out.append(dict(name=f"zero{stage}_padded", stage=stage, split=False, d_out=3))
    for stage in (1, 2, 3):
        out.append(dict(name=f"zero{stage}_tensor", stage=stage, split=False, opt_extra={"reduction": "tensor"},
                        expect_error=True))
    # the element-wise gate estimators and the decay toward p0 (a copy of each flat partition's first value)
    for stage in (1, 2, 3):
        out.append(dict(name=f"zero{stage}_options", stage=stage, split=True, opt_extra=OPTION_CASES["options"]))
    out.append(dict(name="zero2_signal_step", stage=2, split=False, opt_extra=OPTION_CASES["signal_step"]))
    out.append(dict(name="zero2_row", stage=2, split=False, opt_extra={"reduction": "row"}, expect_error=True))
    return out


OPTION_CASES = {
    "options": {"noise": "ema", "decay_to": "init", "weight_decay": 0.2},
    "signal_step": {"signal": "step", "decay_to": "init", "weight_decay": 0.2},
}
CASE_OPTIONS = {f"zero{s}_options": "options" for s in (1, 2, 3)} | {"zero2_signal_step": "signal_step"}


def ds_config(stage: int, extra: dict | None = None) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # partition every parameter, however small (the default keeps < 1e5-element ones whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    zero.update(extra or {})
    return {
        "train_batch_size": WORLD * GA * MICRO,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GA,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run_case(case: dict, rank: int) -> dict:
    import deepspeed

    from hf_snr import SNRAdamW
    from hf_snr.integration import deepspeed_partition_group

    d_out = case.get("d_out", 4)
    model = _common.tiny_net(seed=0, d_out=d_out)
    total_numel = sum(p.numel() for p in model.parameters())
    kwargs = {**OPT_KWARGS, **case.get("opt_extra", {})}
    opt = SNRAdamW(_common.param_groups(model, kwargs["weight_decay"], case["split"]), **kwargs)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                config=ds_config(case["stage"], case.get("ds_extra")))
    assert engine.zero_optimization_stage() == case["stage"]
    assert dist.get_world_size() == WORLD and dist.get_backend() == "gloo"
    assert engine.gradient_clipping() == 0.0  # DeepSpeed's default clips at 1.0; the reference does not clip

    # the integration's choice of statistics group for this optimizer chain
    group = deepspeed_partition_group(ds_opt, opt)
    if case["stage"] == 0:
        assert group is None, "stage 0 keeps replicas: summing statistics over ranks would double them"
    else:
        assert group is not None and dist.get_world_size(group) == WORLD
    opt.process_group = group

    calls = {"n": 0}
    original_step = opt.step

    def counting_step(*a, **kw):
        calls["n"] += 1
        return original_step(*a, **kw)

    opt.step = counting_step

    stats, calls_per_step = [], []
    for _k, (x, y) in enumerate(_common.regression_batches(STEPS, WORLD * GA * MICRO, d_out=d_out)):
        calls["n"] = 0
        opt.request_stats()
        for j in range(GA):
            lo = (j * WORLD + rank) * MICRO
            loss = torch.nn.functional.mse_loss(engine(x[lo:lo + MICRO]), y[lo:lo + MICRO])
            engine.backward(loss)
            engine.step()
        calls_per_step.append(calls["n"])
        stats.append(dict(opt.last_stats))

    local_numel = sum(st["exp_avg"].numel() for st in opt.state.values() if "exp_avg" in st)
    numel = torch.tensor([float(local_numel)])
    dist.all_reduce(numel)
    if case["stage"] == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {
        "params": params,
        "stats": stats,
        "calls_per_step": calls_per_step,
        "local_numel": local_numel,
        "summed_local_numel": int(numel.item()),
        "total_numel": total_numel,
        "optimizer_chain": _common.optimizer_chain(ds_opt),
        "group_size": None if group is None else dist.get_world_size(group),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", default=None, help="comma-separated case names (debugging)")
    cli = ap.parse_args()
    torch.set_num_threads(1)

    _common.disable_deepspeed_shm_comm()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, f"launched {world} processes, wanted {WORLD}"
    assert int(os.environ.get("WORLD_SIZE", "0")) == WORLD
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu", get_accelerator().device_name()

    # the API the integration used to call for the statistics group: it must be the world here
    from deepspeed.utils import groups

    dp = groups._get_data_parallel_group()
    results: dict = {"_meta": {"world": world, "dp_group_size": dist.get_world_size(dp),
                               "deepspeed": deepspeed.__version__, "torch": torch.__version__}}
    wanted = set(cli.only.split(",")) if cli.only else None
    for case in cases():
        if wanted and case["name"] not in wanted:
            continue
        try:
            res = run_case(case, rank)
            if case.get("expect_error"):
                res = {"error": None, "unexpected_success": True}
        except Exception as err:  # noqa: BLE001 - recorded and judged on the pytest side
            if not case.get("expect_error"):
                traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {err}", "error_type": type(err).__name__}
        results[case["name"]] = res
        dist.barrier()
    if rank == 0:
        torch.save(results, Path(cli.out) / "zero_results.pt")
    dist.barrier()
    dist.destroy_process_group()
    _common.exit_after_teardown(0)


if __name__ == "__main__":
    main()
