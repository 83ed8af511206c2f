#!/usr/bin/env bash
# Tables, plots and costs of the real-model study from whatever has finished (the runs' results.json are
# already here: compare.py writes them into docs/smollm2_study as they finish).
#   bash docs/smollm2_study/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
DST=docs/smollm2_study
# per comparison: summary.md / summary.json / plots; the list of runs not finished yet
for name in smollm2_sweep smollm2_study; do
  $PY recipes/compare.py --config recipes/configs/$name.yaml --report_only 2>/dev/null \
    | grep '^compare: not run:' > $DST/$name.not_run.txt || true
done
# the memorization monitor's checkpoint choice: the frozen rule on every seeds-1-3 run with SNR statistics
if compgen -G "$DST/main/*/runs/*/seed*/results.json" > /dev/null; then
  $PY recipes/checkpoint_choice.py $DST/main --frozen > /dev/null
fi
# wall and CPU time per run and in total
$PY recipes/study_cost.py $DST/sweep $DST/main --out $DST/cost.md > /dev/null
# the gate on real weights beside the tiny model's (seed 1 of each)
runs=() titles=()
add_gate_maps() {  # add_gate_maps STUDY_DIR LABEL REGIME...: the two gate arms' seed-1 runs that have a gate map
  local dir=$1 label=$2; shift 2
  for regime in "$@"; do
    for arm in snr_default snr_row_ema; do
      d=$dir/$regime/runs/$arm/seed1
      if [ -f $d/gate_map.jsonl ]; then runs+=("$d"); titles+=("$label $regime ${arm#snr_}"); fi
    done
  done
}
add_gate_maps $DST/main SmolLM2 many_passes one_pass
add_gate_maps $DST/tiny_gate_map tiny many_passes sft_one_pass
if [ ${#runs[@]} -gt 0 ]; then
  $PY recipes/plot_gate_map.py "${runs[@]}" --out $DST/gate_maps --combined gate_real_vs_tiny.png --titles "${titles[@]}" > /dev/null
fi
du -sh $DST
