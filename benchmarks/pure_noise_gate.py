"""The gate's mean on pure noise and on a constant gradient, per estimator option, measured vs derived.

    python benchmarks/pure_noise_gate.py        # ~30 s on one core

Zero-mean Gaussian gradients (4,000 coordinates in rows of 200, 2 micro-batches per step, 400 steps; the mean of
snr/mask_mean over the last 100 steps) against the value derived in hf_snr/optimizer.py's docstring, with
c = (1 - beta1)/(1 + beta1) and Z standard normal. A gate that "sees signal" must sit well below 1 here and
open (near 1) on a constant gradient. tests/test_gate_options.py asserts the same values.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_snr import SNRAdamW  # noqa: E402

C = (1 - 0.9) / (1 + 0.9)
Z2 = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
CASES = [
    ("mask=snr (default)", {}, "E[c Z^2 / (c Z^2 + 1 + c)]", (C * Z2 / (C * Z2 + 1 + C)).mean().item()),
    ("noise=ema", dict(noise="ema"), "E[Z^2 / (Z^2 + 1 + c)]", (Z2 / (Z2 + 1 + C)).mean().item()),
    ("signal=step", dict(signal="step"), "E[Z^2 / (Z^2 + 1 + c)]", (Z2 / (Z2 + 1 + C)).mean().item()),
    ("variance=microbatch", dict(variance="microbatch"), "E[c Z^2 / (c Z^2 + 1)]",
     (C * Z2 / (C * Z2 + 1)).mean().item()),
    ("variance=microbatch,noise=ema", dict(variance="microbatch", noise="ema"), "E[Z^2 / (Z^2 + 1)]",
     (Z2 / (Z2 + 1)).mean().item()),
    ("reduction=row,noise=ema", dict(reduction="row", noise="ema"), "1 / (2 + c) (rows of 200)", 1 / (2 + C)),
    ("reduction=row (noise=step)", dict(reduction="row"), "c / (2c + 1) (rows of 200)", C / (2 * C + 1)),
    ("mask=hard,noise=ema", dict(mask="hard", noise="ema"), "P(Z^2 > 1 + c)", (Z2 > 1 + C).double().mean().item()),
]


def mask_mean(gradient, opts, steps=400, shape=(20, 200), k=2) -> float:
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SNRAdamW([p], lr=1e-3, weight_decay=0.0, **opts)
    gen = torch.Generator().manual_seed(1)
    means = []
    for t in range(1, steps + 1):
        p.grad = None
        for _ in range(k):
            ((p * gradient(gen, shape)).sum() / k).backward()
        if t > steps - 100:
            opt.request_stats()
        opt.step()
        if t > steps - 100:
            means.append(opt.last_stats["mask_mean"])
    return sum(means) / len(means)


def main():
    torch.set_num_threads(1)
    const = torch.linspace(0.5, 1.5, 200).expand(20, 200)
    print("| options | gate mean on pure noise | derived | formula | gate mean on a constant gradient |")
    print("|---|---:|---:|---|---:|")
    for name, opts, formula, derived in CASES:
        noise = mask_mean(lambda g, s: torch.randn(s, generator=g), opts)
        flat = mask_mean(lambda g, s: const, opts, steps=300)
        print(f"| `{name}` | {noise:.3f} | {derived:.3f} | {formula} | {flat:.3f} |", flush=True)


if __name__ == "__main__":
    main()
