"""transformers Trainer + DeepSpeed ZeRO-2 / ZeRO-3 with optim="snr_adamw", 1 CPU process.

    accelerate launch --config_file OUT/zero3.yaml --num_processes 1 trainer_deepspeed.py OUT

zero3.yaml is an accelerate config (distributed_type DEEPSPEED, deepspeed_config_file OUT/zero3.json),
so this process runs with ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_DEEPSPEED_CONFIG_FILE set:
the path on which TrainingArguments builds its DeepSpeed plugin from the environment. It checks:

1. refusals at TrainingArguments construction, for a DeepSpeed config given as
   ``TrainingArguments(deepspeed=dict)`` and for one reached through the accelerate environment:
   an "optimizer" section, ZeRO optimizer offload without "zero_force_ds_cpu_optimizer": false,
   reduction="tensor" under ZeRO; a correct offload config is accepted;
2. a ZeRO-3 training run configured by the accelerate config file (environment path);
3. a ZeRO-2 training run configured by ``TrainingArguments(deepspeed=dict)``.

Each run asserts DeepSpeed is on with the right stage, that the optimizer which steps is SNRAdamW
(the unwrap chain), and writes OUT/ds_zero{2,3}.pt (final parameters) and .json (log_history,
chain). Refusals go to OUT/refusals.json. Multi-process Trainer + DeepSpeed does not run on CPU
(accelerate sees no GPU and believes it has 1 process), so this is 1 process by design; the
multi-rank ZeRO semantics are checked with raw DeepSpeed in deepspeed_zero.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402


def ds_config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold="auto", stage3_prefetch_bucket_size="auto",
                    reduce_bucket_size="auto")
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def bad_configs() -> dict[str, tuple[dict, str]]:
    """name -> (DeepSpeed config, optim_args); each must be refused."""
    with_optimizer = ds_config(2)
    with_optimizer["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
    offload = ds_config(2)
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return {
        "optimizer_section": (with_optimizer, "warmup_steps=2"),
        "offload_without_force_flag": (offload, "warmup_steps=2"),
        "tensor_reduction_zero3": (ds_config(3), "reduction=tensor"),
    }


def _attempt(out: Path, results: dict, key: str, **kw) -> None:
    from transformers import TrainingArguments

    try:
        TrainingArguments(use_cpu=False, **{**_common.trainer_args_kwargs(str(out / "refused"), 4), **kw})
    except ValueError as err:
        results[key] = {"refused": True, "message": str(err)}
    else:
        results[key] = {"refused": False, "message": None}


def _assert_accelerate_deepspeed_env() -> str:
    env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and env_file, (
        "launch through `accelerate launch --config_file <DeepSpeed yaml>` (the environment path is under test); "
        "note that TrainingArguments(deepspeed=...) deletes ACCELERATE_USE_DEEPSPEED from os.environ"
    )
    return env_file


def env_refusals(out: Path, results: dict) -> None:
    """Bad configs reached through accelerate's environment, as `accelerate launch --config_file` sets it."""
    env_file = _assert_accelerate_deepspeed_env()
    for name, (cfg, optim_args) in bad_configs().items():
        path = out / f"bad_{name}.json"
        path.write_text(json.dumps(cfg))
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(path)
        try:
            _attempt(out, results, f"env/{name}", optim_args=optim_args)
        finally:
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = env_file


def dict_refusals(out: Path, results: dict) -> None:
    """Bad configs given as TrainingArguments(deepspeed=dict); the documented offload fix is accepted."""
    for name, (cfg, optim_args) in bad_configs().items():
        _attempt(out, results, f"dict/{name}", deepspeed=copy.deepcopy(cfg), optim_args=optim_args)
    # accepted, not trained (SNRAdamW would step on the CPU copy of the partitions, in PyTorch)
    good = ds_config(2)
    good["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    good["zero_force_ds_cpu_optimizer"] = False
    _attempt(out, results, "dict/offload_with_force_flag_false", deepspeed=good)


def train(out: Path, stage: int, deepspeed_arg: dict | None) -> None:
    import deepspeed
    from transformers import TrainingArguments

    kw = _common.trainer_args_kwargs(str(out / f"trainer_ds{stage}"), _common.GLOBAL_MICRO_BATCH)
    if deepspeed_arg is not None:
        kw["deepspeed"] = deepspeed_arg
    args = TrainingArguments(use_cpu=False, **kw)  # use_cpu=True would switch DeepSpeed off
    if deepspeed_arg is None:  # really configured from accelerate's environment, not from a dict
        assert getattr(args, "hf_deepspeed_config", None) is None and args.deepspeed_plugin is not None
    trainer = _common.build_trainer(args)
    acc = trainer.accelerator
    assert trainer.is_deepspeed_enabled, "DeepSpeed is not enabled"
    assert acc.num_processes == 1 and str(acc.distributed_type) == "DistributedType.DEEPSPEED", acc.distributed_type
    assert acc.state.deepspeed_plugin.zero_stage == stage, acc.state.deepspeed_plugin.zero_stage

    trainer.train()

    chain = _common.optimizer_chain(trainer.optimizer)
    assert chain[-1] == "SNRAdamW", chain
    assert trainer.model_wrapped.zero_optimization_stage() == stage
    model = trainer.model
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(params, out / f"ds_zero{stage}.pt")
    _common.write_json(out / f"ds_zero{stage}.json", {
        "optimizer_chain": chain,
        "configured_by": "TrainingArguments(deepspeed=dict)" if deepspeed_arg is not None else "accelerate config file",
        "log_history": trainer.state.log_history,
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    cli = ap.parse_args()
    out = Path(cli.out)
    torch.set_num_threads(1)

    _common.disable_deepspeed_shm_comm()
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import hf_snr  # noqa: F401  (registers optim="snr_adamw")

    assert int(os.environ.get("WORLD_SIZE", "1")) == 1

    def reset() -> None:
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)

    # Environment path first: transformers' TrainingArguments(deepspeed=...) deletes the launcher's
    # ACCELERATE_USE_DEEPSPEED from os.environ (training_args.py, device set-up), which would turn the
    # environment path off for the rest of the process.
    refused: dict = {}
    env_refusals(out, refused)
    reset()
    _assert_accelerate_deepspeed_env()
    train(out, 3, deepspeed_arg=None)  # configured by the accelerate config file (zero3.json)
    reset()
    dict_refusals(out, refused)
    reset()
    train(out, 2, deepspeed_arg=ds_config(2))
    _common.write_json(out / "refusals.json", refused)


if __name__ == "__main__":
    main()
