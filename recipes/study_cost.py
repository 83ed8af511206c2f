"""What a study cost: wall time and CPU time per run, per arm and in total, from its runs' results.json.

    python recipes/study_cost.py docs/smollm2_study/sweep docs/smollm2_study/main [--out docs/smollm2_study/cost.md]

Reads every ``COMPARISON/runs/ARM/seedS/results.json`` under each study folder (``compare.py``'s layout). Each run
records ``wall_time_s`` (the whole run: loading, reference log-probs, training, evaluations) and ``cpu_time_s``
(its process's CPU time, all threads: load-independent on a shared machine). Runs that ran side by side
(``compare.py --jobs 2``) overlap in wall time, so the study's elapsed time is less than the sum of wall times;
the table gives both sums and says so.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import Any


def load(study: pathlib.Path) -> list[dict[str, Any]]:
    """One row per finished run: study, comparison, arm, seed, wall and CPU seconds, optimizer steps."""
    rows = []
    for path in sorted(study.glob("*/runs/*/seed*/results.json")):
        r = json.loads(path.read_text())
        steps = max((h.get("step", 0) for h in r.get("log_history", [])), default=0)
        rows.append(dict(study=study.name, comparison=path.parts[-5], arm=path.parts[-3], seed=int(path.parts[-2][4:]),
                         wall_s=float(r["wall_time_s"]), cpu_s=float(r["cpu_time_s"]), steps=int(steps)))
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (study, comparison, arm): runs, mean wall / CPU seconds a run; and totals per study and overall."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["study"], row["comparison"], row["arm"]), []).append(row)
    per_arm = [dict(study=s, comparison=c, arm=a, runs=len(g), wall_s=statistics.fmean(x["wall_s"] for x in g),
                    cpu_s=statistics.fmean(x["cpu_s"] for x in g), steps=statistics.fmean(x["steps"] for x in g))
               for (s, c, a), g in sorted(groups.items())]
    totals = {}
    for study in sorted({r["study"] for r in rows}):
        sub = [r for r in rows if r["study"] == study]
        totals[study] = dict(runs=len(sub), wall_h=sum(r["wall_s"] for r in sub) / 3600,
                             cpu_h=sum(r["cpu_s"] for r in sub) / 3600)
    totals["all"] = dict(runs=len(rows), wall_h=sum(r["wall_s"] for r in rows) / 3600,
                         cpu_h=sum(r["cpu_s"] for r in rows) / 3600)
    return dict(per_arm=per_arm, totals=totals)


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| study | comparison | arm | runs | steps | wall s / run | CPU s / run |",
             "|---|---|---|---|---|---|---|"]
    for a in summary["per_arm"]:
        lines.append(f"| {a['study']} | {a['comparison']} | {a['arm']} | {a['runs']} | {a['steps']:.0f} | "
                     f"{a['wall_s']:.0f} | {a['cpu_s']:.0f} |")
    lines += ["", "| study | runs | sum of wall times (h) | CPU time (h) |", "|---|---|---|---|"]
    for name, t in summary["totals"].items():
        lines.append(f"| {name} | {t['runs']} | {t['wall_h']:.2f} | {t['cpu_h']:.2f} |")
    lines += ["", "Runs that ran side by side (`--jobs 2`) overlap in wall time: the elapsed time is about the sum of "
              "wall times divided by the number of jobs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", type=pathlib.Path, help="compare.py output folders")
    p.add_argument("--out", type=pathlib.Path, help="write the markdown table here (and a .json beside it)")
    a = p.parse_args(argv)
    rows = [row for study in a.studies for row in load(study)]
    if not rows:
        raise SystemExit(f"no finished runs under {[str(s) for s in a.studies]}")
    summary = summarize(rows)
    text = markdown(summary)
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text, end="")
    return summary


if __name__ == "__main__":
    main()
