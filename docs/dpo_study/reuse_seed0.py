"""Copy the lr sweep's seed-0 runs into the verdict folder where the arguments are identical (same arm, lr, seed).

    python docs/dpo_study/reuse_seed0.py recipes/configs/verdict_sweep.yaml recipes/configs/verdict.yaml COMPARISON...

The runs are deterministic per seed, so the verdict's seed 0 at an arm's best lr is the sweep's run; it is
copied only when every noisy_dpo flag but --output_dir matches, and `compare.py --reuse` then keeps it.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "recipes"))
import compare  # noqa: E402


def _key(argv):
    flags = list(argv)
    i = flags.index("--output_dir")
    del flags[i:i + 2]
    if "--sft_cache_dir" in flags:  # where the SFT model is kept, not what it is
        i = flags.index("--sft_cache_dir")
        del flags[i:i + 2]
    return tuple(flags)


sweep_cfg, verdict_cfg, names = sys.argv[1], sys.argv[2], sys.argv[3:]
sweep = compare.load_config(sweep_cfg)
verdict = compare.load_config(verdict_cfg)
by_args = {_key(r.argv): r for r in compare.expand(sweep, sweep["output_dir"], only=names)}
for run in compare.expand(verdict, verdict["output_dir"], only=names):
    src = by_args.get(_key(run.argv))
    if src is None:
        continue
    src_file = os.path.join(src.run_dir, "results.json")
    dst_file = os.path.join(run.run_dir, "results.json")
    if os.path.isfile(src_file) and not os.path.isfile(dst_file):
        os.makedirs(run.run_dir, exist_ok=True)
        shutil.copyfile(src_file, dst_file)
        print(f"reuse_seed0: {run.comparison} | {run.arm} | seed {run.seed} <- {src.run_dir}")
