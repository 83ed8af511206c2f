"""What state_dtype="bfloat16" (exp_var in bf16) changes on the two recipes, against float32, same seed.

    python benchmarks/state_dtype_effect.py [--grok_steps 2000] [--dpo_epochs 5]

Runs recipes/grokking.py (paper setting, --grok_steps steps) and recipes/noisy_dpo.py (offline tiny task, the
many-passes regime: 400 pairs, --dpo_epochs epochs) twice each with fused SNRAdamW, exp_var in float32 and in
bfloat16, and prints per recipe: the largest and mean difference of the logged gate mean (snr/mask_mean), of
snr/active_fraction (the share of gate decisions q > 1/2), and the final metrics of both runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def grok(state_dtype, steps, out):
    import grokking

    args = grokking.parse_args(["--config", os.path.join(ROOT, "recipes/configs/grokking/grokking.yaml"),
                                "--optim", "snr_adamw", "--optim_args", f"fused=true,state_dtype={state_dtype}",
                                "--max_steps", str(steps), "--output_dir", out, "--stop_after_grok", "0"])
    res = grokking.main(args)
    rows = [r for r in res["log"] if "snr/mask_mean" in r]
    return ([(r["step"], r["snr/mask_mean"], r["snr/active_fraction"]) for r in rows],
            {k: rows[-1][k] for k in ("train_acc", "heldout_acc", "heldout_loss")})


def dpo(state_dtype, epochs, out):
    import noisy_dpo

    argv = ["--config", os.path.join(ROOT, "recipes/configs/offline_tiny.yaml"), "--train_pairs", "400",
            "--num_train_epochs", str(epochs), "--eval_steps", "13", "--logging_steps", "13", "--eval_pairs", "200",
            "--learning_rate", "3e-2", "--optim_args", f"mask=snr,fused=true,state_dtype={state_dtype}",
            "--output_dir", out]
    res = noisy_dpo.main(*noisy_dpo.parse_args(argv), quiet=True)
    rows = [h for h in res["log_history"] if "snr/mask_mean" in h and "loss" in h]
    final = res["final"]
    return ([(h["step"], h["snr/mask_mean"], h["snr/active_fraction"]) for h in rows],
            {k: final.get(k) for k in ("eval_rewards/accuracies", "eval_rewards/drift", "noise/flipped_fit")})


def compare(name, a, b):
    (ra, fa), (rb, fb) = a, b
    dm = [abs(x[1] - y[1]) for x, y in zip(ra, rb)]
    da = [abs(x[2] - y[2]) for x, y in zip(ra, rb)]
    print(f"{name}: {len(dm)} logged steps; |mask_mean(fp32) - mask_mean(bf16)| max {max(dm):.4f}, mean "
          f"{sum(dm) / len(dm):.4f}; |active_fraction difference| max {max(da):.4f}, mean {sum(da) / len(da):.4f}")
    print(f"  final, exp_var float32:  {fa}")
    print(f"  final, exp_var bfloat16: {fb}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grok_steps", type=int, default=2000)
    ap.add_argument("--dpo_epochs", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        compare("noisy DPO (many passes)", dpo("float32", args.dpo_epochs, f"{tmp}/d32"),
                dpo("bfloat16", args.dpo_epochs, f"{tmp}/d16"))
        compare("grokking (paper setting)", grok("float32", args.grok_steps, f"{tmp}/g32"),
                grok("bfloat16", args.grok_steps, f"{tmp}/g16"))


if __name__ == "__main__":
    main()
