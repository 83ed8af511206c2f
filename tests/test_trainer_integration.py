"""SNRAdamW inside single-process Trainer / SFTTrainer / DPOTrainer runs on a tiny Llama (CPU)."""

import copy
import logging
import math
import re

import pytest
import torch
from _snr_hf_utils import (
    SNR_KEYS,
    LogRecorder,
    StatsCounter,
    sentences,
    snr,
    tiny_llama,
    tiny_tokenizer,
    token_dataset,
    token_iterable,
    train_args,
    train_logs,
)
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import hf_snr
from hf_snr import SNRAdamW, SNRCallback, snr_optimizer_cls_and_kwargs, unwrap_optimizer
from hf_snr.integration import SNRAdamWFactory


def _decay_names(model):
    return set(Trainer.get_decay_parameter_names(None, model))


def _group_of(opt, param):
    (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]
    return group


def _assert_hparams(opt, model, args, **knobs):
    """lr/betas/eps from args, weight decay per decay / no-decay group, the SNR knobs as given."""
    decay = _decay_names(model)
    assert any(n not in decay for n, _ in model.named_parameters())  # norms exist: both groups are checked
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = _group_of(opt, p)
        assert g.get("initial_lr", g["lr"]) == args.learning_rate
        assert g["betas"] == (args.adam_beta1, args.adam_beta2) and g["eps"] == args.adam_epsilon
        assert g["weight_decay"] == (args.weight_decay if name in decay else 0.0), name
        for k, v in knobs.items():
            assert g[k] == v, (name, k, g[k], v)


def _assert_snr_logs(trainer, expected_steps=None):
    logs = train_logs(trainer)
    assert logs, trainer.state.log_history
    if expected_steps is not None:
        assert [h["step"] for h in logs] == expected_steps
    for h in logs:
        for k in SNR_KEYS:
            assert k in h and math.isfinite(h[k]), (k, h)
        assert h["snr/signal_minus_noise"] == pytest.approx(h["snr/signal"] - h["snr/memorization_rate"], abs=1e-12)
        assert not any(k in h for k in ("snr/population_risk", "snr/cumulative_noise"))  # no risk estimate is claimed
        assert 0.0 <= h["snr/mask_mean"] <= 1.0 and 0.0 <= h["snr/active_fraction"] <= 1.0
        assert h["snr/memorization_rate"] >= 0.0 and h["snr/signal"] >= 0.0
    return logs


# -- which optimizer each trainer builds ---------------------------------------------------------

def test_trainer_by_name(tmp_path):
    model = tiny_llama()
    args = train_args(tmp_path, optim="snr_adamw", optim_args="mask=soft,softness=3,rho=0.95,warmup_steps=1",
                      learning_rate=3e-3, adam_beta1=0.85, adam_beta2=0.99, adam_epsilon=1e-7, weight_decay=0.05,
                      max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(12))
    trainer.train()
    opt = snr(trainer)
    assert type(opt) is SNRAdamW
    _assert_hparams(opt, model, args, mask="soft", softness=3.0, rho=0.95, warmup_steps=1, alpha=1.0, snr=True)
    _assert_snr_logs(trainer, [1, 2, 3])
    assert any(isinstance(cb, SNRCallback) for cb in trainer.callback_handler.callbacks)


def _sft_setup(tmp_path, **kw):
    tok = tiny_tokenizer()
    data = Dataset.from_dict({"text": sentences(12, 8, seed=1)})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_length=16, use_cpu=True, bf16=False, report_to=[],
                     disable_tqdm=True, save_strategy="no", per_device_train_batch_size=4, logging_steps=1,
                     gradient_checkpointing=False, dataset_num_proc=None, **kw)
    return SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tok)


def test_sft_trainer_by_name(tmp_path):
    trainer = _sft_setup(tmp_path, optim="snr_adamw", optim_args="mask=hard,alpha=0.5", learning_rate=2e-3,
                         weight_decay=0.1, max_steps=2)
    trainer.train()
    opt = snr(trainer)
    _assert_hparams(opt, trainer.model, trainer.args, mask="hard", alpha=0.5)
    _assert_snr_logs(trainer, [1, 2])


def _dpo_setup(tmp_path, **kw):
    tok = tiny_tokenizer()
    n = 8
    data = Dataset.from_dict({"prompt": sentences(n, 3, 2), "chosen": sentences(n, 4, 3),
                              "rejected": sentences(n, 4, 4)})
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=16, use_cpu=True, bf16=False, report_to=[],
                     disable_tqdm=True, save_strategy="no", per_device_train_batch_size=4, logging_steps=1,
                     gradient_checkpointing=False, max_steps=2, **kw)
    model = tiny_llama()
    return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                      processing_class=tok)


@pytest.mark.parametrize("route", ["name", "explicit"])
def test_dpo_trainer(tmp_path, route):
    if route == "name":
        trainer = _dpo_setup(tmp_path, optim="snr_adamw", optim_args="mask=soft,reduction=tensor",
                             learning_rate=1e-3, weight_decay=0.02)
    else:  # DPOTrainer has no optimizer_cls_and_kwargs argument: set the attribute after __init__
        trainer = _dpo_setup(tmp_path, learning_rate=1e-3, weight_decay=0.02)
        trainer.optimizer_cls_and_kwargs = snr_optimizer_cls_and_kwargs(trainer.args, "mask=soft,reduction=tensor")
    trainer.train()
    opt = snr(trainer)
    _assert_hparams(opt, trainer.model, trainer.args, mask="soft", reduction="tensor")
    logs = _assert_snr_logs(trainer, [1, 2])
    assert all("rewards/accuracies" in h for h in logs)  # DPO's own metrics still there


def test_explicit_route_gets_risk_logging(tmp_path):
    model = tiny_llama()
    args = train_args(tmp_path, max_steps=2, weight_decay=0.03, learning_rate=5e-3)  # optim left at its default
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8),
                      optimizer_cls_and_kwargs=hf_snr.snr_optimizer_cls_and_kwargs(args, "mask=soft"))
    trainer.train()
    _assert_hparams(snr(trainer), model, args, mask="soft")
    _assert_snr_logs(trainer, [1, 2])


def test_own_create_optimizer_or_instance_still_logs(tmp_path):
    class MyTrainer(Trainer):
        def create_optimizer(self, model=None):  # overrides without super(): the create_scheduler hook attaches
            if self.optimizer is None:
                self.optimizer = SNRAdamW(self.model.parameters(), lr=1e-3, warmup_steps=0)
            return self.optimizer

    trainer = MyTrainer(model=tiny_llama(), args=train_args(tmp_path, max_steps=2), train_dataset=token_dataset(8))
    trainer.train()
    _assert_snr_logs(trainer, [1, 2])

    model = tiny_llama()
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2), train_dataset=token_dataset(8),
                      optimizers=(SNRAdamW(model.parameters(), lr=1e-3), None))
    trainer.train()
    _assert_snr_logs(trainer, [1, 2])


def test_plain_adamw_trainer_is_untouched(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=train_args(tmp_path, max_steps=2, optim="adamw_torch"),
                      train_dataset=token_dataset(8))
    trainer.train()
    assert type(unwrap_optimizer(trainer.optimizer)) is torch.optim.AdamW
    assert not any(isinstance(cb, SNRCallback) for cb in trainer.callback_handler.callbacks)
    assert not any(k.startswith("snr/") for h in trainer.state.log_history for k in h)


# -- risk logging --------------------------------------------------------------------------------

def test_risk_logging_only_on_logging_steps(tmp_path, monkeypatch):
    counter = StatsCounter(monkeypatch)
    reporter = LogRecorder()
    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=2", max_steps=7, logging_steps=3,
                      logging_first_step=True, eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=4)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(16),
                      eval_dataset=token_dataset(4, seed=5), callbacks=[reporter])
    trainer.train()
    # the reporter-like callback was registered before ours and still sees the keys
    cbs = trainer.callback_handler.callbacks
    assert cbs.index(reporter) < next(i for i, cb in enumerate(cbs) if isinstance(cb, SNRCallback))
    logs = _assert_snr_logs(trainer, [1, 3, 6])
    # statistics were computed at those optimizer steps and at no other
    assert counter.steps == [1, 3, 6]
    reported = [h for h in reporter.logs if "loss" in h]
    assert [{k: h[k] for k in SNR_KEYS} for h in reported] == [{k: h[k] for k in SNR_KEYS} for h in logs]
    # evaluation logs and the end-of-training summary carry no snr/* keys
    others = [h for h in trainer.state.log_history if "loss" not in h]
    assert any("eval_loss" in h for h in others) and any("train_runtime" in h for h in others)
    assert not any(k.startswith("snr/") for h in others for k in h)
    assert not any(k.startswith("snr/") for h in reporter.logs if "loss" not in h for k in h)


def test_risk_logging_every_step(tmp_path, monkeypatch):
    counter = StatsCounter(monkeypatch)
    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=1,mask=soft", max_steps=5,
                      logging_steps=1)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(12))
    trainer.train()
    logs = _assert_snr_logs(trainer, [1, 2, 3, 4, 5])
    assert counter.steps == [1, 2, 3, 4, 5]
    # the optimizer keeps the raw running sum of the per-step noise (not logged: it is no risk estimate)
    running = sum(h["snr/memorization_rate"] for h in logs)
    assert snr(trainer).snr_state["cumulative_noise"] == pytest.approx(running, rel=1e-6)
    assert logs[0]["snr/mask_mean"] == 1.0  # warm-up step: gate open
    assert logs[-1]["snr/mask_mean"] < 1.0  # soft gate after warm-up


def test_unforeseen_log_step_warns_once(tmp_path, monkeypatch, caplog):
    class LogAtStep3(TrainerCallback):  # a user callback that asks for a log the Trainer's rule does not
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_log = True

    counter = StatsCounter(monkeypatch)
    args = train_args(tmp_path, optim="snr_adamw", max_steps=4, logging_steps=2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(16), callbacks=[LogAtStep3()])
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        trainer.train()
    logs = _assert_snr_logs(trainer, [2, 3, 4])
    assert counter.steps == [2, 4]
    assert logs[1]["snr/memorization_rate"] == logs[0]["snr/memorization_rate"]  # step 3 carries step 2's ...
    stale = [r for r in caplog.records if "last requested for step 2" in r.getMessage()]
    assert len(stale) == 1  # ... and says so, once


def test_risk_logging_epoch_strategy(tmp_path, monkeypatch):
    counter = StatsCounter(monkeypatch)
    args = train_args(tmp_path, optim="snr_adamw", logging_strategy="epoch", max_steps=5,
                      per_device_train_batch_size=3)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(8))  # 3 steps per pass
    trainer.train()
    # logged at the end of the first pass and where max_steps cuts the second one short
    _assert_snr_logs(trainer, [3, 5])
    assert counter.steps == [3, 5]


# -- alpha = auto ---------------------------------------------------------------------------------

def _alpha_run(tmp_path, caplog, dataset, **kw):
    args = train_args(tmp_path, optim="snr_adamw", optim_args="alpha=auto", **kw)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        trainer.train()
    opt = snr(trainer)
    alphas = {g["alpha"] for g in opt.param_groups}
    assert len(alphas) == 1
    logs = train_logs(trainer)
    assert "snr/alpha" in logs[0] and not any("snr/alpha" in h for h in logs[1:])  # logged once
    notes = [r.getMessage() for r in caplog.records if "alpha=auto" in r.getMessage()]
    assert len(notes) == 1
    return alphas.pop(), logs[0]["snr/alpha"], notes[0]


def test_alpha_auto_one_pass_is_one(tmp_path, caplog):
    alpha, logged, note = _alpha_run(tmp_path, caplog, token_dataset(16), per_device_train_batch_size=4,
                                     num_train_epochs=1)
    assert alpha == logged == 1.0 and "one pass over n=16" in note


def test_alpha_auto_several_epochs(tmp_path, caplog):
    # b = per-device 2 x accumulation 2 x world 1 = 4, n = 16, 3 passes -> alpha = 4 / 12
    alpha, logged, note = _alpha_run(tmp_path, caplog, token_dataset(16), per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2, num_train_epochs=3, logging_steps=4)
    assert alpha == logged == pytest.approx(4 / 12) and "b=4" in note and "n=16" in note


def test_alpha_auto_iterable_dataset_is_one(tmp_path, caplog):
    alpha, logged, note = _alpha_run(tmp_path, caplog, token_iterable(16), per_device_train_batch_size=4,
                                     max_steps=6)  # 6 x 4 > 16: would be 1.5 passes if the length were known
    assert alpha == logged == 1.0 and "iterable" in note


# -- per-module opt-out ------------------------------------------------------------------------

class ShadowAdamW(TrainerCallback):
    """Replays torch.optim.AdamW on a copy of every parameter, with the gradients SNRAdamW is given."""

    def __init__(self, names):
        self.names = names

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.opt = unwrap_optimizer(optimizer)
        self.pairs, groups = [], []
        for g in self.opt.param_groups:
            copies = [p.detach().clone().requires_grad_(True) for p in g["params"]]
            self.pairs += list(zip(g["params"], copies))
            groups.append({"params": copies, "weight_decay": g["weight_decay"]})
        (b1, b2), eps = self.opt.param_groups[0]["betas"], self.opt.param_groups[0]["eps"]
        self.shadow = torch.optim.AdamW(groups, lr=0.0, betas=(b1, b2), eps=eps, foreach=False)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        for p, c in self.pairs:
            c.grad = p.grad.detach().clone()
        for g, sg in zip(self.opt.param_groups, self.shadow.param_groups):
            sg["lr"] = g["lr"]
        self.shadow.step()

    def diffs(self):
        by_id = {id(p): c for p, c in self.pairs}
        return {n: (p.detach() - by_id[id(p)].detach()).abs().max().item() for n, p in self.names}


def test_exclude_gives_plain_adamw(tmp_path):
    model = tiny_llama()
    names = list(model.named_parameters())
    shadow = ShadowAdamW(names)
    args = train_args(tmp_path, optim="snr_adamw", optim_args="exclude=mlp|lm_head,mask=hard,warmup_steps=0",
                      weight_decay=0.1, learning_rate=1e-2, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(16), callbacks=[shadow])
    trainer.train()
    opt = snr(trainer)
    decay = _decay_names(model)
    excluded = {n for n, _ in names if re.search("mlp|lm_head", n)}
    assert excluded and len(excluded) < len(names)
    for name, p in names:
        g = _group_of(opt, p)
        assert g["snr"] is (name not in excluded), name
        assert g["weight_decay"] == (0.1 if name in decay else 0.0), name
    diffs = shadow.diffs()
    for name in excluded:  # exactly AdamW
        assert diffs[name] < 1e-6, (name, diffs[name])
    # the gated rest is not AdamW (the hard gate starts closed): the comparison can tell them apart
    assert min(diffs[n] for n, _ in names if n not in excluded and "norm" not in n) > 1e-4
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        SNRAdamWFactory()(tiny_llama(), exclude="no_such_module")


# -- gradient accumulation ------------------------------------------------------------------------

class _GateRecorder(TrainerCallback):
    """Records, per optimizer step, the gradient the optimizer sees and the two sides of the gate."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.gaps: list[dict[str, torch.Tensor]] = []  # relative distance of mu^2 from alpha sigma^2

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        gaps = {}
        for name, p in model.named_parameters():
            st, group = opt.state[p], _group_of(opt, p)
            t = st["step"].item()
            mu2 = (st["exp_avg"] / (1 - group["betas"][0] ** t)).square()
            sig2 = group["alpha"] * st["exp_var"] / (1 - group["rho"] ** t)
            gaps[name] = (mu2 - sig2).abs() / (mu2 + sig2).clamp_min(1e-30)
        self.gaps.append(gaps)


def _accumulation_runs(tmp_path, optim_args):
    """Per-device batch 4 x GA 1 and 2 x GA 2 on the same data: equal-length sequences, no padding, so the
    token-mean loss over the accumulated batch equals the full-batch mean."""
    results = []
    for bs, ga in [(4, 1), (2, 2)]:
        args = train_args(tmp_path / f"ga{ga}", optim="snr_adamw", optim_args=optim_args,
                          per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=4,
                          logging_steps=1, train_sampling_strategy="sequential", max_grad_norm=0.0)
        recorder = _GateRecorder()
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(16), callbacks=[recorder])
        trainer.train()
        results.append((dict(trainer.model.named_parameters()), snr(trainer), train_logs(trainer), recorder))
    return results


# fp32 rounding of a gradient summed in another order: a few ulps of the largest term of the tensor. Two
# microbatch means of 2 against one of 4 differ by a handful of roundings; 64 ulps leaves room and still
# fails by orders of magnitude if a micro-batch were lost or double-weighted (a 2x or 1/2x gradient).
_GRAD_ULPS = 64 * torch.finfo(torch.float32).eps


def _assert_same_gradients(rec1, rec2):
    """At step 1 (same parameters in both runs) the two gradients agree within summation-order rounding.
    Later steps start from parameters that already differ by rounding, so only the trajectory is compared."""
    assert len(rec1.grads) == len(rec2.grads) == 4
    g1, g2 = rec1.grads[0], rec2.grads[0]
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = g1[name].abs().max().item()
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=_GRAD_ULPS * scale + 1e-30, msg=name)


def test_gradient_accumulation_feeds_the_full_batch_gradient(tmp_path):
    """GA 2 x 2 hands the optimizer the gradient of the whole batch of 4, within summation-order rounding.

    With the smooth default gate (mask=snr) the trajectories then agree within a tolerance derived from that
    rounding: each coordinate moves at most lr per step (Adam's normalized step, q <= 1), and a gradient
    perturbation of relative size r changes a step by about r * lr. Coordinates whose gradient is below 1e-3 of
    its tensor's largest (where a few-ulp absolute error is a large relative one) are held to the coarser bound."""
    (p1, o1, l1, r1), (p2, o2, l2, r2) = _accumulation_runs(tmp_path, "mask=snr,warmup_steps=1")
    _assert_same_gradients(r1, r2)
    assert o1.snr_state["steps"] == o2.snr_state["steps"] == 4
    lr, steps = 1e-2, 4
    for name in p1:
        diff = (p1[name] - p2[name]).abs()
        # every coordinate: bounded by the size of the steps themselves, far below it almost everywhere
        assert diff.max().item() <= 2 * lr * steps, name
        small = torch.stack([r1.grads[t][name].abs() < 1e-3 * r1.grads[t][name].abs().max() for t in range(4)]).any(0)
        big = diff[~small]
        if big.numel():
            assert big.max().item() <= 1e-3 * lr * steps, (name, big.max().item())
    for a, b in zip(l1, l2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for k in ("snr/mask_mean", "snr/signal", "snr/memorization_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-3), k


def test_gradient_accumulation_kinked_gate_agrees_off_the_kink(tmp_path):
    """With mask=soft the gate has a kink at mu^2 = alpha sigma^2: a rounding-size change of the gradient can move
    a coordinate across it. The trajectories agree on every coordinate that never came within 1e-4 (relative) of
    the kink in either run, and those are nearly all of them."""
    (p1, o1, l1, r1), (p2, o2, l2, r2) = _accumulation_runs(tmp_path, "mask=soft,warmup_steps=1")
    _assert_same_gradients(r1, r2)
    lr, steps = 1e-2, 4
    total = near_total = 0
    for name in p1:
        # from step 2 on: step 1 is the gate's warm-up (open), where mu^2 == sigma^2 exactly by construction
        near = torch.stack([r.gaps[t][name] < 1e-4 for r in (r1, r2) for t in range(1, 4)]).any(0)
        small = torch.stack([r1.grads[t][name].abs() < 1e-3 * r1.grads[t][name].abs().max() for t in range(4)]).any(0)
        off = ~(near | small)
        diff = (p1[name] - p2[name]).abs()
        if off.any():
            assert diff[off].max().item() <= 1e-3 * lr * steps, (name, diff[off].max().item())
        total += diff.numel()
        near_total += int((near & ~small).sum())
    # the excluded set is small, so the comparison covers nearly every coordinate that has a real gradient
    assert near_total <= 0.01 * total, (near_total, total)


# -- PEFT ---------------------------------------------------------------------------------------

def test_peft_lora_only_adapters(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    counter = StatsCounter(monkeypatch)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    n_lora = sum(p.numel() for p in lora.values())
    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=1", learning_rate=1e-2, max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(12))
    trainer.train()
    opt = snr(trainer)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in lora.values()} and len(in_opt) == len(lora)
    assert sum(opt.state[p]["exp_var"].numel() for p in in_opt) == n_lora
    # the gate and the statistics cover exactly the adapter coordinates
    # mask statistics count the coordinates that have had a gradient: at step 1 LoRA's A matrices get
    # none (B starts at zero), afterwards every adapter coordinate is covered, and nothing else is
    counts = [t["mask_count"] for t in counter.totals]
    assert len(counts) == 3 and 0 < counts[0] < n_lora and counts[1:] == [float(n_lora)] * 2, counts
    for n, p in model.named_parameters():
        if n not in lora:
            assert torch.equal(p.detach(), before[n]), n  # the base model is frozen
    assert all(not torch.equal(p.detach(), before[n]) for n, p in lora.items() if "lora_B" in n)
    _assert_snr_logs(trainer, [1, 2, 3])


# -- checkpoint / resume ------------------------------------------------------------------------

def test_resume_from_checkpoint_is_exact(tmp_path):
    def make(out):
        args = train_args(out, optim="snr_adamw", optim_args="mask=soft,warmup_steps=2", per_device_train_batch_size=2,
                          max_steps=10, save_strategy="steps", save_steps=5, logging_steps=1)
        return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=token_dataset(8))  # 4 steps per pass

    straight = make(tmp_path / "a")
    straight.train()
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-5"))
    pa, pb = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=0, atol=1e-6, msg=name)
    oa, ob = snr(straight), snr(resumed)
    assert ob.snr_state["steps"] == oa.snr_state["steps"] == 10
    for name in pa:
        for key in ("exp_avg", "exp_avg_sq", "exp_var"):
            torch.testing.assert_close(ob.state[pb[name]][key], oa.state[pa[name]][key], rtol=0, atol=1e-6)
    la = {h["step"]: h for h in train_logs(straight)}
    lb = {h["step"]: h for h in train_logs(resumed)}
    assert sorted(lb) == list(range(1, 11))  # 1..5 from the checkpoint's trainer state, 6..10 new
    for step in range(6, 11):
        assert lb[step]["snr/memorization_rate"] == pytest.approx(la[step]["snr/memorization_rate"], rel=1e-4)
    # the optimizer's running sum continues from the checkpoint's, it does not restart at 0
    assert ob.snr_state["cumulative_noise"] == pytest.approx(oa.snr_state["cumulative_noise"], rel=1e-5)
    # the training_args.bin the Trainer wrote loads back with the registered name
    saved = torch.load(tmp_path / "a" / "out" / "checkpoint-5" / "training_args.bin", weights_only=False)
    assert saved.optim == "snr_adamw" and saved.optim_args == "mask=soft,warmup_steps=2"


# -- bf16 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16])
def test_bf16_on_cpu_keeps_fp32_state(tmp_path, model_dtype):
    model = tiny_llama(dtype=model_dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=1,mask=soft", bf16=True, max_steps=3,
                      learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(12))
    trainer.train()
    opt = snr(trainer)
    expect = model_dtype or torch.float32
    for n, p in model.named_parameters():
        assert p.dtype == expect, n
        st = opt.state[p]
        assert all(st[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "exp_var")), n
        assert not torch.equal(p.detach(), before[n]), n
        assert torch.isfinite(p.detach().float()).all(), n
    _assert_snr_logs(trainer, [1, 2, 3])


# -- switching optimizers on resume, micro-batch variance, reporters -------------------------------------

def test_resume_from_an_adamw_checkpoint_with_snr_adamw(tmp_path, caplog):
    """A user trains with AdamW, changes optim to snr_adamw and resumes: the moments carry over, exp_var starts
    fresh with the gate open for its warm-up, and a log line says so."""
    def make(out, optim, optim_args=None):
        args = train_args(out, optim=optim, optim_args=optim_args, per_device_train_batch_size=2, max_steps=10,
                          save_strategy="steps", save_steps=5, logging_steps=1)
        return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=token_dataset(8))

    first = make(tmp_path / "a", "adamw_torch")
    first.train()
    adamw_state = torch.load(tmp_path / "a" / "out" / "checkpoint-5" / "optimizer.pt", weights_only=False)
    resumed = make(tmp_path / "b", "snr_adamw", "mask=snr,warmup_steps=2")
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-5"))
    assert "without exp_var" in caplog.text
    opt = snr(resumed)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(opt.state[p]["step"].item() == 10 and opt.state[p]["exp_var_start"].item() == 5 for p in params)
    assert all(torch.count_nonzero(opt.state[p]["exp_var"]) > 0 for p in params)
    logs = {h["step"]: h for h in train_logs(resumed)}
    assert logs[6]["snr/mask_mean"] == 1.0 and logs[7]["snr/mask_mean"] == 1.0  # the gate's warm-up: open
    assert logs[10]["snr/mask_mean"] < 1.0
    # the moments were continued, not restarted: step 6's exp_avg_sq builds on the AdamW checkpoint's
    assert len(adamw_state["state"]) == len(params)


def test_microbatch_variance_sees_every_micro_batch_through_the_trainer(tmp_path):
    counts = []

    class Count(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            counts.append(unwrap_optimizer(optimizer).last_microbatch_count)

    args = train_args(tmp_path, optim="snr_adamw", optim_args="variance=microbatch,noise=ema,warmup_steps=1",
                      per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=3)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(12), callbacks=[Count()])
    trainer.train()
    assert counts == [4, 4, 4]
    _assert_snr_logs(trainer, [1, 2, 3])


def test_microbatch_variance_is_refused_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match=r"variance='microbatch' needs k >= 2 .*gradient_accumulation_steps=1"):
        train_args(tmp_path, optim="snr_adamw", optim_args="variance=microbatch")


def test_snr_metrics_reach_tensorboard_event_files(tmp_path):
    """A reporter's view: TensorBoard's own reader finds the snr/* scalars in the event files the Trainer wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=1", max_steps=4, logging_steps=2,
                      report_to=["tensorboard"])
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(16))
    trainer.train()
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert files, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in SNR_KEYS:
        assert f"train/{key}" in tags, (key, sorted(tags))
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [2, 4]
    logged = {h["step"]: h for h in train_logs(trainer)}
    assert acc.Scalars("train/snr/mask_mean")[-1].value == pytest.approx(logged[4]["snr/mask_mean"], rel=1e-6)
