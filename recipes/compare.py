"""Run a grid of noisy-DPO arms and write, per comparison, a table and plots.

    python recipes/compare.py --config recipes/configs/demo.yaml          # `make demo`
    python recipes/compare.py --config recipes/configs/lr_sweep.yaml      # how the demo's lrs were chosen
    python recipes/compare.py --config recipes/configs/demo.yaml --jobs 2 --seeds 0 1 2

A comparison is a set of arms (each: an optimizer, a loss, a learning rate: any
``recipes/noisy_dpo.py`` option) crossed with noise rates and seeds, optionally with a list of
learning rates. Every run is one ``noisy_dpo.main`` call, in this process (no re-import per run),
or in ``--jobs N`` forked workers, or as a subprocess under ``--launch "accelerate launch ..."``.

The config file (YAML)::

    output_dir: outputs/demo
    jobs: 2                               # runs in parallel (forked workers); --jobs overrides
    base_config: offline_tiny.yaml        # a noisy_dpo config, relative to this file
    args: {eval_steps: 10}                # noisy_dpo options for every run
    seeds: [0, 1]                         # --seed and --noise_seed of each run
    noise_rates: [0.3]
    thresholds: [0.75, 0.85]              # for "first step from which accuracy stays >= t"
    sustained_from: 0.5                   # sustained accuracy: min over evals at step >= 0.5 * last step
    comparisons:
      - name: many_passes
        title: 400 pairs, 25 epochs
        thresholds: [0.6, 0.7]            # optional per comparison (also sustained_from)
        args: {train_pairs: 400, num_train_epochs: 25}
        learning_rates: [1.0e-3, 3.0e-3]  # optional: crossed with every arm that sets no learning_rate
        arms:
          - {name: adamw, optim: adamw_torch, learning_rate: 3.0e-3}   # the first arm is the baseline
          - {name: snr, optim: snr_adamw, learning_rate: 1.0e-2}
          - {name: snr_sweep, optim: snr_adamw, learning_rates: [1.0e-2, 3.0e-2]}  # this arm's own lr grid
          - {name: adamw clean, optim: adamw_torch, learning_rate: 3.0e-3, noise_rate: 0.0}  # own noise rate
        recovered: {clean: adamw clean, noisy: adamw}  # optional (default: the noise-0 arm, the first noisy arm)
    best_lr_from: outputs/lr_sweep        # optional: arms named as in that sweep take its best lr

An arm's ``noise_rate`` replaces the noise rates for that arm (a clean-label baseline). With a clean
AdamW arm the report adds "recovered": the share of the final accuracy that the noise costs AdamW
which an arm recovers (:func:`recovered_share`). Every run's ``snr/*`` keys are scored against the
real held-out loss (:func:`risk_tracking`, the "risk tracking" table). ``--arms`` runs some arms,
``--report_only`` reports whatever has finished.

Output, per comparison ``OUTPUT_DIR/NAME/``: ``summary.md`` (the table), ``summary.json``
(everything in it plus per-seed values and curves), ``accuracy.png``, ``drift.png``,
``flipped_fit.png``, ``mask_mean.png``, and ``runs/ARM/seedS/results.json``. ``OUTPUT_DIR/summary.md``
holds all tables. The summary statistics are defined in :func:`run_summary`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ACC = "eval_rewards/accuracies"
DRIFT = "eval_rewards/drift"
FLIPPED_FIT = "noise/flipped_fit"
CLEAN_FIT = "noise/clean_fit"
MASK = "snr/mask_mean"
TASK_ACC = "eval_pref/policy_accuracy"  # the policy's own preference on the clean eval pairs (SNRDPOTrainer)
REF_TASK_ACC = "eval_pref/reference_accuracy"  # the reference's (constant on a fixed eval set)
CURVES = {"accuracy": ACC, "drift": DRIFT, "flipped_fit": FLIPPED_FIT, "clean_fit": CLEAN_FIT, "mask_mean": MASK,
          "task_accuracy": TASK_ACC, "reference_task_accuracy": REF_TASK_ACC}


# -- summary math (pure functions, unit-tested on hand-made curves) ------------------------------------
def sustained_accuracy(curve: Sequence[tuple[int, float]], from_fraction: float = 0.5) -> float:
    """The minimum accuracy over the evaluations at step >= ``from_fraction`` * (last evaluated step).

    ``curve`` is [(step, accuracy), ...]. With 0.5 it is the worst accuracy over the second half of
    training: what a user gets if they stop anywhere late, rather than at a lucky peak. nan for an
    empty curve.
    """
    if not curve:
        return math.nan
    if not 0.0 <= from_fraction <= 1.0:
        raise ValueError(f"Invalid from_fraction: {from_fraction!r} (accepted: [0, 1])")
    last = max(step for step, _ in curve)
    return min(acc for step, acc in curve if step >= from_fraction * last)


def first_step_staying_above(curve: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step from which accuracy is >= ``threshold`` at every later evaluation.

    None when the last evaluation is below the threshold (it never settles above it).
    """
    first = None
    for step, acc in sorted(curve):
        if acc >= threshold:
            if first is None:
                first = step
        else:
            first = None
    return first


def curve_of(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """[(step, value)] of ``key`` in a Trainer log_history (finite values only)."""
    out = []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
            out.append((int(entry["step"]), float(value)))
    return out


def _late(curve: list[tuple[int, float]], from_fraction: float) -> list[float]:
    if not curve:
        return []
    last = max(s for s, _ in curve)
    return [v for s, v in curve if s >= from_fraction * last]


def run_summary(log_history: list[dict[str, Any]], thresholds: Sequence[float], from_fraction: float = 0.5,
                wall_time_s: float | None = None, cpu_time_s: float | None = None) -> dict[str, Any]:
    """One run's numbers.

    * ``final_acc``: clean-eval accuracy at the last evaluation; ``peak_acc``: its maximum.
    * ``sustained_acc``: :func:`sustained_accuracy` (min over evals at step >= from_fraction * last step).
    * ``first_step_above[t]``: :func:`first_step_staying_above` for each threshold.
    * ``drift``: the last clean-eval reward drift, mean |beta log(pi/pi_ref)| over chosen and rejected.
    * ``flipped_fit`` / ``clean_fit``: the last logged share of swapped / unswapped training pairs the
      policy prefers as labelled (swapped: memorized noise; 0.5 = chance).
    * ``task_acc`` / ``reference_task_acc``: the policy's / the reference's own task accuracy at the last
      evaluation (``pref/policy_accuracy`` / ``pref/reference_accuracy``: the share of clean eval pairs on which
      the model gives the chosen completion the higher log-probability); nan for runs that did not log it.
    * ``mask_mean``: mean of the logged SNR gate mean over the same late window (absent for AdamW,
      whose gate is 1 by definition).
    * ``step_s``: training seconds per optimizer step (the Trainer's train_runtime / its steps: no data
      preparation; evaluations included, as they are in every arm alike).
    * ``agreement_kept`` / ``agreement_kept_clean`` / ``agreement_kept_swapped``: with the agreement filter, the
      mean over the logs of the share of micro-batches kept (all, and weighted by clean / swapped pairs).
    """
    curves = {name: curve_of(log_history, key) for name, key in CURVES.items()}
    acc = curves["accuracy"]
    last = lambda c: c[-1][1] if c else math.nan  # noqa: E731
    late_mask = _late(curves["mask_mean"], from_fraction)
    return {
        "final_acc": last(acc),
        "peak_acc": max((a for _, a in acc), default=math.nan),
        "sustained_acc": sustained_accuracy(acc, from_fraction),
        "first_step_above": {str(t): first_step_staying_above(acc, t) for t in thresholds},
        "drift": last(curves["drift"]),
        "flipped_fit": last(curves["flipped_fit"]),
        "clean_fit": last(curves["clean_fit"]),
        "task_acc": last(curves["task_accuracy"]),
        "reference_task_acc": last(curves["reference_task_accuracy"]),
        "mask_mean": statistics.fmean(late_mask) if late_mask else math.nan,
        "step_s": _step_seconds(log_history),
        **{f"agreement_{k}": _mean_of(log_history, f"snr/agreement_{k}") for k in ("kept", "kept_clean",
                                                                                    "kept_swapped")},
        "wall_time_s": math.nan if wall_time_s is None else float(wall_time_s),
        "cpu_time_s": math.nan if cpu_time_s is None else float(cpu_time_s),
        "curves": curves,
        "risk_tracking": risk_tracking(log_history),
    }


def _step_seconds(log_history: list[dict[str, Any]]) -> float:
    for entry in reversed(log_history):
        if "train_runtime" in entry and entry.get("step"):
            return float(entry["train_runtime"]) / int(entry["step"])
    return math.nan


def _mean_of(log_history: list[dict[str, Any]], key: str) -> float:
    values = [v for _, v in curve_of(log_history, key)]
    return statistics.fmean(values) if values else math.nan


def rank_average(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``, ties given the average of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson's r of the tie-averaged ranks. nan for n < 3 or a constant input."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 3:
        return math.nan
    rx, ry = rank_average(list(x)), rank_average(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


EVAL_LOSS = "eval_loss"
TRAIN_LOSS = "loss"
# cumulative estimates of the held-out minus training gap, and how to read the gap off each
CUMULATIVE = {"snr/cumulative_noise": "value", "snr/population_risk": "value - train loss"}


def risk_tracking(log_history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How well each logged ``snr/*`` quantity tracks the real held-out loss (``eval_loss``) over one run.

    At the steps where both are logged: ``rho_level`` = Spearman(key, eval_loss); ``rho_change`` =
    Spearman of their per-interval changes (consecutive common steps). For the cumulative keys
    (:data:`CUMULATIVE`), the estimated gap (cumulative_noise; population_risk - train loss) against
    the actual gap eval_loss - train loss at the same step (the train loss is the Trainer's mean over
    the logging interval): ``gap_rel_mae`` = mean |est - actual| / mean |actual|, and
    ``gap_final`` / ``gap_est_final`` the two at the last common step.
    """
    eval_loss = dict(curve_of(log_history, EVAL_LOSS))
    train_loss = dict(curve_of(log_history, TRAIN_LOSS))
    keys = sorted({k for e in log_history for k in e if k.startswith("snr/")})
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        curve = [(s, v) for s, v in curve_of(log_history, key) if s in eval_loss]
        est = [v for _, v in curve]
        held = [eval_loss[s] for s, _ in curve]
        d_est = [b - a for a, b in zip(est, est[1:])]
        d_held = [b - a for a, b in zip(held, held[1:])]
        entry: dict[str, Any] = {"n": len(curve), "rho_level": spearman(est, held),
                                 "rho_change": spearman(d_est, d_held)}
        if key in CUMULATIVE:
            pts = [(s, v) for s, v in curve if s in train_loss]
            gaps = [eval_loss[s] - train_loss[s] for s, _ in pts]
            ests = [v - train_loss[s] if key == "snr/population_risk" else v for s, v in pts]
            denom = statistics.fmean([abs(g) for g in gaps]) if gaps else math.nan
            entry.update(
                gap_rel_mae=(statistics.fmean([abs(e - g) for e, g in zip(ests, gaps)]) / denom
                             if gaps and denom > 0 else math.nan),
                gap_final=gaps[-1] if gaps else math.nan,
                gap_est_final=ests[-1] if ests else math.nan,
            )
        out[key] = entry
    return out


def recovered_share(arm_acc: float, noisy_acc: float, clean_acc: float) -> float:
    """Share of the accuracy label noise costs AdamW that an arm recovers: (arm - noisy) / (clean - noisy).

    noisy/clean: AdamW's accuracy with noisy / clean labels. 0 = no better than noisy AdamW, 1 = as
    good as clean AdamW (> 1: better). nan when the noise costs nothing (clean <= noisy) or an input is nan.
    """
    cost = clean_acc - noisy_acc
    if not all(math.isfinite(v) for v in (arm_acc, noisy_acc, clean_acc)) or cost <= 0:
        return math.nan
    return (arm_acc - noisy_acc) / cost


def aggregate(values: Sequence[float]) -> dict[str, float]:
    """mean, sd (sample standard deviation; 0 for one value), min, max and n over seeds, ignoring nan."""
    finite = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


# -- the grid -----------------------------------------------------------------------------------------
@dataclass
class Run:
    comparison: str
    arm: str  # the label shown in the table (name, plus lr / noise when those vary)
    seed: int
    noise_rate: float
    argv: list[str]
    run_dir: str
    meta: dict[str, Any] = field(default_factory=dict)


def to_flags(options: dict[str, Any]) -> list[str]:
    """{"learning_rate": 1e-3, "use_peft": True, "lora_target_modules": ["q_proj"]} -> noisy_dpo flags."""
    flags: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, bool):
            flags.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            flags.extend(str(v) for v in value)
        else:
            flags.append(str(value))
    return flags


def _fmt_lr(lr: float) -> str:
    return f"{float(lr):.0e}".replace("e-0", "e-")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("comparisons"), list) or not config["comparisons"]:
        raise ValueError(f"{path}: a compare config needs a non-empty 'comparisons' list (see recipes/compare.py)")
    config["_path"] = str(path)
    base = config.get("base_config")
    if base is not None and not os.path.isabs(base):
        base_path = pathlib.Path(path).resolve().parent / base
        config["base_config"] = str(base_path if base_path.exists() else pathlib.Path(base).resolve())
    for comparison in config["comparisons"]:
        if not comparison.get("name") or not comparison.get("arms"):
            raise ValueError(f"{path}: every comparison needs a 'name' and 'arms'; got {comparison}")
        names = [arm.get("name") for arm in comparison["arms"]]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"{path}: comparison {comparison['name']!r}: arms need distinct names, got {names}")
    return config


def swept_learning_rates(config: dict[str, Any], comparison: str) -> dict[str, float]:
    """{arm name: best lr} from an lr sweep's ``BEST_LR_FROM/COMPARISON/summary.json`` (its ``best_lr``).

    Config key ``best_lr_from`` (a compare output folder, relative to the working directory): an arm
    of the same name that sets ``learning_rate`` gets the sweep's best instead; arms the sweep did not
    cover, or a sweep that has not run, keep the config's value (each run's meta says ``lr_from``).
    """
    folder = config.get("best_lr_from")
    if not folder:
        return {}
    path = os.path.join(folder, comparison, "summary.json")
    if not os.path.isfile(path):
        print(f"compare: no lr sweep at {path}: {comparison} uses the config's learning rates", file=sys.stderr)
        return {}
    with open(path) as f:
        best = json.load(f).get("best_lr", {})
    return {name: float(b["lr"]) for name, b in best.items() if b.get("lr") is not None}


def expand(config: dict[str, Any], output_dir: str, seeds: Sequence[int] | None = None,
           only: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
           arms: Sequence[str] | None = None) -> list[Run]:
    """Every run of the grid, in order: comparison, arm, learning rate, noise rate, seed."""
    seeds = list(seeds if seeds is not None else config.get("seeds", [0]))
    runs = []
    for comparison in config["comparisons"]:
        if only and comparison["name"] not in only:
            continue
        noise_rates = comparison.get("noise_rates", config.get("noise_rates", [None]))
        lrs = comparison.get("learning_rates")
        # lr_sweep: read the best rates of another comparison of the sweep; an arm's lr_of: another arm's rate
        swept = swept_learning_rates(config, comparison.get("lr_sweep", comparison["name"]))
        # a comparison's own seeds: the ones it names (within --seeds, when given)
        comparison_seeds = [s for s in seeds if s in comparison["seeds"]] if "seeds" in comparison else seeds
        for arm in comparison["arms"]:
            if arms and arm["name"] not in arms:
                continue
            arm_opts = {k: v for k, v in arm.items() if k not in ("name", "learning_rates", "noise_rate", "lr_of")}
            arm_rates = [arm["noise_rate"]] if "noise_rate" in arm else noise_rates
            lr_from = "config"
            lr_key = arm.get("lr_of", arm["name"])
            if lr_key in swept and "learning_rate" in arm_opts:
                arm_opts["learning_rate"], lr_from = swept[lr_key], "sweep"
            if "learning_rate" in arm_opts:
                arm_lrs, sweep = [arm_opts.pop("learning_rate")], False
            elif arm.get("learning_rates"):
                arm_lrs, sweep = list(arm["learning_rates"]), True
            else:
                arm_lrs, sweep = lrs or [None], bool(lrs)
            for lr in arm_lrs:
                for rate in arm_rates:
                    label = arm["name"]
                    if sweep:
                        label += f" lr={_fmt_lr(lr)}"
                    if len(arm_rates) > 1:
                        label += f" noise={rate:g}"
                    for seed in comparison_seeds:
                        options = {**config.get("args", {}), **comparison.get("args", {}), **arm_opts}
                        if lr is not None:
                            options["learning_rate"] = lr
                        if rate is not None:
                            options["noise_rate"] = rate
                        options.update(seed=seed, noise_seed=seed)
                        options.update(overrides or {})
                        run_dir = os.path.join(output_dir, comparison["name"], "runs", _slug(label), f"seed{seed}")
                        options.update(output_dir=run_dir, results_file="results.json")
                        argv = (["--config", config["base_config"]] if config.get("base_config") else [])
                        argv += to_flags(options)
                        runs.append(Run(comparison["name"], label, seed, options.get("noise_rate", 0.0), argv,
                                        run_dir, {"arm": arm["name"], "lr": options.get("learning_rate"),
                                                  "optim": options.get("optim"), "loss": options.get("loss_type"),
                                                  "lr_from": lr_from}))
    return runs


def check_runs(runs: list[Run]) -> None:
    """Parse every run's arguments now, so a typo fails before an hour of training, not after."""
    import noisy_dpo

    for run in runs:
        noisy_dpo.parse_args(run.argv)


# -- running ------------------------------------------------------------------------------------------
class _StepBar:
    """A TrainerCallback that drives an inner tqdm bar over the optimizer steps of one run."""

    def __new__(cls, bar):
        from transformers import TrainerCallback

        class StepBar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                bar.reset(total=state.max_steps)

            def on_step_end(self, args, state, control, **kwargs):
                bar.update(1)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and ACC in logs:
                    bar.set_postfix_str(f"clean acc {logs[ACC]:.3f}")

        return StepBar()


def _run_in_process(argv: list[str], callbacks=None) -> dict[str, Any]:
    import noisy_dpo

    return noisy_dpo.main(*noisy_dpo.parse_args(argv), callbacks=callbacks, quiet=True)


def _run_subprocess(run: Run, launch: str) -> dict[str, Any]:
    cmd = [*shlex.split(launch), str(HERE / "noisy_dpo.py"), *run.argv]
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, "stdout.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"run {run.arm} seed {run.seed} failed ({proc.returncode}); see {run.run_dir}/stdout.log")
    with open(os.path.join(run.run_dir, "results.json")) as f:
        return json.load(f)


_STEP_COUNTER = None  # a multiprocessing.Value shared with forked workers: optimizer steps done, all runs


def _pool_worker(argv: list[str]) -> dict[str, Any]:
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _STEP_COUNTER is not None:
                with _STEP_COUNTER.get_lock():
                    _STEP_COUNTER.value += 1

    results = _run_in_process(argv, callbacks=[CountSteps()])
    return {k: results[k] for k in ("log_history", "wall_time_s", "cpu_time_s", "final")}


def execute(runs: list[Run], jobs: int = 1, launch: str | None = None, reuse: bool = False) -> dict[int, dict]:
    """Run everything (with progress bars); returns {index in runs: results}."""
    global _STEP_COUNTER
    from tqdm.auto import tqdm

    done: dict[int, dict] = {}
    todo = []
    for i, run in enumerate(runs):
        path = os.path.join(run.run_dir, "results.json")
        if reuse and os.path.isfile(path):
            with open(path) as f:
                done[i] = json.load(f)
        else:
            todo.append(i)
    for i in done:
        done[i]["_reused"] = True
    outer = tqdm(total=len(runs), initial=len(done), desc="runs", position=0, dynamic_ncols=True)
    if jobs > 1 and todo and launch is None:
        # fork: the workers inherit the imported libraries (no re-import per worker) and the step counter
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        _STEP_COUNTER = ctx.Value("l", 0)
        steps = tqdm(desc="optimizer steps (all workers)", unit="step", position=1, leave=False, dynamic_ncols=True)

        def finished(i):
            def callback(result):
                done[i] = result
                outer.set_postfix_str(f"done: {runs[i].comparison}/{runs[i].arm} seed {runs[i].seed}")
                outer.update(1)
            return callback

        with ctx.Pool(jobs) as pool:
            futures = [pool.apply_async(_pool_worker, (runs[i].argv,), callback=finished(i)) for i in todo]
            while not all(f.ready() for f in futures):
                time.sleep(0.5)
                steps.update(_STEP_COUNTER.value - steps.n)
            for f in futures:
                f.get()  # re-raises a worker's exception
        steps.close()
        _STEP_COUNTER = None
    else:
        inner = tqdm(total=0, desc="steps", position=1, leave=False, dynamic_ncols=True)
        for i in todo:
            run = runs[i]
            outer.set_postfix_str(f"{run.comparison}/{run.arm} seed {run.seed}")
            if launch is not None:
                done[i] = _run_subprocess(run, launch)
            else:
                done[i] = _run_in_process(run.argv, callbacks=[_StepBar(inner)])
            outer.update(1)
        inner.close()
    outer.close()
    return done


# -- reporting ----------------------------------------------------------------------------------------
def _cell(agg: dict[str, float], digits: int = 3) -> str:
    if not agg["n"]:
        return "n/a"
    if agg["n"] == 1:
        return f"{agg['mean']:.{digits}f}"
    return f"{agg['mean']:.{digits}f} ± {agg['sd']:.{digits}f}"


def _step_cell(steps: list[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"never (0/{len(steps)})"
    text = f"{statistics.fmean(reached):.0f}"
    return text if len(reached) == len(steps) else f"{text} ({len(reached)}/{len(steps)})"


def summarize_comparison(name: str, comparison: dict[str, Any], runs: list[Run], results: list[dict],
                         thresholds: Sequence[float], from_fraction: float) -> dict[str, Any]:
    arms: dict[str, dict[str, Any]] = {}
    for run, res in zip(runs, results):
        s = run_summary(res["log_history"], thresholds, from_fraction, res.get("wall_time_s"), res.get("cpu_time_s"))
        arm = arms.setdefault(run.arm, {"meta": run.meta, "noise_rate": run.noise_rate, "seeds": {}})
        arm["seeds"][run.seed] = s
    scalar_keys = ("final_acc", "peak_acc", "sustained_acc", "task_acc", "reference_task_acc", "drift", "flipped_fit",
                   "clean_fit", "mask_mean", "step_s", "agreement_kept", "agreement_kept_clean",
                   "agreement_kept_swapped", "wall_time_s", "cpu_time_s")
    for arm in arms.values():
        per_seed = list(arm["seeds"].values())
        arm["stats"] = {k: aggregate([s[k] for s in per_seed]) for k in scalar_keys}
        arm["first_step_above"] = {str(t): [s["first_step_above"][str(t)] for s in per_seed] for t in thresholds}
        tracked = sorted({k for s in per_seed for k in s["risk_tracking"]})
        arm["risk_tracking"] = {
            key: {m: aggregate([s["risk_tracking"].get(key, {}).get(m, math.nan) for s in per_seed])
                  for m in ("rho_level", "rho_change", "gap_rel_mae", "gap_final", "gap_est_final")
                  if any(m in s["risk_tracking"].get(key, {}) for s in per_seed)}
            for key in tracked}
    summary = {"name": name, "title": comparison.get("title", name), "notes": comparison.get("notes", ""),
               "thresholds": list(thresholds), "sustained_from": from_fraction, "arms": arms}
    summary["recovered"] = add_recovered(summary, comparison.get("recovered"))
    return summary


def add_recovered(summary: dict[str, Any], spec: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Per arm, the share of AdamW's noise cost it recovers (:func:`recovered_share`), on final and sustained acc.

    ``spec`` = {"clean": label of the AdamW arm at noise 0, "noisy": label of the noisy AdamW arm}; by default
    the one arm with noise_rate 0 and the first arm with noise_rate > 0. The cost and the noisy level are the
    seed means of those two arms; each arm's per-seed values give its spread (the baselines' own spread is
    in their rows). Written into every arm's stats as ``recovered`` / ``recovered_sustained``; returns the
    baselines and the cost, or None when there is no clean arm.

    A share of a cost that the seeds cannot tell from zero is noise divided by noise: the returned
    ``noise_cost_<key>_se`` is the cost's standard error (the two baselines' seed sds over sqrt(n), combined) and
    ``noise_cost_<key>_resolved`` says whether the cost exceeds two of them (None with one seed of either
    baseline: no spread to judge by). The table shows no share for an unresolved cost.
    """
    arms = summary["arms"]
    spec = dict(spec or {})
    clean = spec.get("clean") or next((lbl for lbl, a in arms.items() if a["noise_rate"] == 0), None)
    noisy = spec.get("noisy") or next((lbl for lbl, a in arms.items() if a["noise_rate"] > 0), None)
    if clean not in arms or noisy not in arms:
        return None
    out: dict[str, Any] = {"clean_arm": clean, "noisy_arm": noisy}
    for key, name in (("final_acc", "recovered"), ("sustained_acc", "recovered_sustained")):
        cs, ns = arms[clean]["stats"][key], arms[noisy]["stats"][key]
        c, n = cs["mean"], ns["mean"]
        out[f"noise_cost_{key}"] = c - n
        se = (math.sqrt(cs["sd"] ** 2 / cs["n"] + ns["sd"] ** 2 / ns["n"]) if min(cs["n"], ns["n"]) > 1
              else math.nan)
        out[f"noise_cost_{key}_se"] = se
        out[f"noise_cost_{key}_resolved"] = None if math.isnan(se) else bool(c - n > 2 * se)
        for _label, arm in arms.items():
            if arm["noise_rate"] == 0:
                arm["stats"][name] = aggregate([])
                continue
            arm["stats"][name] = aggregate([recovered_share(s[key], n, c) for s in arm["seeds"].values()])
    return out


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences: every arm against the first (the baseline), with the seed spread as the yardstick."""
    labels = list(summary["arms"])
    if len(labels) < 2:
        return []
    base_label = labels[0]
    base = summary["arms"][base_label]["stats"]
    lines = []
    for label in labels[1:]:
        st = summary["arms"][label]["stats"]
        parts = []
        for key, what in (("final_acc", "final clean accuracy"), ("sustained_acc", "sustained accuracy")):
            diff = st[key]["mean"] - base[key]["mean"]
            noise = max(st[key]["sd"], base[key]["sd"]) if st[key]["n"] > 1 else math.nan
            if math.isnan(diff):
                continue
            if math.isnan(noise):
                judged = "one seed, no spread to judge by"
            elif abs(diff) > 2 * noise:
                judged = "beyond 2 seed sds"
            else:
                judged = "within the seed spread"
            n = min(st[key]["n"], base[key]["n"])
            if 1 < n < 4:
                judged += f"; only {n} seeds: indicative"
            parts.append(f"{what} {diff:+.3f} ({judged})")
        d, b = st["drift"]["mean"], base["drift"]["mean"]
        if math.isfinite(d) and math.isfinite(b) and d > 0:
            parts.append(f"reward drift {d:.3g} vs {b:.3g} ({d / b:.2f}x)")
        f, fb = st["flipped_fit"]["mean"], base["flipped_fit"]["mean"]
        if math.isfinite(f) and math.isfinite(fb):
            parts.append(f"flipped fit {f:.3f} vs {fb:.3f}")
        lines.append(f"**{label}** vs **{base_label}**: " + "; ".join(parts) + ".")
    return lines


def best_learning_rates(summary: dict[str, Any], key: str = "sustained_acc") -> dict[str, dict[str, Any]]:
    """Per arm name swept over several learning rates: the lr with the highest mean ``key`` (and its stats)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for label, arm in summary["arms"].items():
        groups.setdefault(str(arm["meta"].get("arm", label)), []).append((label, arm))
    best = {}
    for name, members in groups.items():
        lrs = {m[1]["meta"].get("lr") for m in members}
        if len(lrs) < 2:
            continue
        scored = [(arm["stats"][key]["mean"], label, arm) for label, arm in members
                  if math.isfinite(arm["stats"][key]["mean"])]
        if scored:
            value, label, arm = max(scored, key=lambda t: t[0])
            best[name] = {"label": label, "lr": arm["meta"].get("lr"), key: value,
                          "final_acc": arm["stats"]["final_acc"]["mean"]}
    return best


def markdown(summary: dict[str, Any]) -> str:
    th = summary["thresholds"]
    frac = summary["sustained_from"]
    has_task = any(arm["stats"]["task_acc"]["n"] for arm in summary["arms"].values())
    head = ["arm", "optim", "lr", "noise", "final acc", "peak acc", "sustained acc"]
    head += ["task acc (reference)"] if has_task else []
    head += [f"first step ≥ {t:g}" for t in th]
    has_rec = bool(summary.get("recovered"))
    unresolved = has_rec and summary["recovered"].get("noise_cost_final_acc_resolved") is False
    has_agree = any(arm["stats"].get("agreement_kept", {}).get("n") for arm in summary["arms"].values())
    head += ["drift", "flipped fit"] + (["recovered"] if has_rec else []) + ["mask mean"]
    head += ["kept (clean / swapped)"] if has_agree else []
    head += ["s / step", "wall s", "cpu s"]
    lines = [f"## {summary['title']}", ""]
    if summary["notes"]:
        lines += [summary["notes"].strip(), ""]
    seeds = sorted({s for arm in summary["arms"].values() for s in arm["seeds"]})
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, arm in summary["arms"].items():
        st, meta = arm["stats"], arm["meta"]
        lr = meta.get("lr")
        row = [label, str(meta.get("optim") or ""), "" if lr is None else f"{float(lr):g}", f"{arm['noise_rate']:g}",
               _cell(st["final_acc"]), _cell(st["peak_acc"]), _cell(st["sustained_acc"])]
        if has_task:
            row += [f"{_cell(st['task_acc'])} ({st['reference_task_acc']['mean']:.3f})"
                    if st["task_acc"]["n"] else "—"]
        row += [_step_cell(arm["first_step_above"][str(t)]) for t in th]
        row += [_cell(st["drift"]), _cell(st["flipped_fit"])]
        if has_rec:
            if not st.get("recovered", {}).get("n"):
                row += ["—"]  # a baseline at noise 0: no share
            else:
                row += ["unresolved" if unresolved else _cell(st["recovered"], 2)]
        row += [_cell(st["mask_mean"])]
        if has_agree:
            m = {k: st[f"agreement_{k}"]["mean"] for k in ("kept", "kept_clean", "kept_swapped")}
            row += [f"{m['kept']:.2f} ({m['kept_clean']:.2f} / {m['kept_swapped']:.2f})"
                    if st["agreement_kept"].get("n") else "—"]
        row += [_cell(st["step_s"], 3), _cell(st["wall_time_s"], 0), _cell(st["cpu_time_s"], 0)]
        lines.append("| " + " | ".join(row) + " |")
    task_note = ("Task acc: the share of clean evaluation pairs on which the policy itself gives the chosen "
                 "completion the higher log-probability, last evaluation (pref/policy_accuracy; with a true answer, "
                 "the model's accuracy on the task), and in brackets the reference model's (pref/reference_accuracy). "
                 if has_task else "")
    lines += [
        "",
        f"Mean ± sample sd over seeds {seeds}. Accuracy: implicit-reward accuracy on the clean evaluation pairs. "
        f"Sustained acc: the minimum accuracy over the evaluations at step ≥ {frac:g} × the last step. "
        f"First step ≥ t: the first evaluated step from which accuracy stays ≥ t at every later evaluation "
        f"(mean over the seeds that got there; (k/n) when only k did). Drift: mean |β log π/π_ref| over chosen and "
        f"rejected at the last evaluation. Flipped fit: share of swapped training pairs the policy prefers as "
        f"(wrongly) labelled, last log (0.5 = chance, 1 = memorized). {task_note}"
        f"Mask mean: the SNR gate's mean over the same late "
        f"window (AdamW: 1 by definition). Kept: the agreement filter's share of micro-batches kept, mean over the "
        f"logs (the first micro-batch of every step, always kept, included), and the same share weighted by the "
        f"clean / swapped pairs in each micro-batch. S / step: training seconds per optimizer step "
        f"(train_runtime / steps, evaluations included). Wall s / cpu s: per run, including data preparation and "
        f"evaluations (cpu s: the run's own CPU time, what a busy shared machine does not inflate).",
        "",
    ]
    sources = {label: arm["meta"].get("lr_from") for label, arm in summary["arms"].items()}
    if any(v == "sweep" for v in sources.values()):
        lines += ["Learning rates: " + "; ".join(
            f"{label} {float(summary['arms'][label]['meta']['lr']):g} ({src})"
            for label, src in sources.items()) + " (sweep: the lr sweep's best sustained accuracy, 1 seed).", ""]
    rec = summary.get("recovered")
    if rec:
        lines += [f"Recovered: the share of the final clean accuracy that label noise costs AdamW which the arm "
                  f"recovers, (arm − {rec['noisy_arm']}) / ({rec['clean_arm']} − {rec['noisy_arm']}), with the "
                  f"baselines' seed means (noise cost {rec['noise_cost_final_acc']:+.3f}); mean ± sd over the arm's "
                  f"seeds. 0 = noisy AdamW, 1 = clean AdamW.", ""]
        if rec.get("noise_cost_final_acc_resolved") is False:
            lines += [f"**Recovered is not shown (\"unresolved\"): the noise cost "
                      f"{rec['noise_cost_final_acc']:+.3f} is within two standard errors "
                      f"(2 × {rec['noise_cost_final_acc_se']:.3f}) of zero over these seeds, so a share of it would be "
                      f"seed noise divided by seed noise** (summary.json keeps the numbers). Compare the arms' "
                      f"accuracies directly.", ""]
    lines += risk_markdown(summary)
    best = best_learning_rates(summary)
    if best:
        lines += ["Best learning rate per arm (highest mean sustained accuracy): " + "; ".join(
            f"**{name}** lr={float(b['lr']):g} (sustained {b['sustained_acc']:.3f}, final {b['final_acc']:.3f})"
            for name, b in best.items()) + ".", ""]
    else:
        lines += verdict(summary)
    return "\n".join(lines) + "\n"


# the per-step statistics as logged now, and the names logged before this version (committed studies)
RISK_KEYS = ("snr/memorization_rate", "snr/signal_minus_noise", "snr/population_risk", "snr/cumulative_noise",
             "snr/noise", "snr/population_gain")


def risk_markdown(summary: dict[str, Any]) -> list[str]:
    """The "risk tracking" table: per arm that logs snr/*, Spearman with eval_loss (level / change) and gap error."""
    rows = [(label, arm) for label, arm in summary["arms"].items() if arm.get("risk_tracking")]
    if not rows:
        return []
    keys = [k for k in RISK_KEYS if any(k in arm["risk_tracking"] for _, arm in rows)]
    head = ["arm"] + [f"{k.split('/')[1]} ρ level / ρ Δ" for k in keys]
    head += [f"{k.split('/')[1]} gap rel. err" for k in keys if k in CUMULATIVE]
    lines = ["### Risk tracking", "",
             "How each candidate risk estimate tracks the real held-out loss (eval_loss on the clean eval pairs) over "
             "a run: Spearman ρ with eval_loss at the evaluated steps (level), and of its per-interval change with "
             "eval_loss's change (Δ); for the cumulative estimates, gap rel. err = mean |estimated gap − (eval_loss − "
             "train loss)| / mean |eval_loss − train loss| (estimated gap: cumulative_noise; population_risk − train "
             "loss; 0 = exact, 1 = as far off as predicting no gap). Mean ± sd over seeds; every snr/* key is in "
             "summary.json.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, arm in rows:
        rt = arm["risk_tracking"]
        row = [label]
        for k in keys:
            m = rt.get(k, {})
            row.append(f"{_cell(m['rho_level'], 2)} / {_cell(m['rho_change'], 2)}" if m else "n/a")
        for k in keys:
            if k in CUMULATIVE:
                m = rt.get(k, {})
                row.append(_cell(m["gap_rel_mae"], 2) if "gap_rel_mae" in m else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plot(summary: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("accuracy", "accuracy.png", "clean-eval accuracy"),
        ("drift", "drift.png", "reward drift |β log π/π_ref| (eval)"),
        ("flipped_fit", "flipped_fit.png", "flipped fit (swapped training pairs fitted)"),
        ("mask_mean", "mask_mean.png", "SNR mask mean"),
    ]
    if any(s["curves"].get("task_accuracy") for arm in summary["arms"].values() for s in arm["seeds"].values()):
        specs.append(("task_accuracy", "task_accuracy.png", "task accuracy (policy prefers the true answer)"))
    paths = []
    for curve_name, filename, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = 0
        for index, (label, arm) in enumerate(summary["arms"].items()):
            curves = [s["curves"][curve_name] for s in arm["seeds"].values() if s["curves"][curve_name]]
            if not curves:
                continue
            steps = sorted({step for c in curves for step, _ in c})
            by_step = [[dict(c).get(step) for c in curves] for step in steps]
            mean = [statistics.fmean([v for v in vals if v is not None]) for vals in by_step]
            lo = [min(v for v in vals if v is not None) for vals in by_step]
            hi = [max(v for v in vals if v is not None) for vals in by_step]
            color = f"C{index % 10}"  # one colour per arm in every plot, also when an arm has no curve here
            (line,) = ax.plot(steps, mean, color=color, label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            drawn += 1
        if curve_name == "accuracy":
            for t in summary["thresholds"]:
                ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
                ax.annotate(f"{t:g}", xy=(0, t), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                            va="bottom")
        if curve_name == "flipped_fit":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
        if curve_name == "mask_mean" and drawn < len(summary["arms"]):
            ax.set_title("arms without a line use AdamW (gate = 1)", fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        fig.suptitle(summary["title"], fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(config: dict[str, Any], runs: list[Run], results: dict[int, dict], output_dir: str,
           wall_time_s: float) -> str:
    import noisy_dpo  # its JSON conversion of results, shared

    thresholds = [float(t) for t in config.get("thresholds", [0.55, 0.60])]
    frac = float(config.get("sustained_from", 0.5))
    sections = []
    for comparison in config["comparisons"]:
        idx = [i for i, r in enumerate(runs) if r.comparison == comparison["name"]]
        if not idx:
            continue
        summary = summarize_comparison(comparison["name"], comparison, [runs[i] for i in idx],
                                       [results[i] for i in idx],
                                       [float(t) for t in comparison.get("thresholds", thresholds)],
                                       float(comparison.get("sustained_from", frac)))
        out = os.path.join(output_dir, comparison["name"])
        os.makedirs(out, exist_ok=True)
        text = markdown(summary)
        summary["plots"] = plot(summary, out)
        summary["best_lr"] = best_learning_rates(summary)
        summary["verdict"] = verdict(summary)
        summary["runs"] = [{"arm": runs[i].arm, "seed": runs[i].seed, "argv": runs[i].argv} for i in idx]
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text)
            f.write("\nPlots: " + ", ".join(os.path.basename(p) for p in summary["plots"]) + "\n")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(noisy_dpo._jsonable(summary), f, indent=1)
        sections.append(text + "\nPlots: " + ", ".join(summary["plots"]) + "\n")
    body = "\n".join(sections)
    reused = sum(1 for r in results.values() if r.get("_reused"))
    total = (f"# Noisy-preference DPO comparison\n\nConfig: `{config['_path']}`; {len(runs)} runs"
             + (f" ({reused} reused from an earlier invocation: per-run wall/cpu seconds are theirs)" if reused else "")
             + f"; total wall time of this invocation {wall_time_s:.0f} s.\n\n") + body
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(total)
    return total


# -- command line -------------------------------------------------------------------------------------
def _parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes key=value (a noisy_dpo option), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().lstrip("-"), yaml.safe_load(value)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="compare config YAML (see the module docstring)")
    p.add_argument("--output_dir", help="default: the config's output_dir, else outputs/compare")
    p.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    p.add_argument("--only", nargs="+", help="run only these comparisons (names)")
    p.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                   help="noisy_dpo option for every run, e.g. --set max_steps=20 (repeatable)")
    p.add_argument("--jobs", type=int, help="runs in parallel (forked workers, each running arms in-process); "
                                            "default: the config's jobs, else 1")
    p.add_argument("--launch", help='run each arm as a subprocess under this launcher, e.g. '
                                    '"accelerate launch --config_file accelerate_configs/multi_gpu.yaml"')
    p.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists")
    p.add_argument("--arms", nargs="+", help="run only these arms (names), in every selected comparison")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: report the runs whose results.json exists (what has finished), list the rest")
    p.add_argument("--dry_run", action="store_true", help="check and list the runs, train nothing")
    return p


def main(argv: list[str] | None = None) -> str:
    opts = make_parser().parse_args(argv)
    start = time.perf_counter()
    config = load_config(opts.config)
    output_dir = opts.output_dir or config.get("output_dir") or "outputs/compare"
    runs = expand(config, output_dir, opts.seeds, opts.only, dict(opts.overrides), opts.arms)
    if not runs:
        raise SystemExit(f"no runs: --only {opts.only} / --arms {opts.arms} match nothing")
    if opts.report_only:
        missing = [r for r in runs if not os.path.isfile(os.path.join(r.run_dir, "results.json"))]
        for r in missing:
            print(f"compare: not run: {r.comparison} | {r.arm} | seed {r.seed}")
        runs = [r for r in runs if r not in missing]
        if not runs:
            raise SystemExit("compare --report_only: no finished runs")
    check_runs(runs)
    if opts.dry_run:
        for run in runs:
            print(f"{run.comparison} | {run.arm} | seed {run.seed} | " + shlex.join(run.argv))
        return ""
    jobs = opts.jobs if opts.jobs is not None else int(config.get("jobs", 1))
    results = execute(runs, jobs=jobs, launch=opts.launch, reuse=opts.reuse or opts.report_only)
    text = report(config, runs, results, output_dir, time.perf_counter() - start)
    print("\n" + text)
    print(f"compare: report and plots in {os.path.abspath(output_dir)} (summary.md; one folder per comparison); "
          f"{time.perf_counter() - start:.0f} s")
    return output_dir


if __name__ == "__main__":
    main()
