"""Does a cheaper variance state give the same memorization signal? Per-row and per-tensor against per-element.

    python benchmarks/cheap_monitor.py [--out docs/benchmarks/cheap_monitor]

The monitor's statistic, memorization_rate = alpha * sum_k u_k sigma_k^2, needs exp_var: one fp32 value per
parameter (the 0.5x of AdamW's state that mask="none" adds). The cheaper forms keep the variance EMA
s <- rho s + (1 - rho) mean((g - m)^2) per output row (a vector per matrix) or per tensor (one number) and
give each coordinate of the row / tensor that variance: alpha * sum_rows (sum_{k in row} u_k) s_row / (1 - rho^t).
This script runs the recipes with ``mask="none"`` and computes both forms beside the optimizer's own (a shadow
of the state, updated before every step from the same gradients and the previous m), then reports the Spearman
rank correlation of each cheap series with the per-element one over the logged steps of the run, for
memorization_rate and for the lr-free noise_to_signal. "Agrees" = rank correlation >= 0.95 on both recipes.

Runs: the DPO memorization regime (many passes, 400 pairs x 15 epochs, constant lr 3e-2, seed 0, logging every
5 steps) and grokking (the paper's task at the tuned AdamW lr 3e-3, 3,000 steps, evaluation every 50).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

from compare import spearman  # noqa: E402  (recipes/compare.py: tie-averaged ranks)

from hf_snr.optimizer import SNRAdamW  # noqa: E402


class Shadow:
    """Per-row and per-tensor variance EMAs of (g - m_prev)^2, updated before each real step."""

    def __init__(self):
        self.row: dict[int, torch.Tensor] = {}
        self.tensor: dict[int, torch.Tensor] = {}
        self.t: dict[int, int] = {}
        self.series: list[dict[str, float]] = []

    def before(self, opt: SNRAdamW) -> None:
        for group in opt.param_groups:
            rho = group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = opt.state.get(p, {})
                m = st.get("exp_avg")
                g = p.grad.detach().float()
                d2 = (g - m).square() if m is not None else g.square()
                rows = d2.reshape(d2.shape[0], -1).mean(1) if d2.dim() >= 2 else d2.reshape(1, -1).mean(1)
                key = id(p)
                if key not in self.row:
                    self.row[key] = torch.zeros_like(rows)
                    self.tensor[key] = torch.zeros(())
                    self.t[key] = 0
                self.row[key].mul_(rho).add_(rows, alpha=1 - rho)
                self.tensor[key].mul_(rho).add_(d2.mean(), alpha=1 - rho)
                self.t[key] += 1

    def after(self, opt: SNRAdamW, step: int) -> None:
        full = opt.last_stats
        if not full:
            return
        cheap = {"row": 0.0, "tensor": 0.0}
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            rho, eps, alpha, lr = group["rho"], group["eps"], group["alpha"], float(group["lr"])
            for p in group["params"]:
                st = opt.state.get(p)
                if not st or id(p) not in self.row:
                    continue
                t = float(st["step"])
                u = lr / ((st["exp_avg_sq"] / (1 - beta2 ** t)).sqrt() + eps)
                bcr = 1 - rho ** self.t[id(p)]
                urow = u.reshape(u.shape[0], -1).sum(1) if u.dim() >= 2 else u.reshape(1, -1).sum(1)
                cheap["row"] += alpha * float((urow * self.row[id(p)]).sum()) / bcr
                cheap["tensor"] += alpha * float(u.sum() * self.tensor[id(p)]) / bcr
        self.series.append({"step": step, "full": full["noise"], "row": cheap["row"], "tensor": cheap["tensor"],
                            "signal": full["signal"]})


def install(shadow: Shadow):
    """Wrap SNRAdamW.step so that every optimizer the recipes build feeds the shadow."""
    real = SNRAdamW.step

    def step(self, closure=None):
        requested = self._stats.requested
        shadow.before(self)
        out = real(self, closure)
        if requested:
            shadow.after(self, int(self.snr_state["steps"]))
        return out

    SNRAdamW.step = step
    return real


def report(name: str, series: list[dict[str, float]]) -> dict[str, float]:
    full = [s["full"] for s in series]
    ratio_full = [s["full"] / s["signal"] for s in series]
    out = {"run": name, "points": len(series)}
    for form in ("row", "tensor"):
        out[f"{form}_memorization_rate"] = spearman(full, [s[form] for s in series])
        out[f"{form}_noise_to_signal"] = spearman(ratio_full, [s[form] / s["signal"] for s in series])
    return out


def run_dpo(shadow: Shadow, out_dir: pathlib.Path) -> None:
    import noisy_dpo
    from trl import ModelConfig, TrlParser

    from hf_snr.dpo import SNRDPOConfig

    parser = TrlParser((noisy_dpo.NoisyDPOArguments, SNRDPOConfig, ModelConfig))
    script, training, model = parser.parse_args_and_config([
        "--config", str(ROOT / "recipes/configs/offline_tiny.yaml"), "--train_pairs", "400", "--num_train_epochs",
        "15", "--optim", "snr_adamw", "--optim_args", "mask=none", "--learning_rate", "3e-2", "--logging_steps", "5",
        "--eval_strategy", "no", "--output_dir", str(out_dir / "dpo_run"), "--eval_pairs", "50"])
    noisy_dpo.main(script, training, model, quiet=True)


def run_grokking(out_dir: pathlib.Path) -> None:
    import grokking

    args = grokking.parse_args(["--config", str(ROOT / "recipes/configs/grokking/grokking.yaml"), "--optim_args",
                               "mask=none", "--learning_rate", "3e-3", "--max_steps", "3000", "--eval_every", "50",
                               "--output_dir", str(out_dir / "grokking_run")])
    grokking.main(args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "docs/benchmarks/cheap_monitor")
    p.add_argument("--skip_grokking", action="store_true")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, fn in (("dpo many passes", lambda s: run_dpo(s, a.out)), ("grokking", lambda s: run_grokking(a.out))):
        if name == "grokking" and a.skip_grokking:
            continue
        shadow = Shadow()
        real = install(shadow)
        try:
            fn(shadow)
        finally:
            SNRAdamW.step = real
        (a.out / f"{name.replace(' ', '_')}_series.json").write_text(json.dumps(shadow.series, indent=1))
        results.append(report(name, shadow.series))
    lines = ["| run | logged steps | row: memorization_rate | row: noise_to_signal | tensor: memorization_rate | "
             "tensor: noise_to_signal |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = " | ".join(f"{r[k]:.3f}" for k in ("row_memorization_rate", "row_noise_to_signal",
                                                   "tensor_memorization_rate", "tensor_noise_to_signal"))
        lines.append(f"| {r['run']} | {r['points']} | {cells} |")
    text = "Spearman rank correlation with the per-element statistic over the run\n\n" + "\n".join(lines)
    (a.out / "README.md").write_text(text + "\n")
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
