#!/usr/bin/env bash
# Report whatever has finished (compare.py --report_only) and copy the summaries and plots here.
#   bash docs/dpo_study/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
DST=docs/dpo_study
for name in verdict_sweep verdict; do
  $PY recipes/compare.py --config recipes/configs/$name.yaml --report_only 2>/dev/null \
    | grep '^compare: not run:' > $DST/$name.not_run.txt || true
  mkdir -p $DST/$name
  cp outputs/$name/summary.md $DST/$name/summary.md
  for comp in outputs/$name/*/; do
    c=$(basename "$comp")
    [ -f "$comp/summary.json" ] || continue
    mkdir -p $DST/$name/$c
    cp "$comp"/summary.json "$comp"/summary.md "$comp"/*.png $DST/$name/$c/
  done
done
ls -R $DST | head -50
