"""Run a grid of grokking arms (optimizers x learning rates x weight decays x seeds) and summarize it.

    python recipes/grokking_study.py --config recipes/configs/grokking/grokking_study.yaml
    python recipes/grokking_study.py --config recipes/configs/grokking/grokking_study.yaml --seeds 0 --dry_run
    python recipes/grokking_study.py --config recipes/configs/grokking/grokking_study.yaml --set max_steps=5000

Every run is one :func:`grokking.main` call, in this process (``--workers 1``, the default) or in
``--workers N`` spawned worker processes (each with its own ``torch_threads``, 1 by default).
Finished runs are reused: a run whose ``results.json`` exists with the same arguments is not
run again, so an interrupted study resumes where it stopped. ``summary.md``, ``summary.json`` and
``accuracy.png`` are rewritten after every finished run, so a partial study is always summarized
(runs not finished yet are listed as pending).

The config file (YAML)::

    output_dir: outputs/grokking/study
    base_config: grokking.yaml          # a grokking.py config, relative to this file
    args: {max_steps: 10000}            # grokking.py options for every run (override base_config)
    seeds: [0, 1, 2]
    workers: 1
    arms:                               # run in this order, seed by seed (all arms of seed 0 first)
      - {name: adamw, optim: adamw, learning_rates: [1.0e-3, 3.0e-3], weight_decays: [0.3, 1.0, 3.0]}
      - {name: snr, optim: snr_adamw, optim_args: "", learning_rates: [1.0e-3], weight_decays: [1.0]}
      # the matched arm: AdamW at lr * g and weight decay / g, g = the SNR arm's mean gate
      # (snr/mask_mean averaged over each run, then over that arm's runs at the same lr and wd
      # finished when the matched arm first needs it), or g given here as `gate: 0.05`
      - {name: adamw_matched, optim: adamw, matched_to: snr, learning_rates: [1.0e-3], weight_decays: [1.0]}

An arm may also set ``args`` (grokking.py options for that arm only) and a single ``learning_rate``
/ ``weight_decay`` instead of the lists. Output in ``OUTPUT_DIR``: ``runs/ARM/lrLR_wdWD/seedS/``
(each run's results.json and accuracy.png), ``summary.md``, ``summary.json``, ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import grokking  # noqa: E402

HEADLINE_CANDIDATES = ("snr/population_risk", grokking.DERIVED_CANDIDATE)


@dataclass
class Arm:
    name: str
    optim: str
    optim_args: str = ""
    learning_rates: list[float] = field(default_factory=lambda: [1e-3])
    weight_decays: list[float] = field(default_factory=lambda: [1.0])
    matched_to: str | None = None
    gate: float | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    arm: str
    lr: float          # nominal (the grid value); the matched arm runs at lr * gate
    wd: float
    seed: int
    run_dir: str
    args: dict[str, Any]


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import yaml

    path = pathlib.Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "arms" not in raw:
        raise ValueError(f"{path}: a study config is a mapping with an 'arms' list")
    base: dict[str, Any] = {}
    if raw.get("base_config"):
        base = yaml.safe_load((path.parent / raw["base_config"]).read_text()) or {}
    base.update(raw.get("args") or {})
    base.update(overrides or {})
    known = {f.name for f in fields(grokking.GrokkingArguments)}
    arms = []
    for spec in raw["arms"]:
        spec = dict(spec)
        if "learning_rate" in spec:
            spec["learning_rates"] = [spec.pop("learning_rate")]
        if "weight_decay" in spec:
            spec["weight_decays"] = [spec.pop("weight_decay")]
        unknown = set(spec) - {f.name for f in fields(Arm)}
        if unknown:
            raise ValueError(f"{path}: arm {spec.get('name')!r} has unknown keys {sorted(unknown)} "
                             f"(accepted: {', '.join(f.name for f in fields(Arm))})")
        arm = Arm(**spec)
        arm.learning_rates = [float(x) for x in arm.learning_rates]
        arm.weight_decays = [float(x) for x in arm.weight_decays]
        bad = set(arm.args) - known
        if bad:
            raise ValueError(f"{path}: arm {arm.name!r} sets unknown grokking options {sorted(bad)}")
        arms.append(arm)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names must be unique, got {names}")
    for i, arm in enumerate(arms):
        if arm.matched_to is not None and arm.matched_to not in names[:i] and arm.gate is None:
            raise ValueError(f"{path}: arm {arm.name!r} is matched_to {arm.matched_to!r}, which must be an "
                             f"earlier arm (arms: {names}) unless gate is given")
    if raw.get("order", "arms") not in ("arms", "cells"):
        raise ValueError(f"{path}: Invalid order: {raw['order']!r} (accepted: arms, cells)")
    bad = set(base) - known
    if bad:
        raise ValueError(f"{path}: unknown grokking options {sorted(bad)} in base_config/args")
    return {
        "output_dir": raw.get("output_dir", "outputs/grokking/study"),
        "seeds": [int(s) for s in raw.get("seeds", [0])],
        "workers": int(raw.get("workers", 1)),
        "base": base,
        "arms": arms,
        "note": raw.get("note", ""),
        "order": raw.get("order", "arms"),
    }


def expand(config: dict[str, Any], output_dir: str) -> list[tuple[Arm, float, float, int, str]]:
    """(arm, lr, wd, seed, run_dir) of every run, seed-major (all runs of the first seed first).

    Within a seed, ``order: arms`` (default) runs each arm's whole lr x wd grid in turn; ``order: cells``
    runs every arm at one (lr, wd) cell before the next cell (cells in the order the arms first list them).
    """
    out = []
    for seed in config["seeds"]:
        per_seed = []
        for arm in config["arms"]:
            for lr in arm.learning_rates:
                for wd in arm.weight_decays:
                    run_dir = os.path.join(output_dir, "runs", arm.name, f"lr{lr:g}_wd{wd:g}", f"seed{seed}")
                    per_seed.append((arm, lr, wd, seed, run_dir))
        if config.get("order", "arms") == "cells":
            cells = list(dict.fromkeys((lr, wd) for _, lr, wd, _, _ in per_seed))
            per_seed.sort(key=lambda r: cells.index((r[1], r[2])))  # stable: arms keep their order in a cell
        out.extend(per_seed)
    return out


def run_args(config: dict[str, Any], arm: Arm, lr: float, wd: float, seed: int, run_dir: str,
             gate: float | None = None) -> grokking.GrokkingArguments:
    """The grokking options of one run (validated by GrokkingArguments)."""
    kw = dict(config["base"])
    kw.update(arm.args)
    if gate is not None:
        lr, wd = lr * gate, wd / gate
    kw.update(optim=arm.optim, optim_args=arm.optim_args, learning_rate=lr, weight_decay=wd, seed=seed,
              output_dir=run_dir, quiet=True)
    kw.setdefault("torch_threads", 1)
    return grokking.GrokkingArguments(**kw)


def _existing(run_dir: str, args: grokking.GrokkingArguments) -> dict[str, Any] | None:
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    want = grokking._jsonable(asdict(args))
    have = res.get("args", {})
    ignore = {"quiet", "plot"}
    if {k: v for k, v in have.items() if k not in ignore} != {k: v for k, v in want.items() if k not in ignore}:
        return None
    return res


def _worker(args: grokking.GrokkingArguments) -> dict[str, Any]:
    return grokking.main(args)


# -- summary -----------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float | None, sd: float | None, digits: int = 0, count: str = "") -> str:
    if mean is None:
        return f"— {count}".strip()
    text = f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")
    return f"{text} {count}".strip()


def _threshold(res: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(v for k, v in res["thresholds"].items() if k.startswith(prefix))


def summarize(config: dict[str, Any], records: list[dict[str, Any]], output_dir: str) -> dict[str, Any]:
    """Group finished runs by (arm, lr, wd); write summary.md, summary.json, accuracy.png."""
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["arm"], rec["lr"], rec["wd"]), []).append(rec)
    rows = []
    for (arm, lr, wd), recs in groups.items():
        done = [r for r in recs if r.get("results") is not None]
        res = [r["results"] for r in done]
        row: dict[str, Any] = {"arm": arm, "lr": lr, "wd": wd, "seeds": [r["seed"] for r in recs],
                               "finished": len(done), "planned": len(recs),
                               "optim": recs[0]["optim"], "optim_args": recs[0]["optim_args"],
                               "actual_lr": sorted({r["actual_lr"] for r in recs if r["actual_lr"] is not None}),
                               "actual_wd": sorted({r["actual_wd"] for r in recs if r["actual_wd"] is not None}),
                               "gate_used": recs[0].get("gate_used"), "gate_source": recs[0].get("gate_source")}
        for key, prefix in (("train", "train_"), ("heldout", "heldout_")):
            ths = [_threshold(x, prefix) for x in res]
            steps = [t["step"] for t in ths if t["reached"]]
            row[f"{key}_steps"] = [t["step"] for t in ths]
            row[f"{key}_threshold"] = ths[0]["threshold"] if ths else None
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([float(s) for s in steps])
            row[f"{key}_reached"] = len(steps)
        row["max_steps"] = sorted({x["args"]["max_steps"] for x in res})
        row["peak_heldout_acc"] = _mean_sd([max(e["heldout_acc"] for e in x["log"]) for x in res if x["log"]])[0]
        row["final_heldout_acc"] = _mean_sd([x["log"][-1]["heldout_acc"] for x in res if x["log"]])[0]
        row["wall_mean"], row["wall_sd"] = _mean_sd([x["timing"]["wall_s"] for x in res])
        row["steps_per_s"] = _mean_sd([x["timing"]["steps_per_s"] for x in res if x["timing"]["steps_per_s"]])[0]
        row["gate_mean"] = _mean_sd([x["gate_mean"] for x in res if x.get("gate_mean") is not None])[0]
        tracking: dict[str, dict[str, float | None]] = {}
        for cand in sorted({k for x in res for k in x.get("risk_tracking", {})}):
            tracking[cand] = {}
            for metric in ("spearman_heldout_loss", "spearman_gap", "spearman_delta", "rel_error_heldout",
                           "rel_error_gap"):
                vals = [x["risk_tracking"][cand][metric] for x in res
                        if cand in x.get("risk_tracking", {}) and x["risk_tracking"][cand].get(metric) is not None]
                tracking[cand][metric] = _mean_sd(vals)[0]
        row["risk_tracking"] = tracking
        row["curves"] = [{"seed": r["seed"], "step": [e["step"] for e in r["results"]["log"]],
                          "train_acc": [e["train_acc"] for e in r["results"]["log"]],
                          "heldout_acc": [e["heldout_acc"] for e in r["results"]["log"]]} for r in done]
        rows.append(row)

    recs_by_key = groups
    pending = [r for r in records if r.get("results") is None]
    lines = ["# Grokking study", ""]
    if config.get("note"):
        lines += [config["note"].strip(), ""]
    base = config["base"]
    lines += [f"{base.get('operation', 'division')} mod {base.get('prime', 97)}, train fraction "
              f"{base.get('train_fraction', 0.25)}, batch {base.get('batch_size', 512)}, seeds {config['seeds']}, "
              f"max_steps {sorted({m for r in rows for m in r['max_steps']}) or base.get('max_steps')}. "
              "Steps: first eval at which the accuracy reaches the threshold, mean ± sample sd over the seeds "
              "that reached it, (k/n) = how many of the finished seeds reached it before max_steps. "
              "Peak / final: the highest and the last held-out accuracy of the run (mean over seeds). "
              "Gate: snr/mask_mean averaged over the run. Risk: Spearman rank correlation over the run with "
              "the held-out loss of the headline risk estimate (snr/population_risk when logged, else training "
              "loss + snr/cumulative_noise), and of the training loss for reference.", ""]
    lines += ["| arm | optim_args | lr | wd | train ≥ 99 % (steps) | held-out ≥ 95 % (steps) | peak / final held-out "
              "acc | wall s | gate | ρ(risk, held-out loss) | ρ(Δrisk, Δheld-out) | ρ(train loss, held-out loss) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        n = row["finished"]
        matched = recs_by_key[(row["arm"], row["lr"], row["wd"])][0]["matched_to"] is not None
        lr_text, wd_text = f"{row['lr']:g}", f"{row['wd']:g}"
        if matched:
            lr_text += "×g = " + (", ".join(f"{x:.3g}" for x in row["actual_lr"]) or "(pending)")
            wd_text += "/g = " + (", ".join(f"{x:.3g}" for x in row["actual_wd"]) or "(pending)")
        head = next((row["risk_tracking"][c] for c in HEADLINE_CANDIDATES if c in row["risk_tracking"]), {})
        tl = row["risk_tracking"].get("train_loss", {})

        def num(d, k):
            return "—" if d.get(k) is None else f"{d[k]:+.2f}"

        train_cell = _fmt(row["train_mean"], row["train_sd"], 0, "(%d/%d)" % (row["train_reached"], n))
        heldout_cell = _fmt(row["heldout_mean"], row["heldout_sd"], 0, "(%d/%d)" % (row["heldout_reached"], n))
        gate_cell = "—" if row["gate_mean"] is None else "%.3f" % row["gate_mean"]
        lines.append(
            f"| {row['arm']} | {row['optim_args'] or '—'} | {lr_text} | {wd_text} | {train_cell} | {heldout_cell} | "
            f"{_fmt(row['peak_heldout_acc'], None, 3)} / {_fmt(row['final_heldout_acc'], None, 3)} | "
            f"{_fmt(row['wall_mean'], None, 0)} | {gate_cell} | "
            f"{num(head, 'spearman_heldout_loss')} | {num(head, 'spearman_delta')} | "
            f"{num(tl, 'spearman_heldout_loss')} |")
    if any(r["gate_used"] is not None for r in rows):
        lines += [""] + [f"Matched arm {r['arm']} at lr {r['lr']:g}, wd {r['wd']:g}: g = {r['gate_used']:.4g} "
                         f"({r['gate_source']})." for r in rows if r["gate_used"] is not None]
    lines += ["", "## Risk tracking, every candidate (means over finished seeds)", "",
              "ρ: Spearman over the eval rows; gap = held-out loss − train loss; Δ: change per eval interval; "
              "rel. error: Σ|x − target| / Σ|target|.", "",
              "| arm | lr | wd | candidate | ρ held-out loss | ρ gap | ρ Δ | rel. error vs held-out | "
              "rel. error vs gap |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for cand, m in row["risk_tracking"].items():
            cells = ["—" if m[k] is None else f"{m[k]:.3g}" for k in
                     ("spearman_heldout_loss", "spearman_gap", "spearman_delta", "rel_error_heldout", "rel_error_gap")]
            lines.append(f"| {row['arm']} | {row['lr']:g} | {row['wd']:g} | `{cand}` | " + " | ".join(cells) + " |")
    if pending:
        lines += ["", f"## Not finished ({len(pending)} of {len(records)} runs)", ""]
        lines += [f"- {r['arm']} lr {r['lr']:g} wd {r['wd']:g} seed {r['seed']}" for r in pending]
    os.makedirs(output_dir, exist_ok=True)
    text = "\n".join(lines) + "\n"
    pathlib.Path(output_dir, "summary.md").write_text(text)
    summary = {"config": {**{k: v for k, v in config.items() if k != "arms"},
                          "arms": [asdict(a) for a in config["arms"]]},
               "rows": rows, "runs": [{k: v for k, v in r.items() if k != "results"} for r in records],
               "pending": len(pending)}
    pathlib.Path(output_dir, "summary.json").write_text(json.dumps(grokking._jsonable(summary), indent=1))
    plot_study(rows, os.path.join(output_dir, "accuracy.png"))
    return summary


def plot_study(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        color = colors[i % len(colors)]
        for j, curve in enumerate(row["curves"]):
            label = f"{row['arm']} lr={row['lr']:g} wd={row['wd']:g}" if j == 0 else None
            axes[0].plot(curve["step"], curve["train_acc"], color=color, lw=1, alpha=0.8, label=label)
            axes[1].plot(curve["step"], curve["heldout_acc"], color=color, lw=1, alpha=0.8, label=label)
    for ax, title in zip(axes, ("train accuracy", "held-out accuracy")):
        ax.set(xscale="log", xlabel="step", title=title, ylim=(-0.02, 1.02))
    axes[0].set_ylabel("accuracy")
    if rows:
        axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver ------------------------------------------------------------------------------------------
def _parse_set(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes key=value (a grokking.py option), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML (see the module docstring)")
    p.add_argument("--output_dir", help="overrides the config's output_dir")
    p.add_argument("--seeds", type=int, nargs="+", help="overrides the config's seeds")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: the config's, else 1)")
    p.add_argument("--set", type=_parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="a grokking.py option for every run (repeatable), e.g. --set max_steps=5000")
    p.add_argument("--gate", type=float, help="the matched arms' gate g (instead of reading the SNR arm's)")
    p.add_argument("--dry_run", action="store_true", help="list the runs and exit")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = make_parser().parse_args(argv)
    config = load_config(opts.config, dict(opts.set))
    if opts.seeds:
        config["seeds"] = opts.seeds
    output_dir = opts.output_dir or config["output_dir"]
    workers = opts.workers or config["workers"]
    if workers < 1:
        raise ValueError(f"Invalid workers: {workers!r} (accepted: an integer >= 1)")
    arms = {a.name: a for a in config["arms"]}
    plan = expand(config, output_dir)
    records: list[dict[str, Any]] = []
    for arm, lr, wd, seed, run_dir in plan:
        rec = {"arm": arm.name, "optim": arm.optim, "optim_args": arm.optim_args, "lr": lr, "wd": wd, "seed": seed,
               "run_dir": run_dir, "matched_to": arm.matched_to, "results": None}
        if arm.matched_to is None:
            args = run_args(config, arm, lr, wd, seed, run_dir)  # validates every plain run now
            rec.update(actual_lr=args.learning_rate, actual_wd=args.weight_decay)
        else:
            rec.update(actual_lr=None, actual_wd=None)
        records.append(rec)
    if opts.dry_run:
        for r in records:
            print(f"{r['arm']:16s} lr {r['lr']:<8g} wd {r['wd']:<6g} seed {r['seed']}  -> {r['run_dir']}")
        print(f"{len(records)} runs")
        return {"runs": records}

    gates: dict[tuple[str, float, float], tuple[float, str]] = {}

    def gate_for(arm: Arm, lr: float, wd: float) -> tuple[float, str]:
        if opts.gate is not None:
            return opts.gate, "given with --gate"
        if arm.gate is not None:
            return float(arm.gate), "given in the config"
        key = (arm.name, lr, wd)
        if key not in gates:
            src = [r for r in records if r["arm"] == arm.matched_to and r["lr"] == lr and r["wd"] == wd
                   and r["results"] is not None and r["results"].get("gate_mean") is not None]
            if not src:
                raise ValueError(f"matched arm {arm.name!r} at lr {lr:g}, wd {wd:g} needs a finished run of arm "
                                 f"{arm.matched_to!r} at the same lr and wd (or --gate / gate: in the config)")
            g = statistics.fmean(r["results"]["gate_mean"] for r in src)
            gates[key] = (g, f"mean gate of {arm.matched_to} lr {lr:g} wd {wd:g}, seeds "
                             f"{[r['seed'] for r in src]}")
        return gates[key]

    def prepare(rec: dict[str, Any]) -> grokking.GrokkingArguments:
        arm = arms[rec["arm"]]
        gate = None
        if arm.matched_to is not None:
            gate, source = gate_for(arm, rec["lr"], rec["wd"])
            rec.update(gate_used=gate, gate_source=source)
        args = run_args(config, arm, rec["lr"], rec["wd"], rec["seed"], rec["run_dir"], gate)
        rec.update(actual_lr=args.learning_rate, actual_wd=args.weight_decay)
        return args

    start = time.perf_counter()

    def finished(rec: dict[str, Any], res: dict[str, Any], reused: bool) -> None:
        rec["results"] = res
        ho = _threshold(res, "heldout_")
        tr = _threshold(res, "train_")
        print(f"[{sum(r['results'] is not None for r in records)}/{len(records)}] {rec['arm']} lr {rec['lr']:g} "
              f"wd {rec['wd']:g} seed {rec['seed']}: train {tr['step']} held-out {ho['step']} "
              f"({res['steps_run']} steps, {res['timing']['wall_s']:.0f} s{', reused' if reused else ''}; "
              f"study {time.perf_counter() - start:.0f} s)", flush=True)
        summarize(config, records, output_dir)

    # One process: in plan order (a matched run reads the gates of the runs finished before it, so list the
    # matched arm after its source arm). Workers: phase 1 runs with their own settings, phase 2 the matched
    # arms (they read phase 1's gates).
    if workers == 1:
        phases = [records]
    else:
        phases = [[r for r in records if r["matched_to"] is None], [r for r in records if r["matched_to"] is not None]]
    for phase in phases:
        todo = []
        for rec in phase:
            args = prepare(rec)
            res = _existing(rec["run_dir"], args)
            if res is not None:
                finished(rec, res, True)
            elif workers == 1:
                finished(rec, grokking.main(args), False)
            else:
                todo.append((rec, args))
        if len(todo) <= 1:
            for rec, args in todo:
                finished(rec, grokking.main(args), False)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                for (rec, _), res in zip(todo, pool.imap(_worker, [a for _, a in todo])):
                    finished(rec, res, False)
    summary = summarize(config, records, output_dir)
    print(f"grokking_study: {len(records)} runs in {time.perf_counter() - start:.0f} s; "
          f"{os.path.join(output_dir, 'summary.md')}", flush=True)
    return summary


if __name__ == "__main__":
    main()
