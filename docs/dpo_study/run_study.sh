#!/usr/bin/env bash
# The DPO study, in priority order, on one core (the other was busy). See README.md here.
#   bash docs/dpo_study/run_study.sh > outputs/dpo_study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
MAIN=(adamw "adamw clean" snr "snr ema" "snr row+ema" "snr decay_to=init" "adamw wd")
ROBUST=("cdpo (adamw)" "robust (adamw)")
stage() {  # stage COMPARISON ARMS...: the lr sweep (1 seed), then the verdict's 4 seeds at each arm's best lr
  local comp=$1; shift
  echo "== $(date -u +%T) sweep $comp: $*"
  $PY recipes/compare.py --config recipes/configs/verdict_sweep.yaml --jobs 1 --reuse --only "$comp" --arms "$@"
  $PY recipes/compare.py --config recipes/configs/verdict_sweep.yaml --report_only --only "$comp" > /dev/null
  $PY docs/dpo_study/reuse_seed0.py recipes/configs/verdict_sweep.yaml recipes/configs/verdict.yaml "$comp"
  echo "== $(date -u +%T) verdict $comp: $*"
  $PY recipes/compare.py --config recipes/configs/verdict.yaml --jobs 1 --reuse --only "$comp" --arms "$@"
}
stage sft_one_pass "${MAIN[@]}"
stage many_passes "${MAIN[@]}"
stage sft_one_pass "${ROBUST[@]}"
stage many_passes "${ROBUST[@]}"
stage few_passes "${MAIN[@]}" "${ROBUST[@]}"
echo "== $(date -u +%T) done"
