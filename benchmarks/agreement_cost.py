"""What agreement=<threshold> costs: per micro-batch filter time, its memory, and DPO seconds per step.

    python benchmarks/agreement_cost.py [--rounds 30] [--dpo_steps 20] [--threads 1] [--json out.jsonl]
        [--skip_dpo]

Part 1, the filter alone (no model): ``end_microbatch()`` on two parameter sets, (a) 420 LoRA-sized tensors
(rank-16 adapters on a 576-wide model, 3.9M parameters: the many-small-tensors case) and (b) 8 dense
tensors of 2.5M parameters (20M: the bandwidth case). A "backward" is simulated by adding a fresh random
gradient to ``p.grad`` (not timed). Reported: median ms per micro-batch for the model and the tensor scope,
the same as a multiple of one torch AdamW (fused) step on the same parameters measured in the same
interleaved rounds, and the filter's buffer as a multiple of the parameters' bytes (expected 1.0: one
gradient-sized buffer).

Part 2, DPO end to end (recipes/noisy_dpo.py, the tiny model, the memorization regime's data, no
evaluation): training seconds per optimizer step (the Trainer's train_runtime / steps) of an effective batch
of 32 pairs taken as (i) one micro-batch with AdamW, (ii) 32 one-pair micro-batches with AdamW (what
micro-batching alone costs), (iii) the same with agreement=0, (iv) 8 micro-batches of 4 pairs with
agreement=0; each run twice in alternating order, the median kept. Ratios to (i) and (ii).

Timing needs a quiet machine: never run it while a study runs on the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from hf_snr.optimizer import SNRAdamW  # noqa: E402

K = 8  # micro-batches per step in part 1


def lora_params(n=420, rank=16, width=576, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn((rank, width) if i % 2 == 0 else (width, rank), generator=gen) * 0.02)
            for i in range(n)]


def dense_params(n=8, numel=2_500_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(numel, generator=gen) * 0.02) for _ in range(n)]


def filter_cost(make, label: str, rounds: int) -> list[dict]:
    params = {scope: make() for scope in ("model", "tensor")}
    opts = {scope: SNRAdamW(ps, lr=1e-3, mask="none", agreement=0.0, agreement_scope=scope)
            for scope, ps in params.items()}
    adam_params = make()
    adam = torch.optim.AdamW(adam_params, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(1)
    noise = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in adam_params] for _ in range(K)]
    for p, g in zip(adam_params, noise[0]):
        p.grad = g.clone()
    times = {"model": [], "tensor": [], "adamw": []}
    for r in range(rounds + 2):
        for scope, opt in opts.items():
            ps = params[scope]
            for p in ps:
                p.grad = None
            elapsed = 0.0
            for j in range(K):
                for p, g in zip(ps, noise[j]):  # the "backward": accumulate a micro-batch gradient (not timed)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
                t0 = time.perf_counter()
                opt.end_microbatch()
                elapsed += time.perf_counter() - t0
            opt.step()
            if r >= 2:
                times[scope].append(elapsed / K)
        t0 = time.perf_counter()
        adam.step()
        if r >= 2:
            times["adamw"].append(time.perf_counter() - t0)
    adam_ms = statistics.median(times["adamw"]) * 1e3
    n_params = sum(p.numel() for p in adam_params)
    rows = []
    for scope, opt in opts.items():
        ms = statistics.median(times[scope]) * 1e3
        buffer = sum(x.numel() * x.element_size() for x in opt._agree.kept_mean.values())
        param_bytes = sum(p.numel() * p.element_size() for p in params[scope])
        rows.append({"kind": "filter", "params": label, "n_params": n_params, "n_tensors": len(adam_params),
                     "scope": scope, "ms_per_microbatch": ms, "adamw_fused_step_ms": adam_ms,
                     "vs_adamw_step": ms / adam_ms, "buffer_vs_param_bytes": buffer / param_bytes})
    return rows


DPO_BASE = ["--config", os.path.join(os.path.dirname(HERE), "recipes", "configs", "offline_tiny.yaml"),
            "--train_pairs", "400", "--eval_pairs", "32", "--eval_strategy", "no", "--logging_steps", "1000",
            "--learning_rate", "1e-2", "--seed", "0", "--noise_seed", "0"]
DPO_ARMS = {
    "adamw, 1 x 32 pairs": ["--optim", "adamw_torch", "--per_device_train_batch_size", "32",
                            "--gradient_accumulation_steps", "1"],
    "adamw, 32 x 1 pair": ["--optim", "adamw_torch", "--per_device_train_batch_size", "1",
                           "--gradient_accumulation_steps", "32"],
    "agreement=0, 32 x 1 pair": ["--optim", "snr_adamw", "--optim_args", "mask=none,agreement=0",
                                 "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "32"],
    "agreement=0, 8 x 4 pairs": ["--optim", "snr_adamw", "--optim_args", "mask=none,agreement=0",
                                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8"],
}


def dpo_cost(steps: int, out_dir: str) -> list[dict]:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "recipes"))
    import noisy_dpo

    seconds = {name: [] for name in DPO_ARMS}
    for rep in range(2):
        names = list(DPO_ARMS) if rep == 0 else list(reversed(DPO_ARMS))
        for name in names:
            argv = DPO_BASE + DPO_ARMS[name] + ["--max_steps", str(steps), "--num_train_epochs", "100",
                                                "--output_dir", os.path.join(out_dir, f"dpo{rep}")]
            res = noisy_dpo.main(*noisy_dpo.parse_args(argv), quiet=True)
            final = [e for e in res["log_history"] if "train_runtime" in e][-1]
            seconds[name].append(final["train_runtime"] / final["step"])
    base = statistics.median(seconds["adamw, 1 x 32 pairs"])
    micro = statistics.median(seconds["adamw, 32 x 1 pair"])
    return [{"kind": "dpo", "arm": name, "s_per_step": statistics.median(v), "runs": v,
             "vs_adamw_one_batch": statistics.median(v) / base, "vs_adamw_same_microbatches":
             statistics.median(v) / micro} for name, v in seconds.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--dpo_steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append the JSON lines here")
    p.add_argument("--skip_dpo", action="store_true")
    p.add_argument("--work_dir", default="outputs/agreement_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = filter_cost(lora_params, "420 LoRA tensors", args.rounds)
    rows += filter_cost(dense_params, "8 dense tensors", max(3, args.rounds // 3))
    if not args.skip_dpo:
        rows += dpo_cost(args.dpo_steps, args.work_dir)
    print("| parameters | scope | ms / micro-batch | x AdamW fused step | buffer / parameter bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "filter":
            print(f"| {r['params']} ({r['n_params'] / 1e6:.1f}M) | {r['scope']} | {r['ms_per_microbatch']:.2f} | "
                  f"{r['vs_adamw_step']:.2f} | {r['buffer_vs_param_bytes']:.2f} |")
    if not args.skip_dpo:
        print("\n| DPO arm (32 pairs per step) | s / step | x AdamW one batch | x AdamW same micro-batches |")
        print("|---|---|---|---|")
        for r in rows:
            if r["kind"] == "dpo":
                print(f"| {r['arm']} | {r['s_per_step']:.3f} | {r['vs_adamw_one_batch']:.2f} | "
                      f"{r['vs_adamw_same_microbatches']:.2f} |")
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
