"""mask="none": AdamW's exact step with the SNR statistics still computed (a memorization monitor on a plain
AdamW run), on every path, and the lr-free noise-to-signal statistic."""

import pytest
import torch

from hf_snr import fused_cpu
from hf_snr.optimizer import SNRAdamW
from hf_snr.options import OptionError, parse_optim_args

PATHS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _path(name):
    if name == "fused" and not fused_cpu.available():
        pytest.skip("no C compiler for the fused CPU kernel")
    return PATHS[name]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_mask_none_is_adamw_on_every_path_and_still_reports(path, weight_decay):
    kw = _path(path)
    torch.manual_seed(0)
    shapes = [(16, 33), (7,), (5, 2, 3)]
    start = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = SNRAdamW(ours, mask="none", warmup_steps=0, noise="ema", **hp, **kw)
    adamw = torch.optim.AdamW(ref, foreach=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 41):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen) * (1.0 + 0.1 * step) + 0.3  # a drifting, noisy mean
            a.grad, b.grad = g.clone(), g.clone()
        if step % 10 == 0:
            opt.request_stats()
        opt.step()
        adamw.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7, msg=f"step {step}")
        if step % 10 == 0:
            st = opt.last_stats
            assert st["mask_mean"] == 1.0 and st["active_fraction"] == 1.0  # the gate is open everywhere
            assert st["noise"] > 0 and st["signal"] > 0  # ... and the monitor still measures
            assert st["noise_to_signal"] == pytest.approx(st["noise"] / st["signal"])


def test_mask_none_statistics_follow_alpha_and_the_noise_option():
    def stats(**kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32, 8))
        opt = SNRAdamW([p], mask="none", lr=1e-2, **kw)
        gen = torch.Generator().manual_seed(3)
        for _ in range(15):
            p.grad = torch.randn(32, 8, generator=gen)
            opt.step()
        opt.request_stats()
        p.grad = torch.randn(32, 8, generator=gen)
        opt.step()
        return p.detach().clone(), opt.last_stats

    p1, s1 = stats(alpha=1.0)
    p2, s2 = stats(alpha=0.5)
    p3, s3 = stats(alpha=1.0, noise="ema")
    assert torch.equal(p1, p2) and torch.equal(p1, p3)  # the step never depends on them
    assert s2["noise"] == pytest.approx(0.5 * s1["noise"])
    assert s3["noise"] < 0.2 * s1["noise"]  # noise="ema" scales sigma^2 by c_t ~ 0.05
    assert s1["signal"] == s2["signal"] == s3["signal"]


def test_mask_none_options():
    assert parse_optim_args("mask=none").mask == "none"
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(OptionError, match="mask='none' with reduction='row'"):
        SNRAdamW([p], mask="none", reduction="row")
    with pytest.raises(OptionError, match="mask='none' with reduction='tensor'"):
        parse_optim_args("mask=none,reduction=tensor")


# -- MemorizationStoppingCallback on a scripted run: clean labels, then pure noise from step SWITCH ----------------

SWITCH, BATCH, DIM = 60, 32, 16


class _Scripted(torch.utils.data.IterableDataset):
    """Sample i: x ~ N(0, 1); y = w.x while i < SWITCH * BATCH (clean), then noise (memorization only)."""

    def __iter__(self):
        w = torch.randn(DIM, generator=torch.Generator().manual_seed(123))
        i = 0
        while True:
            g = torch.Generator().manual_seed(10_000 + i)
            x = torch.randn(DIM, generator=g)
            y = (x @ w) if i < SWITCH * BATCH else 3.0 * torch.randn((), generator=g)
            yield {"x": x, "y": y}
            i += 1


class _Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(DIM, 1)

    def forward(self, x, y):
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


def _scripted_trainer(tmp_path, callback, max_steps=120):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True, optim="snr_adamw",
        optim_args="mask=none", learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant",
        per_device_train_batch_size=BATCH, max_steps=max_steps, logging_steps=5, save_strategy="steps", save_steps=5,
        save_only_model=False, seed=0, dataloader_num_workers=0)
    return Trainer(model=_Regressor(), args=args, train_dataset=_Scripted(), callbacks=[callback])


RULE = dict(smoothing=1.0, rise=1.0, patience=2, min_fraction=0.1, keep="before_rise")


def test_callback_keeps_the_checkpoint_before_memorization_and_stops(tmp_path):
    from hf_snr import MemorizationRule, MemorizationStoppingCallback

    cb = MemorizationStoppingCallback(MemorizationRule(**RULE), stop=True)
    trainer = _scripted_trainer(tmp_path, cb)
    trainer.train()
    ratios = {h["step"]: h["snr/noise_to_signal"] for h in trainer.state.log_history if "snr/noise_to_signal" in h}
    assert max(v for s, v in ratios.items() if s <= SWITCH) * 2 < min(v for s, v in ratios.items() if s > SWITCH)
    assert trainer.state.global_step == SWITCH + 10  # two logs (patience 2) past the switch, then stopped
    assert cb.kept_step == SWITCH and cb.best_checkpoint.endswith(f"checkpoint-{SWITCH}")
    from safetensors.torch import load_file

    saved = load_file(f"{cb.best_checkpoint}/model.safetensors")
    assert torch.equal(trainer.model.lin.weight.detach(), saved["lin.weight"])  # the kept weights were restored


def test_callback_without_stop_trains_on_and_names_the_checkpoint(tmp_path):
    from hf_snr import MemorizationStoppingCallback

    cb = MemorizationStoppingCallback(stop=False, restore=False, **RULE)
    trainer = _scripted_trainer(tmp_path, cb, max_steps=90)
    trainer.train()
    assert trainer.state.global_step == 90
    assert cb.kept_step == SWITCH and cb.summary()["stop_step"] == SWITCH + 10


def test_callback_resumes_with_the_trainers_checkpoints(tmp_path):
    from hf_snr import MemorizationRule, MemorizationStoppingCallback

    first = MemorizationStoppingCallback(MemorizationRule(**RULE), stop=True)
    _scripted_trainer(tmp_path, first, max_steps=SWITCH + 5).train()  # interrupted after the switch
    resumed = MemorizationStoppingCallback(MemorizationRule(**RULE), stop=True)
    trainer = _scripted_trainer(tmp_path, resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{SWITCH + 5}"))
    assert trainer.state.global_step == SWITCH + 10  # the rule's state came back from the checkpoint's log
    assert resumed.kept_step == SWITCH and resumed.best_checkpoint.endswith(f"checkpoint-{SWITCH}")


def test_rule_validates_its_parameters():
    from hf_snr import MemorizationRule

    for bad, match in ((dict(smoothing=0), "smoothing"), (dict(rise=-1), "rise"), (dict(patience=0), "patience"),
                       (dict(min_fraction=1.0), "min_fraction"), (dict(keep="best"), "keep")):
        with pytest.raises(ValueError, match=match):
            MemorizationRule(**bad)
