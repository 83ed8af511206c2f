"""Plot where SNRAdamW's gate closes, by module type and by layer, from runs' ``gate_map.jsonl``.

    python recipes/plot_gate_map.py outputs/study/arm/seed0 [more run folders] --out outputs/gate_maps

Each run folder holds ``gate_map.jsonl`` (written by ``recipes/noisy_dpo.py --gate_map_steps N``, see
:mod:`hf_snr.gate_map`): per recorded optimizer step, each tensor's mean gate over its coordinates that
have had a gradient, and their count. Tensors are grouped by module type (:func:`module_type`: q_proj,
k_proj, v_proj, o_proj, mlp = gate/up/down_proj, embeddings = embed_tokens / lm_head, norm, other) and by
layer index (``layers.<i>.`` in the name; "-" for tensors outside the layers); a group's gate is the
coordinate-weighted mean of its tensors' means, so it is the share of the group's gated step mass.
Llama naming, so the tiny recipe model and SmolLM2 (and PEFT-wrapped names) alike.

Writes, into ``--out`` (default: the first run folder): ``gate_by_module_<run>.png`` and
``gate_by_layer_<run>.png`` (gate mean over training, one line per module type / layer), and
``gate_map.md``: the final per-module-type means, one column per run; with ``--combined FILE`` also one figure
of every run side by side (a row each: the gate by module type over training, and the final gate by layer
and module type), e.g. a real model's runs beside the tiny model's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "embeddings", "norm", "other")
_MLP = ("gate_proj", "up_proj", "down_proj")
GATE_MAP_FILE = "gate_map.jsonl"


def module_type(name: str) -> str:
    """The module type of a parameter name (one of :data:`MODULE_TYPES`)."""
    parts = name.split(".")
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if kind in parts:
            return kind
    if any(kind in parts for kind in _MLP):
        return "mlp"
    if "embed_tokens" in parts or "lm_head" in parts:
        return "embeddings"
    if any("norm" in part for part in parts):
        return "norm"
    return "other"


def layer_of(name: str) -> int | None:
    """The decoder layer index of a parameter name (``layers.<i>.``), None outside the layers."""
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def read_gate_map(folder: str | os.PathLike) -> list[dict]:
    """The recorded entries of one run, in step order (a resumed run's repeated steps: the last entry wins)."""
    path = pathlib.Path(folder) / GATE_MAP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {GATE_MAP_FILE} in {str(folder)!r}: run recipes/noisy_dpo.py with "
                                "--gate_map_steps N (N >= 1) and optim snr_adamw")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            by_step[int(entry["step"])] = entry
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a gate map entry ({err})") from None
    if not by_step:
        raise ValueError(f"{path} has no entries (the run recorded no optimizer step)")
    return [by_step[s] for s in sorted(by_step)]


def grouped(entry: dict, key) -> dict:
    """{group: coordinate-weighted mean gate} of one entry; ``key(name)`` gives a tensor's group."""
    sums: dict = {}
    seen = entry.get("seen") or {}
    for name, mean in entry["gates"].items():
        if mean is None:
            continue
        weight = seen.get(name, 1)
        acc = sums.setdefault(key(name), [0.0, 0])
        acc[0] += mean * weight
        acc[1] += weight
    return {group: total / count for group, (total, count) in sums.items() if count}


def series(entries: list[dict], key) -> dict:
    """{group: [(step, mean), ...]} over a run's entries."""
    out: dict = {}
    for entry in entries:
        for group, value in grouped(entry, key).items():
            out.setdefault(group, []).append((entry["step"], value))
    return out


def _label(folder: str, used: set, from_path: bool = True) -> str:
    parts = pathlib.Path(folder).resolve().parts[-3:] if from_path else [folder]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_") or "run"
    base, k = label, 2
    while label in used:
        label, k = f"{base}_{k}", k + 1
    used.add(label)
    return label


def plot_run(entries: list[dict], label: str, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_type = series(entries, module_type)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in MODULE_TYPES:
        if kind in by_type:
            steps, values = zip(*by_type[kind])
            ax.plot(steps, values, marker="o", markersize=3, label=kind)
    ax.set(xlabel="optimizer step", ylabel="mean gate q", title=f"gate by module type: {label}", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    path = out / f"gate_by_module_{label}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))

    by_layer = series(entries, lambda n: layer_of(n) if layer_of(n) is not None else -1)
    layers = sorted(k for k in by_layer if k >= 0)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        steps, values = zip(*by_layer[layer])
        ax.plot(steps, values, color=cmap(i / max(len(layers) - 1, 1)), label=f"layer {layer}")
    if -1 in by_layer:
        steps, values = zip(*by_layer[-1])
        ax.plot(steps, values, color="black", linestyle="--", label="outside layers")
    ax.set(xlabel="optimizer step", ylabel="mean gate q", title=f"gate by layer: {label}", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    path = out / f"gate_by_layer_{label}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    return written


def by_layer_and_type(entry: dict) -> dict:
    """{module type: {layer: coordinate-weighted mean gate}} of one entry (tensors inside the layers only)."""
    out: dict = {}
    for (kind, layer), value in grouped(entry, lambda n: (module_type(n), layer_of(n))).items():
        if layer is not None:
            out.setdefault(kind, {})[layer] = value
    return out


def plot_combined(runs: dict[str, list[dict]], path: pathlib.Path, titles: dict[str, str] | None = None) -> str:
    """One figure for several runs side by side: a row per run; left, the gate by module type over training;
    right, the final gate by layer, one line per module type (and the tensors outside the layers as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = dict(zip(MODULE_TYPES, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.2 * len(runs)), squeeze=False)
    for row, (label, entries) in enumerate(runs.items()):
        title = (titles or {}).get(label, label)
        left, right = axes[row]
        by_type = series(entries, module_type)
        for kind in MODULE_TYPES:
            if kind in by_type:
                steps, values = zip(*by_type[kind])
                left.plot(steps, values, marker="o", markersize=2, color=colors[kind], label=kind)
        left.set(xlabel="optimizer step", ylabel="mean gate q", ylim=(0, 1.02), title=f"{title}: by module type")
        final = by_layer_and_type(entries[-1])
        for kind in MODULE_TYPES:
            if kind in final:
                layers = sorted(final[kind])
                right.plot(layers, [final[kind][i] for i in layers], marker="o", markersize=2, color=colors[kind],
                           label=kind)
        outside = {k: v for k, v in grouped(entries[-1], module_type).items()
                   if k not in final and k in ("embeddings", "norm", "other")}
        for kind, value in outside.items():
            right.axhline(value, color=colors[kind], linestyle=":", label=f"{kind} (outside layers)")
        right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        right.set(xlabel="layer", ylabel="mean gate q", ylim=(0, 1.02),
                  title=f"{title}: by layer at step {entries[-1]['step']}")
        left.legend(fontsize=7)
        right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def final_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: the final per-module-type mean gate (rows) of each run (columns)."""
    finals = {label: grouped(entries[-1], module_type) for label, entries in runs.items()}
    kinds = [k for k in MODULE_TYPES if any(k in f for f in finals.values())]
    lines = ["| module type | " + " | ".join(f"{label} (step {runs[label][-1]['step']})" for label in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for kind in kinds:
        cells = [f"{finals[label][kind]:.3f}" if kind in finals[label] and math.isfinite(finals[label][kind])
                 else "–" for label in runs]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, each with a gate_map.jsonl")
    p.add_argument("--out", default=None, help="where the PNGs and gate_map.md go (default: the first run folder)")
    p.add_argument("--combined", default=None,
                   help="also one figure with every run side by side (a row each), written to this file name in --out")
    p.add_argument("--titles", nargs="+", default=None,
                   help="a title per run, in order: the plots' titles, file names and table columns")
    opts = p.parse_args(argv)
    if opts.titles is not None and len(opts.titles) != len(opts.runs):
        p.error(f"--titles: {len(opts.titles)} given for {len(opts.runs)} runs (accepted: one per run)")
    out = pathlib.Path(opts.out or opts.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    used: set = set()
    # labels: the titles when given (file names and table columns then say which run is which), else the paths
    names = opts.titles or opts.runs
    runs = {_label(name, used, from_path=opts.titles is None): read_gate_map(folder)
            for name, folder in zip(names, opts.runs)}
    written = []
    for label, entries in runs.items():
        written += plot_run(entries, label, out)
    if opts.combined:
        titles = dict(zip(runs, opts.titles)) if opts.titles else None
        written.append(plot_combined(runs, out / opts.combined, titles))
    table = out / "gate_map.md"
    table.write_text("Final mean gate per module type (coordinate-weighted over the type's tensors)\n\n"
                     + final_table(runs))
    written.append(str(table))
    print("\n".join(written))
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
