"""Time per DPO training step: SNRDPOTrainer with SNRAdamW vs the same trainer with AdamW.

    python benchmarks/dpo_overhead.py                       # tiny Llama, ~1 min
    python benchmarks/dpo_overhead.py --hidden 256 --layers 4 --rounds 8 --steps 40

Same model initialisation, same data, same batch order, same trainer; only ``optim`` differs
(``snr_adamw`` vs ``adamw_torch``), with risk logging on at the usual interval
(``logging_steps=10``: the SNR statistics are computed on those steps only). A step's time is the
interval between consecutive ``on_step_end`` events, so it covers data loading, forward, backward,
the optimizer step and the logging that follows it. The first ``--skip`` steps of every run are
dropped (lazy optimizer state, allocator warm-up).

A shared machine is noisy, so the arms are interleaved: ``--rounds`` rounds, each training one run
of ``--steps`` steps per arm, in alternating order (ABBA...). Reported:

* ``ratio of medians``: median step time of SNR / median step time of AdamW (the typical step);
* ``ratio of means``: per round, mean step time of SNR / AdamW of the same round (this includes the
  logging steps), then the median over rounds. This is the number to compare with the 3 % target.

The run ends with one line ``RESULT ratio_of_means=... ratio_of_medians=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

_REPO = pathlib.Path(__file__).resolve().parent.parent
if (_REPO / "hf_snr").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds; each trains one run per arm")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=3, help="first steps of each run left out of the timing")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="default 2 x hidden")
    p.add_argument("--optim_args", default="mask=snr", help="SNR knobs of the SNR arm")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timing on a shared CPU)")
    p.add_argument("--json", help="also write the raw timings here")
    return p.parse_args()


def main() -> None:
    args = parse()
    import torch
    import transformers
    from transformers import TrainerCallback

    import hf_snr  # noqa: F401  (optim="snr_adamw")
    from hf_snr.dpo import SNRDPOConfig, SNRDPOTrainer
    from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer, make_preference_dataset

    import datasets

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    n_pairs = args.batch * args.steps
    data = make_preference_dataset(n_train=n_pairs, n_eval=0, seed=0)
    from hf_snr.data import swap_preferences

    train = swap_preferences(data["train"], 0.3, seed=0)  # with the flipped column: noise/* metrics on too
    tokenizer = build_tiny_tokenizer()
    model0 = build_tiny_model(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                              ffn=args.ffn or 2 * args.hidden, seed=0)
    n_params = sum(p.numel() for p in model0.parameters())

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, a, state, control, **kw):
            self.marks.append(time.perf_counter())

    import copy
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    def one_run(optim: str, out: str) -> list[float]:
        model = copy.deepcopy(model0)
        cfg = SNRDPOConfig(
            output_dir=out, optim=optim, optim_args=args.optim_args if optim == "snr_adamw" else None,
            learning_rate=3e-3, lr_scheduler_type="constant", beta=0.1, max_length=64,
            per_device_train_batch_size=args.batch, max_steps=args.steps, logging_steps=args.logging_steps,
            eval_strategy="no", save_strategy="no", report_to="none", bf16=False, use_cpu=True,
            gradient_checkpointing=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = SNRDPOTrainer(model=model, ref_model=copy.deepcopy(model0), args=cfg, train_dataset=train,
                                processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        logged = [e for e in trainer.state.log_history if "loss" in e]
        if optim == "snr_adamw":
            assert logged and all("snr/mask_mean" in e for e in logged), "risk logging did not run"
        marks = timer.marks
        return [b - a for a, b in zip(marks[args.skip:], marks[args.skip + 1:])]

    arms = {"snr_adamw": [], "adamw_torch": []}
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["snr_adamw", "adamw_torch"] if r % 2 == 0 else ["adamw_torch", "snr_adamw"]
            means = {}
            for optim in order:
                times = one_run(optim, os.path.join(tmp, f"{optim}-{r}"))
                arms[optim].extend(times)
                means[optim] = statistics.fmean(times)
            per_round.append(means["snr_adamw"] / means["adamw_torch"])
            print(f"round {r + 1}/{args.rounds}: mean step SNR {means['snr_adamw'] * 1e3:.1f} ms, "
                  f"AdamW {means['adamw_torch'] * 1e3:.1f} ms, ratio {per_round[-1]:.3f}", flush=True)

    med = {k: statistics.median(v) for k, v in arms.items()}
    ratio_medians = med["snr_adamw"] / med["adamw_torch"]
    ratio_means = statistics.median(per_round)
    print(f"\nmodel: tiny Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e3:.0f}k parameters; "
          f"batch {args.batch} pairs; logging_steps {args.logging_steps}; {args.rounds} rounds x {args.steps} steps "
          f"per arm; torch threads {args.threads}")
    print(f"median step: SNR {med['snr_adamw'] * 1e3:.2f} ms, AdamW {med['adamw_torch'] * 1e3:.2f} ms")
    print(f"per-round mean-step ratios: {', '.join(f'{x:.3f}' for x in per_round)}")
    print(f"RESULT ratio_of_means={ratio_means:.4f} ratio_of_medians={ratio_medians:.4f} (target <= 1.03)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "n_params": n_params, "step_times": arms, "per_round": per_round,
                       "ratio_of_means": ratio_means, "ratio_of_medians": ratio_medians}, f, indent=1)


if __name__ == "__main__":
    main()
