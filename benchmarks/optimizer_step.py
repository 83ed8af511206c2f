"""Step time and memory of SNRAdamW against torch.optim.AdamW, printed as a markdown table.

    PYTHONPATH=. python benchmarks/optimizer_step.py [--size 50] [--dtype fp32 bf16] [--steps 30]

The "model" is a list of parameters with the shapes of a GPT-style stack (d_model 512, per layer
qkv, out, MLP up/down, two norms and the biases), as many layers as make --size million
parameters. Gradients are random and fixed: an optimizer step does not depend on where the
gradient came from, and leaving out forward/backward keeps the measurement to the optimizer.

Contestants: SNRAdamW (foreach and per-tensor paths; warmup_steps=0 so that the gate is computed
every step, default mask "snr") and AdamW (foreach and fused). All update the *same* parameter
tensors and read the same gradients (each keeps its own state), so memory holds one model.

Measured, one run, all reported as ratios to AdamW-foreach at the same dtype:
* step time: median over --steps interleaved rounds (each round steps every optimizer once, in a
  rotating order, so background load hits all alike). Wall clock, torch's own thread count (or
  --threads). Also the median process CPU time: with --threads 1 it is the least disturbed by
  other processes on a shared machine (with several threads it includes OpenMP spin-waits).
* state bytes: counted directly, sum of nbytes of every tensor in optimizer.state (the 0-d step
  counters included; they add 4 bytes per tensor to both sides).
* transient peak: the most memory a step allocates above what existed before it, read from torch's
  CPU allocator events (torch.profiler, profile_memory=True) over one warm step. This counts every
  tensor torch allocates on CPU (intermediates of foreach kernels, fp32 copies of bf16 params and
  grads); it does not count allocator caching or the Python heap. RSS is not used: on a shared
  machine it mostly measures what glibc keeps mapped.

Reading the numbers: SNRAdamW keeps fp32 state for every parameter dtype (by design), torch's
AdamW keeps its state in the parameter's dtype. So in fp32 SNRAdamW's state is 1.5x AdamW's and
the step does comparable work; in bf16 its state is 3x AdamW's (fp32 vs bf16 moments) and every
step converts gradients and parameters, so expect the bf16 time ratio to be well above the fp32
one. On CPU SNRAdamW's foreach path runs in cache-sized blocks (see hf_snr/optimizer.py), which is
why its transient memory is a few MiB where AdamW-foreach allocates a model-sized temporary.
On a machine shared with other jobs, prefer --threads 1: with several threads every op waits for
all of them, and a descheduled thread stalls each of the ~20 ops per block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_snr.optimizer import SNRAdamW  # noqa: E402

D_MODEL = 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_shapes(d: int) -> list[tuple[int, ...]]:
    return [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]


def make_model(size_m: float, dtype: torch.dtype, seed: int = 0):
    per_layer = sum(torch.Size(s).numel() for s in layer_shapes(D_MODEL))
    n_layers = max(1, round(size_m * 1e6 / per_layer))
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n_layers):
        for shape in layer_shapes(D_MODEL):
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
            params.append(p)
    return params


def contestants(params):
    hp = dict(lr=1e-4, weight_decay=0.01)
    return {
        "SNRAdamW foreach": SNRAdamW(params, foreach=True, warmup_steps=0, **hp),
        "SNRAdamW per-tensor": SNRAdamW(params, foreach=False, warmup_steps=0, **hp),
        "AdamW foreach": torch.optim.AdamW(params, foreach=True, **hp),
        "AdamW fused": torch.optim.AdamW(params, fused=True, **hp),
    }


def state_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def transient_peak(opt) -> int:
    """Peak bytes allocated above the level at the start of one step (torch CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    level = peak = 0
    for e in mem:
        level += e["args"]["Bytes"]  # negative for a free
        peak = max(peak, level)
    return peak


def bench(size_m: float, dtype_name: str, steps: int) -> list[dict]:
    dtype = DTYPES[dtype_name]
    params = make_model(size_m, dtype)
    n_params = sum(p.numel() for p in params)
    opts = contestants(params)
    names = list(opts)
    for opt in opts.values():  # create the state and warm up kernels and the allocator
        for _ in range(2):
            opt.step()
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            opts[n].step()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    rows = []
    for n in names:
        rows.append(dict(name=n, dtype=dtype_name, n_params=n_params, n_tensors=len(params),
                         time=statistics.median(times[n]), cpu=statistics.median(cpu[n]),
                         state=state_bytes(opts[n]),
                         peak=transient_peak(opts[n])))
    del opts, params
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one row per optimizer and dtype; ratios to AdamW-foreach at the same dtype."""
    out = ["| dtype | optimizer | step ms (median) | time / AdamW foreach | CPU time / AdamW foreach | state MiB"
           " | state / AdamW foreach | transient peak MiB | peak / AdamW foreach |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        ref = next(r for r in sub if r["name"] == "AdamW foreach")
        for r in sub:
            out.append(
                f"| {dtype} | {r['name']} | {r['time'] * 1e3:.1f} | {r['time'] / ref['time']:.2f}x | "
                f"{r['cpu'] / ref['cpu']:.2f}x | "
                f"{r['state'] / 2**20:.1f} | {r['state'] / ref['state']:.3f}x | {r['peak'] / 2**20:.1f} | "
                f"{r['peak'] / ref['peak']:.2f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=float, default=50.0, help="model size in millions of parameters (default 50)")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (each steps every optimizer once)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtype:
        rows += bench(args.size, dtype, args.steps)
    r0 = rows[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {r0['n_params'] / 1e6:.1f}M parameters "
          f"in {r0['n_tensors']} tensors, {args.steps} interleaved rounds\n")
    print(table(rows))


if __name__ == "__main__":
    main()
