"""recipes/grokking.py (and grokking_study.py): the smoke config end to end, the data, Spearman, option checks."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from _recipe_module import load_recipe

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs" / "grokking"
SMOKE = str(CONFIGS / "grokking_smoke.yaml")


@pytest.fixture(scope="module")
def grokking():
    return load_recipe("grokking")


@pytest.fixture(scope="module")
def study(grokking):
    return load_recipe("grokking_study")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _check_results(res, out_dir, optim):
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["args"]["optim"] == optim
    assert (out_dir / "accuracy.png").stat().st_size > 1000
    rows = on_disk["log"]
    assert rows and all({"step", "train_loss", "train_acc", "heldout_loss", "heldout_acc", "wall_s"} <= set(r)
                        for r in rows)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert [k.split("_")[0] for k in on_disk["thresholds"]] == ["train", "heldout"]
    for name, th in on_disk["thresholds"].items():
        assert th["reached"] == (th["step"] is not None)
        if th["reached"]:  # the first eval at or above the threshold
            key = name.split("_")[0] + "_acc"
            first = next(r["step"] for r in rows if r[key] >= th["threshold"])
            assert th["step"] == first
    assert "train_loss" in on_disk["risk_tracking"]
    for metrics in on_disk["risk_tracking"].values():
        assert set(metrics) >= {"spearman_heldout_loss", "spearman_gap", "spearman_delta", "rel_error_heldout",
                                "rel_error_gap", "n"}
    assert on_disk["timing"]["steps_per_s"] > 0 and on_disk["timing"]["torch_threads"] == 1
    if optim == "snr_adamw":
        snr_keys = {k for k in rows[-1] if k.startswith("snr/")}
        assert "snr/mask_mean" in snr_keys and all(r["snr/mask_mean"] is not None for r in rows)
        assert snr_keys <= set(on_disk["risk_tracking"])  # every logged statistic is analysed
        assert 0 < on_disk["gate_mean"] <= 1
    else:
        assert not any(k.startswith("snr/") for k in rows[-1]) and on_disk["gate_mean"] is None
    return on_disk


# -- end to end --------------------------------------------------------------------------------------
def test_smoke_command_line(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(RECIPES / "grokking.py"), "--config", SMOKE, "--output_dir", str(out),
                           "--max_steps", "60", "--optim_args", "mask=snr,softness=3"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _check_results(None, out, "snr_adamw")
    assert res["args"]["max_steps"] == 60 and res["args"]["prime"] == 23  # flag over file, file over default
    assert res["optimizer"]["optimizer_kwargs"]["softness"] == 3.0
    assert res["steps_run"] == 60 and res["log"][-1]["step"] == 60
    assert "grokking: snr_adamw" in proc.stdout


def test_smoke_main_adamw_reaches_train_threshold(grokking, tmp_path):
    args = grokking.parse_args(["--config", SMOKE, "--optim", "adamw", "--output_dir", str(tmp_path), "--quiet",
                                "true"])
    res = grokking.main(args)
    on_disk = _check_results(res, tmp_path, "adamw")
    assert set(on_disk["thresholds"]) == {"train_99", "heldout_95"}
    assert on_disk["thresholds"]["train_99"]["reached"]  # the smoke task is fitted within 200 steps
    assert on_disk["data"] == {"pairs": 23 * 22, "train": 253, "heldout": 253, "data_seed": 0, "batch_size": 64,
                               "vocab": 25}


def test_main_snr_optim_args_generic_and_stop_after_grok(grokking, tmp_path):
    # alpha=auto resolved from the data; exclude gives the head plain AdamW; unknown future keys go through
    # parse_optim_args (tested by the CLI test); stop_after_grok stops 0 evals after both thresholds.
    args = grokking.parse_args(["--config", SMOKE, "--output_dir", str(tmp_path), "--quiet", "true",
                                "--optim_args", "alpha=auto,exclude=head", "--max_steps", "40",
                                "--heldout_threshold", "0.01", "--train_threshold", "0.01",
                                "--stop_after_grok", "0"])
    res = grokking.main(args)
    _check_results(res, tmp_path, "snr_adamw")
    assert res["steps_run"] == 20 and res["stopped_early"]  # both "thresholds" met at the first eval
    assert res["optimizer"]["excluded"] == ["head.weight"]
    assert 0 < res["optimizer"]["optimizer_kwargs"]["alpha"] < 1 and "b/(n-b)" in res["optimizer"]["alpha_reason"]


# -- data --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [23, 97])
def test_division_split(grokking, p):
    data = grokking.make_split(p, "division", 0.25, seed=0)
    n = p * (p - 1)
    n_train, n_ho = len(data["train_y"]), len(data["heldout_y"])
    assert n_train + n_ho == n and n_train == round(0.25 * n)
    tr = {tuple(r) for r in data["train_x"].tolist()}
    ho = {tuple(r) for r in data["heldout_x"].tolist()}
    assert len(tr) == n_train and len(ho) == n_ho and not tr & ho
    x = torch.cat([data["train_x"], data["heldout_x"]])
    y = torch.cat([data["train_y"], data["heldout_y"]])
    a, op, b, eq = x.unbind(1)
    assert (op == p).all() and (eq == p + 1).all() and (b != 0).all()
    assert ((y * b) % p == a).all()  # c = a * b^-1  <=>  c * b = a (mod p)
    assert {(int(i), int(j)) for i, j in zip(a, b)} == {(i, j) for i in range(p) for j in range(1, p)}
    again = grokking.make_split(p, "division", 0.25, seed=0)
    assert torch.equal(again["train_x"], data["train_x"])  # seeded
    assert not torch.equal(grokking.make_split(p, "division", 0.25, seed=1)["train_x"], data["train_x"])


@pytest.mark.parametrize("op,fn", [("addition", lambda a, b, p: (a + b) % p),
                                   ("subtraction", lambda a, b, p: (a - b) % p),
                                   ("multiplication", lambda a, b, p: (a * b) % p)])
def test_other_operations(grokking, op, fn):
    p = 11
    a, b, c = grokking.operation_table(p, op)
    assert len(c) == p * p and (c == fn(a, b, p)).all()


def test_batch_stream_epochs(grokking):
    stream = grokking.BatchStream(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([stream.next() for _ in range(5)])  # 20 indices = exactly 2 epochs
    assert torch.equal(torch.bincount(seen, minlength=10), torch.full((10,), 2))
    assert grokking.BatchStream(10, 512, torch.Generator()).next().numel() == 10  # capped at the set


def test_last_only_block_is_the_last_row(grokking):
    torch.manual_seed(0)
    model = grokking.GrokTransformer(13, width=16, heads=4, layers=2)
    x = torch.randint(0, 13, (5, 4))
    h = model.tok(x) + model.pos.weight
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model(x), model.head(model.ln_f(h[:, -1])))


# -- analysis ----------------------------------------------------------------------------------------
def test_rankdata_and_spearman(grokking):
    assert grokking.rankdata([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert grokking.rankdata([1, 1, 1]) == [2.0, 2.0, 2.0]
    assert grokking.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert grokking.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert grokking.spearman([1, 2, 3, 4, 5], [1, 100, 2, 3, 4]) == pytest.approx(0.4)  # 1 - 6*12/120
    # with ties, by hand: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; Pearson = 4.5 / sqrt(4.5 * 5)
    assert grokking.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert grokking.spearman([1, 1, 1], [1, 2, 3]) is None and grokking.spearman([1, 2], [1, 2]) is None


def test_risk_tracking(grokking):
    rows = [{"step": s, "train_loss": t, "heldout_loss": h, "snr/cumulative_noise": c, "snr/const": 1.0}
            for s, t, h, c in [(1, 3.0, 4.0, 0.5), (2, 1.0, 5.0, 1.0), (3, 0.5, 6.0, 2.0), (4, 0.1, 3.0, 2.5)]]
    rt = grokking.risk_tracking(rows)
    assert set(rt) == {"train_loss", "snr/cumulative_noise", "snr/const", "train_loss+snr/cumulative_noise"}
    cn = rt["snr/cumulative_noise"]
    assert cn["n"] == 4 and cn["spearman_heldout_loss"] == pytest.approx(grokking.spearman([1, 2, 3, 4], [4, 5, 6, 3]))
    assert cn["spearman_gap"] == pytest.approx(0.4)  # gaps 1, 4, 5.5, 2.9: ranks 1,3,4,2 vs 1..4; 1 - 6*6/60
    assert cn["spearman_gap"] == pytest.approx(grokking.spearman([0.5, 1, 2, 2.5], [1, 4, 5.5, 2.9]))
    # per-interval changes: noise +0.5, +1, +0.5; held-out +1, +1, -3
    assert cn["spearman_delta"] == pytest.approx(grokking.spearman([0.5, 1.0, 0.5], [1.0, 1.0, -3.0]))
    assert cn["rel_error_heldout"] == pytest.approx((3.5 + 4 + 4 + 0.5) / 18)
    assert cn["rel_error_gap"] == pytest.approx((0.5 + 3 + 3.5 + 0.4) / 13.4)
    assert rt["snr/const"]["spearman_heldout_loss"] is None  # a constant has no rank correlation
    derived = rt["train_loss+snr/cumulative_noise"]
    assert derived["rel_error_heldout"] == pytest.approx((0.5 + 3 + 3.5 + 0.4) / 18)


# -- option checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,expected", [
    ("--train_fraction", "1.5", "Invalid train_fraction: 1.5 (accepted: a number in (0, 1), exclusive)"),
    ("--optim", "sgd", "Invalid optim: 'sgd' (accepted: one of adamw, snr_adamw)"),
    ("--prime", "96", "Invalid prime: 96 (accepted: a prime >= 3)"),
    ("--operation", "power", "Invalid operation: 'power'"),
    ("--optim_args", "mask=fuzzy", "mask='fuzzy'"),
])
def test_bad_option_fails_clearly(grokking, flag, value, expected):
    with pytest.raises(ValueError) as err:
        grokking.parse_args(["--config", SMOKE, flag, value])
    assert expected in str(err.value)


def test_bad_option_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPES / "grokking.py"), "--config", SMOKE, "--train_fraction", "1.5",
                           "--output_dir", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Invalid train_fraction: 1.5 (accepted: a number in (0, 1), exclusive)" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_adamw_refuses_optim_args(grokking):
    with pytest.raises(ValueError, match="optim_args are SNRAdamW options"):
        grokking.parse_args(["--config", SMOKE, "--optim", "adamw", "--optim_args", "mask=soft"])


# -- configs and the study ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grokking.yaml", "grokking_smoke.yaml"])
def test_configs_parse(grokking, name):
    import yaml

    args = grokking.parse_args(["--config", str(CONFIGS / name)])
    for key, value in yaml.safe_load((CONFIGS / name).read_text()).items():
        assert getattr(args, key) == value, key


def test_study_config_expands(study):
    config = study.load_config(CONFIGS / "grokking_study.yaml")
    plan = study.expand(config, "out")
    assert plan and len({p[-1] for p in plan}) == len(plan)
    for arm, lr, wd, seed, run_dir in plan:
        if arm.matched_to is None:
            study.run_args(config, arm, lr, wd, seed, run_dir)  # every plain run's options validate


def test_study_end_to_end_with_matched_arm(study, tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(
        f"base_config: {SMOKE}\n"
        "args: {max_steps: 40, eval_every: 20}\n"
        "seeds: [0, 1]\n"
        "arms:\n"
        "  - {name: snr, optim: snr_adamw, optim_args: 'softness=3', learning_rate: 3.0e-3, weight_decay: 1.0}\n"
        "  - {name: adamw_matched, optim: adamw, matched_to: snr, learning_rate: 3.0e-3, weight_decay: 1.0}\n")
    out = tmp_path / "out"
    summary = study.main(["--config", str(cfg), "--output_dir", str(out)])
    assert summary["pending"] == 0 and len(summary["runs"]) == 4
    snr_row, matched = summary["rows"]
    # one process runs in plan order (seed-major): the matched arm reads the snr runs finished before it, seed 0
    g = json.loads((out / "runs" / "snr" / "lr0.003_wd1" / "seed0" / "results.json").read_text())["gate_mean"]
    assert 0 < g < 1 and matched["gate_used"] == pytest.approx(g) and "seeds [0]" in matched["gate_source"]
    assert 0 < snr_row["gate_mean"] < 1
    assert matched["actual_lr"] == [pytest.approx(3e-3 * g)] and matched["actual_wd"] == [pytest.approx(1.0 / g)]
    md = (out / "summary.md").read_text()
    assert "| snr | softness=3 |" in md and "adamw_matched" in md and "Risk tracking" in md
    assert (out / "accuracy.png").stat().st_size > 1000 and json.loads((out / "summary.json").read_text())["rows"]
    res = json.loads((out / "runs" / "adamw_matched" / "lr0.003_wd1" / "seed1" / "results.json").read_text())
    assert res["args"]["learning_rate"] == pytest.approx(3e-3 * g)
    # a rerun reuses every finished run
    mtime = (out / "runs" / "snr" / "lr0.003_wd1" / "seed0" / "results.json").stat().st_mtime
    study.main(["--config", str(cfg), "--output_dir", str(out)])
    assert (out / "runs" / "snr" / "lr0.003_wd1" / "seed0" / "results.json").stat().st_mtime == mtime
