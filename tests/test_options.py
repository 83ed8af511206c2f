"""optim_args parsing and validation (hf_snr.options) and the DeepSpeed config guard, without a Trainer."""

import re
from types import SimpleNamespace

import pytest

from hf_snr.integration import SNRCallback, check_deepspeed_config
from hf_snr.optimizer import DEFAULT_WARMUP_STEPS
from hf_snr.options import OPTIM_ARGS_KEYS as OPTIONS
from hf_snr.options import SNROptions, finite_data_alpha, parse_optim_args


def test_every_knob_is_parsed_typed():
    o = parse_optim_args(
        "mask=soft, softness=3,alpha=0.25,rho=0.9,reduction=tensor,warmup_steps=4,nonfinite=raise,"
        "foreach=false,exclude=mlp|lm_head,noise=ema,signal=ema,variance=microbatch,decay_to=init,"
        "max_consecutive_skips=5,agreement=-0.25,agreement_scope=Tensor,agreement_reference=momentum"
    )
    assert o == SNROptions(mask="soft", softness=3.0, alpha=0.25, rho=0.9, reduction="tensor", warmup_steps=4,
                           nonfinite="raise", foreach=False, exclude="mlp|lm_head", noise="ema", signal="ema",
                           variance="microbatch", decay_to="init", max_consecutive_skips=5, agreement=-0.25,
                           agreement_scope="tensor", agreement_reference="momentum")
    assert parse_optim_args("agreement=OFF").agreement is None and SNROptions().agreement is None
    assert parse_optim_args("fused=true,state_dtype=bfloat16").fused is True
    assert type(o.softness) is float and type(o.alpha) is float and type(o.warmup_steps) is int
    assert o.optimizer_kwargs() == dict(mask="soft", softness=3.0, alpha=0.25, rho=0.9, reduction="tensor",
                                        warmup_steps=4, nonfinite="raise", foreach=False, noise="ema", signal="ema",
                                        variance="microbatch", decay_to="init", fused=False, state_dtype="float32",
                                        max_consecutive_skips=5, agreement=-0.25, agreement_scope="tensor",
                                        agreement_reference="momentum")
    # every option in the table is covered by this test (a new knob must be added here)
    assert set(OPTIONS) == {"mask", "softness", "alpha", "rho", "reduction", "warmup_steps", "nonfinite", "foreach",
                            "exclude", "noise", "signal", "variance", "decay_to", "fused", "state_dtype",
                            "max_consecutive_skips", "agreement", "agreement_scope",
                            "agreement_reference"}


def test_defaults_and_aliases():
    assert parse_optim_args(None) == parse_optim_args("") == SNROptions()
    assert SNROptions().warmup_steps == DEFAULT_WARMUP_STEPS
    o = parse_optim_args("beta3=0.95,warmup=0,alpha=AUTO,foreach=auto")
    assert (o.rho, o.warmup_steps, o.alpha, o.foreach) == (0.95, 0, "auto", None)
    assert o.optimizer_kwargs()["alpha"] == 1.0  # until the trainer resolves 'auto'
    assert parse_optim_args({"softness": 2, "foreach": True}).softness == 2.0


def test_unknown_key_lists_what_is_accepted():
    with pytest.raises(ValueError) as err:
        parse_optim_args("mask=soft,beta4=1")
    msg = str(err.value)
    assert "'beta4'" in msg
    for key in OPTIONS:
        assert key in msg
    # lr & co. come from TrainingArguments, and the message says where
    with pytest.raises(ValueError, match="learning_rate"):
        parse_optim_args("lr=1e-3")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("mask=medium", r"mask.*snr, soft, hard"),
        ("softness=-1", r"softness.*>= 0"),
        ("softness=abc", r"softness='abc'.*finite number"),
        ("softness=nan", r"softness"),
        ("alpha=-0.5", r"alpha.*>= 0"),
        ("alpha=inf", r"alpha"),
        ("alpha=sometimes", r"alpha='sometimes'.*auto"),
        ("rho=1", r"rho.*\[0, 1\)"),
        ("reduction=layer", r"reduction.*element, row, tensor"),
        ("noise=batch", r"noise.*one of step, ema"),
        ("signal=mean", r"signal.*one of ema, step"),
        ("variance=rank", r"variance.*one of ema, microbatch"),
        ("decay_to=ref", r"decay_to.*one of zero, init"),
        ("signal=step,noise=ema", r"combination signal='step' with noise='ema'"),
        ("warmup_steps=2.5", r"warmup_steps.*integer"),
        ("warmup_steps=-1", r"warmup_steps.*>= 0"),
        ("nonfinite=ignore", r"nonfinite.*skip, raise, propagate"),
        ("foreach=maybe", r"foreach.*true, false or auto"),
        ("exclude=(mlp", r"exclude.*regular expression"),
        ("mask", r"key=value"),
        ("mask=soft,mask=hard", r"given twice"),
        ("rho=0.9,beta3=0.8", r"given twice"),
    ],
)
def test_bad_values_name_the_problem(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_optim_args(text)


@pytest.mark.parametrize("raw", [{"exclude": 5}, {"softness": True}, {"warmup_steps": 1.5}, {"mask": 1},
                                 {"foreach": "x"}])
def test_bad_python_values(raw):
    with pytest.raises(ValueError, match="Invalid optim_args value"):
        parse_optim_args(raw)


def test_finite_data_alpha():
    assert finite_data_alpha(None, 4, 1.0)[0] == 1.0
    assert finite_data_alpha(100, 4, 1.0)[0] == 1.0
    alpha, reason = finite_data_alpha(100, 4, 3.0)
    assert alpha == pytest.approx(4 / 96) and "b/(n-b)" in reason
    assert finite_data_alpha(4, 8, 5.0)[0] == 1.0  # full batch: formula diverges, 1 kept


def _callback_for(n, per_device, ga, max_steps, batches_per_epoch, world_size=1):
    trainer = SimpleNamespace(train_dataset=list(range(n)) if n is not None else iter(()))
    cb = SNRCallback(trainer)
    args = SimpleNamespace(per_device_train_batch_size=per_device, gradient_accumulation_steps=ga,
                           world_size=world_size, num_train_epochs=1.0)
    cb._updates_per_epoch = cb._steps_per_epoch(args, range(batches_per_epoch))
    return cb._auto_alpha(args, SimpleNamespace(max_steps=max_steps))


def test_auto_alpha_counts_passes_like_the_trainer():
    # n=10, b=4: one pass is 3 steps (the last batch is short) -> still one pass, alpha = 1
    assert _callback_for(10, 4, 1, 3, 3)[0] == 1.0
    # 6 steps = 2 passes -> b/(n-b) = 4/6
    assert _callback_for(10, 4, 1, 6, 3)[0] == pytest.approx(4 / 6)
    # gradient accumulation counts in b: per-device 2 x GA 2, 5 batches per pass -> 3 updates per pass
    assert _callback_for(10, 2, 2, 6, 5)[0] == pytest.approx(4 / 6)
    # data parallel: b = per-device 2 x GA 1 x 2 ranks = 4; each rank's dataloader has 16/2/2 = 4 batches
    assert _callback_for(16, 2, 1, 4, 4, world_size=2)[0] == 1.0
    assert _callback_for(16, 2, 1, 8, 4, world_size=2)[0] == pytest.approx(4 / 12)
    # no length (iterable data set): one pass assumed
    assert _callback_for(None, 4, 1, 50, 0)[0] == 1.0


def test_deepspeed_guard_direct():
    check_deepspeed_config(None)
    check_deepspeed_config({"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=re.escape('Remove the "optimizer" section')):
        check_deepspeed_config({"optimizer": {"type": "AdamW", "params": {}}, "zero_optimization": {"stage": 1}})
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match='"zero_force_ds_cpu_optimizer": false'):
        check_deepspeed_config(offload)
    check_deepspeed_config({**offload, "zero_force_ds_cpu_optimizer": False})
    check_deepspeed_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})


def test_readme_options_table_is_the_options_table():
    """The README's optim_args table is generated from hf_snr.options (one source of truth)."""
    from pathlib import Path

    from hf_snr.options import options_markdown

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = "<!-- options-table:start -->\n", "\n<!-- options-table:end -->"
    assert start in text and end in text
    shown = text.split(start, 1)[1].split(end, 1)[0]
    assert shown == options_markdown(), "regenerate with: python -c 'from hf_snr.options import options_markdown; " \
                                        "print(options_markdown())'"


def test_optimizer_docstring_and_signature_come_from_the_options_table():
    """SNRAdamW's Args section is generated from OPTIONS, and its keywords are exactly the table's optimizer options."""
    import inspect

    from hf_snr.optimizer import SNRAdamW
    from hf_snr.options import OPTIONS as TABLE
    from hf_snr.options import options_docstring

    assert options_docstring() in SNRAdamW.__doc__
    for name, opt in TABLE.items():
        if name != "exclude":  # the factory's, not the optimizer's
            assert f"        {name} ({opt.type}): {opt.help.split()[0]}" in SNRAdamW.__doc__, name
    keywords = set(inspect.signature(SNRAdamW).parameters) - {"params", "process_group"}
    assert keywords == set(TABLE) - {"exclude"}
    defaults = {k: p.default for k, p in inspect.signature(SNRAdamW).parameters.items() if k in keywords}
    assert defaults == {k: TABLE[k].default for k in keywords}
