"""How well candidate population-risk estimates, built from SNRAdamW's logged statistics, track a real held-out loss.

    python recipes/risk_candidates.py docs/grokking/paper/snr_adamw_seed0/results.json [more results.json ...]

Reads a run of recipes/grokking.py (rows with ``train_loss``, ``heldout_loss``, ``snr/noise``) or of
recipes/noisy_dpo.py (``log_history`` with ``loss``, ``eval_loss``, ``snr/noise``), and for each candidate prints
the Spearman rank correlation over the run with the held-out loss, of its per-interval change with the held-out
loss's change, and its relative error against the held-out loss (sum |x - y| / sum |y|). The candidates, with n
the per-step noise (``alpha sum_k u_k sigma_k^2``: the first-order part of a step's training-loss drop that
is memorization) and L the training loss:

* ``L + cumulative noise``: the specified estimate, L + sum over steps of n (memorization never decays);
* ``L + discounted noise (half-life H)``: memorized noise that decays, L + sum_s 0.5^((t-s)/H) n_s;
* ``n`` alone (a per-step memorization rate) and ``L`` alone (the reference every estimate must beat).

This is the evidence behind the README's risk-metrics table; it fits nothing to the held-out loss.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import spearman  # noqa: E402  (one Spearman for every recipe: tie-averaged ranks)


def rows_of(path):
    res = json.load(open(path))
    if "log" in res:  # grokking
        return [(r["step"], r["train_loss"], r["heldout_loss"], r["snr/noise"]) for r in res["log"] if "snr/noise" in r]
    train = {h["step"]: h for h in res["log_history"] if "loss" in h and "snr/noise" in h}
    out = []
    for h in res["log_history"]:
        if "eval_loss" in h and h["step"] in train:
            t = train[h["step"]]
            out.append((h["step"], t["loss"], h["eval_loss"], t["snr/noise"]))
    return out


def candidates(rows):
    steps = [r[0] for r in rows]
    train = [r[1] for r in rows]
    noise = [r[3] for r in rows]
    out = {"L (training loss)": train, "n (per-step noise)": noise}
    cum, acc, prev = [], 0.0, 0
    for s, n in zip(steps, noise):
        acc += n * (s - prev)
        prev = s
        cum.append(acc)
    out["L + cumulative noise"] = [a + b for a, b in zip(train, cum)]
    span = steps[-1] - steps[0] if len(steps) > 1 else 1
    for frac in (0.01, 0.1):
        h = max(1.0, frac * span)
        acc, prev, disc = 0.0, steps[0], []
        for s, n in zip(steps, noise):
            acc = acc * 0.5 ** ((s - prev) / h) + n * (s - prev if s > prev else 1)
            prev = s
            disc.append(acc)
        out[f"L + discounted noise (half-life {h:.0f} steps)"] = [a + b for a, b in zip(train, disc)]
    return out


def table(path) -> str:
    rows = rows_of(path)
    held = [r[2] for r in rows]
    dheld = [b - a for a, b in zip(held, held[1:])]
    lines = [f"{path}: {len(rows)} logged points",
             "| candidate | rho(., held-out loss) | rho(change, held-out change) | rel. error vs held-out loss |",
             "|---|---:|---:|---:|"]
    for name, x in candidates(rows).items():
        dx = [b - a for a, b in zip(x, x[1:])]
        err = sum(abs(a - b) for a, b in zip(x, held)) / max(sum(abs(b) for b in held), 1e-30)
        lines.append(f"| {name} | {spearman(x, held):+.2f} | {spearman(dx, dheld):+.2f} | {err:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
        print()
