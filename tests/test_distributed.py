"""Distributed checks on CPU (gloo): DDP through accelerate, raw DeepSpeed ZeRO 0-3, Trainer + DeepSpeed.

Each check launches a worker script from tests/distributed/ in a subprocess (one process per rank);
the worker asserts the world size and distributed type it asked for (``accelerate launch --cpu
--num_processes 2`` silently runs ONE process) and writes its results to a temporary folder; this
side compares them with single-process references. The launches a test session needs are started
together when the first of these tests runs, so their start-up costs overlap (set
HF_SNR_TEST_SERIAL_LAUNCHES=1 to run them one after another).

What is proved:
* DDP (2 ranks, Trainer, optim="snr_adamw"): both ranks end with bit-identical parameters and
  logs, and parameters, loss and every snr/* metric equal a 1-process run on the same global batch.
* raw DeepSpeed ZeRO-0/1/2/3 (2 ranks): SNRAdamW, stepping on flat fp32 partitions, follows the
  single-process trajectory; statistics summed over the partition group chosen by
  hf_snr.integration.deepspeed_partition_group equal the single-process statistics;
  reduction="tensor" is refused with a clear ValueError.
* Trainer + DeepSpeed ZeRO-2 (TrainingArguments(deepspeed=dict)) and ZeRO-3 (accelerate config file,
  environment path), 1 process: the optimizer that steps is SNRAdamW, snr/* metrics reach
  log_history, the trajectory equals the plain Trainer's; configs that would swap SNRAdamW out are
  refused when TrainingArguments is built, on both configuration paths.
* ZeRO calls step() once per parameter group (stages 1/2) and per sub-group (stage 3); the Trainer
  always has 2 groups: the statistics of one training step still cover every call and the step is
  counted once (cumulative_noise is not over-counted); ZeRO's zero padding is not counted in
  mask_mean/active_fraction.
* SNRDPOTrainer + DeepSpeed ZeRO-2 (TrainingArguments(deepspeed=dict)), 1 process: SNRAdamW steps under
  the ZeRO wrappers, and snr/*, rewards/drift, noise/* (train) and eval_rewards/drift reach log_history, finite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import _common  # noqa: E402

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")

LAUNCH_TIMEOUT_S = 480

# -- launches -------------------------------------------------------------------------------------
class Launch:
    """One worker launch: started in the background, waited for by the tests that read its results."""

    def __init__(self, name: str, out: Path):
        self.name, self.out = name, out
        self.proc: subprocess.Popen | None = None
        self.log_path = out / "launch.log"
        self.started = self.finished = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        w = _common.WORKER_DIR
        port = str(_common.free_port())
        if self.name == "ddp":
            return [_common.launcher("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", port, str(w / "ddp_trainer.py"), str(self.out), "--world", "2",
                    "--per-device", str(_common.GLOBAL_MICRO_BATCH // 2)]
        if self.name == "single":
            return [sys.executable, str(w / "ddp_trainer.py"), str(self.out), "--world", "1",
                    "--per-device", str(_common.GLOBAL_MICRO_BATCH)]
        if self.name == "zero":
            return [_common.launcher("torchrun"), "--nproc_per_node", "2", "--master_port", port,
                    str(w / "deepspeed_zero.py"), str(self.out)]
        if self.name == "trainer_ds":
            yaml = self._write_accelerate_deepspeed_config()
            return [_common.launcher("accelerate"), "launch", "--config_file", str(yaml), "--num_processes", "1",
                    "--main_process_port", port, str(w / "trainer_deepspeed.py"), str(self.out)]
        if self.name == "dpo_ds":
            return [_common.launcher("torchrun"), "--nproc_per_node", "1", "--master_port", port,
                    str(w / "dpo_deepspeed.py"), str(self.out)]
        raise KeyError(self.name)

    def _write_accelerate_deepspeed_config(self) -> Path:
        from trainer_deepspeed import ds_config

        ds_json = self.out / "zero3.json"
        ds_json.write_text(json.dumps(ds_config(3)))
        yaml = self.out / "zero3.yaml"
        yaml.write_text(
            "compute_environment: LOCAL_MACHINE\n"
            "distributed_type: DEEPSPEED\n"
            "deepspeed_config:\n"
            f"  deepspeed_config_file: {ds_json}\n"
            "  deepspeed_multinode_launcher: standard\n"
            "  zero3_init_flag: false\n"
            "num_processes: 1\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: false\n"
        )
        return yaml

    def start(self) -> None:
        if self.proc is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        self.log = open(self.log_path, "w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=_common.REPO_ROOT, env=_common.child_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> Path:
        self.start()
        if self.returncode is None:
            try:
                self.returncode = self.proc.wait(timeout=max(1.0, LAUNCH_TIMEOUT_S - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # the launcher and every rank it started (own session)
                self.proc.wait()
                self.returncode = -9
            self.finished = time.monotonic()
            self.log.close()
        if self.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-6000:]
            pytest.fail(f"launch {self.name!r} failed (rc={self.returncode}, "
                        f"{self.finished - self.started:.0f} s); log tail:\n{tail}")
        return self.out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


# which launches each test reads (the session starts only those of the selected tests)
NEEDS = {
    "test_ddp_ranks_hold_identical_replicas": ("ddp",),
    "test_ddp_matches_single_process": ("ddp", "single"),
    "test_zero_uses_partition_group": ("zero",),
    "test_zero_trajectory_matches_single_process": ("zero",),
    "test_zero_statistics_match_single_process": ("zero",),
    "test_zero_refuses_tensor_reduction": ("zero",),
    "test_zero_refuses_row_reduction": ("zero",),
    "test_trainer_deepspeed_steps_snradamw": ("trainer_ds", "single"),
    "test_trainer_deepspeed_snr_metrics_match_single_process": ("trainer_ds", "single"),
    "test_trainer_deepspeed_refuses_swapping_configs": ("trainer_ds",),
    "test_dpo_trainer_deepspeed_zero2_logs_metrics": ("dpo_ds",),
}
ORDER = ("zero", "trainer_ds", "ddp", "dpo_ds", "single")  # longest first


class Launches:
    def __init__(self, root: Path, names: set[str]):
        self.root = root
        self.by_name = {n: Launch(n, root / n) for n in ORDER if n in names}
        self.serial = os.environ.get("HF_SNR_TEST_SERIAL_LAUNCHES") == "1"
        if not self.serial:
            for launch in self.by_name.values():
                launch.start()

    def out(self, name: str) -> Path:
        launch = self.by_name.get(name)
        if launch is None:  # a test not listed in NEEDS
            launch = self.by_name[name] = Launch(name, self.root / name)
        return launch.wait()

    def close(self) -> None:
        for launch in self.by_name.values():
            launch.kill()
        timings = {n: round(lg.finished - lg.started, 1) for n, lg in self.by_name.items() if lg.finished}
        if timings:
            print(f"\n[test_distributed] launch wall times (s): {timings}")


@pytest.fixture(scope="session")
def launches(request, tmp_path_factory):
    wanted: set[str] = set()
    for item in request.session.items:
        wanted.update(NEEDS.get(getattr(item, "originalname", item.name), ()))
    if not HAS_DEEPSPEED:
        wanted -= {"zero", "trainer_ds", "dpo_ds"}
    ls = Launches(tmp_path_factory.mktemp("distributed"), wanted)
    yield ls
    ls.close()


# -- helpers --------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# active_fraction is a count over the tiny Llama's ~20k gated coordinates: allow a few of them to sit on q = 1/2
_COUNT_TOL = 2e-4


def _compare_logs(got: list[dict], ref: list[dict], keys_prefix: tuple[str, ...] = ("snr/", "loss")) -> list[str]:
    """Differences between two log_histories' training entries (by step) for the given keys."""
    got_by = {e["step"]: e for e in got if "loss" in e}
    ref_by = {e["step"]: e for e in ref if "loss" in e}
    problems = []
    if sorted(got_by) != sorted(ref_by):
        return [f"logged steps differ: {sorted(got_by)} vs {sorted(ref_by)}"]
    for step, r in ref_by.items():
        g = got_by[step]
        for k, v in r.items():
            if not k.startswith(keys_prefix):
                continue
            # a coordinate within rounding of q = 1/2 may count on either side (summation order differs)
            abs_tol = _COUNT_TOL if k == "snr/active_fraction" else 1e-6
            if k not in g:
                problems.append(f"step {step}: {k} missing")
            elif not _close(g[k], v, abs_=abs_tol):
                problems.append(f"step {step}: {k} = {g[k]!r}, single process {v!r}")
    return problems


# -- 1. DDP through accelerate launch -----------------------------------------------------------
@pytest.fixture(scope="session")
def ddp_out(launches) -> Path:
    return launches.out("ddp")


@pytest.fixture(scope="session")
def single_out(launches) -> Path:
    return launches.out("single")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_replicas(ddp_out):
    infos = [_load_json(ddp_out / f"world2_rank{r}.json") for r in (0, 1)]
    for r, info in enumerate(infos):
        assert info["rank"] == r
        assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
        assert info["optimizer_chain"][-1] == "SNRAdamW", info["optimizer_chain"]
        assert info["process_group_is_none"], "DDP keeps replicas: statistics must not be summed over ranks"
    p0, p1 = (torch.load(ddp_out / f"world2_rank{r}.pt") for r in (0, 1))
    assert set(p0) == set(p1)
    differing = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not differing, f"parameters differ between DDP ranks: {differing[:5]}"
    snr0 = _common.snr_logs(infos[0]["log_history"])
    snr1 = _common.snr_logs(infos[1]["log_history"])
    assert snr0 and [{k: v for k, v in e.items() if k.startswith("snr/")} for e in snr0] == \
        [{k: v for k, v in e.items() if k.startswith("snr/")} for e in snr1]


@pytest.mark.slow
def test_ddp_matches_single_process(ddp_out, single_out):
    ddp = _load_json(ddp_out / "world2_rank0.json")
    single = _load_json(single_out / "world1_rank0.json")
    assert single["num_processes"] == 1 and single["distributed_type"] == "DistributedType.NO"

    diff = _max_param_diff(torch.load(ddp_out / "world2_rank0.pt"), torch.load(single_out / "world1_rank0.pt"))
    assert diff < 1e-4, f"DDP parameters differ from the 1-process run by {diff:.3g}"

    snr = _common.snr_logs(single["log_history"])
    assert [e["step"] for e in snr] == [2, 4, 6], snr
    assert set(hf_metric_keys()) <= set(snr[-1]), set(snr[-1])
    assert snr[-1]["snr/mask_mean"] < 0.9, "the gate never closed: the comparison would be trivial"
    problems = _compare_logs(ddp["log_history"], single["log_history"])
    assert not problems, "\n".join(problems)


def hf_metric_keys() -> list[str]:
    return ["snr/mask_mean", "snr/active_fraction", "snr/signal", "snr/memorization_rate", "snr/signal_minus_noise"]


# -- 2. raw DeepSpeed ZeRO, 2 ranks ---------------------------------------------------------------
ZERO_CASES = ["zero0", "zero1", "zero2", "zero3", "zero1_two_groups", "zero2_two_groups", "zero3_two_groups",
              "zero3_sub_groups", "zero2_padded", "zero3_padded", "zero1_options", "zero2_options", "zero3_options",
              "zero2_signal_step"]
MULTI_CALL_CASES = {"zero1_two_groups", "zero2_two_groups", "zero3_two_groups", "zero3_sub_groups", "zero1_options",
                    "zero2_options", "zero3_options"}
PADDED_CASES = {"zero2_padded", "zero3_padded"}


@pytest.fixture(scope="session")
def zero_results(launches) -> dict:
    return torch.load(launches.out("zero") / "zero_results.pt", weights_only=False)


_REFERENCE_CACHE: dict[tuple[bool, int], tuple[dict, list[dict]]] = {}


def zero_reference(name: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Plain PyTorch, 1 process, SNRAdamW on the whole global batch of every step."""
    import deepspeed_zero as dz

    split, d_out = ("two_groups" in name or name in dz.CASE_OPTIONS and "options" in name,
                    3 if name in PADDED_CASES else 4)
    extra = dz.OPTION_CASES.get(dz.CASE_OPTIONS.get(name), {})
    key = (split, d_out, tuple(sorted(extra.items())))
    if key not in _REFERENCE_CACHE:
        from hf_snr import SNRAdamW

        model = _common.tiny_net(seed=0, d_out=d_out)
        kwargs = {**dz.OPT_KWARGS, **extra}
        opt = SNRAdamW(_common.param_groups(model, kwargs["weight_decay"], split), **kwargs)
        stats = []
        for x, y in _common.regression_batches(dz.STEPS, dz.WORLD * dz.GA * dz.MICRO, d_out=d_out):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.request_stats()
            opt.step()
            stats.append(dict(opt.last_stats))
        _REFERENCE_CACHE[key] = ({n: p.detach().clone() for n, p in model.named_parameters()}, stats)
    return _REFERENCE_CACHE[key]


def _zero_case(zero_results: dict, name: str) -> dict:
    res = zero_results[name]
    assert "error" not in res, f"{name} failed in the worker: {res['error']}"
    return res


@pytest.mark.slow
@needs_deepspeed
def test_zero_uses_partition_group(zero_results):
    meta = zero_results["_meta"]
    assert meta["world"] == 2
    # deepspeed.utils.groups._get_data_parallel_group() (the integration's former choice) is the world here
    assert meta["dp_group_size"] == 2
    assert zero_results["zero0"]["group_size"] is None  # replicas: nothing to sum
    for name in ("zero1", "zero2", "zero3"):
        assert zero_results[name]["group_size"] == 2


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("name", ZERO_CASES)
def test_zero_trajectory_matches_single_process(zero_results, name):
    res = _zero_case(zero_results, name)
    ref_params, _ = zero_reference(name)
    stage = int(name[4])
    expected_chain = {0: ["SNRAdamW"], 1: ["DeepSpeedZeroOptimizer", "SNRAdamW"],
                      2: ["DeepSpeedZeroOptimizer", "SNRAdamW"], 3: ["DeepSpeedZeroOptimizer_Stage3", "SNRAdamW"]}
    assert res["optimizer_chain"] == expected_chain[stage]
    if stage == 0:
        assert res["local_numel"] == res["total_numel"]
    else:  # the optimizer really steps on disjoint flat partitions that together cover the model
        padding = 1 if name in PADDED_CASES else 0
        assert res["local_numel"] < res["total_numel"]
        assert res["summed_local_numel"] == res["total_numel"] + padding
    # DeepSpeed's calling pattern the statistics must cope with: one step() per group / ZeRO-3 sub-group
    calls = 2 if name in MULTI_CALL_CASES else 1
    assert res["calls_per_step"] == [calls] * len(res["calls_per_step"]), res["calls_per_step"]
    diff = _max_param_diff(res["params"], ref_params)
    assert diff < 1e-5, f"{name}: parameters differ from the single-process run by {diff:.3g}"


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("name", ZERO_CASES)
def test_zero_statistics_match_single_process(zero_results, name):
    res = _zero_case(zero_results, name)
    _, ref_stats = zero_reference(name)
    one_coordinate = 1.5 / res["total_numel"]
    problems = []
    for k, (got, ref) in enumerate(zip(res["stats"], ref_stats)):
        for key, v in ref.items():
            abs_tol = one_coordinate if key == "active_fraction" else 1e-6
            if not _close(got[key], v, abs_=abs_tol):
                problems.append(f"step {k + 1}: {key} = {got[key]!r}, single process {v!r}")
    assert not problems, "\n".join(problems)
    assert ref_stats[-1]["mask_mean"] < 0.9, "the gate never closed: the comparison would be trivial"


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_refuses_tensor_reduction(zero_results, stage):
    res = zero_results[f"zero{stage}_tensor"]
    assert res.get("error_type") == "ValueError", res
    assert "reduction='tensor'" in res["error"] and "flat partitions" in res["error"]
    assert "reduction='element'" in res["error"]  # says what to do instead


@pytest.mark.slow
@needs_deepspeed
def test_zero_refuses_row_reduction(zero_results):
    res = zero_results["zero2_row"]
    assert res.get("error_type") == "ValueError", res
    assert "reduction='row'" in res["error"] and "flat partitions" in res["error"]


# -- 3. Trainer + DeepSpeed, 1 process --------------------------------------------------------------
@pytest.fixture(scope="session")
def trainer_ds_out(launches) -> Path:
    return launches.out("trainer_ds")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_steps_snradamw(trainer_ds_out, single_out, stage):
    info = _load_json(trainer_ds_out / f"ds_zero{stage}.json")
    inner = "DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3"
    assert info["optimizer_chain"] == ["DeepSpeedOptimizerWrapper", inner, "SNRAdamW"]
    assert info["configured_by"] == ("TrainingArguments(deepspeed=dict)" if stage == 2 else "accelerate config file")
    snr = _common.snr_logs(info["log_history"])
    assert [e["step"] for e in snr] == [2, 4, 6]
    for entry in snr:
        assert set(hf_metric_keys()) <= set(entry), set(entry)
        assert all(math.isfinite(entry[k]) for k in hf_metric_keys())

    single = _load_json(single_out / "world1_rank0.json")
    diff = _max_param_diff(torch.load(trainer_ds_out / f"ds_zero{stage}.pt"),
                           torch.load(single_out / "world1_rank0.pt"))
    assert diff < 1e-4, f"ZeRO-{stage} Trainer parameters differ from the plain Trainer's by {diff:.3g}"
    problems = _compare_logs(info["log_history"], single["log_history"], keys_prefix=("loss",))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_snr_metrics_match_single_process(trainer_ds_out, single_out, stage):
    info = _load_json(trainer_ds_out / f"ds_zero{stage}.json")
    single = _load_json(single_out / "world1_rank0.json")
    problems = _compare_logs(info["log_history"], single["log_history"], keys_prefix=("snr/",))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@needs_deepspeed
def test_trainer_deepspeed_refuses_swapping_configs(trainer_ds_out):
    refused = _load_json(trainer_ds_out / "refusals.json")
    for path in ("dict", "env"):
        r = refused[f"{path}/optimizer_section"]
        assert r["refused"] and '"optimizer" section' in r["message"] and "Remove" in r["message"], (path, r)
        r = refused[f"{path}/offload_without_force_flag"]
        assert r["refused"] and '"zero_force_ds_cpu_optimizer": false' in r["message"], (path, r)
        r = refused[f"{path}/tensor_reduction_zero3"]
        assert r["refused"] and "reduction='tensor'" in r["message"], (path, r)
    assert refused["dict/offload_with_force_flag_false"] == {"refused": False, "message": None}


# -- 4. SNRDPOTrainer + DeepSpeed ZeRO-2, 1 process ---------------------------------------------------
@pytest.mark.slow
@needs_deepspeed
def test_dpo_trainer_deepspeed_zero2_logs_metrics(launches):
    """SNRDPOTrainer (TRL DPOTrainer subclass) under TrainingArguments(deepspeed=dict) ZeRO-2: SNRAdamW
    is the optimizer that steps, and its snr/* metrics plus the DPO drift / noise metrics reach log_history."""
    info = _load_json(launches.out("dpo_ds") / "result.json")
    assert info["world_size"] == 1 and info["distributed_type"] == "DistributedType.DEEPSPEED"
    assert info["zero_stage"] == 2
    assert info["optimizer_chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "SNRAdamW"]
    history = info["log_history"]
    train = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in train] == [2, 4] and [e["step"] for e in evals] == [4], history
    for entry in train:
        for key in ("snr/mask_mean", "rewards/drift", "noise/flipped_fit", "noise/clean_fit"):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    assert "eval_rewards/drift" in evals[0] and math.isfinite(evals[0]["eval_rewards/drift"]), evals[0]
    for entry in [*train, *evals]:
        bad = {k: v for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite values at step {entry['step']}: {bad}"


# -- fast checks of the guards the launches rely on (no launch) -------------------------------------
class _Wrapper:
    def __init__(self, inner, group=None):
        self.optimizer = inner
        if group is not None:
            self.dp_process_group = group


def test_deepspeed_partition_group_walks_the_wrapper_chain():
    from hf_snr import SNRAdamW
    from hf_snr.integration import deepspeed_partition_group

    real = SNRAdamW([torch.nn.Parameter(torch.zeros(2))])
    group = object()
    # accelerate wrapper -> ZeRO optimizer (holds the partition group) -> SNRAdamW
    assert deepspeed_partition_group(_Wrapper(_Wrapper(real, group)), real) is group
    # stage 0 / fp16 wrapper without a partition group: replicas, no group
    assert deepspeed_partition_group(_Wrapper(_Wrapper(real)), real) is None
    assert deepspeed_partition_group(real, real) is None
    # a group further out than the optimizer's direct wrapper does not count
    assert deepspeed_partition_group(_Wrapper(_Wrapper(real), group), real) is None


def test_callback_refuses_a_swapped_optimizer():
    from hf_snr.integration import SNRCallback

    class FakeTrainer:
        optimizer = _Wrapper(_Wrapper(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])))
        accelerator = None

    with pytest.raises(RuntimeError, match="AdamW"):
        SNRCallback(FakeTrainer()).on_train_begin(None, None, None)
