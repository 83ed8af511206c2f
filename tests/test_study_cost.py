"""recipes/study_cost.py: per-arm and total wall / CPU time of a study, on hand-made results."""

import json

import pytest
from _recipe_module import load_recipe


def _module():
    return load_recipe("study_cost")


def _run(root, comparison, arm, seed, wall, cpu, steps=36):
    path = root / comparison / "runs" / arm / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"wall_time_s": wall, "cpu_time_s": cpu,
                                "log_history": [{"step": s, "loss": 0.5} for s in range(6, steps + 1, 6)]}))


def test_per_arm_means_and_totals(tmp_path):
    sc = _module()
    sweep, main = tmp_path / "sweep", tmp_path / "main"
    _run(sweep, "many_passes", "adamw_lr=1e-5", 0, 300.0, 290.0)
    _run(sweep, "many_passes", "adamw_lr=3e-5", 0, 280.0, 270.0)
    _run(main, "many_passes", "adamw", 1, 400.0, 390.0)
    _run(main, "many_passes", "adamw", 2, 200.0, 210.0)
    (tmp_path / "main" / "many_passes" / "runs" / "adamw" / "seed3").mkdir()  # unfinished: no results.json
    out = sc.main([str(sweep), str(main), "--out", str(tmp_path / "cost.md")])
    arm = next(a for a in out["per_arm"] if a["study"] == "main")
    assert (arm["runs"], arm["wall_s"], arm["cpu_s"], arm["steps"]) == (2, 300.0, 300.0, 36)
    assert out["totals"]["sweep"]["runs"] == 2 and out["totals"]["all"]["runs"] == 4
    assert out["totals"]["all"]["cpu_h"] == pytest.approx((290 + 270 + 390 + 210) / 3600)
    assert out["totals"]["main"]["wall_h"] == pytest.approx(600 / 3600)
    assert "| main | 2 | 0.17 | 0.17 |" in (tmp_path / "cost.md").read_text()
    with pytest.raises(SystemExit, match="no finished runs"):
        sc.main([str(tmp_path / "nothing")])
