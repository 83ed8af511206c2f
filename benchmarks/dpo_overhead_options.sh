#!/usr/bin/env bash
# DPO-step overhead of each SNR option against AdamW (benchmarks/dpo_overhead.py, tiny Llama, batch 32,
# logging_steps=10, interleaved rounds), one RESULT line per option, written to docs/benchmarks/.
#   bash benchmarks/dpo_overhead_options.sh [rounds] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROUNDS=${1:-4}; STEPS=${2:-30}
OUT=docs/benchmarks; mkdir -p "$OUT"
REPORT=$OUT/dpo_overhead_options.md
{
  echo "# DPO-step overhead per SNR option"
  echo
  echo "\`bash benchmarks/dpo_overhead_options.sh $ROUNDS $STEPS\` on $(nproc) cores, $(date -u +%Y-%m-%d). Each row: SNRAdamW with"
  echo "these optim_args vs AdamW (adamw_torch) in the same trainer, $ROUNDS interleaved rounds x $STEPS steps, 1 torch thread."
  echo "ratio of means: per-round mean step time SNR / AdamW, median over rounds (CPU time of the process)."
  echo "optimizer step: the step alone, timed in isolation (CPU ms, statistics every 10 steps)."
  echo
  echo "| optim_args | GA | ratio of means (CPU) | ratio of medians (CPU) | implied by the optimizer step | SNR / AdamW optimizer step ms |"
  echo "|---|---:|---:|---:|---:|---:|"
} > "$REPORT"
run() {
  local args=$1 ga=$2
  local log; log=$(mktemp)
  $PY benchmarks/dpo_overhead.py --rounds "$ROUNDS" --steps "$STEPS" --optim_args "$args" \
      --gradient_accumulation_steps "$ga" --json "$log.json" > "$log" 2>&1
  $PY - "$log.json" "$args" "$ga" >> "$REPORT" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))["result"]
o = r["optimizer_step_ms"]
print(f"| `{sys.argv[2]}` | {sys.argv[3]} | {r['cpu']['ratio_of_means']:.3f} | {r['cpu']['ratio_of_medians']:.3f} | "
      f"{r['implied_ratio']['cpu']:.3f} | {o['snr_adamw']:.2f} / {o['adamw_torch']:.2f} |")
PYEOF
  tail -1 "$REPORT"
}
run "mask=snr" 1
run "mask=snr,fused=true" 1
run "noise=ema" 1
run "signal=step" 1
run "reduction=row,noise=ema" 1
run "decay_to=init" 1
run "mask=snr" 2
run "variance=microbatch,noise=ema" 2
