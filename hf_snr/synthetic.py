"""A built-in, offline noisy-preference task with a known true reward, and a tiny model for it.

The task stands in for a preference data set such as UltraFeedback where no Hub is reachable
(tests, the CPU demo, the recipes' defaults). Everything is seeded and needs nothing beyond
``datasets``, ``tokenizers`` and ``transformers``.

* Prompts: ``"review of film 123 :"``.
* Responses: 2 to 4 clauses ``"<subject> was <adjective> ."``, e.g. ``"the plot was great .
  the music was dull ."``. Adjectives come from a small built-in valence lexicon (:data:`VALENCE`).
* True reward: ``r(y) = sum of the valences of y's words`` (:func:`true_reward`). Known exactly,
  so a policy's true win rate and the accuracy of its implicit reward can be measured without a
  reward model.
* Pairs: two random responses per prompt; pairs with equal true reward are dropped.
  Training labels are drawn Bradley-Terry, ``P(a preferred to b) = sigmoid(scale * (r_a - r_b))``
  (annotator noise that depends on how close the pair is); evaluation labels are the true order
  (clean). Flipping a fixed share of training labels on top, as in the paper's "30 % swapped"
  experiment, is :func:`hf_snr.data.swap_preferences`' job.

The tiny model is a random-init ``LlamaForCausalLM`` (~140k parameters with the default sizes)
over a word-level tokenizer built from the task's vocabulary. :func:`save_tiny_model_and_tokenizer`
writes both to a folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read offline: the same code path as a Hub model id.

Measured on a 2-core CPU with TRL 1.16's ``DPOTrainer`` (beta 0.1, lr 3e-3, batch 32, 2 epochs
over 2,000 pairs = 126 steps, ~40 s of training): the clean-eval ``eval_rewards/accuracies`` goes
from 0 (all margins are exactly 0 at the start) to 0.94 with clean training labels, and to 0.91
with 30 % of the training pairs swapped (eval margin 2.18 vs 0.42).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from typing import Any, Iterable

from datasets import Dataset, DatasetDict

__all__ = [
    "VALENCE",
    "SUBJECTS",
    "ROLES",
    "CHAT_TEMPLATE",
    "true_reward",
    "sample_response",
    "make_preference_dataset",
    "task_vocabulary",
    "dataset_texts",
    "build_tiny_tokenizer",
    "build_tiny_model",
    "save_tiny_model_and_tokenizer",
]

# The valence lexicon: the whole of the true reward. Positive, negative and neutral words, with
# magnitudes 0.5..3 so that pairs range from near ties (noisy Bradley-Terry labels) to clear calls.
VALENCE: dict[str, float] = {
    # positive
    "brilliant": 3.0,
    "superb": 3.0,
    "wonderful": 2.5,
    "great": 2.0,
    "charming": 2.0,
    "good": 1.5,
    "enjoyable": 1.5,
    "solid": 1.0,
    "decent": 0.5,
    # negative
    "awful": -3.0,
    "dreadful": -3.0,
    "terrible": -2.5,
    "bad": -2.0,
    "boring": -2.0,
    "weak": -1.5,
    "dull": -1.5,
    "clumsy": -1.0,
    "mediocre": -0.5,
    # neutral
    "long": 0.0,
    "short": 0.0,
    "loud": 0.0,
    "quiet": 0.0,
    "colourful": 0.0,
    "familiar": 0.0,
    "unusual": 0.0,
    "simple": 0.0,
}
ADJECTIVES: tuple[str, ...] = tuple(VALENCE)

SUBJECTS: tuple[str, ...] = (
    "the plot",
    "the acting",
    "the music",
    "the script",
    "the ending",
    "the cast",
    "the pacing",
    "the dialogue",
    "the camera work",
    "the soundtrack",
)

# Chat roles known to the tiny tokenizer; the chat template renders a message as "<role> content <eos>".
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# A minimal chat template. The prompt rendered with add_generation_prompt=True is a token prefix of
# the prompt rendered with its completion, which is what TRL's conversational tokenisation expects.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
_FIXED_WORDS = ("review", "of", "film", ":", "was", ".")


def _text_of(content: str | list[dict[str, Any]]) -> str:
    """A string, or the contents of a list of chat messages joined by spaces."""
    if isinstance(content, str):
        return content
    return " ".join(str(message["content"]) for message in content)


def true_reward(text: str | list[dict[str, Any]]) -> float:
    """The task's true reward: the sum of the lexicon valences of the words of ``text``.

    ``text`` is a response string or a list of chat messages (``{"role", "content"}``; all contents
    are scored). Words outside :data:`VALENCE` (subjects, "was", ".", prompt words) score 0, so
    scoring a prompt together with its response gives the response's reward.
    """
    return float(sum(VALENCE.get(word, 0.0) for word in _text_of(text).split()))


def sample_response(rng: random.Random, min_clauses: int = 2, max_clauses: int = 4) -> str:
    """One random response of ``min_clauses..max_clauses`` clauses "<subject> was <adjective> ."."""
    n = rng.randint(min_clauses, max_clauses)
    return " ".join(f"{rng.choice(SUBJECTS)} was {rng.choice(ADJECTIVES)} ." for _ in range(n))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _make_pairs(
    rng: random.Random,
    n: int,
    scale: float | None,
    n_films: int,
    min_clauses: int,
    max_clauses: int,
) -> list[tuple[str, str, str, float, float]]:
    """n (prompt, chosen, rejected, r_chosen, r_rejected) rows; scale None means the true order."""
    rows = []
    while len(rows) < n:
        prompt = f"review of film {rng.randrange(n_films)} :"
        a = sample_response(rng, min_clauses, max_clauses)
        b = sample_response(rng, min_clauses, max_clauses)
        r_a, r_b = true_reward(a), true_reward(b)
        if r_a == r_b:  # ties carry no preference: dropped
            continue
        if scale is None:
            a_wins = r_a > r_b
        elif math.isinf(scale):  # noiseless limit; avoids inf * small difference
            a_wins = r_a > r_b
        else:
            a_wins = rng.random() < _sigmoid(scale * (r_a - r_b))
        if a_wins:
            rows.append((prompt, a, b, r_a, r_b))
        else:
            rows.append((prompt, b, a, r_b, r_a))
    return rows


def _to_dataset(rows: list[tuple[str, str, str, float, float]], conversational: bool, with_rewards: bool) -> Dataset:
    prompts, chosen, rejected, r_chosen, r_rejected = (list(col) for col in zip(*rows)) if rows else ([],) * 5
    if conversational:
        data: dict[str, list] = {
            "prompt": [[{"role": "user", "content": p}] for p in prompts],
            "chosen": [[{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [[{"role": "assistant", "content": r}] for r in rejected],
        }
    else:
        # Standard format: TRL concatenates prompt + completion, so completions start with a space.
        data = {
            "prompt": prompts,
            "chosen": [" " + c for c in chosen],
            "rejected": [" " + r for r in rejected],
        }
    if with_rewards:
        data["true_reward_chosen"] = r_chosen
        data["true_reward_rejected"] = r_rejected
    return Dataset.from_dict(data)


def make_preference_dataset(
    n_train: int = 2000,
    n_eval: int = 500,
    seed: int = 0,
    *,
    scale: float = 1.0,
    conversational: bool = False,
    with_rewards: bool = True,
    n_films: int = 1000,
    min_clauses: int = 2,
    max_clauses: int = 4,
) -> DatasetDict:
    """The synthetic preference task as a ``DatasetDict`` with splits ``"train"`` and ``"test"``.

    Args:
        n_train, n_eval: number of pairs in each split (ties are redrawn, so the counts are exact).
        seed: the two splits come from independent random streams derived from ``seed``; the test
            split does not change with ``n_train`` or ``scale``.
        scale: Bradley-Terry inverse temperature of the *training* labels,
            ``P(a preferred to b) = sigmoid(scale * (r_a - r_b))``. ``0`` gives coin flips,
            ``math.inf`` the true order. The default 1.0 agrees with the true order on ~89 % of
            pairs. Test labels are always the true order.
        conversational: ``False`` gives TRL's standard format (``prompt``/``chosen``/``rejected``
            strings; completions start with a space); ``True`` the conversational one (lists of
            ``{"role", "content"}`` messages: a user prompt and an assistant completion).
        with_rewards: add float columns ``true_reward_chosen`` and ``true_reward_rejected``.
            They are safe to keep for TRL 1.16's ``DPOTrainer``: its tokenisation keeps extra
            columns, the Trainer drops them before batching (``remove_unused_columns=True``, the
            default) and ``DataCollatorForPreference`` reads only the keys it needs when they are
            kept (``remove_unused_columns=False``, or ``precompute_ref_log_probs=True``).
            :func:`hf_snr.data.swap_preferences` swaps them together with chosen/rejected.
        n_films: prompts name a film id drawn from ``range(n_films)`` (mostly this sets the size
            of the tokenizer's vocabulary).
        min_clauses, max_clauses: clause count range of a response.
    """
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 0)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (accepted: an integer)")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= 0):  # nan fails too
        raise ValueError(f"Invalid scale: {scale!r} (accepted: a number >= 0, or math.inf for the true order)")
    if isinstance(n_films, bool) or not isinstance(n_films, int) or n_films < 1:
        raise ValueError(f"Invalid n_films: {n_films!r} (accepted: an integer >= 1)")
    if not (isinstance(min_clauses, int) and isinstance(max_clauses, int) and 1 <= min_clauses <= max_clauses):
        raise ValueError(
            f"Invalid clause range: min_clauses={min_clauses!r}, max_clauses={max_clauses!r} "
            "(accepted: integers with 1 <= min_clauses <= max_clauses)"
        )
    # String seeds are hashed deterministically (sha512) by random.Random: independent streams per split.
    train_rng = random.Random(f"hf_snr.synthetic/{seed}/train")
    eval_rng = random.Random(f"hf_snr.synthetic/{seed}/test")
    train = _make_pairs(train_rng, n_train, float(scale), n_films, min_clauses, max_clauses)
    test = _make_pairs(eval_rng, n_eval, None, n_films, min_clauses, max_clauses)
    return DatasetDict(
        {
            "train": _to_dataset(train, conversational, with_rewards),
            "test": _to_dataset(test, conversational, with_rewards),
        }
    )


def task_vocabulary(n_films: int = 1000) -> list[str]:
    """Every word the synthetic task can produce with ``n_films`` films (one "text" per word)."""
    words = list(_FIXED_WORDS) + [w for s in SUBJECTS for w in s.split()] + list(ADJECTIVES)
    words += [str(i) for i in range(n_films)]
    return list(dict.fromkeys(words))


def dataset_texts(dataset: Dataset | DatasetDict) -> list[str]:
    """The prompt/chosen/rejected texts of a preference data set (any split, either format)."""
    splits = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    texts: list[str] = []
    for split in splits:
        for column in ("prompt", "chosen", "rejected"):
            if column in split.column_names:
                texts.extend(_text_of(value) for value in split[column])
    return texts


def build_tiny_tokenizer(
    texts: Iterable[str] | Dataset | DatasetDict | None = None,
    save_dir: str | os.PathLike | None = None,
    *,
    model_max_length: int = 256,
):
    """A word-level ``PreTrainedTokenizerFast`` over whitespace-separated words.

    The vocabulary is ``<pad> <unk> <bos> <eos>``, the chat role markers (``<user>`` ...), then the
    words of ``texts`` by decreasing count (ties alphabetical), so it is deterministic. ``texts``
    may be strings, or a preference ``Dataset``/``DatasetDict`` (see :func:`dataset_texts`); the
    default is :func:`task_vocabulary`, which covers every seed of :func:`make_preference_dataset`
    with the default ``n_films``. Plain calls add ``<bos>`` at the start; the special tokens are
    split off even when glued to a word (TRL appends ``eos_token`` to "... ." without a space).
    ``chat_template`` is :data:`CHAT_TEMPLATE`. If ``save_dir`` is given, the tokenizer is saved
    there too (``AutoTokenizer.from_pretrained(save_dir)`` reloads it).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = task_vocabulary()
    elif isinstance(texts, (Dataset, DatasetDict)):
        texts = dataset_texts(texts)
    elif isinstance(texts, str):
        texts = [texts]
    counts = Counter(word for text in texts for word in text.split())
    specials = [PAD, UNK, BOS, EOS]
    vocab_words = specials + [f"<{role}>" for role in ROLES]
    known = set(vocab_words)
    vocab_words += [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    vocab = {word: i for i, word in enumerate(vocab_words)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_tiny_model(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 128,
    seed: int = 0,
    max_position_embeddings: int = 256,
):
    """A random-init ``LlamaForCausalLM`` sized for ``tokenizer`` (tied input/output embeddings).

    With the default sizes and the default tokenizer it has ~140k parameters. The initialisation
    is seeded by ``seed`` without touching the global torch RNG.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"Invalid sizes: hidden={hidden} is not divisible by heads={heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model_and_tokenizer(
    save_dir: str | os.PathLike,
    model=None,
    tokenizer=None,
    *,
    texts: Iterable[str] | Dataset | DatasetDict | None = None,
    **model_kwargs,
) -> str:
    """Save a tiny model and its tokenizer to ``save_dir``; returns ``save_dir`` as a string.

    Missing pieces are built: the tokenizer with ``build_tiny_tokenizer(texts)``, the model with
    ``build_tiny_model(tokenizer, **model_kwargs)``. The folder then works wherever a Hub model id
    does (``AutoModelForCausalLM.from_pretrained(save_dir)``, ``AutoTokenizer.from_pretrained``,
    ``DPOTrainer(model=save_dir)``), offline.
    """
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(texts)
    if model is None:
        model = build_tiny_model(tokenizer, **model_kwargs)
    elif model_kwargs:
        raise ValueError(f"model sizes {sorted(model_kwargs)} were given together with a built model")
    save_dir = os.fspath(save_dir)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir
