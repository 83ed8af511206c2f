"""Which checkpoint to keep without a clean validation set: the regret of each choice on logged runs.

    python recipes/checkpoint_choice.py docs/checkpoint_study [--grokking docs/grokking/seeds/runs] [--out DIR]

Reads every ``runs/ARM/seedS/results.json`` of a ``compare.py`` study whose runs log the SNR statistics at
every evaluation (``recipes/configs/checkpoint_study.yaml``). Every evaluation step is a candidate checkpoint.
For each run, the clean-accuracy regret (best candidate in hindsight minus the kept one) of:

* (a) the last checkpoint;
* (b) the lowest loss on the noisy validation split (10 % of the same noisy pairs held out of training:
  what a user without clean labels has);
* (c) the memorization rule (:class:`hf_snr.monitor.MemorizationRule`, on ``snr/noise_to_signal``);
* (d) the lowest loss on the clean held-out split (the oracle's bound);
* and, for reference, the lowest logged ``snr/memorization_rate`` (lr-carried; falls with a decaying schedule).

The rule's parameters are chosen on seeds 0-1 (the lowest regret averaged over the regimes) from a small grid
and frozen; the report is on seeds 2-3, which the choice never saw, and on the grokking runs (held-out
accuracy regret; no noisy split there). Steps saved: how much earlier than the end the rule says memorization
dominates (what ``stop=True`` would save).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import statistics
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hf_snr.monitor import MemorizationRule, choose  # noqa: E402

GRID = dict(smoothing=[1.0, 0.5, 0.3], rise=[0.25, 0.5, 1.0, 2.0, 4.0], patience=[1, 2, 3],
            min_fraction=[0.0, 0.1, 0.2], keep=["before_rise", "min"])
CHOOSE_SEEDS, REPORT_SEEDS = (0, 1), (2, 3)


def _regime_and_schedule(comparison: str, results: dict[str, Any]) -> tuple[str, str]:
    """(regime, schedule) of a run: the checkpoint study names its comparisons REGIME_SCHEDULE
    (``many_passes_linear``); other studies name the regime only, and the schedule is the run's own
    ``lr_scheduler_type``."""
    schedule = str(results.get("args", {}).get("training", {}).get("lr_scheduler_type", "constant"))
    schedule = schedule.rpartition(".")[2].lower()  # "SchedulerType.LINEAR" as some versions write it
    regime, _, suffix = comparison.rpartition("_")
    if regime and suffix in ("constant", "linear", "cosine"):
        return regime, suffix
    return comparison, schedule


def load_dpo_runs(study: pathlib.Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(study.glob("*/runs/*/seed*/results.json")):
        regime_schedule = path.parts[-5]
        r = json.loads(path.read_text())
        hist = r["log_history"]
        evals = {h["step"]: h for h in hist if "eval_rewards/accuracies" in h}
        noisy = {h["step"]: h["noisyval_loss"] for h in hist if "noisyval_loss" in h}
        stats = {h["step"]: h for h in hist if "snr/noise_to_signal" in h and "loss" in h}
        steps = sorted(s for s in evals if s in stats)
        if not steps:
            continue
        regime, schedule = _regime_and_schedule(regime_schedule, r)
        runs.append(dict(
            task="dpo", regime=regime, schedule=schedule, arm=path.parts[-3], seed=int(path.parts[-2][4:]),
            steps=steps, max_steps=max(h["step"] for h in hist),
            quality={s: evals[s]["eval_rewards/accuracies"] for s in steps},
            clean_loss={s: evals[s]["eval_loss"] for s in steps},
            noisy_loss={s: noisy[s] for s in steps if s in noisy},
            ratio=[stats[s]["snr/noise_to_signal"] for s in steps],
            memo={s: stats[s]["snr/memorization_rate"] for s in steps},
        ))
    return runs


def load_grokking_runs(root: pathlib.Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(root.glob("*/*/seed*/results.json")):
        r = json.loads(path.read_text())
        log = [h for h in r["log"] if "snr/signal" in h and h.get("snr/signal")]
        if not log:
            continue  # an AdamW arm without statistics
        steps = [h["step"] for h in log]
        runs.append(dict(
            task="grokking", regime="grokking", schedule="constant", arm=f"{path.parts[-4]} {path.parts[-3]}",
            seed=int(path.parts[-2][4:]),
            steps=steps, max_steps=int(r.get("steps_run") or steps[-1]),
            quality={h["step"]: h["heldout_acc"] for h in log},
            clean_loss={h["step"]: h["heldout_loss"] for h in log}, noisy_loss={},
            ratio=[h["snr/noise"] / h["snr/signal"] for h in log],
            memo={h["step"]: h["snr/noise"] for h in log},
        ))
    return runs


def choices(run: dict[str, Any], rule: MemorizationRule) -> dict[str, Any]:
    q, steps = run["quality"], run["steps"]
    best = max(q[s] for s in steps)
    kept, stop = choose(rule, steps, run["ratio"], run["max_steps"])
    picks = {
        "a_last": steps[-1],
        "b_noisy_val": min(run["noisy_loss"], key=run["noisy_loss"].get) if run["noisy_loss"] else None,
        "c_rule": kept if kept is not None else steps[-1],
        "d_clean_val": min(run["clean_loss"], key=run["clean_loss"].get),
        "min_memorization_rate": min(run["memo"], key=run["memo"].get),
    }
    out = {k: (best - q[s] if s is not None else None) for k, s in picks.items()}
    out["steps_saved"] = (run["max_steps"] - stop) if stop is not None else 0
    out["steps_saved_share"] = out["steps_saved"] / run["max_steps"]
    return out


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def by_regime(runs, rule, key):
    out = {}
    for regime in sorted({r["regime"] for r in runs}):
        rs = [choices(r, rule) for r in runs if r["regime"] == regime]
        out[regime] = mean([c[key] for c in rs])
    return out


def select_rule(runs: list[dict[str, Any]]) -> tuple[MemorizationRule, list[dict[str, Any]]]:
    scored = []
    for values in itertools.product(*GRID.values()):
        rule = MemorizationRule(**dict(zip(GRID, values)))
        per = by_regime(runs, rule, "c_rule")
        scored.append(dict(rule=rule, regret=mean(list(per.values())), per_regime=per))
    scored.sort(key=lambda x: x["regret"])
    return scored[0]["rule"], scored


KEYS = ("a_last", "b_noisy_val", "c_rule", "d_clean_val", "min_memorization_rate")


def table(runs, rule, title) -> list[str]:
    lines = [f"### {title}", "", "| regime | runs | (a) last | (b) noisy val | (c) rule | (d) clean val | lowest "
             "memorization_rate | rule stops, steps saved |", "|---|---|---|---|---|---|---|---|"]
    rows = {}
    for regime in sorted({r["regime"] for r in runs}):
        rs = [choices(r, rule) for r in runs if r["regime"] == regime]
        rows[regime] = {k: mean([c[k] for c in rs]) for k in KEYS}
        stopped = [c for c in rs if c["steps_saved"] > 0]
        saved = mean([c["steps_saved_share"] for c in rs])
        cells = " | ".join("—" if rows[regime][k] is None else f"{rows[regime][k]:.3f}" for k in KEYS)
        lines.append(f"| {regime} | {len(rs)} | {cells} | {len(stopped)}/{len(rs)}, {100 * saved:.0f} % |")
    avg = {k: mean([rows[g][k] for g in rows]) for k in KEYS}
    cells = " | ".join("—" if avg[k] is None else f"**{avg[k]:.3f}**" for k in KEYS)
    lines.append(f"| **mean over regimes** | | {cells} | |")
    return lines + [""], rows, avg


def add_tables_by(field: str, runs, rule, md: list[str], out: dict[str, Any], title, key) -> None:
    """One regret table per value of ``field`` (e.g. each arm), appended to ``md`` and ``out``; ``title(value)`` /
    ``key(value)`` name the table and its entry."""
    for value in sorted({r[field] for r in runs}):
        lines, rows, avg = table([r for r in runs if r[field] == value], rule, title(value))
        md += lines
        out[key(value)] = {"by_regime": rows, "mean": avg}


def write_report(dest: pathlib.Path, md: list[str], out: dict[str, Any]) -> dict[str, Any]:
    text = "\n".join(md)
    (dest / "regret.md").write_text(text + "\n")
    (dest / "regret.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(text)
    return out


def frozen_report(runs: list[dict[str, Any]], dest: pathlib.Path) -> dict[str, Any]:
    """The regret table of the frozen rule on every run (another study's runs: no seed saw the choice)."""
    rule = MemorizationRule()
    seeds = sorted({r["seed"] for r in runs})
    md = ["# Which checkpoint to keep: clean-accuracy regret (best checkpoint in hindsight minus the kept one)", "",
          f"The frozen rule `{rule}` (MemorizationRule's defaults, chosen on the checkpoint study's seeds 0-1 on the "
          f"tiny model), applied unchanged to {len(runs)} runs of this study (seeds {seeds}).", ""]
    lines, rows, avg = table(runs, rule, "all runs")
    md += lines
    out: dict[str, Any] = {"rule": vars(rule), "seeds": seeds, "all runs": {"by_regime": rows, "mean": avg}}
    add_tables_by("arm", runs, rule, md, out, title=lambda arm: f"arm {arm}", key=lambda arm: f"arm {arm}")
    return write_report(dest, md, out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=pathlib.Path)
    p.add_argument("--grokking", type=pathlib.Path, default=None)
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--frozen", action="store_true",
                   help="choose nothing: apply the frozen rule (MemorizationRule's defaults, chosen on the checkpoint "
                        "study's seeds 0-1) to every run of this study, all of them unseen by that choice")
    a = p.parse_args(argv)
    runs = load_dpo_runs(a.study)
    if not runs:
        raise SystemExit(f"no finished runs with SNR statistics under {a.study}")
    if a.frozen:
        return frozen_report(runs, a.out or a.study)
    choose_runs = [r for r in runs if r["seed"] in CHOOSE_SEEDS]
    report_runs = [r for r in runs if r["seed"] in REPORT_SEEDS]
    rule, scored = select_rule(choose_runs)
    md = ["# Which checkpoint to keep: clean-accuracy regret (best checkpoint in hindsight minus the kept one)", "",
          f"Rule chosen on seeds {list(CHOOSE_SEEDS)} ({len(choose_runs)} runs) from the grid {GRID}: "
          f"`{rule}`; reported on seeds {list(REPORT_SEEDS)} ({len(report_runs)} runs), which the choice never saw.",
          ""]
    out: dict[str, Any] = {"rule": vars(rule), "grid": GRID, "chosen_on": list(CHOOSE_SEEDS),
                           "top_rules": [dict(rule=vars(x["rule"]), regret=x["regret"]) for x in scored[:10]]}
    for name, subset in (("seeds 2-3 (never seen by the choice)", report_runs),
                         ("seeds 0-1 (the choice's own)", choose_runs)):
        if not subset:
            continue
        lines, rows, avg = table(subset, rule, name)
        md += lines
        out[name] = {"by_regime": rows, "mean": avg}
        add_tables_by("schedule", subset, rule, md, out, title=lambda v, n=name: f"{n}, {v} schedule",
                      key=lambda v, n=name: f"{n}, {v}")
        add_tables_by("arm", subset, rule, md, out, title=lambda v, n=name: f"{n}, arm {v}",
                      key=lambda v, n=name: f"{n}, arm {v}")
    if a.grokking:
        g = load_grokking_runs(a.grokking)
        if g:
            lines, rows, avg = table(g, rule, "grokking (held-out accuracy regret; never seen by the choice)")
            md += lines
            out["grokking"] = {"by_regime": rows, "mean": avg, "runs": len(g)}
    rep = out.get("seeds 2-3 (never seen by the choice)")
    if rep:
        m = rep["mean"]
        worse = [g for g, row in rep["by_regime"].items() if row["c_rule"] > row["a_last"] + 1e-12]
        verdict = (m["c_rule"] <= m["b_noisy_val"] and m["c_rule"] <= 0.5 * m["a_last"] and not worse)
        out["target_met"] = verdict
        md += [f"Target (rule <= (b) and <= half of (a), averaged over regimes; no regime worse than (a)): "
               f"**{'met' if verdict else 'not met'}** (rule {m['c_rule']:.3f}, (a) {m['a_last']:.3f}, "
               f"(b) {m['b_noisy_val']:.3f}; regimes worse than (a): {worse or 'none'}).", ""]
    return write_report(a.out or a.study, md, out)


if __name__ == "__main__":
    main()
