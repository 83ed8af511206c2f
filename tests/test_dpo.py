"""SNRDPOTrainer: optimizer injection, drift / noise-fit metrics, the flipped column, cDPO, PEFT, precompute, DDP.

Everything runs on CPU with the tiny Llama and the synthetic preference task of hf_snr.synthetic
(vocabulary cut to 64 films, so the model is small); label noise comes from hf_snr.data.
"""

import copy
import functools
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_snr  # noqa: F401  (registers optim="snr_adamw")
from hf_snr.data import swap_preferences
from hf_snr.dpo import DPO_METRICS, SNRDPOConfig, SNRDPOTrainer, cdpo_loss
from hf_snr.integration import SNR_METRICS, unwrap_optimizer
from hf_snr.optimizer import SNRAdamW
from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer, make_preference_dataset, task_vocabulary

N_FILMS = 64
NOISE = 0.3
NOISE_KEYS = ["noise/flipped_fit", "noise/clean_fit", "noise/flipped_margin", "noise/clean_margin"]
SNR_TRAIN_KEYS = list(SNR_METRICS)
SNR_EVAL_KEYS = list(SNR_METRICS)


@functools.lru_cache(maxsize=None)
def tokenizer():
    return build_tiny_tokenizer(task_vocabulary(N_FILMS))


@functools.lru_cache(maxsize=None)
def task(noise: float):
    """(train with `noise` swapped and the flag column, held-out test with a flag column all False).

    Training labels start in the true order (scale=inf), so the swaps are the only label noise.
    """
    dd = make_preference_dataset(n_train=192, n_eval=64, seed=0, n_films=N_FILMS, scale=math.inf)
    dd = swap_preferences(dd, noise)
    return dd["train"], dd["test"]


@functools.lru_cache(maxsize=None)
def noisy_eval():
    """A held-out set swapped like the training data, to see eval_noise/flipped_fit."""
    dd = make_preference_dataset(n_train=0, n_eval=48, seed=1, n_films=N_FILMS, scale=math.inf)
    return swap_preferences(dd["test"], NOISE, seed=1)


def make_args(tmp_path, **overrides) -> SNRDPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_steps=8,
        logging_steps=4,
        seed=0,
    )
    kwargs.update(overrides)
    return SNRDPOConfig(**kwargs)


def make_trainer(args, train, eval_dataset=None, *, explicit_ref=True, **kwargs) -> SNRDPOTrainer:
    tok = tokenizer()
    model = build_tiny_model(tok, seed=0)
    ref = copy.deepcopy(model) if explicit_ref else None
    return SNRDPOTrainer(model, ref_model=ref, args=args, train_dataset=train, eval_dataset=eval_dataset,
                         processing_class=tok, **kwargs)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def eval_logs(trainer):
    return [h for h in trainer.state.log_history if "eval_loss" in h]


def assert_step0(metrics: dict, prefix: str = "", exact: bool = True):
    """Before any update the policy is its reference: no drift, every margin a tie (fit 1/2)."""
    tol = 0.0 if exact else 1e-4
    assert abs(metrics[f"{prefix}rewards/drift"]) <= tol
    assert metrics[f"{prefix}noise/clean_fit"] == pytest.approx(0.5, abs=0.25 if not exact else 0.0)
    if f"{prefix}noise/flipped_fit" in metrics:
        assert metrics[f"{prefix}noise/flipped_fit"] == pytest.approx(0.5, abs=0.25 if not exact else 0.0)


# -- configuration -----------------------------------------------------------------------------------
def test_config_defaults_and_cdpo_validation(tmp_path):
    args = make_args(tmp_path)
    assert args.optim == "snr_adamw" and args.flipped_column == "label_flipped"
    assert make_args(tmp_path, loss_type="cdpo", label_smoothing=0.0).loss_type == ["cdpo"]
    assert make_args(tmp_path, loss_type="cdpo", label_smoothing=0.49).label_smoothing == 0.49
    for bad in (-0.1, 0.5, 0.7, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\)"):
            make_args(tmp_path, loss_type="cdpo", label_smoothing=bad)
    with pytest.raises(ValueError, match="reverse_kl"):
        make_args(tmp_path, loss_type="cdpo", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="flipped_column"):
        make_args(tmp_path, flipped_column="")
    with pytest.warns(UserWarning, match="no effect"):  # TRL's sigmoid ignores label_smoothing
        make_args(tmp_path, label_smoothing=0.1)


def test_plain_dpoconfig_is_validated_by_the_trainer(tmp_path):
    from trl import DPOConfig

    train, _ = task(NOISE)
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[],
                     loss_type="cdpo",
                     label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        make_trainer(args, train)


def test_cdpo_reference_formula():
    delta = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    beta = 0.5
    assert torch.equal(cdpo_loss(delta, beta, 0.0), -F.logsigmoid(beta * delta))
    eps = 0.2
    hand = torch.tensor([-(1 - eps) * math.log(1 / (1 + math.exp(-beta * d)))
                         - eps * math.log(1 / (1 + math.exp(beta * d)))
                         for d in delta.tolist()])
    torch.testing.assert_close(cdpo_loss(delta, beta, eps), hand)
    # the identity the trainer uses: cDPO = sigmoid loss + eps * beta * delta
    torch.testing.assert_close(cdpo_loss(delta, beta, eps), -F.logsigmoid(beta * delta) + eps * beta * delta)


# -- the flipped column through TRL's data path ----------------------------------------------------------
def indexed_pairs(n: int):
    """Pairs whose prompt names their row index, flagged on every third row."""
    from datasets import Dataset

    rows = {"prompt": [f"review of film {i} :" for i in range(n)],
            "chosen": [" the plot was great ."] * n,
            "rejected": [" the plot was bad ."] * n,
            "is_noisy": [i % 3 == 0 for i in range(n)]}
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_flag_column_reaches_the_batch_aligned_and_never_the_model(tmp_path, remove_unused_columns):
    tok = tokenizer()
    args = make_args(tmp_path, flipped_column="is_noisy", remove_unused_columns=remove_unused_columns,
                     per_device_train_batch_size=8, max_steps=1, logging_steps=1)
    trainer = make_trainer(args, indexed_pairs(24))
    batch = next(iter(trainer.get_train_dataloader()))  # shuffled
    flags = batch["is_noisy"]
    assert flags.dtype == torch.bool and flags.shape == (8,)
    chosen_ids = batch["input_ids"][:8]  # TRL's layout: [all chosen; all rejected]
    film = [int(tok.convert_ids_to_tokens(int(row[4]))) for row in chosen_ids]  # <bos> review of film N :
    assert flags.tolist() == [i % 3 == 0 for i in film]

    seen = []  # every forward's keyword names, and how many forwards per optimizer step
    hooks = [m.register_forward_hook(lambda mod, a, kw, out, tag=tag: seen.append((tag, set(kw))), with_kwargs=True)
             for tag, m in (("policy", trainer.model), ("ref", trainer.ref_model))]
    trainer.train()
    for h in hooks:
        h.remove()
    assert all("is_noisy" not in keys for _, keys in seen)
    assert [tag for tag, _ in seen] == ["policy", "ref"]  # no second forward pass: one of each per step
    assert "noise/flipped_fit" in train_logs(trainer)[-1]


def test_flag_column_disabled_or_absent(tmp_path):
    train, _ = task(NOISE)
    trainer = make_trainer(make_args(tmp_path, flipped_column=None, max_steps=2, logging_steps=2), train)
    trainer.train()
    log = train_logs(trainer)[-1]
    assert "rewards/drift" in log and not any(k.startswith("noise/") for k in log)

    trainer = make_trainer(make_args(tmp_path, max_steps=2, logging_steps=2), train.remove_columns("label_flipped"))
    trainer.train()
    log = train_logs(trainer)[-1]
    assert "rewards/drift" in log and not any(k.startswith("noise/") for k in log)


def test_metrics_pool_counts_not_batch_ratios(tmp_path):
    train, _ = task(NOISE)
    trainer = make_trainer(make_args(tmp_path), train)
    trainer.model.train()
    t = torch.tensor
    # batch A: 1 swapped pair fitted, 1 clean pair not; batch B: 3 swapped pairs not fitted, 1 clean tie
    trainer._accumulate("train", t([0.3, -0.1]), t([0.1, 0.2]), t([True, False]))
    trainer._accumulate("train", t([-0.2, 0.0, -0.4, 0.5]), t([0.1, 0.1, 0.0, 0.5]), t([True, True, True, False]))
    trainer.log({"loss": 0.0})
    log = trainer.state.log_history[-1]
    assert log["noise/flipped_fit"] == pytest.approx(1 / 4)  # an average of batch ratios would say 1/2
    assert log["noise/clean_fit"] == pytest.approx((0 + 0.5) / 2)  # the tie counts 1/2
    assert log["noise/flipped_margin"] == pytest.approx((0.2 - 0.3 - 0.1 - 0.4) / 4)
    assert log["rewards/drift"] == pytest.approx(
        (0.3 + 0.1 + 0.1 + 0.2 + 0.2 + 0.1 + 0.0 + 0.1 + 0.4 + 0.0 + 0.5 + 0.5) / 12
    )
    assert trainer._pair_sums["train"] == {}


def test_recomputed_rewards_are_checked_against_trl(tmp_path):
    train, _ = task(NOISE)
    trainer = make_trainer(make_args(tmp_path, per_device_train_batch_size=8), train)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    reduce = trainer._sequence_logps
    trainer._sequence_logps = lambda lp, mask: reduce(lp, mask) * 1.01  # a TRL change we would not follow
    with pytest.raises(RuntimeError, match="internals changed"):
        trainer.compute_loss(trainer.model, inputs)
    trainer._sequence_logps = reduce
    trainer.compute_loss(trainer.model, inputs)  # checked once per mode, then trusted
    assert trainer._verified_modes == {"train"}


# -- a full noisy run: every metric, train and eval, and step 0 -------------------------------------------
def test_noisy_run_logs_all_metrics_train_and_eval(tmp_path):
    train, _ = task(NOISE)
    args = make_args(tmp_path, logging_first_step=True, eval_strategy="steps", eval_steps=8)
    trainer = make_trainer(args, train, noisy_eval())
    assert trainer.args.optim == "snr_adamw"

    step0 = trainer.evaluate()  # before any update
    assert_step0(step0, "eval_")
    assert not any(k.startswith("eval_snr/") for k in step0)  # no optimizer statistics yet

    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), SNRAdamW)
    logs = train_logs(trainer)
    assert logs[0]["step"] == 1
    assert_step0(logs[0])  # logging_first_step: metrics of the first batch, computed before the update
    for log in logs:
        for key in [*SNR_TRAIN_KEYS, *DPO_METRICS, "rewards/accuracies", "loss"]:
            assert key in log, (key, log["step"])
        assert not any(k.startswith("eval_") for k in log)
    final_eval = eval_logs(trainer)[-1]
    for key in [*SNR_EVAL_KEYS, *DPO_METRICS, "rewards/accuracies"]:
        assert f"eval_{key}" in final_eval, key
    assert final_eval["eval_snr/mask_mean"] == logs[-1]["snr/mask_mean"]  # the latest statistics, as logged
    assert final_eval["eval_rewards/drift"] > 0
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith(("eval_", "snr/")) for k in summary)


# -- 0 % and 30 % noise, both optimizers: the metrics move the right way; A/B changes one flag -----------
@functools.lru_cache(maxsize=None)
def trained(optim: str, noise: float, tmp: str):
    train, test = task(noise)
    args = make_args(Path(tmp) / f"{optim}-{noise}", optim=optim, max_steps=18, logging_steps=6,
                     learning_rate=3e-2, eval_strategy="no")
    trainer = make_trainer(args, train, test)
    before = trainer.evaluate()
    trainer.train()
    return trainer, before, trainer.evaluate()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("noise", [0.0, NOISE])
@pytest.mark.parametrize("optim", ["snr_adamw", "adamw_torch"])
def test_metrics_move_the_right_way(run_dir, optim, noise):
    trainer, before, after = trained(optim, noise, run_dir)
    # held-out clean pairs (flag column all False): clean fit is the clean accuracy with ties = 1/2
    assert_step0(before, "eval_")
    assert after["eval_noise/clean_fit"] > 0.6
    assert "eval_noise/flipped_fit" not in after  # no swapped pair in the held-out set
    assert after["eval_rewards/drift"] > 0.02  # it moved away from the reference
    logs = train_logs(trainer)
    assert logs[-1]["rewards/drift"] > 0.02
    assert logs[-1]["noise/clean_fit"] > 0.6
    if noise:
        # swapped pairs are fitted less than clean ones: the population signal dominates early on
        assert logs[-1]["noise/flipped_fit"] < logs[-1]["noise/clean_fit"]
    else:
        assert "noise/flipped_fit" not in logs[-1]


def test_ab_same_trainer_same_metrics_minus_snr(run_dir):
    snr, _, snr_eval = trained("snr_adamw", NOISE, run_dir)
    adamw, _, adamw_eval = trained("adamw_torch", NOISE, run_dir)
    assert isinstance(unwrap_optimizer(snr.optimizer), SNRAdamW)
    assert type(unwrap_optimizer(adamw.optimizer)) is torch.optim.AdamW
    assert getattr(adamw, "_snr_callback", None) is None
    snr_keys, adamw_keys = set(train_logs(snr)[-1]), set(train_logs(adamw)[-1])
    assert adamw_keys == {k for k in snr_keys if not k.startswith("snr/")}
    assert set(adamw_eval) == {k for k in snr_eval if not k.startswith("eval_snr/")}
    assert {k for k in snr_keys if k.startswith("snr/")} == set(SNR_TRAIN_KEYS)


# -- cDPO ----------------------------------------------------------------------------------------------
def hand_logratios(trainer, inputs, ref_model):
    """(log pi - log pi_ref)(chosen) - (...)(rejected) per pair, from plain logits (not TRL's code)."""

    def seq_logps(model):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        tokens = inputs["input_ids"][:, 1:]
        mask = inputs["completion_mask"][:, 1:].float()
        return (logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)

    policy = seq_logps(trainer.model)
    with torch.no_grad():
        ref = seq_logps(ref_model)
    chosen, rejected = (policy - ref).chunk(2)
    return chosen - rejected


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cdpo_loss_and_gradient_match_hand_computation(tmp_path, eps):
    train, _ = task(NOISE)
    trainers = {}
    for loss_type in ("cdpo", "sigmoid"):
        args = make_args(tmp_path / loss_type, loss_type=loss_type, label_smoothing=eps if loss_type == "cdpo" else 0.0,
                         beta=0.5)
        trainers[loss_type] = make_trainer(args, train)
    cdpo = trainers["cdpo"]
    assert cdpo.loss_types == ["sigmoid"] and cdpo.args.loss_type == ["cdpo"]
    with torch.no_grad():  # move the policy off its reference so that margins are not all 0
        g = torch.Generator().manual_seed(1)
        for tr in trainers.values():
            for p in tr.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            g.manual_seed(1)
    inputs = cdpo._prepare_inputs(next(iter(cdpo.get_train_dataloader())))
    ref = cdpo.ref_model
    for tr in trainers.values():
        tr.model.train()

    loss = cdpo.compute_loss(cdpo.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in cdpo.model.parameters()]
    cdpo.model.zero_grad()

    hand = cdpo_loss(hand_logratios(cdpo, inputs, ref), 0.5, eps).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    hand.backward()
    for g_trainer, p in zip(grads, cdpo.model.parameters()):
        torch.testing.assert_close(g_trainer, p.grad, rtol=1e-4, atol=1e-6)

    sigmoid_loss = trainers["sigmoid"].compute_loss(trainers["sigmoid"].model, inputs)
    if eps == 0.0:
        torch.testing.assert_close(loss, sigmoid_loss, rtol=0, atol=0)
    else:
        assert not torch.allclose(loss, sigmoid_loss)


@pytest.mark.parametrize("loss_type", ["cdpo", "robust"])
def test_noise_robust_baselines_run_with_the_same_metrics(tmp_path, loss_type):
    train, _ = task(NOISE)
    trainer = make_trainer(make_args(tmp_path, loss_type=loss_type, label_smoothing=NOISE, max_steps=2,
                                     logging_steps=2), train)
    trainer.train()
    log = train_logs(trainer)[-1]
    assert all(k in log for k in [*DPO_METRICS, *SNR_TRAIN_KEYS]) and math.isfinite(log["loss"])


# -- reference handled by TRL: PEFT (adapter disabled), precomputed log-probs -------------------------------
def test_peft_lora_reference_is_the_disabled_adapter(tmp_path):
    from peft import LoraConfig

    train, _ = task(NOISE)
    args = make_args(tmp_path, learning_rate=2e-2, logging_first_step=True, per_device_train_batch_size=16,
                     gradient_accumulation_steps=2)
    trainer = make_trainer(args, train, noisy_eval(), explicit_ref=False,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    assert_step0(trainer.evaluate(), "eval_")  # LoRA starts at B = 0: policy == reference exactly
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), SNRAdamW)
    logs = train_logs(trainer)
    assert_step0(logs[0])
    assert all(k in logs[-1] for k in [*DPO_METRICS, *SNR_TRAIN_KEYS])
    assert logs[-1]["rewards/drift"] > 0


def test_precompute_ref_log_probs(tmp_path):
    train, _ = task(NOISE)
    args = make_args(tmp_path, precompute_ref_log_probs=True, logging_first_step=True)
    trainer = make_trainer(args, train, explicit_ref=False)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    # a raw data set with the flag column passed to evaluate(): TRL precomputes its reference log-probs
    # through our collator, so the flag must not reach the model there either
    assert_step0(trainer.evaluate(noisy_eval()), "eval_", exact=False)
    trainer.train()
    logs = train_logs(trainer)
    assert_step0(logs[0], exact=False)  # the reference forward saw other batches: equal up to rounding
    assert all(k in logs[-1] for k in [*DPO_METRICS, *SNR_TRAIN_KEYS])
    assert logs[-1]["rewards/drift"] > 0


# -- DDP ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_pool_across_ranks(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "distributed"))
    import _common

    cmd = [_common.launcher("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_common.free_port()), str(_common.WORKER_DIR / "dpo_ddp.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=_common.child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["distributed_type"] == "MULTI_CPU"
    assert result["optimizer"] == "SNRAdamW"
    for key in ("eval_rewards/drift", "eval_noise/flipped_fit", "eval_noise/clean_fit"):
        assert result["eval"][key] == pytest.approx(result["expected"][key], rel=1e-4, abs=1e-6), key
    assert all(k in result["last_train_log"] for k in [*DPO_METRICS, *SNR_TRAIN_KEYS])


def test_decay_to_init_anchors_on_the_reference_weights(tmp_path, caplog):
    """decay_to='init' with a reference model: the decay pulls toward the reference's own tensors (no copy)."""
    train, _ = task(NOISE)
    args = make_args(tmp_path, optim_args="decay_to=init,warmup_steps=1", weight_decay=0.5, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        trainer = make_trainer(args, train)
        trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    ref = dict(trainer.ref_model.named_parameters())
    policy = dict(trainer.model.named_parameters())
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert decayed
    for g in decayed:
        for p in g["params"]:
            name = next(n for n, q in policy.items() if q is p)
            assert opt._anchors[p] is not None and opt._anchors[p].data_ptr() == ref[name].data_ptr()
            assert "param_init" not in opt.state[p]
    assert "anchors" in caplog.text and "reference model's weights" in caplog.text


def test_pref_accuracies_pool_the_policy_and_reference_preferences(tmp_path):
    train, _ = task(NOISE)
    trainer = make_trainer(make_args(tmp_path), train)
    trainer.model.train()
    t = torch.tensor
    # policy margins: 2 right, 1 wrong, 1 tie; reference margins: 1 right, 3 wrong
    trainer._accumulate("train", t([0.1, 0.0]), t([0.0, 0.1]), None, t([1.0, -2.0]), t([0.5, -0.1]))
    trainer._accumulate("train", t([0.2, 0.0]), t([0.0, 0.0]), None, t([3.0, 0.0]), t([-1.0, -0.2]))
    trainer.log({"loss": 0.0})
    log = trainer.state.log_history[-1]
    assert log["pref/policy_accuracy"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert log["pref/reference_accuracy"] == pytest.approx(1 / 4)
    assert log["rewards/drift"] == pytest.approx((0.1 + 0.0 + 0.0 + 0.1 + 0.2 + 0.0 + 0.0 + 0.0) / 8)


def test_pref_accuracy_starts_at_the_reference_and_the_reference_stays(tmp_path):
    train, test = task(0.0)  # clean labels: training teaches the true order, so the policy's own preference moves
    args = make_args(tmp_path, precompute_ref_log_probs=True, max_steps=24, learning_rate=2e-2)
    trainer = make_trainer(args, train, test, explicit_ref=False)
    before = trainer.evaluate()
    assert before["eval_pref/policy_accuracy"] == pytest.approx(before["eval_pref/reference_accuracy"], abs=1e-6)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_pref/reference_accuracy"] == pytest.approx(before["eval_pref/reference_accuracy"], abs=1e-6)
    assert after["eval_pref/policy_accuracy"] > before["eval_pref/policy_accuracy"] + 0.1
    assert all(k in train_logs(trainer)[-1] for k in ("pref/policy_accuracy", "pref/reference_accuracy"))
