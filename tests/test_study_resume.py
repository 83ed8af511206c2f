"""compare.py survives a kill: rerun with --reuse skips the runs whose results.json exists and runs the rest."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "configs" / "offline_tiny.yaml")


def test_killed_study_resumes_with_reuse(tmp_path):
    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "base_config": TINY,
        "args": {"model_name_or_path": "tiny", "train_pairs": 64, "eval_pairs": 16, "eval_steps": 3,
                 "logging_steps": 3, "per_device_train_batch_size": 16},
        "seeds": [0],
        "noise_rates": [0.3],
        "comparisons": [{"name": "resume", "title": "kill and resume", "arms": [
            {"name": "first", "optim": "adamw_torch", "learning_rate": 3.0e-3, "max_steps": 3},
            # long enough that the kill lands while it trains
            {"name": "second", "optim": "snr_adamw", "learning_rate": 1.0e-2, "max_steps": 150}]}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    first = out / "resume" / "runs" / "first" / "seed0" / "results.json"
    second = out / "resume" / "runs" / "second" / "seed0" / "results.json"
    cmd = [sys.executable, str(ROOT / "recipes" / "compare.py"), "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not first.exists():
            assert proc.poll() is None, "compare.py ended before the first run finished: " + proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run did not finish in 300 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: compare.py and anything it started
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "compare.py had finished before the kill: nothing was interrupted"
    assert not second.exists() and not (out / "summary.md").exists()
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    json.loads(before[0])  # complete (noisy_dpo writes it atomically)

    done = subprocess.run([*cmd, "--reuse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # skipped: not rerun, not rewritten
    results = json.loads(second.read_text())
    assert results["args"]["training"]["max_steps"] == 150
    assert any(e.get("step") == 150 for e in results["log_history"])
    summary = (out / "summary.md").read_text()
    assert "2 runs (1 reused from an earlier invocation" in summary
    table = (out / "resume" / "summary.md").read_text()
    assert "| first |" in table and "| second |" in table
