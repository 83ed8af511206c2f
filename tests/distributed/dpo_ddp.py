"""SNRDPOTrainer under DDP (2 CPU ranks): drift and noise metrics pooled over ranks, exactly.

    accelerate launch --multi_gpu --num_processes 2 dpo_ddp.py OUT

Trains a few steps on noisy synthetic preferences (optim="snr_adamw"), then evaluates on a flagged
held-out set of 45 pairs: with 2 ranks x 8 pairs per batch the last global batch is padded with 3
duplicate pairs, which the metrics must drop. Every rank then recomputes the expected eval metrics
over the whole set by hand (plain logits of the policy and the reference, no TRL code) and compares.
Rank 0 writes OUT/result.json. The run refuses to report if the launch did not give 2 ranks of
MULTI_CPU (``accelerate launch --cpu`` silently runs one process).
"""

import json
import math
import sys
from pathlib import Path

import torch


def expected_metrics(trainer, dataset, column: str) -> dict[str, float]:
    """Pooled drift and fits over every pair of ``dataset``, from plain forward passes."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids", column]
    rows = dataset.select_columns(columns)
    chosen_r, rejected_r, flags = [], [], []
    policy.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            examples = [rows[i] for i in range(start, min(start + 8, len(rows)))]
            batch = trainer.data_collator(examples)

            def seq_logps(model, batch=batch):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                tokens = batch["input_ids"][:, 1:]
                mask = batch["completion_mask"][:, 1:].float()
                return (logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)

            c, r = (trainer.beta * (seq_logps(policy) - seq_logps(ref))).chunk(2)
            chosen_r.append(c)
            rejected_r.append(r)
            flags.append(batch[column].float())
    c, r, f = torch.cat(chosen_r), torch.cat(rejected_r), torch.cat(flags)
    margin = c - r
    fit = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {
        "eval_rewards/drift": ((c.abs() + r.abs()).sum() / (2 * len(c))).item(),
        "eval_noise/flipped_fit": ((fit * f).sum() / f.sum()).item(),
        "eval_noise/clean_fit": ((fit * (1 - f)).sum() / (1 - f).sum()).item(),
        "n_pairs": len(c),
    }


def main() -> None:
    out = Path(sys.argv[1])
    import copy

    import datasets
    from accelerate.utils import DistributedType

    import hf_snr  # noqa: F401
    from hf_snr.data import swap_preferences
    from hf_snr.dpo import SNRDPOConfig, SNRDPOTrainer
    from hf_snr.integration import unwrap_optimizer
    from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer, make_preference_dataset, task_vocabulary

    datasets.disable_progress_bars()
    tok = build_tiny_tokenizer(task_vocabulary(64))
    dd = make_preference_dataset(n_train=96, n_eval=45, seed=0, n_films=64, scale=math.inf)
    dd = swap_preferences(dd, 0.3, splits=["train", "test"])
    model = build_tiny_model(tok, seed=0)
    args = SNRDPOConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        max_steps=6,
        logging_steps=3,
        ddp_find_unused_parameters=False,
        seed=0,
    )
    trainer = SNRDPOTrainer(model, ref_model=copy.deepcopy(model), args=args, train_dataset=dd["train"],
                            eval_dataset=dd["test"], processing_class=tok)
    acc = trainer.accelerator
    if acc.num_processes != 2 or acc.distributed_type != DistributedType.MULTI_CPU:
        raise SystemExit(f"expected 2 MULTI_CPU ranks, got {acc.num_processes} {acc.distributed_type}")

    trainer.train()
    metrics = trainer.evaluate()
    expected = expected_metrics(trainer, trainer.eval_dataset, args.flipped_column)
    assert expected["n_pairs"] == 45
    for key in ("eval_rewards/drift", "eval_noise/flipped_fit", "eval_noise/clean_fit"):
        assert math.isclose(metrics[key], expected[key], rel_tol=1e-4, abs_tol=1e-6), (key, metrics[key], expected[key])

    if acc.is_main_process:
        train_logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        result = {
            "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type.value),
            "optimizer": type(unwrap_optimizer(trainer.optimizer)).__name__,
            "eval": metrics,
            "expected": expected,
            "last_train_log": train_logs[-1],
        }
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
