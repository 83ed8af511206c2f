"""Label noise for preference data: swap chosen and rejected on an exact, seeded share of pairs.

This is the paper's noisy-DPO setting ("UltraFeedback with 30 % of pairs swapped"): the training
labels of a fixed share of pairs are inverted, the evaluation split stays clean, and a boolean
column records which rows were swapped, so that a run can also report how well it fits the
swapped pairs versus the clean ones.

The marker column is safe to keep for TRL 1.16's ``DPOTrainer``: its tokenisation keeps extra
columns, the Trainer removes them before batching (``remove_unused_columns=True``, the default),
and ``DataCollatorForPreference`` ignores keys it does not use when they are kept.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Iterable

from datasets import Dataset, DatasetDict

__all__ = ["swap_preferences", "swap_count", "MAX_SWAP_RATE"]

# Above one half the labels carry inverted signal: that is relabelling, not noise.
MAX_SWAP_RATE = 0.5


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (0.0 <= rate <= MAX_SWAP_RATE):
        # nan fails the range test too
        raise ValueError(
            f"Invalid swap rate: {rate!r} (accepted: a number in [0, {MAX_SWAP_RATE}], the share of pairs "
            "whose chosen and rejected are swapped)"
        )
    return float(rate)


def _paired_columns(column_names: list[str]) -> list[tuple[str, str]]:
    """chosen/rejected plus every column pair whose names differ only by chosen <-> rejected.

    E.g. ``true_reward_chosen``/``true_reward_rejected`` (hf_snr.synthetic) or
    ``score_chosen``/``score_rejected`` (UltraFeedback): they describe a side, so they move with it.
    """
    pairs = [("chosen", "rejected")]
    for name in column_names:
        if name != "chosen" and "chosen" in name:
            other = name.replace("chosen", "rejected")
            if other in column_names:
                pairs.append((name, other))
    return pairs


def swap_count(n: int, rate: float) -> int:
    """How many of ``n`` rows a swap rate ``rate`` swaps: ``floor(rate * n)``, never more than the share asked for.

    The product is nudged up by a relative 1e-9 before flooring, so that floating-point error in ``rate`` does
    not lose a row (``0.29 * 100`` is 28.999999999999996 in binary floating point: 29 rows, not 28).
    """
    return min(n, math.floor(rate * n * (1.0 + 1e-9) + 1e-9))


def _swapped_rows(n: int, rate: float, seed: int) -> list[bool]:
    """A mask with exactly swap_count(n, rate) True entries, at the first positions of a seeded permutation.

    Taking a prefix of one permutation makes the rows nested across rates for one seed: the pairs
    swapped at 10 % are among those swapped at 30 % (the count never decreases with the rate).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    mask = [False] * n
    for i in order[: swap_count(n, rate)]:
        mask[i] = True
    return mask


def _swap_split(dataset: Dataset, rate: float, seed: int, column: str) -> Dataset:
    pairs = _paired_columns(dataset.column_names)
    mask = _swapped_rows(len(dataset), rate, seed)
    dataset = dataset.add_column(column, mask)
    if not any(mask):
        return dataset

    def swap(batch):
        flipped = batch[column]
        out = {}
        for a, b in pairs:
            out[a] = [y if f else x for x, y, f in zip(batch[a], batch[b], flipped)]
            out[b] = [x if f else y for x, y, f in zip(batch[a], batch[b], flipped)]
        return out

    return dataset.map(swap, batched=True, desc=f"Swapping {rate:.0%} of preference pairs")


def _check_columns(dataset: Dataset, column: str, where: str = "") -> None:
    loc = f" (split {where!r})" if where else ""
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"swap_preferences needs 'chosen' and 'rejected' columns; missing {missing}{loc}, "
            f"the data set has {dataset.column_names}"
        )
    if column in dataset.column_names:
        raise ValueError(
            f"Column {column!r} already exists{loc}: the preferences look swapped already. Swapping again would "
            "mix two noise draws; start from the clean data set or pass another column name"
        )


def swap_preferences(
    dataset: Dataset | DatasetDict,
    rate: float,
    seed: int = 0,
    column: str = "label_flipped",
    splits: Iterable[str] | None = None,
) -> Dataset | DatasetDict:
    """Swap chosen and rejected on exactly ``floor(rate * n)`` seeded rows and mark them.

    Args:
        dataset: a preference ``Dataset`` or ``DatasetDict`` with ``chosen`` and ``rejected``
            columns, in TRL's standard (strings) or conversational (lists of messages) format,
            with an explicit ``prompt`` column or an implicit one (the shared prefix). Columns
            named like ``X_chosen``/``X_rejected`` (e.g. ``score_chosen``, ``true_reward_chosen``)
            are swapped with them; other columns are left as they are (UltraFeedback's
            ``messages``, a copy of the chosen conversation, then no longer matches ``chosen``).
        rate: share of rows to swap, in [0, 0.5]. The count is ``floor(rate * n)`` (see
            :func:`swap_count`): never more than ``rate`` of the rows, e.g. 3 of 7 at 0.5, 3 of 10 at 0.3.
        seed: the rows are the first ``floor(rate * n)`` of a permutation of ``range(n)`` seeded by
            ``seed``: the same seed gives the same rows, and for one seed the rows swapped at a
            lower rate are a subset of those swapped at a higher one. Every swapped split uses
            the same seed, so swapping ``dd`` or ``dd["train"]`` gives the same train split.
        column: name of the boolean column added to every returned split: True on swapped rows,
            False elsewhere. If it already exists the call raises rather than swap twice.
        splits: for a ``DatasetDict``, the names of the splits to swap. Default: every split whose
            name starts with ``"train"`` (``train``, ``train_prefs``). The other splits are
            returned unswapped with the column all False, so evaluation stays clean. Not allowed
            with a single ``Dataset``.

    Returns:
        A new ``Dataset`` or ``DatasetDict``; the input is not modified.
    """
    rate = _check_rate(rate)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"Invalid seed: {seed!r} (accepted: an integer)")
    if isinstance(dataset, DatasetDict):
        if splits is None:
            chosen_splits = [name for name in dataset if name.startswith("train")]
            if not chosen_splits:
                raise ValueError(
                    f"No split to swap: none of the splits {list(dataset)} starts with 'train'; pass splits=[...]"
                )
        else:
            chosen_splits = [splits] if isinstance(splits, str) else list(splits)
            unknown = [name for name in chosen_splits if name not in dataset]
            if unknown:
                raise ValueError(f"Unknown split(s) {unknown}; the data set has {list(dataset)}")
        for name, split in dataset.items():
            _check_columns(split, column, name)
        return DatasetDict(
            {
                name: _swap_split(split, rate if name in chosen_splits else 0.0, seed, column)
                for name, split in dataset.items()
            }
        )
    if isinstance(dataset, Dataset):
        if splits is not None:
            raise ValueError("splits= applies to a DatasetDict; this is a single Dataset")
        _check_columns(dataset, column)
        return _swap_split(dataset, rate, seed, column)
    raise TypeError(
        f"swap_preferences needs a datasets.Dataset or DatasetDict, got {type(dataset).__name__} "
        "(an IterableDataset has no length, so an exact share cannot be drawn)"
    )
