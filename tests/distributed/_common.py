"""Shared pieces of the distributed checks: tiny models, deterministic data, the child environment.

Imported both by the worker scripts (launched with torchrun / accelerate launch, one process per
rank) and by the pytest side (tests/test_distributed.py), which builds its single-process
references from the same functions. Imports only torch at module level, so the pytest process
stays light; transformers is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_DIR = Path(__file__).resolve().parent

VOCAB = 64
SEQ_LEN = 16


# -- environment ----------------------------------------------------------------------------------
def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a launched worker: offline, no telemetry, CPU DeepSpeed, 1 thread per rank."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_CPU"):
        env.pop(key, None)  # a test session started under a launcher must not leak its rank
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str) -> str:
    """Path of a console script (torchrun, accelerate) installed beside this interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def disable_deepspeed_shm_comm() -> None:
    """Skip DeepSpeed's JIT-built shared-memory comm op (about 100 s of g++ on first use).

    DeepSpeed's TorchBackend builds ``deepspeed_shm_comm`` when it creates the process group, but
    uses it only for ``inference_all_reduce``; ZeRO training communicates through
    torch.distributed (gloo here). Marking the op incompatible makes DeepSpeed fall back exactly
    as it does on a platform without it. Set HF_SNR_TEST_DS_SHM=1 to build and use it anyway.
    """
    if os.environ.get("HF_SNR_TEST_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def write_json(path: Path | str, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))


# -- data -----------------------------------------------------------------------------------------
def token_rows(n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """n deterministic token rows: x_{t+1} = (5 x_t + 3) mod VOCAB, with 20 % random tokens.

    A learnable rule plus noise, so the gradients have both signal and noise (the gate moves).
    """
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, seq_len, dtype=torch.long)
    rows[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, seq_len):
        rule = (5 * rows[:, t - 1] + 3) % VOCAB
        noise = torch.randint(0, VOCAB, (n,), generator=g)
        rows[:, t] = torch.where(torch.rand(n, generator=g) < 0.2, noise, rule)
    return rows


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples of fixed length (no padding: every example has the same token count,
    so the mean over a global batch equals the mean of per-rank means)."""

    def __init__(self, n: int = 64, seed: int = 0):
        self.rows = token_rows(n, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


# -- models ---------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0):
    """LlamaForCausalLM, vocab 64, hidden 32, 2 layers, no dropout, fp32 (deterministic init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


class TinyNet(torch.nn.Module):
    """A small MLP for the raw DeepSpeed checks (fast to build, several tensors per flat group).

    With d_out=4 every parameter has an even number of elements and each decay / no-decay group a
    multiple of 4, so ZeRO (2 ranks, 2-element alignment) adds no padding: the flat partitions hold
    exactly the model's coordinates. d_out=3 gives an odd-sized bias, hence one padding element in
    the ZeRO-1/2 flat group and in ZeRO-3's partition of that bias.
    """

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = self.norm(h)
        h = torch.tanh(self.fc2(h))
        return self.head(h)


def tiny_net(seed: int = 0, d_out: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(d_out=d_out)


def regression_batches(steps: int, global_batch: int, seed: int = 1,
                       d_out: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches (x, y) of a noisy linear-plus-tanh regression task."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, d_out, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(global_batch, 8, generator=g)
        y = torch.tanh(x @ w) + 0.5 * torch.randn(global_batch, d_out, generator=g)
        out.append((x, y))
    return out


def param_groups(model: torch.nn.Module, weight_decay: float, split: bool) -> list[dict[str, Any]]:
    """One group, or the Trainer's decay / no-decay split (biases and norms without decay)."""
    params = list(model.named_parameters())
    if not split:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- the Trainer set-up shared by the DDP, single-process and Trainer + DeepSpeed runs ---------------
TRAINER_STEPS = 6
GLOBAL_MICRO_BATCH = 4  # per-device batch x processes; gradient accumulation 2 on top


def trainer_args_kwargs(output_dir: str, per_device: int) -> dict[str, Any]:
    """TrainingArguments for every Trainer run of these checks (add use_cpu / deepspeed per run)."""
    return dict(
        output_dir=output_dir,
        optim="snr_adamw",
        optim_args="warmup_steps=2,mask=snr",
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=2,
        max_steps=TRAINER_STEPS,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,
        train_sampling_strategy="sequential",  # rank r of W takes batches r, r+W, ...: same global batches
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def build_trainer(args):
    from transformers import Trainer, default_data_collator

    return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=TokenDataset(64),
                   data_collator=default_data_collator)


def optimizer_chain(opt) -> list[str]:
    """Class names from the outermost wrapper down to the optimizer that really steps."""
    names = []
    while opt is not None and len(names) < 8:
        names.append(type(opt).__name__)
        opt = getattr(opt, "optimizer", None)
    return names


def snr_logs(log_history: list[dict]) -> list[dict]:
    """The training log entries that carry snr/* metrics."""
    return [e for e in log_history if any(k.startswith("snr/") for k in e)]


def exit_after_teardown(code: int = 0) -> None:
    """End a worker whose results are already written: flush, then leave without interpreter teardown.

    With torch 2.13's gloo on some CPUs a worker that already called destroy_process_group() still aborted
    now and then while the interpreter shut down ("terminate called without an active exception", SIGABRT,
    about 1 run in 6 of the FSDP2 worker on a 2-core AMD EPYC), failing a launch whose checks had all passed.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
