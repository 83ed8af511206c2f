"""results.json's provenance: the git commit and dirtiness of the checkout, the run's argv, the seeds."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
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
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert noisy_dpo.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}  # a folder that is no checkout
    script, training, _ = noisy_dpo.parse_args(["--config", TINY, "--output_dir", str(tmp_path)])
    prov = noisy_dpo.provenance(script, training)
    assert prov["argv"] == ["--config", TINY, "--output_dir", str(tmp_path)] and prov["seed"] == 0


def _git(repo, *cmd):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *cmd], check=True,
                   capture_output=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_the_one_the_code_was_imported_from(tmp_path, monkeypatch):
    """A study runs for hours while finished runs are committed: each run must name the commit of the code it
    executes (imported when the study started; compare.py's forked workers inherit it), not the checkout's HEAD
    when the run ends."""
    import importlib.util

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "checkout"
    (repo / "recipes").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "noisy_dpo.py", repo / "recipes" / "noisy_dpo.py")
    (repo / "results.txt").write_text("none yet\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    first = _git(repo, "commit", "-q", "-m", "code")
    spec = importlib.util.spec_from_file_location("noisy_dpo_in_checkout", repo / "recipes" / "noisy_dpo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # the study starts: the code is imported at `first`
    (repo / "results.txt").write_text("run 1 finished\n")
    second = _git(repo, "commit", "-q", "-am", "results")  # the checkout moves on during the study
    (repo / "results.txt").write_text("run 2 in progress\n")  # and is dirty now
    assert second != first and module.git_state() == {"git_commit": second, "git_dirty": True}
    script, training, _ = module.parse_args(["--config", TINY, "--output_dir", str(tmp_path / "out")])
    prov = module.provenance(script, training)
    assert (prov["git_commit"], prov["git_dirty"]) == (first, False)
