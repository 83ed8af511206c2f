"""What only a GPU shows, in one short run (a few minutes on one H100/H200): see benchmarks/gpu_check.sh.

1. The fused and foreach SNRAdamW steps against torch's fused AdamW on CUDA, fp32 and bf16, at a few sizes
   (benchmarks/optimizer_step.py --device cuda), one JSON line per row.
2. The CUDA trajectory against the CPU oracle on a small model: 20 steps of SNRAdamW (fused=True, and the
   foreach path) on CUDA and of the per-tensor oracle on CPU from the same start and the same gradients;
   prints the largest parameter and state differences (fp32 rounding: about 1e-6 relative).
3. A short single-GPU SNRDPOTrainer run (recipes/noisy_dpo.py, offline tiny task, bf16, fused=true): the
   run finishes, logs snr/* and says which implementation stepped.

Writes everything under --out (default $OUT or outputs/gpu_check) and prints a summary; exits non-zero on
a failed check. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trajectory_check(out_dir: str) -> dict:
    from hf_snr import SNRAdamW

    results = {}
    for name, kw in {"fused": dict(fused=True), "foreach": dict(foreach=True)}.items():
        for opts in ({}, dict(reduction="row", noise="ema"), dict(variance="ema", decay_to="init", mask="soft")):
            torch.manual_seed(0)
            shapes = [(64, 48), (48,), (33, 7), (5,)]
            start = [torch.randn(s) for s in shapes]
            cpu = [torch.nn.Parameter(x.clone()) for x in start]
            gpu = [torch.nn.Parameter(x.clone().cuda()) for x in start]
            hp = dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, **opts)
            ref = SNRAdamW(cpu, foreach=False, **hp)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = SNRAdamW(gpu, **kw, **hp)
                gen = torch.Generator().manual_seed(1)
                for t in range(20):
                    for a, b in zip(cpu, gpu):
                        g = torch.randn(a.shape, generator=gen) * 0.1 + 0.05
                        if t == 10 and a.dim() == 1:  # one non-finite step: skipped (fused: decided on the device)
                            g[0] = float("nan")
                        a.grad, b.grad = g.clone(), g.clone().cuda()
                    ref.step()
                    opt.step()
                opt.state_dict()  # folds a device-side skip into the step counts (as reading statistics does)
                steps_equal = all(ref.state[a]["step"].item() == opt.state[b]["step"].item() == 19.0
                                  for a, b in zip(cpu, gpu))
            diff = max((a.detach() - b.detach().cpu()).abs().max().item() / (a.abs().max().item() + 1e-12)
                       for a, b in zip(cpu, gpu))
            sdiff = max((ref.state[a]["exp_var"] - opt.state[b]["exp_var"].cpu()).abs().max().item()
                        / (ref.state[a]["exp_var"].abs().max().item() + 1e-30) for a, b in zip(cpu, gpu))
            key = f"{name} {opts or 'default'}"
            results[key] = dict(param_rel_diff=diff, exp_var_rel_diff=sdiff, steps_after_one_skip_equal=steps_equal,
                                warnings=sorted({str(w.message) for w in caught}))
            print(f"trajectory {key}: max relative param diff {diff:.2e}, exp_var {sdiff:.2e}, "
                  f"step counts after one skipped step equal: {steps_equal}"
                  + (f"; warnings: {results[key]['warnings']}" if caught else ""), flush=True)
    with open(os.path.join(out_dir, "trajectory.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "outputs", "gpu_check"))
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100, 400], help="millions of parameters")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dpo_steps", type=int, default=40)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    failed = []
    bench = os.path.join(args.out, "bench.jsonl")
    for size in args.sizes:
        t0 = time.time()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "optimizer_step.py"),
                               "--device", "cuda",
                               "--size", str(size), "--steps", str(args.steps), "--threads", "0", "--no_per_tensor",
                               "--json", bench], cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout.split("\n\n")[1] if "\n\n" in proc.stdout else proc.stdout, flush=True)
        print(f"(size {size}M: {time.time() - t0:.0f} s)", flush=True)
        if proc.returncode:
            failed.append(f"benchmark {size}M: {proc.stderr[-2000:]}")
    traj = trajectory_check(args.out)
    for key, r in traj.items():
        if not (r["param_rel_diff"] < 1e-4 and r["exp_var_rel_diff"] < 1e-4):
            failed.append(f"trajectory {key}: {r}")
    t0 = time.time()
    dpo_out = os.path.join(args.out, "dpo")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "noisy_dpo.py"), "--config",
                           os.path.join(ROOT, "recipes", "configs", "offline_tiny.yaml"), "--use_cpu", "false",
                           "--bf16", "true", "--max_steps", str(args.dpo_steps), "--optim_args", "mask=snr,fused=true",
                           "--output_dir", dpo_out, "--torch_threads", "4"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    with open(os.path.join(args.out, "dpo.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    print(f"SNRDPOTrainer, {args.dpo_steps} steps on one GPU: rc={proc.returncode}, {time.time() - t0:.0f} s; "
          + (proc.stdout.strip().splitlines() or ["no output"])[-1], flush=True)
    if proc.returncode:
        failed.append("dpo: " + proc.stderr[-2000:])
    else:
        res = json.load(open(os.path.join(dpo_out, "results.json")))
        keys = [k for k in res["final"] if k.startswith("snr/")]
        print(f"  logged {len(keys)} snr/* metrics; fused fallback warned: "
              f"{'runs the foreach path instead' in proc.stderr}", flush=True)
    print("gpu_check:", "FAILED\n" + "\n".join(failed) if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
