"""optim="snr_adamw" as a transformers optimizer name: registration, argument classes, CLI, pickling,
the transformers-version guard and the DeepSpeed guards at argument-construction time."""

import dataclasses
import gc
import importlib
import json
import os
import pickle

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, trainer_optimizer
from transformers.training_args import OptimizerNames
from trl import DPOConfig, SFTConfig, TrlParser

import hf_snr
from hf_snr import SNRAdamW, SNRRegistrationError, registration
from hf_snr.integration import SNRAdamWFactory, snr_optimizer_cls_and_kwargs

CPU = dict(use_cpu=True, report_to=[], bf16=False)


@dataclasses.dataclass
class MySFTConfig(SFTConfig):
    """A user's own config subclass: must accept the name too."""

    my_extra: int = 3


@pytest.fixture
def clean_env():
    """TrainingArguments(deepspeed=...) touches process-global state; put the environment back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    gc.collect()  # drop the DeepSpeed config weakref that HfTrainerDeepSpeedConfig registers


def _cls_kwargs(args):
    return Trainer.get_optimizer_cls_and_kwargs(args)


# -- the name ------------------------------------------------------------------------------------

def test_name_is_registered():
    assert registration.is_registered()
    member = OptimizerNames("snr_adamw")
    assert member is OptimizerNames.SNR_ADAMW and member == "snr_adamw"
    assert "snr_adamw" in [m.value for m in OptimizerNames]
    assert trainer_optimizer._OPTIMIZER_HANDLERS[member] is registration._handler
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        OptimizerNames("snr_adamx")


def test_register_is_idempotent(monkeypatch):
    handlers = trainer_optimizer._OPTIMIZER_HANDLERS
    before = (list(OptimizerNames._member_names_), dict(handlers), Trainer.create_optimizer,
              Trainer.create_scheduler, TrainingArguments.__post_init__, TrainingArguments.set_optimizer)
    hf_snr.register()  # flag set: a no-op
    monkeypatch.setattr(registration, "_registered", False)
    hf_snr.register()  # flag cleared: runs again, must not add or wrap twice
    hf_snr.register()
    importlib.reload(hf_snr)  # "import hf_snr" once more
    after = (list(OptimizerNames._member_names_), dict(handlers), Trainer.create_optimizer,
             Trainer.create_scheduler, TrainingArguments.__post_init__, TrainingArguments.set_optimizer)
    assert after == before
    assert OptimizerNames._member_names_.count("SNR_ADAMW") == 1
    # one wrapper layer, not two
    assert not getattr(Trainer.create_optimizer.__wrapped__, "_hf_snr", False)
    assert not getattr(TrainingArguments.__post_init__.__wrapped__, "_hf_snr", False)


def test_missing_handler_table_fails_loudly(monkeypatch):
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(SNRRegistrationError) as err:
        hf_snr.register()
    msg = str(err.value)
    assert "_OPTIMIZER_HANDLERS" in msg and registration.transformers.__version__ in msg
    assert "snr_optimizer_cls_and_kwargs" in msg  # the fix: the explicit route
    assert not registration.is_registered()


@pytest.mark.parametrize("version", ["6.0.0", "6.1.0.dev0", "4.57.1"])
def test_unsupported_transformers_version_fails_loudly(monkeypatch, version):
    # registration.transformers, not a module-level "import transformers" here: transformers' lazy
    # module replaces itself in sys.modules while it loads, so an early import can be a stale object
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.setattr(registration.transformers, "__version__", version)
    with pytest.raises(SNRRegistrationError,
                       match=rf"transformers {version}: supported versions are >=5\.0\.0,<6\.0\.0"):
        hf_snr.register()


def test_import_warns_instead_of_crashing_when_registration_fails(monkeypatch):
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.setattr(registration.transformers, "__version__", "6.0.0")
    monkeypatch.setattr(hf_snr._hooks, "_done", set())  # the import hooks run every part again
    with pytest.warns(RuntimeWarning, match="cannot register optim='snr_adamw'"):
        importlib.reload(hf_snr)


def test_changed_enum_internals_fail_loudly(monkeypatch):
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.delattr(OptimizerNames, "_value2member_map_")
    with pytest.raises(SNRRegistrationError, match="enum internals changed"):
        hf_snr.register()


# -- argument classes ----------------------------------------------------------------------------

@pytest.mark.parametrize("config_cls", [TrainingArguments, DPOConfig, SFTConfig, MySFTConfig])
def test_argument_classes_accept_the_name(tmp_path, config_cls):
    args = config_cls(output_dir=str(tmp_path), optim="snr_adamw", optim_args="mask=soft,softness=3,beta3=0.95",
                      learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1,
                      **CPU)
    assert args.optim is OptimizerNames.SNR_ADAMW
    cls, kwargs = _cls_kwargs(args)
    assert cls is SNRAdamW
    assert kwargs["lr"] == 3e-4 and kwargs["betas"] == (0.8, 0.95) and kwargs["eps"] == 1e-7
    assert (kwargs["mask"], kwargs["softness"], kwargs["rho"]) == ("soft", 3.0, 0.95)
    # exclude / alpha=auto need the parameter names or the data: a factory that builds the groups
    args.optim_args = "exclude=mlp,alpha=auto"
    cls, kwargs = _cls_kwargs(args)
    assert cls is SNRAdamWFactory and kwargs["exclude"] == "mlp" and kwargs["alpha_auto"] is True
    assert kwargs["weight_decay"] == 0.1


@pytest.mark.parametrize("config_cls", [TrainingArguments, DPOConfig, SFTConfig, MySFTConfig])
def test_bad_optim_args_fail_at_construction(tmp_path, config_cls):
    with pytest.raises(ValueError, match=r"Unknown optim_args key 'softnes'.*Accepted keys: mask"):
        config_cls(output_dir=str(tmp_path), optim="snr_adamw", optim_args="softnes=3", **CPU)
    with pytest.raises(ValueError, match=r"mask.*snr, soft, hard"):
        config_cls(output_dir=str(tmp_path), optim="snr_adamw", optim_args="mask=medium", **CPU)
    # other optimizers keep transformers' own (lenient) handling of optim_args
    config_cls(output_dir=str(tmp_path), optim="adamw_torch", optim_args="softnes=3", **CPU)


def test_set_optimizer_validates(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **CPU)
    args.set_optimizer("snr_adamw", learning_rate=1e-3, args="mask=hard")
    assert args.optim is OptimizerNames.SNR_ADAMW and _cls_kwargs(args)[1]["mask"] == "hard"
    with pytest.raises(ValueError, match="alpha"):
        args.set_optimizer("snr_adamw", args="alpha=-1")


def test_training_args_pickle_and_json(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), optim="snr_adamw", optim_args="mask=soft", **CPU)
    back = pickle.loads(pickle.dumps(args))
    assert back.optim is OptimizerNames.SNR_ADAMW and back.optim_args == "mask=soft"
    # what Trainer writes as training_args.bin, and how it is read back
    torch.save(args, tmp_path / "training_args.bin")
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert loaded.optim is OptimizerNames.SNR_ADAMW and _cls_kwargs(loaded)[1]["mask"] == "soft"
    as_json = json.loads(args.to_json_string())
    assert as_json["optim"] == "snr_adamw" and as_json["optim_args"] == "mask=soft"
    assert args.to_dict()["optim"] == "snr_adamw"


# -- command line ------------------------------------------------------------------------------

def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "snr_adamw", "--optim_args", "mask=hard,alpha=0.5",
         "--learning_rate", "2e-3", "--use_cpu", "true", "--report_to", "none"])
    assert args.optim is OptimizerNames.SNR_ADAMW
    cls, kwargs = _cls_kwargs(args)
    assert cls is SNRAdamW and kwargs["mask"] == "hard" and kwargs["alpha"] == 0.5 and kwargs["lr"] == 2e-3
    with pytest.raises(ValueError, match="Unknown optim_args key 'mask_kind'"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "snr_adamw",
                                            "--optim_args", "mask_kind=hard", "--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"rho.*\[0, 1\)"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "snr_adamw",
                                            "--optim_args", "rho=2", "--use_cpu", "true"])


@pytest.mark.parametrize("config_cls", [DPOConfig, SFTConfig])
def test_trl_parser_with_yaml_config(tmp_path, config_cls):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path}\noptim: snr_adamw\noptim_args: mask=soft,softness=10\n"
        "learning_rate: 5.0e-4\nuse_cpu: true\nbf16: false\nreport_to: none\n")
    parser = TrlParser((config_cls,))
    (args,) = parser.parse_args_and_config(["--config", str(cfg), "--adam_beta2", "0.98"])
    assert isinstance(args, config_cls) and args.optim is OptimizerNames.SNR_ADAMW
    cls, kwargs = _cls_kwargs(args)
    assert cls is SNRAdamW and kwargs["softness"] == 10.0 and kwargs["lr"] == 5e-4 and kwargs["betas"][1] == 0.98
    # the same on the plain command line, and a bad value in the YAML fails at parse time
    (args,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--optim", "snr_adamw",
                                            "--use_cpu", "true", "--bf16", "false"])
    assert args.optim is OptimizerNames.SNR_ADAMW
    cfg.write_text(f"output_dir: {tmp_path}\noptim: snr_adamw\noptim_args: softness=lots\nuse_cpu: true\nbf16: false\n")
    with pytest.raises(ValueError, match="softness='lots'"):
        parser.parse_args_and_config(["--config", str(cfg)])


# -- DeepSpeed guards when the arguments are built ----------------------------------------------

def _ds_args(tmp_path, ds, optim_args=None, optim="snr_adamw"):
    return TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args, report_to=[], deepspeed=ds)


def test_deepspeed_guards_at_construction(tmp_path, clean_env):
    zero2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    args = _ds_args(tmp_path, zero2)  # a valid config builds (no distributed launch needed)
    assert args.deepspeed_plugin is not None and args.optim is OptimizerNames.SNR_ADAMW
    del args
    with pytest.raises(ValueError, match=r'"optimizer" section.*Remove the "optimizer" section'):
        _ds_args(tmp_path, {**zero2, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match=r'DeepSpeedCPUAdam.*"zero_force_ds_cpu_optimizer": false'):
        _ds_args(tmp_path, offload)
    _ds_args(tmp_path, {**offload, "zero_force_ds_cpu_optimizer": False})
    with pytest.raises(ValueError, match=r"reduction='tensor' cannot run under DeepSpeed ZeRO stage 2"):
        _ds_args(tmp_path, zero2, optim_args="reduction=tensor")
    with pytest.raises(ValueError, match=r"ZeRO stage 3"):
        _ds_args(tmp_path, {"zero_optimization": {"stage": 3}}, optim_args="reduction=tensor")
    # the explicit route checks too: with optim="adamw_torch" the arguments build, the factory refuses
    adamw_args = _ds_args(tmp_path, {**zero2, "optimizer": {"type": "AdamW"}}, optim="adamw_torch")
    with pytest.raises(ValueError, match='"optimizer" section'):
        snr_optimizer_cls_and_kwargs(adamw_args, "mask=soft")
