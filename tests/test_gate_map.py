"""hf_snr.gate_map: the per-tensor gate recomputed from the state equals what the optimizer's step used, and
recipes/plot_gate_map.py on a recorded tiny run."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from _recipe_module import load_recipe

from hf_snr import SNRAdamW
from hf_snr.gate_map import GateMapCallback, parameter_names, tensor_gates
from hf_snr.synthetic import build_tiny_model, build_tiny_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "configs" / "offline_tiny.yaml")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(12, 6)  # rows 8..11 never get a gradient: v = 0 there
        self.proj = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)


def _weighted(gates):
    seen = sum(c for _, c in gates.values())
    return sum(m * c for m, c in gates.values() if m is not None) / seen


def _train(opt_kwargs, steps=14):
    net = Net()
    opt = SNRAdamW(net.parameters(), lr=1e-2, warmup_steps=3, **opt_kwargs)
    gen = torch.Generator().manual_seed(1)
    signal = {n: torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()}
    scale = {n: torch.rand(p.shape, generator=gen) * 3 for n, p in net.named_parameters()}  # varied SNR
    stats = None
    for step in range(steps):
        for n, p in net.named_parameters():
            p.grad = signal[n] + scale[n] * torch.randn(p.shape, generator=gen)
            if n == "embed.weight":
                p.grad[8:] = 0.0
        if step == steps - 1:
            opt.request_stats()
        opt.step()
        if step == steps - 1:
            stats = opt.last_stats
    return net, opt, stats


OPTION_SETS = [
    {},                                                   # element, snr, noise=step
    {"reduction": "row", "noise": "ema"},
    {"reduction": "tensor", "mask": "soft", "alpha": 0.05, "softness": 2.0},
    {"mask": "hard", "alpha": 0.5, "noise": "ema"},
    {"reduction": "row", "noise": "ema", "fused": True},  # the fused CPU kernel's state reads the same
    {"signal": "step", "mask": "snr"},                    # mu^2 = g^2: needs the step's gradient (still there)
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default"
                                                      for o in OPTION_SETS])
def test_weighted_mean_of_tensor_gates_is_the_optimizers_mask_mean(options):
    net, opt, stats = _train(options)
    gates = tensor_gates(opt, parameter_names(net))
    assert set(gates) == {n for n, _ in net.named_parameters()}
    assert gates["embed.weight"][1] == 8 * 6  # only the rows that had a gradient count
    means = [m for m, _ in gates.values()]
    assert all(0.0 <= m <= 1.0 for m in means) and len(set(means)) > 1  # not all open: the gate is really read
    assert _weighted(gates) == pytest.approx(stats["mask_mean"], rel=1e-5, abs=1e-6)


def test_row_gate_matches_a_hand_computation_and_open_cases_read_one():
    net, opt, _ = _train({"reduction": "row", "noise": "ema"})
    p = net.proj.weight
    st, g = opt.state[p], opt.param_groups[0]
    t = float(st["step"])
    b1 = g["betas"][0]
    mu2 = (st["exp_avg"] / (1 - b1 ** t)) ** 2
    c_t = (1 - b1) * (1 + b1 ** t) / ((1 + b1) * (1 - b1 ** t))
    sig2 = st["exp_var"] / (1 - g["rho"] ** t) * c_t
    q = mu2.sum(1) / (mu2.sum(1) + g["softness"] * g["alpha"] * sig2.sum(1))
    assert tensor_gates(opt, parameter_names(net))["proj.weight"][0] == pytest.approx(float(q.mean()), rel=1e-5)
    for options, steps in (({"mask": "none"}, 14), ({}, 3)):  # mask=none; still in the 3-step warm-up
        net, opt, stats = _train(options, steps)
        assert all(m == 1.0 for m, _ in tensor_gates(opt).values()) and stats["mask_mean"] == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"Invalid gate map interval: 0 \(accepted: an integer >= 1"):
        GateMapCallback(0)
    with pytest.raises(TypeError, match="needs an hf_snr.SNRAdamW optimizer, got AdamW"):
        tensor_gates(torch.optim.AdamW(Net().parameters()))


def _noisy_dpo():
    return load_recipe("noisy_dpo")


def test_recipe_records_gate_map_and_plot_script_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    noisy_dpo = _noisy_dpo()
    run = tmp_path / "run"
    argv = ["--config", TINY, "--train_pairs", "64", "--eval_pairs", "16", "--max_steps", "13", "--eval_steps", "13",
            "--logging_steps", "13", "--per_device_train_batch_size", "16", "--warmup_steps", "0",
            "--optim_args", "mask=snr,warmup_steps=2", "--gate_map_steps", "5", "--output_dir", str(run)]
    results = noisy_dpo.main(*noisy_dpo.parse_args(argv))
    lines = [json.loads(x) for x in (run / "gate_map.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [5, 10, 13]  # every 5 steps and the last
    names = {n for n, _ in build_tiny_model(build_tiny_tokenizer(), hidden=64, layers=2, heads=4, ffn=128)
             .named_parameters()}
    assert set(lines[-1]["gates"]) == names
    last = lines[-1]
    weighted = sum(last["gates"][k] * last["seen"][k] for k in last["gates"]) / sum(last["seen"].values())
    assert weighted == pytest.approx(results["final"]["snr/mask_mean"], rel=1e-5)  # logged at step 13 too
    with pytest.raises(ValueError, match="gate_map_steps 5 needs --optim snr_adamw"):
        noisy_dpo.main(*noisy_dpo.parse_args([*argv, "--optim", "adamw_torch"]))

    out = tmp_path / "plots"
    shutil.copytree(run, tmp_path / "run2")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "plot_gate_map.py"), str(run), str(tmp_path / "run2"),
                           "--out", str(out), "--combined", "both.png", "--titles", "first", "second"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert (out / "both.png") in pngs
    assert len(pngs) >= 5 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = (out / "gate_map.md").read_text()
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "embeddings", "norm"):
        assert f"| {kind} |" in table, kind
