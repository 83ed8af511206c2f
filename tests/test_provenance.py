"""results.json's provenance: the git commit and dirtiness of the checkout, the run's argv, the seeds."""

import json
import pathlib
import shutil
import subprocess
import sys

from _recipe_module import load_recipe

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "configs" / "offline_tiny.yaml")


def _noisy_dpo():
    return load_recipe("noisy_dpo")


def test_results_carry_commit_argv_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    noisy_dpo = _noisy_dpo()
    argv = ["--config", TINY, "--train_pairs", "32", "--eval_pairs", "16", "--max_steps", "1", "--eval_strategy", "no",
            "--per_device_train_batch_size", "16", "--seed", "7", "--noise_seed", "3", "--output_dir", str(tmp_path)]
    noisy_dpo.main(*noisy_dpo.parse_args(argv))
    prov = json.loads((tmp_path / "results.json").read_text())["provenance"]
    assert prov["argv"] == argv and prov["seed"] == 7 and prov["noise_seed"] == 3
    assert prov["command"][0] == sys.executable
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True)
        assert prov["git_commit"] == head.stdout.strip() and len(prov["git_commit"]) == 40
        assert prov["git_dirty"] is bool(status.stdout.strip())


def test_outside_a_checkout_commit_is_none(tmp_path, monkeypatch):
    noisy_dpo = _noisy_dpo()
    monkeypatch.setattr(noisy_dpo, "_REPO", tmp_path)  # a folder that is no git checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    script, training, _ = noisy_dpo.parse_args(["--config", TINY, "--output_dir", str(tmp_path)])
    prov = noisy_dpo.provenance(script, training)
    assert prov["git_commit"] is None and prov["git_dirty"] is None
    assert prov["argv"] == ["--config", TINY, "--output_dir", str(tmp_path)] and prov["seed"] == 0
