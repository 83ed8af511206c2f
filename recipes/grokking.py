# /// script
# dependencies = ["hf_snr", "trl", "matplotlib"]
# ///
"""Grokking on modular arithmetic: SNRAdamW vs AdamW, steps to fit and steps to generalize.

The paper's grokking experiment (Litman & Guo 2026, arXiv 2605.01172, "population-risk training")
as a TRL-style script: one dataclass of options parsed with ``TrlParser`` (``--config file.yaml``,
every option also a flag, flags win over the file).

    # the paper's setting, one run (SNRAdamW; add --optim adamw for the baseline)
    python recipes/grokking.py --config recipes/configs/grokking/grokking.yaml
    python recipes/grokking.py --config recipes/configs/grokking/grokking.yaml --optim adamw \
        --output_dir outputs/grokking/adamw_seed0
    # seconds, for tests and a first look
    python recipes/grokking.py --config recipes/configs/grokking/grokking_smoke.yaml
    # any SNRAdamW option goes through --optim_args untouched (new keys need no change here)
    python recipes/grokking.py --config recipes/configs/grokking/grokking.yaml --optim_args "mask=soft,softness=3"

Where each choice comes from
----------------------------
From the paper (the summary we have): modular division ``a * b^-1 mod 97``, all pairs (a, b) with
``b != 0``, 25 % of them for training, a 2-layer transformer; reported 95 % held-out accuracy at
step 5,950 with the SNR preconditioner vs 29,450 with AdamW (4.9x fewer steps).

Not in that summary, so taken from the standard grokking setup of Power et al. 2022 ("Grokking:
generalization beyond overfitting on small algorithmic data sets"): decoder-only transformer,
width 128, 4 heads, 2 layers; the sequence ``a op b =`` and the answer predicted at the last
position (loss and accuracy on the answer token only); minibatches of 512; AdamW with lr 1e-3,
betas (0.9, 0.98), weight decay 1, a 10-step linear warm-up then a constant lr. SNRAdamW gets the
same lr, betas, weight decay and schedule (its own ``warmup_steps``, the steps with the gate held
open, is a different knob: 10 by default).

Ours (implementation choices, not from either source): pre-LN blocks (LayerNorm, causal
``scaled_dot_product_attention``, a GELU MLP of 4x width), learned positional embeddings, a final
LayerNorm and an untied output head over the whole vocabulary (p numbers + ``op`` + ``=``), no
dropout; PyTorch's default initialisation; weight decay on every parameter (both optimizers);
eps 1e-8. The split is drawn with ``torch.Generator`` seeded by ``data_seed`` (default: ``seed``).
Training batches: the training set is reshuffled every epoch and the permutations are read as one
stream in chunks of ``batch_size`` (so every batch is full and every example is seen equally
often; a batch that straddles an epoch boundary may hold an example twice). If ``batch_size``
exceeds the training set, the whole set is the batch. Evaluation (every ``eval_every`` steps) runs
on the *whole* training set and the *whole* held-out set. The step of "first eval at which train
accuracy >= 99 % / held-out accuracy >= 95 %" is resolved to ``eval_every`` steps.

What a run leaves in ``output_dir``: ``results.json`` (the arguments, the log rows, the threshold
steps, timing, the risk-tracking analysis) and ``accuracy.png``. :func:`main` returns the same dict,
so ``grokking_study.py`` runs many arms in one process.

Risk tracking (:func:`risk_tracking`): for every ``snr/*`` statistic of SNRAdamW (read generically:
whatever keys ``opt.last_stats`` has), the Spearman rank correlation over the run with the held-out
loss, with the generalization gap (held-out minus train loss), and of its per-interval change with
the per-interval change of the held-out loss; and its mean absolute error relative to the held-out
loss and to the gap. The training loss itself is reported the same way as a reference, and so is
"training loss + cumulative noise" when the optimizer does not log it as ``snr/population_risk``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

# Runnable as `python recipes/grokking.py` from a checkout without `pip install -e .`.
_REPO = pathlib.Path(__file__).resolve().parent.parent
if (_REPO / "hf_snr").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPERATIONS = ("division", "addition", "subtraction", "multiplication")
OPTIMIZERS = ("adamw", "snr_adamw")
STAT_PREFIX = "snr/"
# The candidate "training loss + cumulative noise", built from the logged pieces when the
# optimizer does not log it itself as snr/population_risk.
DERIVED_CANDIDATE = "train_loss+snr/cumulative_noise"


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(math.isqrt(n)) + 1))


@dataclass
class GrokkingArguments:
    """Options of one grokking run (defaults: the paper's setting, see the module docstring)."""

    prime: int = field(default=97, metadata={"help": "The modulus p (a prime >= 3; division needs a prime)."})
    operation: str = field(default="division", metadata={"help": f"One of {', '.join(OPERATIONS)}."})
    train_fraction: float = field(default=0.25, metadata={"help": "Share of all pairs used for training, in (0, 1)."})
    data_seed: int | None = field(default=None, metadata={"help": "Seed of the train/held-out split (default: seed)."})
    width: int = field(default=128, metadata={"help": "Model width d (divisible by heads)."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    layers: int = field(default=2, metadata={"help": "Transformer blocks."})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width = mlp_ratio * width."})
    batch_size: int = field(default=512, metadata={"help": "Minibatch size (capped at the training-set size)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak (constant after warm-up) learning rate."})
    weight_decay: float = field(default=1.0, metadata={"help": "Decoupled weight decay (both optimizers)."})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    beta2: float = field(default=0.98, metadata={"help": "Adam beta2."})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear lr warm-up steps (then constant)."})
    max_steps: int = field(default=30000, metadata={"help": "Step cap; thresholds not reached by then are null."})
    eval_every: int = field(default=100, metadata={"help": "Evaluate (whole train and held-out sets) every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and the batch order."})
    optim: str = field(default="snr_adamw", metadata={"help": f"One of {', '.join(OPTIMIZERS)}."})
    optim_args: str = field(
        default="",
        metadata={"help": "SNRAdamW options, e.g. 'mask=snr,softness=3', parsed by hf_snr.options.parse_optim_args "
                          "and passed as keyword arguments (alpha=auto is resolved from the data; exclude=REGEX "
                          "gives matching parameters plain AdamW)."},
    )
    train_threshold: float = field(default=0.99, metadata={"help": "Train accuracy that counts as fitted."})
    heldout_threshold: float = field(default=0.95, metadata={"help": "Held-out accuracy that counts as generalized."})
    stop_after_grok: int | None = field(
        default=10,
        metadata={"help": "Stop this many evals after both thresholds are reached (null: run to max_steps)."},
    )
    output_dir: str = field(default="outputs/grokking/run", metadata={"help": "Where results.json and the plot go."})
    torch_threads: int | None = field(default=1, metadata={"help": "torch.set_num_threads (null: leave as is)."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training forward/backward (inductor)."})
    plot: bool = field(default=True, metadata={"help": "Write accuracy.png."})
    quiet: bool = field(default=False, metadata={"help": "No per-eval printing."})

    def __post_init__(self):
        def bad(name, accepted):
            raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (accepted: {accepted})")

        if self.operation not in OPERATIONS:
            bad("operation", f"one of {', '.join(OPERATIONS)}")
        if self.optim not in OPTIMIZERS:
            bad("optim", f"one of {', '.join(OPTIMIZERS)}")
        if (isinstance(self.prime, bool) or not isinstance(self.prime, int) or self.prime < 3
                or not _is_prime(self.prime)):
            bad("prime", "a prime >= 3")
        if not (isinstance(self.train_fraction, (int, float)) and 0.0 < self.train_fraction < 1.0):
            bad("train_fraction", "a number in (0, 1), exclusive")
        for name in ("width", "heads", "layers", "mlp_ratio", "batch_size", "max_steps", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "an integer >= 1")
        if self.width % self.heads:
            raise ValueError(f"Invalid width: {self.width!r} (accepted: a multiple of heads={self.heads})")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "an integer >= 0")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                bad(name, "a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 <= getattr(self, name) < 1.0):
                bad(name, "a number in [0, 1)")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            bad("eps", "a finite number > 0")
        for name in ("train_threshold", "heldout_threshold"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 < getattr(self, name) <= 1.0):
                bad(name, "a number in (0, 1]")
        if self.stop_after_grok is not None and (isinstance(self.stop_after_grok, bool) or self.stop_after_grok < 0):
            bad("stop_after_grok", "an integer >= 0, or null to run to max_steps")
        if self.torch_threads is not None and self.torch_threads < 1:
            bad("torch_threads", "an integer >= 1, or null")
        if self.optim_args is None:
            self.optim_args = ""
        if self.optim == "adamw" and self.optim_args.strip():
            raise ValueError(f"Invalid optim_args: {self.optim_args!r} (accepted: empty for optim='adamw'; "
                             "optim_args are SNRAdamW options)")
        if self.optim == "snr_adamw":
            from hf_snr.options import parse_optim_args

            parse_optim_args(self.optim_args)  # fails now, naming the bad key/value, not at the first step


def make_parser():
    from trl import TrlParser

    return TrlParser((GrokkingArguments,))


def parse_args(argv: Sequence[str] | None = None) -> GrokkingArguments:
    """The run's options from flags and an optional ``--config`` YAML (flags win)."""
    (args,) = make_parser().parse_args_and_config(args=list(argv) if argv is not None else None)
    return args


# -- data --------------------------------------------------------------------------------------------
def operation_table(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (a, b) pairs of the operation and their answers c (division: b != 0, c = a * b^-1 mod p)."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    if operation == "division":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([0] + [pow(i, -1, p) for i in range(1, p)])
        c = (a * inverse[b]) % p
    elif operation == "addition":
        c = (a + b) % p
    elif operation == "subtraction":
        c = (a - b) % p
    elif operation == "multiplication":
        c = (a * b) % p
    else:
        raise ValueError(f"Invalid operation: {operation!r} (accepted: one of {', '.join(OPERATIONS)})")
    return a, b, c


def make_split(p: int, operation: str, train_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Token sequences ``a op b =`` (tokens: 0..p-1 the numbers, p the operation, p+1 '=') and answers.

    Returns train_x (n, 4), train_y (n,), heldout_x, heldout_y; the split is a seeded permutation.
    """
    a, b, c = operation_table(p, operation)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    n = len(c)
    n_train = min(max(int(round(train_fraction * n)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, ho = perm[:n_train], perm[n_train:]
    return {"train_x": x[tr], "train_y": c[tr], "heldout_x": x[ho], "heldout_y": c[ho]}


class BatchStream:
    """Minibatch indices: per-epoch permutations of the training set, read as one stream in full chunks."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self._buffer = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self._buffer) < self.batch_size:
            self._buffer = torch.cat([self._buffer, torch.randperm(self.n, generator=self.generator)])
        out, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size:]
        return out


# -- model -------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``last_only``: compute the output at the last position only (keys and values still cover
        every position); exactly the last row of the full output, at about a quarter of the cost of
        the projection and the MLP. The last block needs no more, since only the answer is read."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:  # the last query sees every position: no mask needed
            q, x, T = q[:, :, -1:], x[:, -1:], 1
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GrokTransformer(nn.Module):
    """Decoder-only transformer; returns the logits at the last position (the answer)."""

    def __init__(self, vocab: int, width: int = 128, heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
                 seq_len: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, last_only=i == len(self.blocks) - 1)
        return self.head(self.ln_f(h[:, -1]))


# -- optimizer ---------------------------------------------------------------------------------------
def build_optimizer(args: GrokkingArguments, model: nn.Module, n_train: int, batch: int):
    """torch.optim.AdamW or hf_snr.SNRAdamW with the run's lr/betas/eps/wd; SNR options passed generically.

    Returns (optimizer, info) where info records the resolved SNR options (alpha=auto, exclude).
    """
    common = dict(lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.eps,
                  weight_decay=args.weight_decay)
    if args.optim == "adamw":
        return torch.optim.AdamW(model.parameters(), **common), {}
    from hf_snr import SNRAdamW
    from hf_snr.options import finite_data_alpha, parse_optim_args

    options = parse_optim_args(args.optim_args)
    kwargs = options.optimizer_kwargs()
    info: dict[str, Any] = {"optimizer_kwargs": dict(kwargs)}
    if getattr(options, "alpha", None) == "auto":
        epochs = args.max_steps * batch / n_train
        kwargs["alpha"], info["alpha_reason"] = finite_data_alpha(n_train, batch, epochs)
        info["optimizer_kwargs"]["alpha"] = kwargs["alpha"]
    exclude = getattr(options, "exclude", None)
    if exclude:
        import re

        pattern = re.compile(exclude)
        named = list(model.named_parameters())
        plain = [p for n, p in named if pattern.search(n)]
        gated = [p for n, p in named if not pattern.search(n)]
        info["excluded"] = [n for n, _ in named if pattern.search(n)]
        groups = [g for g in ({"params": gated}, {"params": plain, "snr": False}) if g["params"]]
    else:
        groups = list(model.parameters())
    return SNRAdamW(groups, **common, **kwargs), info


# -- evaluation and analysis -------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the answer token over the whole set."""
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
        correct += int((logits.argmax(-1) == y[i:i + chunk]).sum())
    return loss / len(y), correct / len(y)


def _compare():
    """recipes/compare.py, the one copy of the rank statistics the recipes share."""
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:  # imported as a module from elsewhere (tests, the study, benchmarks)
        sys.path.insert(0, here)
    import compare

    return compare


def rankdata(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties get the average of the ranks they span (compare.py's rank_average)."""
    return _compare().rank_average(values)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """compare.py's Spearman over the pairs where both values are finite; None (JSON null) where undefined."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    rho = _compare().spearman([a for a, _ in pairs], [b for _, b in pairs])
    return None if math.isnan(rho) else rho


def _rel_error(est: list[float], target: list[float]) -> float | None:
    pairs = [(a, b) for a, b in zip(est, target) if math.isfinite(a) and math.isfinite(b)]
    denom = sum(abs(b) for _, b in pairs)
    if not pairs or denom == 0:
        return None
    return sum(abs(a - b) for a, b in pairs) / denom


def risk_tracking(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How well each candidate risk estimate tracks the held-out loss over a run.

    For every ``snr/*`` key in the rows (plus ``train_loss`` as a reference), over the rows that have it:
      * ``spearman_heldout_loss``: rank correlation with the held-out loss;
      * ``spearman_gap``: rank correlation with the gap, held-out loss - train loss;
      * ``spearman_delta``: rank correlation of its change per eval interval with the held-out loss's change;
      * ``rel_error_heldout``: sum |estimate - held-out loss| / sum |held-out loss| (for risk estimates);
      * ``rel_error_gap``: sum |estimate - gap| / sum |gap| (for gap estimates, e.g. a cumulative noise);
      * ``n``: number of rows used.

    When the optimizer logs ``snr/cumulative_noise`` but no ``snr/population_risk``, the candidate
    ``train_loss+snr/cumulative_noise`` (the issue's definition) is analysed too.
    """
    keys = sorted({k for r in rows for k in r if k.startswith(STAT_PREFIX)})
    derived = DERIVED_CANDIDATE if f"{STAT_PREFIX}population_risk" not in keys else None
    if derived and any(f"{STAT_PREFIX}cumulative_noise" in r for r in rows):
        rows = [dict(r, **{derived: r["train_loss"] + r[f"{STAT_PREFIX}cumulative_noise"]})
                if f"{STAT_PREFIX}cumulative_noise" in r else r for r in rows]
        keys.append(derived)
    out: dict[str, dict[str, Any]] = {}
    for key in ["train_loss", *keys]:
        sub = [r for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        est = [float(r[key]) for r in sub]
        ho = [r["heldout_loss"] for r in sub]
        gap = [r["heldout_loss"] - r["train_loss"] for r in sub]
        d_est = [b - a for a, b in zip(est, est[1:])]
        d_ho = [b - a for a, b in zip(ho, ho[1:])]
        out[key] = {
            "spearman_heldout_loss": spearman(est, ho),
            "spearman_gap": spearman(est, gap),
            "spearman_delta": spearman(d_est, d_ho),
            "rel_error_heldout": _rel_error(est, ho),
            "rel_error_gap": _rel_error(est, gap),
            "n": len(sub),
        }
    return out


def plot_accuracy(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["train_acc"] for r in rows], label="train")
    ax1.plot(steps, [r["heldout_acc"] for r in rows], label="held-out")
    ax1.set(xscale="log", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title=title or "accuracy")
    ax1.legend()
    ax2.plot(steps, [r["train_loss"] for r in rows], label="train")
    ax2.plot(steps, [r["heldout_loss"] for r in rows], label="held-out")
    ax2.set(xscale="log", yscale="log", xlabel="step", ylabel="cross-entropy", title="loss")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- training ----------------------------------------------------------------------------------------
def main(args: GrokkingArguments) -> dict[str, Any]:
    """Train one run; returns (and writes to ``output_dir/results.json``) its results."""
    start = time.perf_counter()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    data = make_split(args.prime, args.operation, args.train_fraction, data_seed)
    n_train, n_heldout = len(data["train_y"]), len(data["heldout_y"])
    torch.manual_seed(args.seed)
    model = GrokTransformer(args.prime + 2, args.width, args.heads, args.layers, args.mlp_ratio)
    stream = BatchStream(n_train, args.batch_size, torch.Generator().manual_seed(args.seed + 1))
    opt, opt_info = build_optimizer(args, model, n_train, stream.batch_size)
    warm = max(args.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    is_snr = args.optim == "snr_adamw"

    train_forward = model
    if args.compile:
        train_forward = torch.compile(model)

    def train_step(idx: torch.Tensor) -> torch.Tensor:
        logits = train_forward(data["train_x"][idx])
        loss = F.cross_entropy(logits, data["train_y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    rows: list[dict[str, Any]] = []
    reached: dict[str, int | None] = {"train": None, "heldout": None}
    reached_wall: dict[str, float | None] = {"train": None, "heldout": None}
    train_time = eval_time = 0.0
    first_step_s = None
    evals_after_grok = 0
    stopped_early = False
    step = 0
    setup_s = time.perf_counter() - start
    t_run = time.perf_counter()
    while step < args.max_steps:
        step += 1
        log_now = step % args.eval_every == 0 or step == args.max_steps
        if log_now and is_snr:
            opt.request_stats()
        t0 = time.perf_counter()
        batch_loss = train_step(stream.next())
        dt = time.perf_counter() - t0
        train_time += dt
        if step == 1:
            first_step_s = dt  # includes compilation under --compile
        if not log_now:
            continue
        t0 = time.perf_counter()
        model.eval()
        train_loss, train_acc = evaluate(model, data["train_x"], data["train_y"])
        heldout_loss, heldout_acc = evaluate(model, data["heldout_x"], data["heldout_y"])
        model.train()
        eval_time += time.perf_counter() - t0
        row: dict[str, Any] = {
            "step": step, "batch_loss": float(batch_loss.detach()), "train_loss": train_loss, "train_acc": train_acc,
            "heldout_loss": heldout_loss, "heldout_acc": heldout_acc, "lr": sched.get_last_lr()[0],
            "wall_s": time.perf_counter() - start,
        }
        if is_snr:
            for key, value in opt.last_stats.items():
                row[STAT_PREFIX + key] = float(value) if isinstance(value, (int, float)) else value
        rows.append(row)
        for name, acc, thr in (("train", train_acc, args.train_threshold),
                               ("heldout", heldout_acc, args.heldout_threshold)):
            if reached[name] is None and acc >= thr:
                reached[name], reached_wall[name] = step, row["wall_s"]
        if not args.quiet:
            gate = f" gate {row['snr/mask_mean']:.3f}" if "snr/mask_mean" in row else ""
            print(f"step {step:6d}  train {train_loss:.3g}/{train_acc:.3f}  held-out {heldout_loss:.3g}/"
                  f"{heldout_acc:.3f}{gate}  {row['wall_s']:.0f}s", flush=True)
        if not math.isfinite(train_loss):
            print(f"grokking: non-finite training loss at step {step}; stopping", flush=True)
            stopped_early = True
            break
        if reached["train"] is not None and reached["heldout"] is not None and args.stop_after_grok is not None:
            if evals_after_grok >= args.stop_after_grok:
                stopped_early = step < args.max_steps
                break
            evals_after_grok += 1
    run_s = time.perf_counter() - t_run
    wall = time.perf_counter() - start
    steady = (step - 1) / (train_time - first_step_s) if step > 1 and train_time > first_step_s else None

    gates = [r["snr/mask_mean"] for r in rows if isinstance(r.get("snr/mask_mean"), float)]
    thresholds = {
        f"train_{round(args.train_threshold * 100):g}": {
            "threshold": args.train_threshold, "step": reached["train"], "reached": reached["train"] is not None,
            "wall_s": reached_wall["train"]},
        f"heldout_{round(args.heldout_threshold * 100):g}": {
            "threshold": args.heldout_threshold, "step": reached["heldout"], "reached": reached["heldout"] is not None,
            "wall_s": reached_wall["heldout"]},
    }
    results = {
        "args": asdict(args),
        "data": {"pairs": n_train + n_heldout, "train": n_train, "heldout": n_heldout, "data_seed": data_seed,
                 "batch_size": stream.batch_size, "vocab": args.prime + 2},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "optimizer": {"class": type(opt).__module__ + "." + type(opt).__name__, **opt_info},
        "thresholds": thresholds,
        "steps_run": step,
        "stopped_early": stopped_early,
        "gate_mean": sum(gates) / len(gates) if gates else None,
        "timing": {
            "wall_s": wall, "setup_s": setup_s, "run_s": run_s, "train_s": train_time, "eval_s": eval_time,
            "first_step_s": first_step_s, "steps_per_s": step / run_s if run_s > 0 else None,
            "train_steps_per_s": step / train_time if train_time > 0 else None,
            "steady_train_steps_per_s": steady, "torch_threads": torch.get_num_threads(), "compile": args.compile,
            "torch": torch.__version__,
        },
        "final": rows[-1] if rows else {},
        "risk_tracking": risk_tracking(rows),
        "log": rows,
    }
    results = _jsonable(results)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.plot and rows:
        title = f"{args.optim} lr={args.learning_rate:g} wd={args.weight_decay:g} seed={args.seed}"
        plot_accuracy(rows, os.path.join(args.output_dir, "accuracy.png"), title)
    if not args.quiet:
        th = ", ".join(f"{k}: {'step ' + str(v['step']) if v['reached'] else 'not reached (null)'}"
                       for k, v in thresholds.items())
        print(f"grokking: {args.optim} {th}; {step} steps in {wall:.1f} s "
              f"({results['timing']['steps_per_s']:.1f} steps/s); results in {args.output_dir}", flush=True)
    return results


if __name__ == "__main__":
    main(parse_args())
