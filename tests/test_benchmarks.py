"""benchmarks/optimizer_step.py, the command behind the README's speed table: it runs end to end on a small
model, prints one JSON line per stepper with its ratios measured in the same run, and its bytes-read table
counts what each fused stepper must read."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import optimizer_step  # noqa: E402

from hf_snr import fused_cpu  # noqa: E402


def test_read_bytes_count_each_tensor_a_fused_step_reads():
    # fp32: AdamW p, g, m, v; SNRAdamW adds s; the default skip reads g once more; the bf16 variance s is 2 bytes
    assert optimizer_step.read_bytes("AdamW fused", "fp32") == 16
    assert optimizer_step.read_bytes("SNRAdamW fused, nonfinite=propagate", "fp32") == 20
    assert optimizer_step.read_bytes("SNRAdamW fused", "fp32") == 24
    assert optimizer_step.read_bytes("SNRAdamW fused, bf16 variance", "fp32") == 22
    assert optimizer_step.read_bytes(optimizer_step.CHECK_ONLY, "fp32") == 4
    # bf16 parameters: p and g are 2 bytes, AdamW's state too, SNRAdamW's m, v, s stay fp32
    assert optimizer_step.read_bytes("AdamW fused", "bf16") == 8
    assert optimizer_step.read_bytes("SNRAdamW fused", "bf16") == 18
    assert optimizer_step.read_bytes("SNRAdamW foreach", "fp32") is None  # not a single pass: no count


@pytest.mark.skipif(not fused_cpu.available(), reason="no fused CPU kernel")
def test_the_step_benchmark_runs_and_prints_one_json_line_per_stepper(tmp_path, capsys):
    out = tmp_path / "steps.jsonl"
    optimizer_step.main(["--size", "0.3", "--steps", "2", "--threads", "1", "--dtype", "fp32", "--no_per_tensor",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = [r["name"] for r in rows]
    assert names == ["SNRAdamW fused", "SNRAdamW fused, nonfinite=propagate", "SNRAdamW fused, bf16 variance",
                     "SNRAdamW fused, mask=none (monitor)", "SNRAdamW foreach", "AdamW foreach", "AdamW fused",
                     optimizer_step.CHECK_ONLY]
    by = {r["name"]: r for r in rows}
    assert by["AdamW fused"]["time_vs_adamw_fused"] == 1.0
    for r in rows:
        assert r["time"] > 0 and r["time_vs_adamw_fused"] == pytest.approx(r["time"] / by["AdamW fused"]["time"])
    # state: exactly 1.5x AdamW's fp32 m, v by default, 1.25x with a bf16 variance (the 0-d step counters aside)
    steps = 4 * by["AdamW fused"]["n_tensors"]
    assert (by["SNRAdamW fused"]["state"] - steps) / (by["AdamW fused"]["state"] - steps) == pytest.approx(1.5)
    assert (by["SNRAdamW fused, bf16 variance"]["state"] - steps) / (by["AdamW fused"]["state"] - steps) == \
        pytest.approx(1.25)
    assert by[optimizer_step.CHECK_ONLY]["state"] == 0
    assert by["SNRAdamW fused"]["read_bytes_per_param"] == 24 and by["SNRAdamW fused"]["read_gb_per_s"] > 0
    assert "read_bytes_per_param" not in by["SNRAdamW foreach"]
    # both tables and the JSON lines are printed
    assert "| time / AdamW fused |" in printed and "| bytes read / param |" in printed
    assert printed.count('{"kind": "step"') == len(rows) and '{"kind": "build"' in printed


def test_the_agreement_cost_benchmark_measures_one_buffer_and_ratios(capsys):
    import agreement_cost

    rows = agreement_cost.main(["--rounds", "1", "--skip_dpo"])
    assert [(r["params"], r["scope"]) for r in rows] == [("420 LoRA tensors", "model"), ("420 LoRA tensors", "tensor"),
                                                         ("8 dense tensors", "model"), ("8 dense tensors", "tensor")]
    for r in rows:
        assert r["buffer_vs_param_bytes"] == 1.0  # one gradient-sized buffer, fp32 like the parameters
        assert r["ms_per_microbatch"] > 0 and r["vs_adamw_step"] == pytest.approx(r["ms_per_microbatch"] /
                                                                                  r["adamw_fused_step_ms"])
    assert "| ms / micro-batch |" in capsys.readouterr().out
