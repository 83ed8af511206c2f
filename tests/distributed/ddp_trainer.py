"""transformers Trainer with optim="snr_adamw" on a tiny Llama: DDP (2 CPU ranks) or 1 process.

    accelerate launch --multi_gpu --num_processes 2 ddp_trainer.py OUT --world 2 --per-device 2
    python ddp_trainer.py OUT --world 1 --per-device 4

Both see the same global batch per optimizer step (2 ranks x 2, or 1 x 4; gradient accumulation 2
either way, sequential sampling), so their trajectories must agree. Each rank writes
OUT/world{W}_rank{R}.pt (final parameters) and OUT/world{W}_rank{R}.json (log_history, the
distributed setup, the optimizer chain). The run refuses to report anything if the launch did not
give the requested world size and distributed type (``accelerate launch --cpu --num_processes 2``
silently runs one process; --multi_gpu without use_cpu runs independent processes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--per-device", type=int, required=True)
    cli = ap.parse_args()
    out = Path(cli.out)

    from accelerate.utils import DistributedType
    from transformers import TrainingArguments

    import hf_snr  # noqa: F401  (registers optim="snr_adamw")

    args = TrainingArguments(use_cpu=True, **_common.trainer_args_kwargs(str(out / f"trainer_world{cli.world}"),
                                                                          cli.per_device))
    trainer = _common.build_trainer(args)

    acc = trainer.accelerator
    expected_type = DistributedType.MULTI_CPU if cli.world > 1 else DistributedType.NO
    assert acc.num_processes == cli.world, f"launched {acc.num_processes} processes, wanted {cli.world}"
    assert acc.distributed_type == expected_type, f"distributed type {acc.distributed_type}, wanted {expected_type}"
    assert args.world_size == cli.world

    trainer.train()

    chain = _common.optimizer_chain(trainer.optimizer)
    assert chain[-1] == "SNRAdamW", chain
    if cli.world > 1:
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
        assert torch.distributed.get_backend() == "gloo"

    rank = acc.process_index
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(params, out / f"world{cli.world}_rank{rank}.pt")
    _common.write_json(out / f"world{cli.world}_rank{rank}.json", {
        "rank": rank,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "optimizer_chain": chain,
        "process_group_is_none": hf_snr.unwrap_optimizer(trainer.optimizer).process_group is None,
        "log_history": trainer.state.log_history,
    })


if __name__ == "__main__":
    main()
