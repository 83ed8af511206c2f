"""Hardening of the integration layer: a mistyped flipped column, the swap count, a broken start-up hook,
and the skip count in the Trainer's log."""

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _snr_hf_utils import SNR_KEYS, snr, tiny_llama, token_dataset, train_args, train_logs
from datasets import Dataset, IterableDataset
from test_dpo import make_args, make_trainer
from transformers import Trainer

import hf_snr  # noqa: F401  (registers optim="snr_adamw")
from hf_snr.data import swap_preferences
from hf_snr.dpo import _FlagCollator

ROOT = Path(__file__).resolve().parent.parent


# -- 1. the flipped column: flags only, refused when the trainer is built -------------------------------------
def _pairs(flags) -> Dataset:
    n = len(flags)
    return Dataset.from_dict({"prompt": [f"review of film {i} :" for i in range(n)],
                              "chosen": [" the plot was great ."] * n,
                              "rejected": [" the plot was bad ."] * n,
                              "label_flipped": list(flags)})


@pytest.mark.parametrize("flags,row,shown", [
    (["False", "True", "False", "False"], 0, "'False'"),   # bool("False") is True: every pair would count as swapped
    ([[0], [1], [0], [0]], 0, "[0]"),
    ([0, 1, 2, 0], 2, "2"),
    ([0.0, 1.0, 0.0, 0.0], 0, "0.0"),
    ([True, False, None, True], 2, "None"),
])
def test_mistyped_flipped_column_is_refused_at_construction(tmp_path, flags, row, shown):
    args = make_args(tmp_path, max_steps=1, logging_steps=1)
    with pytest.raises(ValueError, match=rf"flipped column 'label_flipped' of train_dataset, row {row} .*: "
                                         rf"{re.escape(shown)} "):
        make_trainer(args, _pairs(flags))
    # the eval data set too, also given as a dict of named sets; the row number is the data set's as given
    bad = _pairs(flags).select([3, 2, 1, 0])
    with pytest.raises(ValueError, match=r"of eval_dataset\['noisy'\], row \d"):
        make_trainer(args, _pairs([True, False, False, True]), {"clean": _pairs([False] * 4), "noisy": bad})


def test_bool_and_zero_one_flags_are_accepted_and_reach_the_batch_as_bool(tmp_path):
    flags = [i % 3 == 0 for i in range(12)]
    args = make_args(tmp_path, per_device_train_batch_size=12, max_steps=1, logging_steps=1)
    for column in (flags, [int(f) for f in flags], np.array(flags, dtype=np.int8)):
        trainer = make_trainer(args, _pairs(column))
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["label_flipped"].dtype == torch.bool
        assert int(batch["label_flipped"].sum()) == sum(flags)


def test_collator_refuses_rather_than_coerces():
    seen = []
    collate = _FlagCollator(lambda examples: seen.append(examples) or {"n": len(examples)}, "label_flipped")
    good = [True, 0, 1, np.bool_(True), np.int64(0), torch.tensor(True), torch.tensor(1), np.array(False)]
    batch = collate([{"x": i, "label_flipped": v} for i, v in enumerate(good)])
    assert batch["label_flipped"].tolist() == [True, False, True, True, False, True, True, False]
    assert all("label_flipped" not in ex for ex in seen[0])
    for bad in ("False", "True", 2, np.int64(2), 1.0, None, [1], torch.tensor([1]), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"flipped column 'label_flipped' \(example 1 of a batch\)"):
            collate([{"label_flipped": False}, {"label_flipped": bad}])


def test_iterable_dataset_with_string_flags_fails_at_the_first_batch(tmp_path):
    rows = _pairs(["False", "True"] * 4)
    def gen():
        yield from rows

    stream = IterableDataset.from_generator(gen)
    trainer = make_trainer(make_args(tmp_path, per_device_train_batch_size=4, max_steps=1, logging_steps=1), stream)
    with pytest.raises(ValueError, match=r"'False' \(str\)"):
        next(iter(trainer.get_train_dataloader()))


# -- 2. the swap count never exceeds the rate ------------------------------------------------------------------
def _flipped(ds):
    return {i for i, f in enumerate(ds["label_flipped"]) if f}


def test_swap_count_is_floored():
    assert len(_flipped(swap_preferences(_pairs([False] * 7).remove_columns("label_flipped"), 0.5))) == 3
    ten = _pairs([False] * 10).remove_columns("label_flipped")
    assert len(_flipped(swap_preferences(ten, 0.3))) == 3  # 0.3 * 10 = 3.0000000000000004
    hundred = _pairs([False] * 100).remove_columns("label_flipped")
    assert len(_flipped(swap_preferences(hundred, 0.29))) == 29  # 0.29 * 100 = 28.999999999999996


def test_swap_count_never_exceeds_the_rate_and_stays_nested():
    from hf_snr.data import swap_count

    for n in range(0, 60):
        counts = [swap_count(n, r / 100) for r in range(0, 51)]
        assert counts == sorted(counts)  # monotone in the rate: prefixes of one permutation stay nested
        for r, c in zip(range(0, 51), counts):
            assert c <= r * n / 100 + 1e-9 and c == (r * n) // 100, (n, r, c)
    ds = _pairs([False] * 21).remove_columns("label_flipped")
    sets = [_flipped(swap_preferences(ds, r, seed=3)) for r in (0.1, 0.25, 0.3, 0.5)]
    assert [len(s) for s in sets] == [2, 5, 6, 10]
    assert all(a <= b for a, b in zip(sets, sets[1:]))


# -- 3. a broken hf_snr does not break every interpreter start -------------------------------------------------
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
ENV.pop("HF_SNR_AUTOREGISTER", None)
ENV.pop("PYTHONPATH", None)


def _start(tmp_path, package_init: str | None, env_extra=None) -> subprocess.CompletedProcess:
    """An interpreter start that processes the project's .pth from a site dir, as site.py does for site-packages
    (-S keeps the environment's own copy out), with a fake hf_snr package first on the path."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "hf_snr-autoregister.pth", site_dir)
    env = dict(ENV, **(env_extra or {}))
    if package_init is None:
        env["PYTHONPATH"] = str(ROOT)
    else:
        pkg = tmp_path / "fake" / "hf_snr"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(textwrap.dedent(package_init))
        env["PYTHONPATH"] = str(pkg.parent)
    code = f"import site, sys; site.addsitedir({str(site_dir)!r}); print('STARTED', 'hf_snr' in sys.modules)"
    return subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("init,kind,message", [
    ('raise RuntimeError("broken\\non purpose")\n', "RuntimeError", "broken on purpose"),
    ("import hf_snr_missing_dependency\n", "ModuleNotFoundError", "No module named 'hf_snr_missing_dependency'"),
    ("def f(:\n    pass\n", "SyntaxError", "invalid syntax"),
])
def test_broken_package_warns_in_one_line_and_python_starts(tmp_path, init, kind, message):
    proc = _start(tmp_path, init)
    assert proc.returncode == 0 and proc.stdout.strip() == "STARTED False", proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # not site.py's "Error processing line 1 ..." and a traceback
    assert lines[0].startswith(f"hf_snr: start-up hook disabled: {kind}: ") and message in lines[0], lines[0]
    assert lines[0].endswith("(set HF_SNR_AUTOREGISTER=0 to silence)")


def test_start_up_hook_is_one_import_line_and_still_works(tmp_path):
    text = (ROOT / "hf_snr-autoregister.pth").read_text()
    assert len(text.splitlines()) == 1 and text.startswith("import ")
    proc = _start(tmp_path, None)  # the real package: imported, silently
    assert proc.returncode == 0 and proc.stdout.strip() == "STARTED True" and proc.stderr == "", proc.stderr
    proc = _start(tmp_path, 'raise RuntimeError("x")\n', {"HF_SNR_AUTOREGISTER": "0"})  # switched off: not imported
    assert proc.returncode == 0 and proc.stdout.strip() == "STARTED False" and proc.stderr == "", proc.stderr


# -- 4. the skip count in the Trainer's log ---------------------------------------------------------------------
class NaNOnSteps(Trainer):
    """A Trainer whose loss (so every gradient) is NaN on the given optimizer steps (1-based)."""

    def __init__(self, *a, nan_steps=(), **kw):
        super().__init__(*a, **kw)
        self.nan_steps = set(nan_steps)

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        if self.state.global_step + 1 in self.nan_steps:
            loss = loss * float("nan")
        return loss


def _run_with_nans(tmp_path, nan_steps, **kw):
    args = train_args(tmp_path, optim="snr_adamw", optim_args="warmup_steps=1", **kw)
    trainer = NaNOnSteps(model=tiny_llama(), args=args, train_dataset=token_dataset(16), nan_steps=nan_steps)
    with pytest.warns(RuntimeWarning, match="skipped step"):
        trainer.train()
    assert snr(trainer).skipped_steps == len(nan_steps)
    summary = [h for h in trainer.state.log_history if "train_runtime" in h]
    assert len(summary) == 1
    return {h["step"]: h for h in train_logs(trainer)}, summary[0]


def test_nan_on_the_last_step_reaches_the_log(tmp_path):
    rows, summary = _run_with_nans(tmp_path, [4], max_steps=4, logging_steps=3)
    assert list(rows) == [3] and "snr/skipped_steps" not in rows[3]
    assert summary["snr/skipped_steps"] == 1  # the final summary says so; no step after it could


def test_nan_on_a_logging_step(tmp_path):
    rows, summary = _run_with_nans(tmp_path, [2, 5], max_steps=6, logging_steps=2)
    assert list(rows) == [2, 4, 6]
    # step 2 was skipped: its row has the count and no statistics (none were computed for it)
    assert rows[2]["snr/skipped_steps"] == 1 and not any(k in rows[2] for k in SNR_KEYS), rows[2]
    # later rows: the count (also of a skip between logs, step 5) and fresh statistics of their own step
    assert rows[4]["snr/skipped_steps"] == 1 and rows[6]["snr/skipped_steps"] == 2
    for step in (4, 6):
        assert all(k in rows[step] and math.isfinite(rows[step][k]) for k in SNR_KEYS), rows[step]
    assert rows[4]["snr/signal"] != rows[6]["snr/signal"]
    assert summary["snr/skipped_steps"] == 2


def test_skipped_row_does_not_repeat_the_previous_statistics(tmp_path):
    rows, summary = _run_with_nans(tmp_path, [3], max_steps=4, logging_steps=1)
    assert list(rows) == [1, 2, 3, 4]
    assert "snr/skipped_steps" not in rows[1] and "snr/skipped_steps" not in rows[2]
    assert "snr/signal" in rows[2] and "snr/signal" not in rows[3] and rows[3]["snr/skipped_steps"] == 1
    assert rows[4]["snr/skipped_steps"] == 1 and rows[4]["snr/signal"] != rows[2]["snr/signal"]
    assert summary["snr/skipped_steps"] == 1
