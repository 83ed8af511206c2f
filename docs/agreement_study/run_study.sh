#!/usr/bin/env bash
# The agreement study (README "Gradient agreement"): the lr sweep (seed 0), then 4 seeds at each arm's best lr,
# the threshold and micro-batch-size sweeps. Resumable: --reuse skips every run whose results.json exists.
#   bash docs/agreement_study/run_study.sh      (~75 min on 2 cores)
#   bash docs/agreement_study/collect.sh        (summaries, plots and raw results into docs/agreement_study)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
$PY recipes/compare.py --config recipes/configs/agreement_sweep.yaml --jobs 2 --reuse
$PY recipes/compare.py --config recipes/configs/agreement.yaml --jobs 2 --reuse
