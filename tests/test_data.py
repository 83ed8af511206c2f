"""swap_preferences: exact seeded share, content swapped only where marked, eval splits left clean."""

import math

import pytest
from datasets import Dataset, DatasetDict

from hf_snr.data import swap_preferences


def _standard(n=50):
    return Dataset.from_dict(
        {
            "prompt": [f"p{i}" for i in range(n)],
            "chosen": [f" good {i}" for i in range(n)],
            "rejected": [f" bad {i}" for i in range(n)],
            "score_chosen": [float(i) + 1.0 for i in range(n)],
            "score_rejected": [float(i) for i in range(n)],
            "other": list(range(n)),
        }
    )


def _conversational(n=20):
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"p{i}"}] for i in range(n)],
            "chosen": [[{"role": "assistant", "content": f"good {i}"}] for i in range(n)],
            "rejected": [[{"role": "assistant", "content": f"bad {i}"}] for i in range(n)],
        }
    )


def _flipped(ds, column="label_flipped"):
    return {i for i, f in enumerate(ds[column]) if f}


@pytest.mark.parametrize("n,rate,count", [(50, 0.3, 15), (50, 0.1, 5), (7, 0.3, 2), (1000, 0.3, 300), (33, 0.5, 16),
                                          (10, 0.25, 2), (7, 0.5, 3), (10, 0.3, 3), (100, 0.29, 29)])
def test_exact_count(n, rate, count):
    out = swap_preferences(_standard(n), rate, seed=0)
    assert sum(out["label_flipped"]) == count == math.floor(rate * n + 1e-9)  # never more than rate of the rows


def test_seeded_and_nested():
    ds = _standard(200)
    a = _flipped(swap_preferences(ds, 0.3, seed=1))
    assert a == _flipped(swap_preferences(ds, 0.3, seed=1))
    assert a != _flipped(swap_preferences(ds, 0.3, seed=2))
    # One permutation per seed: the rows swapped at 10 % are among those swapped at 30 %.
    assert _flipped(swap_preferences(ds, 0.1, seed=1)) <= a


def test_content_swapped_exactly_on_marked_rows():
    ds = _standard(50)
    out = swap_preferences(ds, 0.3, seed=0)
    assert out.column_names == ds.column_names + ["label_flipped"]
    for before, after in zip(ds, out):
        if after["label_flipped"]:
            assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
            # Per-side columns move with their side.
            assert (after["score_chosen"], after["score_rejected"]) == (before["score_rejected"],
                                                                        before["score_chosen"])
        else:
            assert (after["chosen"], after["rejected"]) == (before["chosen"], before["rejected"])
            assert (after["score_chosen"], after["score_rejected"]) == (before["score_chosen"],
                                                                        before["score_rejected"])
        assert (after["prompt"], after["other"]) == (before["prompt"], before["other"])
    assert ds.column_names == _standard(50).column_names  # input untouched


def test_conversational():
    ds = _conversational(20)
    out = swap_preferences(ds, 0.5, seed=3)
    assert sum(out["label_flipped"]) == 10
    assert out.features["chosen"] == ds.features["chosen"]
    for before, after in zip(ds, out):
        expected = ((before["rejected"], before["chosen"]) if after["label_flipped"]
                    else (before["chosen"], before["rejected"]))
        assert (after["chosen"], after["rejected"]) == expected
        assert after["prompt"] == before["prompt"]


def test_implicit_prompt():
    ds = _standard(30).remove_columns(["prompt"])
    out = swap_preferences(ds, 0.2, seed=0)
    assert "prompt" not in out.column_names
    for before, after in zip(ds, out):
        assert (after["chosen"] == before["rejected"]) == after["label_flipped"]


def test_datasetdict_swaps_train_only_by_default():
    dd = DatasetDict({"train": _standard(40), "test": _standard(20)})
    out = swap_preferences(dd, 0.25, seed=0)
    assert sum(out["train"]["label_flipped"]) == 10
    assert out["test"]["label_flipped"] == [False] * 20
    assert out["test"]["chosen"] == dd["test"]["chosen"]
    # Same rows as swapping the split on its own.
    assert out["train"]["label_flipped"] == swap_preferences(dd["train"], 0.25, seed=0)["label_flipped"]


def test_datasetdict_split_selection():
    dd = DatasetDict({"train_prefs": _standard(40), "test_prefs": _standard(20)})
    assert sum(swap_preferences(dd, 0.5)["train_prefs"]["label_flipped"]) == 20  # "train*" by default
    out = swap_preferences(dd, 0.5, splits=["test_prefs"])
    assert sum(out["train_prefs"]["label_flipped"]) == 0 and sum(out["test_prefs"]["label_flipped"]) == 10
    with pytest.raises(ValueError, match="Unknown split"):
        swap_preferences(dd, 0.1, splits=["train"])
    with pytest.raises(ValueError, match="starts with 'train'"):
        swap_preferences(DatasetDict({"eval": _standard(5)}), 0.1)
    with pytest.raises(ValueError, match="DatasetDict"):
        swap_preferences(_standard(5), 0.1, splits=["train"])


@pytest.mark.parametrize("rate", [-0.1, 0.6, math.nan, math.inf, "0.3", True])
def test_bad_rates_rejected(rate):
    with pytest.raises(ValueError, match=r"Invalid swap rate: .*\[0, 0\.5\]") as info:
        swap_preferences(_standard(10), rate)
    assert repr(rate) in str(info.value)


def test_rate_edges():
    ds = _standard(21)
    zero = swap_preferences(ds, 0.0)
    assert zero["label_flipped"] == [False] * 21 and zero["chosen"] == ds["chosen"]
    half = swap_preferences(ds, 0.5)
    assert sum(half["label_flipped"]) == 10  # floor(10.5): never more than half


def test_missing_columns_and_double_swap():
    with pytest.raises(ValueError, match="'chosen' and 'rejected'.*missing \\['rejected'\\]"):
        swap_preferences(_standard(5).remove_columns(["rejected"]), 0.2)
    once = swap_preferences(_standard(10), 0.2)
    with pytest.raises(ValueError, match="already exists"):
        swap_preferences(once, 0.2)
    assert "noise" in swap_preferences(once, 0.2, column="noise").column_names
    with pytest.raises(TypeError, match="IterableDataset"):
        swap_preferences(_standard(5).to_iterable_dataset(), 0.2)
