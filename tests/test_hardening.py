"""The optimizer's side of the hardening pass: broken state is refused, skips are bounded and named, huge
finite gradients stay finite, the user's options win on resume, and SNRAdamW behaves as a torch optimizer
(copies, old checkpoints, stable state dicts, foreign state entries, one decision on every path).

Each test reproduces a way a user could lose a run or a result; each failed on the code before the fix.
"""

import copy
import logging
import pickle
import warnings

import pytest
import torch
from _snr_hf_utils import snr, tiny_llama, token_dataset, train_args
from transformers import Trainer

from hf_snr import fused_cpu
from hf_snr.optimizer import SNRAdamW
from hf_snr.options import DEFAULT_MAX_CONSECUTIVE_SKIPS, OptionError, parse_optim_args

FP32_MAX = torch.finfo(torch.float32).max
PATHS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
needs_kernel = pytest.mark.skipif(not fused_cpu.available(), reason="no C compiler for the fused CPU kernel")


def _path(name):
    if name == "fused" and not fused_cpu.available():
        pytest.skip("no C compiler for the fused CPU kernel")
    return PATHS[name]


def _trained(steps=3, seed=0, **kw):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(5))
    opt = SNRAdamW([w, b], lr=1e-2, **kw)
    for _ in range(steps):
        w.grad, b.grad = torch.randn(6, 5), torch.randn(5)
        opt.step()
    return opt, w, b


def _step_all(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


# -- 2. broken state is refused at load, with the tensor's name --------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("exp_avg_sq", float("nan"), "exp_avg_sq holds 1 nan/inf"),
    ("exp_avg_sq", -1.0, "exp_avg_sq holds 1 negative"),
    ("exp_var", -0.5, "exp_var holds 1 negative"),
    ("exp_var", float("inf"), "exp_var holds 1 nan/inf"),
    ("exp_avg", float("nan"), "exp_avg holds 1 nan/inf"),
])
def test_load_refuses_non_finite_or_negative_state(key, value, match):
    opt, w, b = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key][2, 3] = value
    fresh, _, _ = _trained(steps=0)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        fresh.load_state_dict(sd)
    assert "parameter 0 of group 0 (shape (6, 5)" in str(err.value)
    assert fresh.state_dict() == before  # nothing was loaded


def test_load_refuses_a_state_of_another_shape():
    opt, w, b = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(7)
    fresh, _, _ = _trained(steps=0)
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 .*exp_avg has shape \(7,\), the parameter \(5,\)"):
        fresh.load_state_dict(sd)


def test_load_refuses_a_bad_step_count():
    opt, _, _ = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="step = nan"):
        _trained(steps=0)[0].load_state_dict(sd)


def test_consecutive_skips_stop_the_run():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SNRAdamW([p], lr=1e-2, max_consecutive_skips=3)
    p.grad = torch.randn(4, 3)
    opt.step()
    p.grad = torch.randn(4, 3)
    p.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(), opt.step(), opt.step()  # 3 in a row: allowed
        with pytest.raises(RuntimeError, match=r"4 optimizer steps in a row had a non-finite gradient \(up to step 5\)"
                                               r".*max_consecutive_skips=3"):
            opt.step()
    # a taken step resets the run
    opt2 = SNRAdamW([p], lr=1e-2, max_consecutive_skips=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            p.grad = torch.full((4, 3), float("nan"))
            opt2.step(), opt2.step()
            p.grad = torch.randn(4, 3)
            opt2.step()
    assert opt2.skipped_steps == 10 and opt2.snr_state["consecutive_skips"] == 0
    assert SNRAdamW([p]).max_consecutive_skips == DEFAULT_MAX_CONSECUTIVE_SKIPS > 0
    assert parse_optim_args("max_consecutive_skips=0").max_consecutive_skips == 0
    with pytest.raises(OptionError, match=r"max_consecutive_skips value: -1 \(accepted: an integer >= 0"):
        SNRAdamW([p], max_consecutive_skips=-1)


def test_resume_from_a_nan_checkpoint_is_refused_through_the_trainer(tmp_path):
    """The reported run: a checkpoint with a NaN exp_avg_sq used to skip every later step and save NaN weights."""
    def make(out):
        args = train_args(out, optim="snr_adamw", per_device_train_batch_size=2, max_steps=4, save_strategy="steps",
                          save_steps=2)
        return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=token_dataset(8))

    make(tmp_path / "a").train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    sd = torch.load(ckpt / "optimizer.pt", weights_only=False)
    next(iter(sd["state"].values()))["exp_avg_sq"].view(-1)[0] = float("nan")
    torch.save(sd, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="exp_avg_sq holds 1 nan/inf"):
        make(tmp_path / "b").train(resume_from_checkpoint=str(ckpt))


# -- 3. the optimizer's side of visible skips ---------------------------------------------------------------

def test_skip_warnings_name_the_optimizer_step_and_are_rate_limited():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SNRAdamW([p], lr=1e-2, max_consecutive_skips=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 61):  # step 6 is the second skip: "skipped step 6", not 5
            p.grad = torch.full((4, 3), float("nan")) if step in (2, 6) or step >= 11 else torch.randn(4, 3)
            opt.step()
    msgs = [str(w.message) for w in caught if "SNRAdamW skipped" in str(w.message)]
    assert msgs[0].startswith("SNRAdamW skipped step 2:") and msgs[1].startswith("SNRAdamW skipped step 6:")
    assert opt.skipped_steps == 52
    assert len(msgs) == 6  # at 1, 2, 4, 8, 16, 32 skips, not 52 warnings
    assert "skipped step 12:" in msgs[2] and "(4 skipped so far, 2 in a row" in msgs[2]


def test_a_skipped_requested_step_leaves_no_stale_statistics():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SNRAdamW([p], lr=1e-2, warmup_steps=0)
    p.grad = torch.randn(4, 3)
    opt.request_stats()
    opt.step()
    assert opt.last_stats["signal"] > 0 and not opt.last_step_skipped
    p.grad = torch.full((4, 3), float("nan"))
    opt.request_stats()
    with pytest.warns(RuntimeWarning, match="skipped step 2"):
        opt.step()
    assert opt.last_step_skipped and opt.last_stats == {} and opt.skipped_steps == 1
    p.grad = torch.randn(4, 3)
    opt.step()  # the request carries over to the next step taken
    assert not opt.last_step_skipped and opt.last_stats["skipped_steps"] == 1.0 and opt.last_stats["signal"] > 0


# -- 4. a huge finite gradient never makes a parameter nan ---------------------------------------------------

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask", ["snr", "soft", "hard"])
@pytest.mark.parametrize("reduction", ["element", "row", "tensor"])
def test_huge_finite_gradients_keep_parameters_finite(path, mask, reduction):
    kw = _path(path)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = SNRAdamW([p], lr=1e-2, warmup_steps=0, mask=mask, reduction=reduction, **kw)
    adamw = torch.optim.AdamW([ref], lr=1e-2)
    opt.request_stats()
    for t in range(5):
        g = torch.randn(8, 16) * 1e-3
        if t == 1:
            g[0, 0], g[1, 3], g[2, 5], g[3, 1] = 1e21, FP32_MAX, -FP32_MAX, 1e30
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        if t == 1:
            opt.request_stats()
    assert torch.isfinite(ref).all()  # torch's AdamW stays finite on these gradients: so must we
    assert torch.isfinite(p).all(), (path, mask, reduction)
    assert opt.skipped_steps == 0
    assert all(map(lambda v: v == v, opt.last_stats.values()))  # no nan statistic either


# -- 5. the user's options win on resume, and the differences are named ----------------------------------------

def _resume_run(out, optim_args):
    args = train_args(out, optim="snr_adamw", optim_args=optim_args, per_device_train_batch_size=2, max_steps=4,
                      save_strategy="steps", save_steps=2)
    return Trainer(model=tiny_llama(seed=0), args=args, train_dataset=token_dataset(8))


@pytest.mark.parametrize("saved_args, resumed_args, expect", [
    ("", "mask=hard,softness=3", dict(mask="hard", softness=3.0)),
    ("mask=hard,softness=3", "", dict(mask="snr", softness=1.0)),
])
def test_resume_uses_this_runs_options_and_names_the_differences(tmp_path, caplog, saved_args, resumed_args, expect):
    _resume_run(tmp_path / "a", saved_args).train()
    resumed = _resume_run(tmp_path / "b", resumed_args)
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    opt = snr(resumed)
    for group in opt.param_groups:
        assert {k: group[k] for k in expect} == expect
    line = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert len(line) == 1
    saved = parse_optim_args(saved_args)
    assert f"mask: checkpoint {saved.mask!r}, this run {expect['mask']!r} (used)" in line[0]
    assert f"softness: checkpoint {saved.softness!r}, this run {expect['softness']!r} (used)" in line[0]
    assert "weight_decay" not in line[0] and "lr" not in line[0].replace("alpha", "")


def test_resume_with_the_same_options_says_nothing_and_state_dtype_follows(caplog):
    opt, w, b = _trained(state_dtype="float32")
    sd = copy.deepcopy(opt.state_dict())
    same, _, _ = _trained(steps=0)
    with caplog.at_level(logging.WARNING, logger="hf_snr"):
        same.load_state_dict(copy.deepcopy(sd))
    assert "differ from the checkpoint" not in caplog.text
    bf16, w2, _ = _trained(steps=0, state_dtype="bfloat16")
    bf16.load_state_dict(copy.deepcopy(sd))
    assert bf16.state[w2]["exp_var"].dtype == torch.bfloat16  # this run's state_dtype, as the rule says


# -- 7. copies and pickles step like the original --------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("variance", ["ema", "microbatch"])
def test_a_copied_optimizer_steps_identically(how, variance):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = SNRAdamW(model.parameters(), lr=1e-2, warmup_steps=0, nonfinite="raise", variance=variance,
                   decay_to="init", weight_decay=0.1)
    x = torch.randn(8, 5)

    def train_step(m, o):
        for half in (x[:4], x[4:]):  # two micro-batches (variance="microbatch" needs k >= 2)
            (m(half).square().mean() / 2).backward()
        o.request_stats()
        o.step()
        o.zero_grad()

    train_step(model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.nonfinite == "raise" and opt2.snr_state == opt.snr_state
    for _ in range(3):
        train_step(model, opt)
        train_step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.state_dict()["snr_state"] == opt.state_dict()["snr_state"]
    assert opt2.last_stats == opt.last_stats


# -- 8, 9, 10. checkpoints as torch's AdamW handles them ----------------------------------------------------

@pytest.mark.parametrize("path", list(PATHS))
def test_an_older_state_dict_with_python_step_counts_loads_and_steps(path):
    kw = _path(path)
    opt, w, b = _trained(**kw)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"].item())  # as older checkpoints hold it
    fresh, w2, b2 = _trained(steps=0, **kw)
    with torch.no_grad():
        w2.copy_(w), b2.copy_(b)
    fresh.load_state_dict(sd)
    assert isinstance(fresh.state[w2]["step"], torch.Tensor)
    gen1, gen2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _step_all(opt, [w, b], gen1)
    _step_all(fresh, [w2, b2], gen2)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_state_dict_is_stable_across_a_load():
    opt, _, _ = _trained()
    sd = opt.state_dict()
    fresh, _, _ = _trained(steps=0)
    fresh.load_state_dict(copy.deepcopy(sd))
    again = fresh.state_dict()
    assert again["param_groups"] == sd["param_groups"]  # no "differentiable" key gained
    assert "differentiable" not in again["param_groups"][0]


def test_state_dict_passes_non_dict_state_entries_through():
    opt, w, _ = _trained()

    def pre_hook(optimizer):
        optimizer.state["user_note"] = 42

    opt.register_state_dict_pre_hook(pre_hook)
    opt.state[w]["device_skips"] = torch.zeros(1)  # what the CUDA fused path leaves, filtered out of checkpoints
    sd = opt.state_dict()
    assert all("device_skips" not in st for st in sd["state"].values() if isinstance(st, dict))


# -- 11. fused and foreach take the same decision at a tie ----------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("mask", ["snr", "soft", "hard"])
@pytest.mark.parametrize("reduction", ["element", "row", "tensor"])
def test_fused_and_torch_paths_agree_without_warmup(mask, reduction):
    """At t = 1 mu^2 equals sigma^2 exactly; fp32 sums in torch and double sums in C fell on different sides of
    a hard threshold (a whole lr-sized step). Every path now sums rows in double."""
    for seed in range(6):
        results = []
        for kw in PATHS.values():
            torch.manual_seed(seed)
            w = torch.nn.Parameter(torch.randn(16, 33))
            b = torch.nn.Parameter(torch.randn(7))
            opt = SNRAdamW([w, b], lr=1e-2, warmup_steps=0, mask=mask, reduction=reduction, **kw)
            for _ in range(3):
                w.grad, b.grad = torch.randn(16, 33), torch.randn(7)
                opt.step()
            results.append(torch.cat([w.detach().flatten(), b.detach().flatten()]))
        for r in results[1:]:
            torch.testing.assert_close(r, results[0], rtol=0, atol=1e-5)


# -- rough edges ----------------------------------------------------------------------------------------------

def test_unknown_group_keys_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'softnes' \(did you mean 'softness'\?\) in parameter "
                                         r"group 0"):
        SNRAdamW([{"params": [p], "softnes": 3}])
    SNRAdamW([{"params": [p], "softness": 3, "initial_lr": 1e-3}])  # what LR schedulers add is fine


def test_duplicate_parameters_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="parameter 1 of parameter group 0 .* is listed twice"):
        SNRAdamW([p, p])


def test_alpha_auto_outside_the_trainer_says_it_needs_the_trainer():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(OptionError, match="alpha='auto' needs the Trainer"):
        SNRAdamW([p], alpha="auto")
    with pytest.raises(OptionError, match="alpha='auto' needs the Trainer"):
        SNRAdamW([p], alpha="AUTO")


def test_one_case_rule_for_every_word_option():
    p = torch.nn.Parameter(torch.randn(3))
    assert parse_optim_args("mask=SNR,reduction=Row,alpha=AUTO,fused=TRUE,nonfinite=Raise").mask == "snr"
    o = parse_optim_args("mask=SNR,reduction=Row,alpha=AUTO,fused=TRUE,nonfinite=Raise")
    assert (o.reduction, o.alpha, o.fused, o.nonfinite) == ("row", "auto", True, "raise")
    opt = SNRAdamW([p], mask="Hard", nonfinite="RAISE")
    assert opt.param_groups[0]["mask"] == "hard" and opt.nonfinite == "raise"
    assert parse_optim_args("exclude=LM_head").exclude == "LM_head"  # a regular expression keeps its case
