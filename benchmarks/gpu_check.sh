#!/usr/bin/env bash
# The one short GPU check (a few minutes on one H100/H200; no network). Run from the repository root on a
# machine with CUDA and a CUDA build of torch:
#   bash benchmarks/gpu_check.sh            # results under $OUT (the device tool) or outputs/gpu_check
# It installs the package into the current Python (no dependencies fetched if they are present), then runs
# benchmarks/gpu_check.py: CUDA step times of SNRAdamW (fused, foreach) vs torch's fused AdamW in fp32 and
# bf16 at 10M/100M/400M parameters, the CUDA trajectory against the CPU oracle, and a short single-GPU
# SNRDPOTrainer run. Put its numbers in the README's "Speed and memory" section.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
$PY -c "import hf_snr" 2>/dev/null || $PY -m pip install -q --no-deps -e .
exec $PY benchmarks/gpu_check.py "$@"
