"""optim="snr_adamw" without importing hf_snr: the start-up hook, TRL's CLI, YAML, a wheel install; and
the optimizer alone without transformers. Each check runs in a fresh interpreter (subprocess)."""

import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
           TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
ENV.pop("HF_SNR_AUTOREGISTER", None)


def _python(code: str, env: dict | None = None, args: tuple[str, ...] = (), cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], env=env or ENV, cwd=cwd or "/",
                          capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_training_arguments_accept_the_name_in_an_interpreter_that_never_imports_hf_snr(tmp_path):
    out = _ok(_python(f"""
        import sys
        from transformers import TrainingArguments
        args = TrainingArguments({str(tmp_path)!r}, optim="snr_adamw", optim_args="mask=soft,softness=3",
                                 use_cpu=True, report_to=[])
        print("OPTIM", args.optim.value)
        try:
            TrainingArguments({str(tmp_path)!r}, optim="snr_adamw", optim_args="mask=medium", use_cpu=True)
        except ValueError as err:
            print("REFUSED", err)
    """))
    assert "OPTIM snr_adamw" in out
    assert re.search(r"REFUSED Invalid optim_args value mask='medium'.*one of snr, soft, hard, none", out), out


def test_the_switch_turns_the_hook_off(tmp_path):
    proc = _python(f"""
        from transformers import TrainingArguments
        TrainingArguments({str(tmp_path)!r}, optim="snr_adamw", use_cpu=True)
    """, env=dict(ENV, HF_SNR_AUTOREGISTER="0"))
    assert proc.returncode != 0 and "snr_adamw is not a valid OptimizerNames" in proc.stderr


def test_the_optimizer_alone_imports_no_transformers():
    out = _ok(_python("""
        import sys
        from hf_snr.optimizer import SNRAdamW
        import hf_snr
        hf_snr.SNRAdamW, hf_snr.parse_optim_args("mask=soft")
        import torch
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        SNRAdamW([p]).step()
        print("LOADED", sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("transformers", "trl",
                                                                                         "accelerate", "datasets")}))
    """, env=dict(ENV, HF_SNR_AUTOREGISTER="0")))
    assert "LOADED []" in out, out


def test_start_up_hook_costs_nothing_measurable():
    """The .pth hook imports only hf_snr's stdlib-only __init__ and installs a finder: no torch, no transformers,
    and a few milliseconds at most in `python -X importtime` (a bare interpreter start takes about 10 ms)."""
    proc = _python("import sys; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))",
                   args=("-X", "importtime"))
    out = _ok(proc)
    assert out.strip() == "[]", out
    times = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            times[m.group(4)] = int(m.group(2))
    assert "hf_snr" in times, "the start-up hook did not run (is hf_snr-autoregister.pth installed?)"
    assert times["hf_snr"] < 5000, f"the hook took {times['hf_snr']} us at start-up"


# -- TRL's own CLI and a YAML config -----------------------------------------------------------------
@pytest.fixture(scope="module")
def offline_model_and_data(tmp_path_factory):
    from hf_snr.synthetic import make_preference_dataset, save_tiny_model_and_tokenizer

    root = tmp_path_factory.mktemp("trl_cli")
    data = make_preference_dataset(n_train=48, n_eval=16, seed=0)
    data_dir = root / "data"
    data_dir.mkdir()
    for split in ("train", "test"):
        data[split].select_columns(["prompt", "chosen", "rejected"]).to_json(str(data_dir / f"{split}.jsonl"))
    model_dir = save_tiny_model_and_tokenizer(root / "model", texts=data, hidden=32, layers=1, heads=2, ffn=64)
    return root, model_dir, data_dir


@pytest.mark.slow
def test_trl_dpo_cli_trains_with_snr_adamw_from_yaml_and_flags(offline_model_and_data):
    root, model_dir, data_dir = offline_model_and_data
    out_dir = root / "out"
    config = root / "dpo.yaml"
    config.write_text(textwrap.dedent(f"""
        model_name_or_path: {model_dir}
        dataset_name: {data_dir}
        output_dir: {out_dir}
        optim: snr_adamw
        optim_args: "mask=snr,softness=3,warmup_steps=1"
        max_steps: 3
        per_device_train_batch_size: 8
        logging_steps: 1
        save_strategy: steps
        save_steps: 3
        learning_rate: 0.01
        report_to: none
        bf16: false
        use_cpu: true
        gradient_checkpointing: false
        max_length: 64
    """))
    trl = Path(sys.executable).with_name("trl")
    proc = subprocess.run([str(trl), "dpo", "--config", str(config), "--num_processes", "1",
                           "--eval_strategy", "no", "--seed", "1"],
                          env=ENV, cwd=str(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ckpt = out_dir / "checkpoint-3"
    logs = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in logs if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3]
    assert all("snr/mask_mean" in h and "snr/memorization_rate" in h for h in train_logs), train_logs
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all("exp_var" in s for s in state["state"].values())  # the optimizer that stepped is SNRAdamW
    assert state["param_groups"][0]["softness"] == 3.0


@pytest.mark.parametrize("command", ["trl dpo", "recipes/noisy_dpo.py"])
def test_help_lists_every_snr_option(command):
    from hf_snr.options import OPTIM_ARGS_KEYS, OPTIONS

    if command == "trl dpo":
        cmd = [str(Path(sys.executable).with_name("trl")), "dpo", "--help"]
    else:
        cmd = [sys.executable, str(ROOT / command), "--help"]
    proc = subprocess.run(cmd, env=dict(ENV, COLUMNS="400"), capture_output=True, text=True, timeout=300)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snr_adamw" in text
    for key in OPTIM_ARGS_KEYS:
        o = OPTIONS[key]
        assert f"{key}: {o.type}, default" in text and " ".join(o.accepted.split()) in text, key


# -- a wheel install ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_install_registers_at_start_up(tmp_path):
    """Build the wheel from the project's files, unpack it as pip would into a site directory, and start an
    interpreter that sees only that directory (plus the dependencies): the wheel's own .pth registers the name."""
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           str(ROOT), "-w", str(wheels)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("hf_snr-*.whl")
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "hf_snr-autoregister.pth" in names and "hf_snr/_hooks.py" in names, names
        assert "hf_snr/_snr_cpu.c" in names, names  # the fused kernel's source ships with the wheel
        z.extractall(site_dir)
    deps = sysconfig.get_paths()["purelib"]  # torch, transformers, ...; no .pth of theirs is processed (-S)
    out = _ok(_python(f"""
        import site, sys
        sys.path.append({deps!r})
        site.addsitedir({str(site_dir)!r})   # what the interpreter does at start-up for site-packages
        assert "hf_snr" in sys.modules, "the wheel's .pth did not run"
        from transformers import TrainingArguments  # hf_snr is never imported by this script
        print("OPTIM", TrainingArguments({str(tmp_path)!r}, optim="snr_adamw", use_cpu=True).optim.value)
        assert sys.modules["hf_snr"].__file__.startswith({str(site_dir)!r}), sys.modules["hf_snr"].__file__
    """, args=("-S",)))
    assert "OPTIM snr_adamw" in out
