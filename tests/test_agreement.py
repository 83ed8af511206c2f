"""agreement=<threshold>: micro-batch gradient agreement filtering (hf_snr._agreement).

What a user relies on: a micro-batch that points against the others is dropped and the step is the step on the
others alone; when every micro-batch is kept the gradient is the plain average; bad thresholds are refused
early; a resumed run continues exactly; the Trainer calls the filter after every micro-batch and logs its
shares; 2-process DDP and FSDP2 decide and step as one process seeing the same micro-batches.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_snr import SNRAdamW
from hf_snr.options import OptionError, parse_optim_args

ROOT = Path(__file__).resolve().parents[1]


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def batches(k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(4, 5, generator=gen)
        y = x[:, :2] + 0.05 * torch.randn(4, 2, generator=gen)
        out.append((x, y))
    return out


def accumulate(model, opt, micro, *, filtered: bool, negate=(), scale=None):
    """Backward over the micro-batches (loss / k, as the Trainer does); returns the keep decisions."""
    k = len(micro) if scale is None else scale
    decisions = []
    for j, (x, y) in enumerate(micro):
        loss = nn.functional.mse_loss(model(x), y) / k
        (-loss if j in negate else loss).backward()
        if filtered:
            decisions.append(opt.end_microbatch())
    return decisions


@pytest.mark.parametrize("mask", ["none", "snr"])
def test_a_negated_micro_batch_is_dropped_and_the_step_equals_the_step_on_the_others(mask):
    micro = batches(4, seed=1)
    a, b = net(), net()
    opt_a = SNRAdamW(a.parameters(), lr=1e-2, mask=mask, warmup_steps=0, agreement=0.0)
    opt_b = SNRAdamW(b.parameters(), lr=1e-2, mask=mask, warmup_steps=0)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        # micro-batch 2's gradient is the negative of micro-batch 1's: it disagrees with the kept sum
        m = list(micro)
        decisions = []
        for j, (x, y) in enumerate(m):
            if j == 2:
                x, y = m[1]
            loss = nn.functional.mse_loss(a(x), y) / 4
            (-loss if j == 2 else loss).backward()
            decisions.append(opt_a.end_microbatch())
        assert decisions == [1.0, 1.0, 0.0, 1.0]
        accumulate(b, opt_b, [m[0], m[1], m[3]], filtered=False)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    stats = opt_a.agreement_stats()
    assert stats["kept"] == pytest.approx(0.75) and stats["kept_tested"] == pytest.approx(2 / 3)
    assert opt_a.agreement_stats() == {}  # read once


def test_all_kept_is_the_plain_average():
    micro = batches(5, seed=2)
    a, b = net(), net()
    opt_a = SNRAdamW(a.parameters(), lr=1e-2, warmup_steps=0, agreement=-1.0)  # cos >= -1: keeps everything
    opt_b = SNRAdamW(b.parameters(), lr=1e-2, warmup_steps=0)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        assert accumulate(a, opt_a, micro, filtered=True) == [1.0] * 5
        accumulate(b, opt_b, micro, filtered=False)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_the_kept_mean_is_rescaled_when_some_are_dropped():
    """Dropping j of k micro-batches gives the mean of the k - j kept (not their sum / k)."""
    p = nn.Parameter(torch.zeros(3))
    opt = SNRAdamW([p], lr=0.0, agreement=0.5)
    gs = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-1.0, -1.0, 0.1]), torch.tensor([3.0, 2.0, 0.0])]
    for g in gs:
        (p * g).sum().div(3).backward()
        opt.end_microbatch()
    torch.testing.assert_close(p.grad, (gs[0] + gs[2]) / 2)


def test_tensor_scope_drops_per_tensor():
    w1, w2 = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    opt = SNRAdamW([w1, w2], lr=0.0, agreement=0.0, agreement_scope="tensor")
    g1 = [torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 2, 3, 4]) * -1]
    g2 = [torch.tensor([1.0, 0]), torch.tensor([2.0, 0])]
    for a, b in zip(g1, g2):
        ((w1 * a).sum() + (w2 * b).sum()).div(2).backward()
        share = opt.end_microbatch()
    assert share == pytest.approx(2 / 6)  # w2 (2 of 6 elements) kept, w1 dropped
    torch.testing.assert_close(w1.grad, g1[0])
    torch.testing.assert_close(w2.grad, (g2[0] + g2[1]) / 2)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -1.01, float("inf"), True, "half"])
def test_bad_thresholds_are_refused_at_construction(bad):
    with pytest.raises(OptionError, match=r"agreement value.*accepted: off, or a cosine threshold in \[-1, 1\]"):
        SNRAdamW([nn.Parameter(torch.zeros(2))], agreement=bad)


@pytest.mark.parametrize("text", ["agreement=nan", "agreement=2", "agreement=-3"])
def test_bad_thresholds_are_refused_in_optim_args(text):
    with pytest.raises(OptionError, match="agreement"):
        parse_optim_args(text)


def test_bad_scope_is_refused():
    with pytest.raises(OptionError, match="agreement_scope.*model, tensor"):
        SNRAdamW([nn.Parameter(torch.zeros(2))], agreement=0.0, agreement_scope="layer")


def test_step_without_end_microbatch_says_what_to_call():
    model = net()
    opt = SNRAdamW(model.parameters(), agreement=0.0)
    nn.functional.mse_loss(model(torch.randn(3, 5)), torch.zeros(3, 2)).backward()
    with pytest.raises(RuntimeError, match=r"end_microbatch\(\) after each backward"):
        opt.step()


def test_end_microbatch_needs_the_option():
    opt = SNRAdamW(net().parameters())
    with pytest.raises(RuntimeError, match="agreement is off"):
        opt.end_microbatch()


def test_non_finite_micro_batch_is_kept_so_the_step_is_skipped():
    p = nn.Parameter(torch.ones(3))
    opt = SNRAdamW([p], lr=0.1, agreement=0.5)
    (p * torch.tensor([1.0, 1, 1])).sum().backward()
    opt.end_microbatch()
    (p * torch.tensor([float("nan"), 1, 1])).sum().backward()
    assert opt.end_microbatch() == 1.0
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.ones(3))


def _train(model, opt, steps, start=0):
    for step in range(start, steps):
        opt.zero_grad()
        micro = batches(4, seed=100 + step)
        accumulate(model, opt, micro, filtered=True, negate=(step % 4,) if step % 2 else ())
        opt.step()


def test_resume_mid_run_is_exact():
    hp = dict(lr=2e-2, warmup_steps=2, reduction="row", noise="ema", agreement=0.0)
    a = net()
    opt_a = SNRAdamW(a.parameters(), **hp)
    _train(a, opt_a, 8)

    b = net()
    opt_b = SNRAdamW(b.parameters(), **hp)
    _train(b, opt_b, 4)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = net(seed=123)
    c.load_state_dict(saved["model"])
    opt_c = SNRAdamW(c.parameters(), **hp)
    opt_c.load_state_dict(saved["opt"])
    _train(c, opt_c, 8, start=4)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_deepcopy_filters_identically():
    a = net()
    opt_a = SNRAdamW(a.parameters(), lr=1e-2, agreement=0.0)
    _train(a, opt_a, 2)
    b = copy.deepcopy(a)
    opt_b = SNRAdamW(b.parameters(), lr=1e-2, agreement=0.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(a, opt_a, 5, start=2)
    _train(b, opt_b, 5, start=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_cleared_gradients_without_a_step_start_a_new_accumulation():
    """A skipped AMP step zeroes the gradients without calling step(): the next micro-batch starts afresh."""
    p = nn.Parameter(torch.zeros(2))
    opt = SNRAdamW([p], lr=0.0, agreement=0.9)
    (p * torch.tensor([1.0, 0.0])).sum().backward()
    opt.end_microbatch()
    opt.zero_grad()  # (set_to_none) no step
    (p * torch.tensor([0.0, 1.0])).sum().backward()
    assert opt.end_microbatch() == 1.0  # first of a new accumulation, not tested against the old sum
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 1.0]))


# -- through the Trainer ------------------------------------------------------------------------
def test_trainer_filters_each_micro_batch_and_logs_the_shares(tmp_path):
    from _snr_hf_utils import snr, tiny_llama, token_dataset, train_args
    from transformers import Trainer

    args = train_args(tmp_path, optim="snr_adamw", optim_args="mask=none,agreement=0", per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, max_steps=6, logging_steps=2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(32))
    trainer.create_optimizer()
    opt = snr(trainer)
    calls = []
    original = opt.end_microbatch

    def counted(**kw):
        calls.append(kw["synced"])
        return original(**kw)

    opt.end_microbatch = counted
    trainer.train()
    assert calls == [False, False, False, True] * 6  # after every micro-batch; synced on the step's last one
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert 0.25 <= r["snr/agreement_kept"] <= 1.0 and -1.0 <= r["snr/agreement_cosine"] <= 1.0, r


def test_trainer_refuses_one_micro_batch_per_step(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match=r"agreement=0\.1 needs gradient_accumulation_steps >= 2, got 1"):
        TrainingArguments(output_dir=str(tmp_path), optim="snr_adamw", optim_args="agreement=0.1",
                          gradient_accumulation_steps=1, report_to="none", use_cpu=True)


def test_agreement_is_refused_under_deepspeed_and_fsdp_without_sync_each_batch():
    from hf_snr.checks import check_agreement

    with pytest.raises(ValueError, match="DeepSpeed accumulates micro-batch gradients in its own partition"):
        check_agreement(agreement=0.0, grad_accum=4, backend="DeepSpeed", sync_each_batch=False)
    with pytest.raises(ValueError, match="sync_each_batch"):
        check_agreement(agreement=0.0, grad_accum=4, backend="FSDP", sync_each_batch=False)
    check_agreement(agreement=0.0, grad_accum=4, backend="FSDP", sync_each_batch=True)
    check_agreement(agreement=None, grad_accum=1, backend="DeepSpeed", sync_each_batch=False)


# -- 2 processes ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_and_fsdp2_decide_and_step_as_one_process_on_the_same_micro_batches():
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    worker = ROOT / "tests" / "distributed" / "agreement.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    ok = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("AGREEMENT-OK"))
    assert ok == ["ddp", "ddp-synced-unknown", "fsdp2", "fsdp2-momentum", "fsdp2-tensor-scope"], log[-8000:]


def test_momentum_reference_tests_every_micro_batch_against_the_first_moment():
    p = nn.Parameter(torch.zeros(3))
    opt = SNRAdamW([p], lr=1e-2, mask="none", agreement=0.0, agreement_reference="momentum")
    # step 1: no first moment yet, the kept-sum rule (the first micro-batch is kept untested)
    for g in ([1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [1.0, 0.0, 0.0]):
        (p * torch.tensor(g)).sum().div(3).backward()
        opt.end_microbatch()
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 0.5, 0.0]))  # mean of the two kept
    opt.step()
    m = opt.state[p]["exp_avg"].clone()
    opt.zero_grad()
    # step 2: the first micro-batch points against m and is dropped; the others agree with m
    shares = []
    for g in ([-1.0, -0.5, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]):
        (p * torch.tensor(g)).sum().div(3).backward()
        shares.append(opt.end_microbatch())
    assert shares == [0.0, 1.0, 1.0] and torch.dot(m, torch.tensor([-1.0, -0.5, 0.0])) < 0
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 0.5, 0.5]))
    opt.step()
    opt.zero_grad()
    # every micro-batch against m: all dropped gives a zero gradient (the step moves on momentum only)
    m = opt.state[p]["exp_avg"].clone()
    for _ in range(2):
        (p * -m).sum().div(2).backward()
        assert opt.end_microbatch() == 0.0
    assert torch.count_nonzero(p.grad) == 0
    opt.step()
