"""The built-in synthetic preference task and tiny model: determinism, labels, offline save/load, TRL."""

import copy
import math
import os

import pytest

from hf_snr.data import swap_preferences
from hf_snr.synthetic import (
    VALENCE,
    build_tiny_model,
    build_tiny_tokenizer,
    make_preference_dataset,
    save_tiny_model_and_tokenizer,
    true_reward,
)


def test_true_reward():
    assert true_reward(" the plot was great . the music was dull .") == VALENCE["great"] + VALENCE["dull"]
    assert true_reward("review of film 12 : the cast was simple .") == 0.0
    msgs = [{"role": "user", "content": "review of film 1 :"}, {"role": "assistant", "content": "the plot was awful ."}]
    assert true_reward(msgs) == VALENCE["awful"]


def test_deterministic_and_seeded():
    a = make_preference_dataset(200, 50, seed=0)
    b = make_preference_dataset(200, 50, seed=0)
    c = make_preference_dataset(200, 50, seed=1)
    assert a["train"].to_dict() == b["train"].to_dict() and a["test"].to_dict() == b["test"].to_dict()
    assert a["train"]["chosen"] != c["train"]["chosen"]
    # The test split comes from its own stream: it does not depend on n_train or the label scale.
    assert make_preference_dataset(20, 50, seed=0, scale=3.0)["test"].to_dict() == a["test"].to_dict()


def test_columns_rewards_and_eval_labels_are_true_order():
    ds = make_preference_dataset(300, 300, seed=0)
    assert set(ds) == {"train", "test"} and len(ds["train"]) == 300 and len(ds["test"]) == 300
    for split in ds.values():
        assert split.column_names == ["prompt", "chosen", "rejected", "true_reward_chosen", "true_reward_rejected"]
        row = split[0]
        assert row["prompt"].startswith("review of film ") and row["prompt"].endswith(" :")
        assert row["chosen"].startswith(" ") and row["chosen"].endswith(" .")
        for c, r, rc, rr in zip(split["chosen"], split["rejected"], split["true_reward_chosen"],
                                split["true_reward_rejected"]):
            assert (true_reward(c), true_reward(r)) == (rc, rr)
            assert rc != rr  # ties dropped
            assert 2 <= c.count(" was ") <= 4
    test = ds["test"]
    assert all(c > r for c, r in zip(test["true_reward_chosen"], test["true_reward_rejected"]))
    assert not make_preference_dataset(5, 5, with_rewards=False)["train"].column_names[3:]


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.0, math.inf])
def test_training_labels_follow_bradley_terry(scale):
    train = make_preference_dataset(2000, 0, seed=0, scale=scale)["train"]
    diffs = [c - r for c, r in zip(train["true_reward_chosen"], train["true_reward_rejected"])]
    agree = sum(d > 0 for d in diffs) / len(diffs)
    # Expected agreement under Bradley-Terry: mean of sigmoid(scale * |r_a - r_b|) over the pairs drawn.
    expected = sum(1 / (1 + math.exp(-min(scale * abs(d), 50.0))) for d in diffs) / len(diffs)
    assert abs(agree - expected) < 0.04  # binomial sd <= 0.011 at n = 2000
    if scale == 0.0:
        assert 0.45 < agree < 0.55
    if scale == math.inf:
        assert agree == 1.0
    if scale == 1.0:
        assert 0.8 < agree < 0.95


def test_conversational_variant():
    std = make_preference_dataset(10, 10, seed=0)
    conv = make_preference_dataset(10, 10, seed=0, conversational=True)
    row, crow = std["train"][0], conv["train"][0]
    assert crow["prompt"] == [{"role": "user", "content": row["prompt"]}]
    assert crow["chosen"] == [{"role": "assistant", "content": row["chosen"].strip()}]
    assert crow["true_reward_chosen"] == row["true_reward_chosen"] == true_reward(crow["chosen"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": -1}, "n_train"),
        ({"scale": -1.0}, "scale"),
        ({"scale": math.nan}, "scale"),
        ({"min_clauses": 3, "max_clauses": 2}, "clause range"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_preference_dataset(**{"n_train": 4, "n_eval": 4, **kwargs})


def test_tokenizer_round_trip_and_chat_template():
    tok = build_tiny_tokenizer()
    ds = make_preference_dataset(50, 0, seed=5)["train"]
    for prompt, chosen in zip(ds["prompt"], ds["chosen"]):
        text = prompt + chosen + tok.eos_token  # what TRL tokenises: EOS glued to the final "."
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == (prompt + chosen).strip()
    # Vocabulary from a corpus: deterministic, unknown words map to <unk>.
    assert build_tiny_tokenizer(ds).get_vocab() == build_tiny_tokenizer(ds).get_vocab()
    assert tok("the plot was xyzzy .")["input_ids"][4] == tok.unk_token_id
    # The rendered prompt (with generation prompt) is a token prefix of prompt + completion.
    prompt = [{"role": "user", "content": ds[0]["prompt"]}]
    completion = [{"role": "assistant", "content": ds[0]["chosen"].strip()}]
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    pc = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert pc[: len(p)] == p and pc[-1] == tok.eos_token_id and tok.unk_token_id not in pc


def test_tiny_model_is_seeded_and_does_not_touch_global_rng():
    import torch

    tok = build_tiny_tokenizer()
    state = torch.random.get_rng_state()
    m1, m2 = build_tiny_model(tok, seed=3), build_tiny_model(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(m1.model.embed_tokens.weight, build_tiny_model(tok, seed=4).model.embed_tokens.weight)
    assert m1.lm_head.weight is m1.model.embed_tokens.weight  # tied
    assert m1.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tok, hidden=30, heads=4)


def test_save_and_load_offline(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = save_tiny_model_and_tokenizer(tmp_path / "tiny", hidden=32, ffn=64)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ref_tok = build_tiny_tokenizer()
    ref_model = build_tiny_model(ref_tok, hidden=32, ffn=64)
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.chat_template == ref_tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    text = "review of film 7 : the plot was great ."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 32
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-6)


def _dpo_config(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # TRL defaults it to True; gradient_checkpointing is its deprecated alias
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=3,
        learning_rate=3e-3,
        beta=0.1,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return DPOConfig(**base)


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_trl_dpo_smoke(tmp_path, conversational):
    """A few DPO steps on the tiny model: both formats tokenise, extra columns pass, metrics are finite."""
    from trl import DPOTrainer

    ds = make_preference_dataset(48, 16, seed=0, conversational=conversational)
    ds = swap_preferences(ds, 0.25, seed=0)  # extra columns: label_flipped (bool), true_reward_* (float)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden=32, ffn=64)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # an in-memory model has no path to rebuild the reference from
        args=_dpo_config(tmp_path),
        train_dataset=ds["train"],
        eval_dataset=ds["test"],
        processing_class=tok,
    )
    # The extra columns survive TRL's tokenisation ...
    assert ({"label_flipped", "true_reward_chosen", "prompt_ids", "chosen_ids"}
            <= set(trainer.train_dataset.column_names))
    first = trainer.train_dataset[0]
    assert tok.unk_token_id not in first["prompt_ids"] + first["chosen_ids"] + first["rejected_ids"]
    assert first["chosen_ids"][-1] == tok.eos_token_id
    trainer.train()
    assert trainer.state.global_step == 3
    metrics = trainer.evaluate()
    assert all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float))
    assert "eval_rewards/accuracies" in metrics


def test_trl_dpo_keeps_extra_columns_through_collator(tmp_path):
    """remove_unused_columns=False and precomputed reference log-probs: the collator ignores extra keys."""
    from trl import DPOTrainer

    ds = swap_preferences(make_preference_dataset(32, 8, seed=0), 0.25)
    path = save_tiny_model_and_tokenizer(tmp_path / "tiny", hidden=32, ffn=64)
    trainer = DPOTrainer(
        model=path,  # a local folder, loaded the way a Hub id would be; the reference comes from it too
        args=_dpo_config(tmp_path, max_steps=2, remove_unused_columns=False, precompute_ref_log_probs=True),
        train_dataset=ds["train"],
        eval_dataset=ds["test"],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "label_flipped" not in batch and "input_ids" in batch
    trainer.train()
    assert trainer.state.global_step == 2
