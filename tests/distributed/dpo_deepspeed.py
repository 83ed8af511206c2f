"""SNRDPOTrainer + DeepSpeed ZeRO-2 through the Trainer, 1 CPU process.

    torchrun --nproc_per_node 1 dpo_deepspeed.py OUT

TrainingArguments(deepspeed=dict) with a ZeRO-2 config that has no "optimizer" section (so the
Trainer's optim="snr_adamw" is kept), DS_ACCELERATOR=cpu, use_cpu=False (use_cpu=True would switch
DeepSpeed off). Trains 4 steps on noisy synthetic preferences, evaluates once, asserts DeepSpeed is
on with stage 2 and that the optimizer which steps is SNRAdamW, and writes OUT/result.json
(optimizer unwrap chain, log_history). One process by design: see trainer_deepspeed.py.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1, os.environ.get("WORLD_SIZE")

    _common.disable_deepspeed_shm_comm()
    import datasets

    import hf_snr  # noqa: F401  (registers optim="snr_adamw")
    from hf_snr.data import swap_preferences
    from hf_snr.dpo import SNRDPOConfig, SNRDPOTrainer
    from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer, make_preference_dataset, task_vocabulary

    datasets.disable_progress_bars()
    tok = build_tiny_tokenizer(task_vocabulary(64))
    dd = make_preference_dataset(n_train=64, n_eval=16, seed=0, n_films=64, scale=math.inf)
    dd = swap_preferences(dd, 0.3, splits=["train", "test"])
    model = build_tiny_model(tok, seed=0)
    args = SNRDPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=False,
        deepspeed=ds_config(),
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        seed=0,
    )
    trainer = SNRDPOTrainer(model, ref_model=copy.deepcopy(model), args=args, train_dataset=dd["train"],
                            eval_dataset=dd["test"], processing_class=tok)
    acc = trainer.accelerator
    assert trainer.is_deepspeed_enabled, "DeepSpeed is not enabled"
    assert acc.num_processes == 1 and str(acc.distributed_type) == "DistributedType.DEEPSPEED", acc.distributed_type
    assert acc.state.deepspeed_plugin.zero_stage == 2, acc.state.deepspeed_plugin.zero_stage

    trainer.train()

    chain = _common.optimizer_chain(trainer.optimizer)
    assert chain[-1] == "SNRAdamW", chain
    assert trainer.model_wrapped.zero_optimization_stage() == 2
    _common.write_json(out / "result.json", {
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "zero_stage": trainer.model_wrapped.zero_optimization_stage(),
        "optimizer_chain": chain,
        "log_history": trainer.state.log_history,
    })


if __name__ == "__main__":
    main()
