"""recipes/checkpoint_choice.py: the regret of each checkpoint choice, on hand-made logged runs."""

import json

import pytest
from _recipe_module import load_recipe

from hf_snr.monitor import MemorizationRule, choose


def _module():
    return load_recipe("checkpoint_choice")


def _write_run(root, regime, arm, seed, acc, clean_loss, noisy_loss, ratio):
    hist = []
    for i, step in enumerate((10, 20, 30, 40)):
        hist.append({"step": step, "loss": 0.5, "snr/noise_to_signal": ratio[i],
                     "snr/memorization_rate": ratio[i] / step})
        hist.append({"step": step, "eval_rewards/accuracies": acc[i], "eval_loss": clean_loss[i]})
        hist.append({"step": step, "noisyval_loss": noisy_loss[i]})
    path = root / regime / "runs" / arm / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"log_history": hist}))


def test_regrets_of_each_choice(tmp_path):
    cc = _module()
    _write_run(tmp_path, "many_passes_constant", "adamw", 2, acc=[0.6, 0.8, 0.75, 0.7],
               clean_loss=[0.7, 0.5, 0.55, 0.6], noisy_loss=[0.69, 0.70, 0.68, 0.71], ratio=[1.0, 1.0, 9.0, 9.0])
    (run,) = cc.load_dpo_runs(tmp_path)
    assert (run["regime"], run["schedule"], run["arm"], run["seed"], run["max_steps"]) == \
        ("many_passes", "constant", "adamw", 2, 40)
    rule = MemorizationRule(smoothing=1.0, rise=1.0, patience=2, min_fraction=0.0, keep="before_rise")
    c = cc.choices(run, rule)
    assert c["a_last"] == pytest.approx(0.1)        # last (0.7) vs best (0.8)
    assert c["b_noisy_val"] == pytest.approx(0.05)  # lowest noisy loss at step 30 (0.75)
    assert c["d_clean_val"] == pytest.approx(0.0)   # lowest clean loss at step 20
    assert c["c_rule"] == pytest.approx(0.0)        # the ratio jumps at 30, dominates at 40: keeps 20
    assert c["steps_saved"] == 0                    # it said so at the last step
    assert choose(rule, run["steps"], run["ratio"], 40) == (20, 40)
    never = MemorizationRule(rise=100.0)
    assert cc.choices(run, never)["c_rule"] == pytest.approx(0.1)  # never dominates: the last checkpoint


def test_a_study_named_by_regime_only_takes_the_schedule_from_the_run_and_the_frozen_rule(tmp_path):
    cc = _module()
    _write_run(tmp_path, "many_passes", "adamw", 1, acc=[0.6, 0.8, 0.75, 0.7],
               clean_loss=[0.7, 0.5, 0.55, 0.6], noisy_loss=[0.69, 0.70, 0.68, 0.71], ratio=[1.0, 1.0, 9.0, 9.0])
    path = tmp_path / "many_passes" / "runs" / "adamw" / "seed1" / "results.json"
    r = json.loads(path.read_text())
    r["args"] = {"training": {"lr_scheduler_type": "linear"}}
    path.write_text(json.dumps(r))
    (run,) = cc.load_dpo_runs(tmp_path)
    assert (run["regime"], run["schedule"]) == ("many_passes", "linear")
    out = cc.main([str(tmp_path), "--frozen"])
    frozen = cc.choices(run, MemorizationRule())
    assert out["all runs"]["by_regime"]["many_passes"]["c_rule"] == pytest.approx(frozen["c_rule"])
    assert out["all runs"]["by_regime"]["many_passes"]["a_last"] == pytest.approx(0.1)
    assert "arm adamw" in out and (tmp_path / "regret.md").read_text().startswith("# Which checkpoint")
