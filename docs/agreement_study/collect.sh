#!/usr/bin/env bash
# Report whatever has finished (compare.py --report_only) and copy the summaries, plots and every finished
# run's results.json (the raw log_history, arguments and timings) into docs/agreement_study.
#   bash docs/agreement_study/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
DST=docs/agreement_study
for name in agreement_sweep agreement; do
  [ -d outputs/$name ] || continue
  $PY recipes/compare.py --config recipes/configs/$name.yaml --report_only 2>/dev/null \
    | grep '^compare: not run:' > $DST/$name.not_run.txt || true
  mkdir -p $DST/$name
  cp outputs/$name/summary.md $DST/$name/summary.md
  for comp in outputs/$name/*/; do
    c=$(basename "$comp")
    [ -f "$comp/summary.json" ] || continue
    mkdir -p $DST/$name/$c
    cp "$comp"/summary.json "$comp"/summary.md "$comp"/*.png $DST/$name/$c/
    (cd "$comp" && find runs -name results.json) | while read -r f; do
      mkdir -p "$DST/$name/$c/$(dirname "$f")"
      cp "$comp/$f" "$DST/$name/$c/$f"
    done
  done
done
du -sh $DST
