"""Per-step host (Python) overhead of SNRAdamW on many small tensors, the LoRA case: a markdown table and JSON lines.

    python benchmarks/step_overhead.py [--tensors 420] [--rank 16] [--width 576] [--rounds 200]
        [--threads 1] [--json results.jsonl]

What it measures: the step time of optimizers over --tensors LoRA-sized fp32 CPU tensors, alternately
lora_A (rank x width) and lora_B (width x rank); the defaults are rank-16 adapters on a 576-wide model
with 30 layers x 7 linear layers (210 pairs). Each tensor is tiny (9k elements), so the arithmetic is
little and the step time is mostly per-tensor host work: Python loops, dispatch, state look-ups, kernel
launches. Contestants: torch AdamW (foreach, fused) and SNRAdamW (warmup_steps=0, so the gate is computed
every step): foreach path (default nonfinite="skip"), fused (skip and "propagate"), fused with
reduction="row", and the per-tensor path (foreach=False; fewer rounds, it is slow). Gradients are random
and set once. Each contestant is warmed up first (the fused C kernel is built at first use; that is
never timed). Then interleaved rounds: each round steps every contestant once, in a rotating order, so
background load hits all alike. Reported: median wall ms per step, median process CPU ms per step
(time.process_time; with one thread the least disturbed by other processes) and ratios to AdamW foreach
and fused measured in the same run.

Why: the per-step Python overhead on many small tensors must not grow when the optimizer code is
reorganised. Absolute times depend on the machine; compare ratios (or times) of two checkouts run back to
back on a quiet machine:

    PYTHONPATH=/path/to/other/checkout HF_SNR_AUTOREGISTER=0 python benchmarks/step_overhead.py --json a.jsonl
    HF_SNR_AUTOREGISTER=0 python benchmarks/step_overhead.py --json b.jsonl

The header JSON line records which hf_snr was imported (file path, git commit of its checkout), torch,
host and CPU model, so the two files say what they measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

try:  # PYTHONPATH (another checkout) first; this checkout only as a fallback
    from hf_snr.optimizer import SNRAdamW
except ImportError:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_snr.optimizer import SNRAdamW

WARMUP = 3


def make_params(n: int, rank: int, width: int, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i in range(n):
        shape = (rank, width) if i % 2 == 0 else (width, rank)  # lora_A, lora_B
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def contestants(params) -> dict[str, tuple[object, int]]:
    """name -> (optimizer, rounds divisor); a contestant this checkout cannot build is left out, with a note."""
    hp = dict(lr=1e-4, weight_decay=0.01)
    snr = dict(warmup_steps=0, **hp)
    specs = {
        "AdamW foreach": (lambda: torch.optim.AdamW(params, foreach=True, **hp), 1),
        "AdamW fused": (lambda: torch.optim.AdamW(params, fused=True, **hp), 1),
        "SNRAdamW foreach (skip)": (lambda: SNRAdamW(params, foreach=True, fused=False, **snr), 1),
        "SNRAdamW fused (skip)": (lambda: SNRAdamW(params, fused=True, **snr), 1),
        "SNRAdamW fused, propagate": (lambda: SNRAdamW(params, fused=True, nonfinite="propagate", **snr), 1),
        "SNRAdamW fused, reduction=row": (lambda: SNRAdamW(params, fused=True, reduction="row", **snr), 1),
        "SNRAdamW per-tensor": (lambda: SNRAdamW(params, foreach=False, fused=False, **snr), 4),
    }
    out = {}
    for name, (build, every) in specs.items():
        try:
            out[name] = (build(), every)
        except Exception as e:  # e.g. an older checkout without this option
            print(f"left out {name}: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def header(args) -> dict:
    import hf_snr.optimizer as mod

    where = os.path.dirname(os.path.abspath(mod.__file__))
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:  # read-only: does the working tree differ from the commit?
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=where, capture_output=True,
                                   timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(kind="header", torch=torch.__version__, python=platform.python_version(), hf_snr_file=mod.__file__,
                git_commit=commit, git_dirty=dirty, hostname=socket.gethostname(), cpu_model=cpu,
                threads=torch.get_num_threads(), argv=sys.argv[1:], time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def bench(args) -> list[dict]:
    params = make_params(args.tensors, args.rank, args.width)
    opts = contestants(params)
    names = list(opts)
    for opt, _ in opts.values():  # state creation, the fused kernel's build/load, allocator warm-up
        for _ in range(WARMUP):
            opt.step()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            opt, every = opts[n]
            if r % every:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    config = dict(tensors=args.tensors, rank=args.rank, width=args.width, rounds=args.rounds,
                  threads=torch.get_num_threads(), n_params=sum(p.numel() for p in params), dtype="fp32", device="cpu")
    rows = [dict(kind="step", config=config, name=n, median_ms=statistics.median(wall[n]) * 1e3,
                 cpu_ms=statistics.median(cpu[n]) * 1e3, samples=len(wall[n])) for n in names]
    ref = {r["name"]: r["median_ms"] for r in rows}
    for r in rows:
        r["ratio_to_adamw_foreach"] = r["median_ms"] / ref["AdamW foreach"] if "AdamW foreach" in ref else None
        r["ratio_to_adamw_fused"] = r["median_ms"] / ref["AdamW fused"] if "AdamW fused" in ref else None
    return rows


def table(rows: list[dict]) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    out = ["| optimizer | steps timed | ms / step (median) | CPU ms / step | / AdamW foreach | / AdamW fused |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['samples']} | {r['median_ms']:.3f} | {r['cpu_ms']:.3f} | "
                   f"{fmt(r['ratio_to_adamw_foreach'])} | {fmt(r['ratio_to_adamw_fused'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=420, help="number of tensors, alternately lora_A and lora_B")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--rounds", type=int, default=200, help="timed interleaved rounds (per-tensor: every 4th)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="append a header line and one JSON line per contestant")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header(args)
    rows = bench(args)
    print(f"torch {head['torch']}, hf_snr {head['hf_snr_file']} @ {head['git_commit']}"
          f"{' (dirty)' if head['git_dirty'] else ''}, {args.tensors} tensors ({args.rank}x{args.width}), "
          f"{args.rounds} rounds, {torch.get_num_threads()} thread(s)\n")
    print(table(rows))
    if args.json:
        with open(args.json, "a") as f:
            f.write("\n".join(json.dumps(x) for x in [head, *rows]) + "\n")


if __name__ == "__main__":
    main()
