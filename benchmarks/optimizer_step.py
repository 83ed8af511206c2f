"""Step time and memory of SNRAdamW against torch.optim.AdamW: a markdown table and one JSON line per row.

    python benchmarks/optimizer_step.py [--size 50] [--dtype fp32 bf16] [--steps 30] [--threads 1 0]
        [--device cpu|cuda] [--json results.jsonl]

--threads takes several values and measures each (0 = torch's default, all cores). Each printed JSON
line carries the configuration (device, dtype, threads, sizes), the optimizer, its median step time and
its ratios to AdamW fused (the step users compare with) and AdamW foreach measured in the same run.
The fused kernel's one-off build time (the C compiler at first use; cached afterwards) is reported on
its own line, never inside a step time.

The "model" is a list of parameters with the shapes of a GPT-style stack (d_model 512, per layer
qkv, out, MLP up/down, two norms and the biases), as many layers as make --size million
parameters. Gradients are random and fixed: an optimizer step does not depend on where the
gradient came from, and leaving out forward/backward keeps the measurement to the optimizer.

Contestants: SNRAdamW fused (fused=True: default non-finite check "skip", and "propagate", which
does no check, as AdamW; and with a bf16 variance), foreach and per-tensor (warmup_steps=0 so that
the gate is computed every step, default mask "snr") and AdamW (foreach and fused). On CPU also the
non-finite check alone (the C loop that "skip" runs inside the step's first kernel call, here on its
own): the default's time is about propagate's plus this one read of the gradients. All update the *same* parameter
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
A second table gives, for each fused stepper, the bytes it must read per parameter (read_bytes) and the
rate it read them at: in fp32 on one core all read at the same rate, so the time ratios are the ratios
of those bytes (AdamW 16, SNRAdamW 20, and 24 with the default non-finite check, which must read the
gradients before anything is written). On a machine shared with other jobs, prefer --threads 1: with several threads every op waits for
all of them, and a descheduled thread stalls each of the ~20 ops per block.
"""  # noqa: E501 (a line of the docstring: rewrapping it would change __doc__)

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


def make_model(size_m: float, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    per_layer = sum(torch.Size(s).numel() for s in layer_shapes(D_MODEL))
    n_layers = max(1, round(size_m * 1e6 / per_layer))
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n_layers):
        for shape in layer_shapes(D_MODEL):
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
            params.append(p)
    return params


def contestants(params, per_tensor: bool = True):
    hp = dict(lr=1e-4, weight_decay=0.01)
    snr = dict(warmup_steps=0, **hp)
    out = {
        "SNRAdamW fused": SNRAdamW(params, fused=True, **snr),
        "SNRAdamW fused, nonfinite=propagate": SNRAdamW(params, fused=True, nonfinite="propagate", **snr),
        "SNRAdamW fused, bf16 variance": SNRAdamW(params, fused=True, state_dtype="bfloat16", **snr),
        "SNRAdamW fused, mask=none (monitor)": SNRAdamW(params, fused=True, mask="none", **snr),
        "SNRAdamW foreach": SNRAdamW(params, foreach=True, **snr),
        "AdamW foreach": torch.optim.AdamW(params, foreach=True, **hp),
        "AdamW fused": torch.optim.AdamW(params, fused=True, **hp),
    }
    if per_tensor:
        out["SNRAdamW per-tensor"] = SNRAdamW(params, foreach=False, **snr)
    if params[0].device.type == "cpu":
        from hf_snr import fused_cpu

        if fused_cpu.available():
            out[CHECK_ONLY] = _CheckOnly(params)
    return out


CHECK_ONLY = "non-finite check alone (one read of the gradients)"


class _CheckOnly:
    """What nonfinite="skip" adds to a fused CPU step, alone: the kernel's inf/nan check of every gradient
    (fused_cpu.any_nonfinite, the same C loop the step's first call runs). A stepper, not an optimizer: no state."""

    def __init__(self, params):
        from hf_snr import fused_cpu

        self.any_nonfinite = fused_cpu.any_nonfinite  # (no import inside the timed step)
        self.grads = [p.grad for p in params]
        self.state: dict = {}

    def step(self):
        if self.any_nonfinite(self.grads):
            raise RuntimeError("the benchmark's gradients are finite")


def read_bytes(name: str, dtype_name: str) -> int | None:
    """Bytes per parameter a fused stepper reads at the least (each tensor once; None for the others).

    AdamW: p, g, m, v (its state in the parameter's dtype); SNRAdamW: p, g and fp32 m, v, s (s bf16 with a
    bf16 variance), plus g once more for the default non-finite skip. Where the step is bound by how fast
    one core reads (fp32, one thread, a model far larger than the caches) the time ratios follow these
    bytes' ratios; where it is bound by arithmetic (bf16 conversions) or the data sits in cache, they do not.
    """
    w = 4 if dtype_name == "fp32" else 2
    table = {
        "AdamW fused": 4 * w,
        "SNRAdamW fused": 2 * w + 12 + w,
        "SNRAdamW fused, nonfinite=propagate": 2 * w + 12,
        "SNRAdamW fused, bf16 variance": 2 * w + 10 + w,
        "SNRAdamW fused, mask=none (monitor)": 2 * w + 12 + w,  # the gate is skipped, the variance EMA is not
        CHECK_ONLY: w,
    }
    return table.get(name)


def state_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def transient_peak(opt, device: str = "cpu") -> int:
    """Peak bytes allocated above the level at the start of one step (torch's allocator)."""
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(size_m: float, dtype_name: str, steps: int, device: str = "cpu", per_tensor: bool = True) -> list[dict]:
    dtype = DTYPES[dtype_name]
    params = make_model(size_m, dtype, device=device)
    n_params = sum(p.numel() for p in params)
    opts = contestants(params, per_tensor)
    names = list(opts)
    for opt in opts.values():  # create the state and warm up kernels and the allocator
        for _ in range(2):
            opt.step()
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            opts[n].step()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    rows = []
    for n in names:
        rows.append(dict(name=n, device=device, dtype=dtype_name, threads=torch.get_num_threads(), n_params=n_params,
                         n_tensors=len(params), time=statistics.median(times[n]), cpu=statistics.median(cpu[n]),
                         state=state_bytes(opts[n]), peak=transient_peak(opts[n], device)))
    for r in rows:  # the bytes each fused stepper must read per parameter, and the rate it read them at
        b = read_bytes(r["name"], dtype_name)
        if b is not None:
            r["read_bytes_per_param"] = b
            r["read_gb_per_s"] = b * n_params / r["time"] / 1e9
    fused_ref = next(r for r in rows if r["name"] == "AdamW fused")
    foreach_ref = next(r for r in rows if r["name"] == "AdamW foreach")
    for r in rows:
        r["time_vs_adamw_fused"] = r["time"] / fused_ref["time"]
        r["time_vs_adamw_foreach"] = r["time"] / foreach_ref["time"]
        r["state_vs_adamw_fused"] = r["state"] / fused_ref["state"]
    del opts, params
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one row per optimizer, dtype and thread count; ratios to AdamW fused in the same run."""
    out = ["| device | dtype | threads | optimizer | step ms (median) | time / AdamW fused | time / AdamW foreach |"
           " state MiB | state / AdamW fp32 state | transient peak MiB |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp32_state = 8 * r["n_params"]  # AdamW's fp32 m and v
        out.append(
            f"| {r['device']} | {r['dtype']} | {r['threads']} | {r['name']} | {r['time'] * 1e3:.1f} | "
            f"{r['time_vs_adamw_fused']:.2f}x | {r['time_vs_adamw_foreach']:.2f}x | {r['state'] / 2**20:.1f} | "
            f"{r['state'] / fp32_state:.3f}x | {r['peak'] / 2**20:.1f} |")
    return "\n".join(out)


def read_table(rows: list[dict]) -> str:
    """The fused steppers' least bytes read per parameter, their ratio to AdamW's, the time ratio and the read rate."""
    out = ["| device | dtype | threads | stepper | bytes read / param | bytes read / AdamW's | time / AdamW fused |"
           " read GB/s |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "read_bytes_per_param" not in r:
            continue
        ref = next(x for x in rows if x["name"] == "AdamW fused" and x["dtype"] == r["dtype"]
                   and x["threads"] == r["threads"])
        out.append(f"| {r['device']} | {r['dtype']} | {r['threads']} | {r['name']} | {r['read_bytes_per_param']} | "
                   f"{r['read_bytes_per_param'] / ref['read_bytes_per_param']:.2f}x | "
                   f"{r['time_vs_adamw_fused']:.2f}x | {r['read_gb_per_s']:.1f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=float, default=50.0, help="model size in millions of parameters (default 50)")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=30, help="timed rounds (each steps every optimizer once)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                    help="torch.set_num_threads values to measure, 0 = torch's default (all cores); default 1 0")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no_per_tensor", action="store_true", help="leave out the slow per-tensor oracle")
    ap.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.device == "cpu":
        from hf_snr import fused_cpu

        t0 = time.perf_counter()
        ok = fused_cpu.available()
        build = dict(kind="build", device="cpu", fused_kernel=ok, seconds=time.perf_counter() - t0,
                     reason=fused_cpu.unavailable_reason(), library=fused_cpu.library_path())
        print(json.dumps(build))
        print(f"fused CPU kernel: {'ready' if ok else 'unavailable: ' + str(build['reason'])} "
              f"({build['seconds']:.2f} s to build or load, once; cached after the first build)\n")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for dtype in args.dtype:
            rows += bench(args.size, dtype, args.steps, args.device, per_tensor=not args.no_per_tensor)
    r0 = rows[0]
    print(f"torch {torch.__version__}, {r0['n_params'] / 1e6:.1f}M parameters in {r0['n_tensors']} tensors, "
          f"{args.steps} interleaved rounds\n")
    print(table(rows))
    print()
    print(read_table(rows))
    print()
    lines = [json.dumps({"kind": "step", **r}) for r in rows]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
