"""hf_snr.tasks: the arithmetic preference task (determinism, disjoint splits, true labels) and its recipe path."""

import math
import pathlib

import pytest
from _recipe_module import load_recipe

from hf_snr.tasks import answer_of, make_arithmetic_dataset, parse_question, wrong_answers

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "configs" / "offline_tiny.yaml")


def _answer(messages):
    assert len(messages) == 1 and messages[0]["role"] == "assistant"
    return int(messages[0]["content"])


def test_deterministic_per_seed_and_seeds_differ():
    a, b = make_arithmetic_dataset(50, 20, seed=3), make_arithmetic_dataset(50, 20, seed=3)
    assert a["train"].to_list() == b["train"].to_list() and a["test"].to_list() == b["test"].to_list()
    c = make_arithmetic_dataset(50, 20, seed=4)
    assert c["train"]["prompt"] != a["train"]["prompt"]


def test_splits_disjoint_no_repeats_and_eval_independent_of_train_size():
    data = make_arithmetic_dataset(3000, 500, seed=0)
    train = [parse_question(p) for p in data["train"]["prompt"]]
    test = [parse_question(p) for p in data["test"]["prompt"]]
    assert len(set(train)) == 3000 and len(set(test)) == 500
    assert not set(train) & set(test)
    assert {op for _, op, _ in train} == {"+", "-", "*"}  # the mix of operations
    assert make_arithmetic_dataset(10, 500, seed=0)["test"].to_list() == data["test"].to_list()


def test_chosen_is_correct_and_rejected_is_a_plausible_wrong_answer():
    data = make_arithmetic_dataset(400, 100, seed=1)
    for split in ("train", "test"):
        for row in data[split]:
            a, op, b = parse_question(row["prompt"])
            truth = answer_of(a, op, b)
            assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
            assert _answer(row["chosen"]) == truth == row["answer"]
            wrong = _answer(row["rejected"])
            assert wrong != truth and wrong >= 0 and wrong in wrong_answers(truth)
            assert abs(wrong - truth) in (1, 10) or str(wrong) == str(truth)[::-1]
            if op != "*":
                assert 10 <= a <= 99 and 10 <= b <= 99


def test_standard_format_and_bad_input():
    row = make_arithmetic_dataset(5, 0, seed=0, conversational=False)["train"][0]
    assert isinstance(row["prompt"], str) and row["chosen"].startswith(" ")
    assert int(row["chosen"]) == answer_of(*parse_question(row["prompt"]))
    assert wrong_answers(10) == [0, 9, 11, 20]  # 10 reversed is 01: not offered; 10 - 10 = 0 is
    with pytest.raises(ValueError, match=r"n_train: -1 \(accepted: an integer >= 0\)"):
        make_arithmetic_dataset(-1, 5)
    with pytest.raises(ValueError, match=r"at most 121"):
        make_arithmetic_dataset(100, 100, ops=("*",))
    with pytest.raises(ValueError, match=r"Invalid ops"):
        make_arithmetic_dataset(5, 5, ops=("/",))
    with pytest.raises(ValueError, match="Not an arithmetic question"):
        parse_question("What is love?")


@pytest.fixture(scope="module")
def noisy_dpo():
    return load_recipe("noisy_dpo")


def test_recipe_loads_it_and_swaps_30_percent(noisy_dpo, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    argv = ["--config", TINY, "--dataset_name", "arithmetic", "--train_pairs", "40", "--eval_pairs", "16",
            "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8",
            "--output_dir", str(tmp_path)]
    script, _, _ = noisy_dpo.parse_args(argv)
    train, test = noisy_dpo.load_preference_data(script)
    assert (len(train), len(test)) == (40, 16)
    results = noisy_dpo.main(*noisy_dpo.parse_args(argv))
    assert results["train_pairs"] == 40 and results["flipped_pairs"] == math.floor(0.3 * 40)
    assert math.isfinite(results["final"]["noise/flipped_fit"])  # the trainer read the label_flipped column
    # the recipe's swap on this data: flipped rows have the wrong answer chosen, the others the right one
    swapped = noisy_dpo.swap_preferences(train, 0.3, seed=script.noise_seed)
    assert sum(swapped["label_flipped"]) == 12
    for row in swapped:
        assert (_answer(row["chosen"]) == row["answer"]) == (not row["label_flipped"])
        assert (_answer(row["rejected"]) == row["answer"]) == row["label_flipped"]


def test_system_prompt_goes_first_and_leaves_the_questions_unchanged():
    plain = make_arithmetic_dataset(20, 5, seed=2)
    sys_ = make_arithmetic_dataset(20, 5, seed=2, system_prompt="")
    for a, b in zip(plain["train"], sys_["train"]):
        assert b["prompt"][0] == {"role": "system", "content": ""}
        assert b["prompt"][1:] == a["prompt"] and b["chosen"] == a["chosen"] and b["rejected"] == a["rejected"]
        assert parse_question(b["prompt"]) == parse_question(a["prompt"])
    with pytest.raises(ValueError, match="system_prompt: 3"):
        make_arithmetic_dataset(5, 5, system_prompt=3)
    with pytest.raises(ValueError, match="conversational=False"):
        make_arithmetic_dataset(5, 5, conversational=False, system_prompt="x")
