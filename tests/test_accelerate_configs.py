"""The ready accelerate configs: they load with accelerate's own loader and say what they claim.

The slow tests launch a tiny script with ``accelerate launch --config_file
accelerate_configs/cpu_2proc.yaml`` and check that it really runs two ranks on CPU, and that the
trap documented in that YAML (its ``use_cpu`` is not forwarded to the processes) still exists.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def _load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_expected_files():
    assert set(YAMLS) >= {"single_gpu.yaml", "multi_gpu.yaml", "fsdp2.yaml", "zero2.yaml", "zero3.yaml",
                          "cpu_2proc.yaml"}
    assert (CONFIGS / "ds_zero2.json").is_file() and (CONFIGS / "ds_zero3.json").is_file()


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_loads_and_documents_its_launch_line(name):
    cfg = _load(name)  # raises on unknown keys
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.num_processes >= 1 and cfg.num_machines == 1
    header = (CONFIGS / name).read_text().splitlines()[0:12]
    assert any(f"accelerate launch --config_file accelerate_configs/{name}" in line for line in header)


@pytest.mark.parametrize(
    "name, dtype, nproc, use_cpu",
    [
        ("single_gpu.yaml", "NO", 1, False),
        ("multi_gpu.yaml", "MULTI_GPU", 8, False),
        ("fsdp2.yaml", "FSDP", 8, False),
        ("zero2.yaml", "DEEPSPEED", 8, False),
        ("zero3.yaml", "DEEPSPEED", 8, False),
        ("cpu_2proc.yaml", "MULTI_GPU", 2, True),  # MULTI_GPU on purpose: MULTI_CPU starts one process
    ],
)
def test_key_facts(name, dtype, nproc, use_cpu):
    cfg = _load(name)
    assert cfg.distributed_type.value == dtype
    assert cfg.num_processes == nproc
    assert cfg.use_cpu is use_cpu
    if dtype != "DEEPSPEED":
        # Precision is left to the training arguments (--bf16); a value here would override them.
        assert cfg.mixed_precision == "no"


def test_fsdp2():
    fsdp = _load("fsdp2.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] != "LOCAL_STATE_DICT"  # not allowed in v2


@pytest.mark.parametrize("name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    cfg = _load(name)
    ds = cfg.deepspeed_config
    # No keys that accelerate refuses together with deepspeed_config_file (precision included).
    assert cfg.mixed_precision is None
    assert set(ds) == {"deepspeed_config_file", "deepspeed_multinode_launcher", "zero3_init_flag"}
    assert ds["zero3_init_flag"] is (stage == 3)
    path = ds["deepspeed_config_file"]
    assert not os.path.isabs(path) and (ROOT / path).is_file()  # relative to the repository root
    js = json.loads((ROOT / path).read_text())
    assert "optimizer" not in js  # else DeepSpeed builds its own optimizer instead of SNRAdamW
    assert "scheduler" not in js  # keep the Trainer's scheduler
    assert js["zero_force_ds_cpu_optimizer"] is False  # else offload swaps in DeepSpeedCPUAdam
    assert js["zero_allow_untested_optimizer"] is True
    assert js["zero_optimization"]["stage"] == stage
    assert js["bf16"]["enabled"] == "auto"  # precision follows the training arguments
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert js[key] == "auto"


@pytest.mark.parametrize("name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_plugin_accepts_config(name, stage, monkeypatch):
    """The check `accelerate launch` triggers in each process (no launch, no DeepSpeed op builds)."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    cfg = _load(name)
    ds = cfg.deepspeed_config
    # What `accelerate launch` exports: the YAML's deepspeed keys, plus mixed_precision if the YAML set it.
    fields = list(ds) + (["mixed_precision"] if cfg.mixed_precision is not None else [])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields))
    monkeypatch.chdir(ROOT)  # the JSON path is relative to the launch directory
    plugin = DeepSpeedPlugin(hf_ds_config=ds["deepspeed_config_file"], zero3_init_flag=ds["zero3_init_flag"])
    assert plugin.zero_stage == stage
    assert "optimizer" not in plugin.hf_ds_config.config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    cpu = sys.argv[1] == "cpu"
    acc = Accelerator(cpu=True) if cpu else Accelerator()
    print(f"RANK {acc.process_index} OF {acc.num_processes} TYPE {acc.distributed_type.value}", flush=True)
    if cpu:
        assert acc.num_processes == 2, acc.num_processes
        assert acc.distributed_type.value == "MULTI_CPU", acc.distributed_type
        assert dist.get_backend() == "gloo"
        total = torch.tensor([acc.process_index + 1.0])
        dist.all_reduce(total)
        assert total.item() == 3.0, total
        print("OK", flush=True)
    # Tear gloo down before exit: a process that exits with the group alive can abort in gloo's
    # destructor ("terminate called without an active exception"), failing the launch at random.
    acc.end_training()
    """
)


def _launch(tmp_path, mode):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "accelerate_configs/cpu_2proc.yaml",
        "--main_process_port", str(_free_port()),  # other launches may run on this machine
        str(script), mode,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cpu_2proc_really_runs_two_ranks(tmp_path):
    proc = _launch(tmp_path, "cpu")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RANK 0 OF 2 TYPE MULTI_CPU" in out and "RANK 1 OF 2 TYPE MULTI_CPU" in out
    assert out.count("OK") >= 2


@pytest.mark.slow
def test_cpu_2proc_needs_cpu_in_the_script(tmp_path):
    """The trap the YAML documents: without cpu=True each process runs alone, silently, as rank 0."""
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("with GPUs the processes would use them")
    except ImportError:  # pragma: no cover
        pass
    proc = _launch(tmp_path, "default")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("RANK 0 OF 1 TYPE NO") == 2, out[-4000:]
