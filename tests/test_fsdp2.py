"""SNRAdamW under FSDP2 (2 processes, gloo, CPU) equals the single-process run.

The worker (tests/distributed/fsdp2_snr.py) does the comparison on rank 0 against a plain
single-process copy trained on the same full batch; see its docstring for the cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "fsdp2_snr.py"
CASES = 9


@pytest.mark.slow
def test_fsdp2_two_processes_equal_single_process():
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"FSDP2 worker timed out after 300 s\n{(exc.stdout or '')[-4000:]}\n{(exc.stderr or '')[-4000:]}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("FSDP2-SNR-OK")]
    assert len(ok) == CASES, log[-8000:]


@pytest.mark.slow
def test_ddp_microbatch_variance_equals_single_process_on_the_same_micro_batches():
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    worker = ROOT / "tests" / "distributed" / "ddp_microbatch.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert "DDP-MICROBATCH-OK" in proc.stdout, log[-8000:]
    assert "pools the micro-batch gradients of all 2 ranks" in log  # the auto-detected group is announced
