"""Shared fixtures for the single-process Trainer / TRL integration tests: a tiny Llama, token data,
a word-level tokenizer, TrainingArguments with quiet defaults, and instruments on SNRAdamW."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback, TrainingArguments

from hf_snr import SNRAdamW, unwrap_optimizer
from hf_snr import _stats as snr_stats_module  # where statistics are finished
from hf_snr._step_args import STAT_KEYS

VOCAB = 64
SEQ = 12

SNR_KEYS = (
    "snr/mask_mean",
    "snr/active_fraction",
    "snr/signal",
    "snr/memorization_rate",
    "snr/signal_minus_noise",
)


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    if dtype is not None:
        model = model.to(dtype)
    return model


def token_dataset(n: int = 16, seq: int = SEQ, seed: int = 0) -> Dataset:
    """n equal-length random sequences (no padding), labels = input_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def token_iterable(n: int = 16, seq: int = SEQ, seed: int = 0) -> torch.utils.data.IterableDataset:
    rows = token_dataset(n, seq, seed)

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                for row in rows:
                    yield {"input_ids": torch.tensor(row["input_ids"]), "labels": torch.tensor(row["labels"])}

    return _Stream()


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids 4..63) plus [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def sentences(n: int, length: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n, length), generator=g).tolist()
    return [" ".join(WORDS[i] for i in row) for row in idx]


def train_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
        per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, seed=0, data_seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def snr(trainer) -> SNRAdamW:
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, SNRAdamW), type(opt)
    return opt


class LogRecorder(TrainerCallback):
    """A reporter-like callback: records what on_log receives (reporters are callbacks too)."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


class StatsCounter:
    """Counts SNRAdamW statistic computations (the reduction + host sync) by optimizer step."""

    def __init__(self, monkeypatch):
        self.steps: list[int] = []
        self.totals: list[dict[str, float]] = []
        original = snr_stats_module.finish
        counter = self

        def finish(total, steps, **kw):
            counter.steps.append(steps)
            counter.totals.append(dict(zip(STAT_KEYS, total.tolist())))
            return original(total, steps, **kw)

        monkeypatch.setattr(snr_stats_module, "finish", finish)


def train_logs(trainer) -> list[dict]:
    """log_history entries of training steps (those with a 'loss' key)."""
    return [h for h in trainer.state.log_history if "loss" in h]
