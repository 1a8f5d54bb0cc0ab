"""Online learning curves: success_once vs env steps for each actor variant, same loop, same data.

    # offline-to-online PickCube (each variant starts from a pretrain of the same velocity field)
    python benchmarks/finetune_curves.py --recipe recipes/pickcube.yaml --variants gated decoded mlp gaussian \
        --steps 50000 [--seeds 0 1 2] [key=value ...]
    # from scratch PushCube
    python benchmarks/finetune_curves.py --recipe recipes/pushcube_scratch.yaml --variants gated decoded gaussian \
        --steps 150000 --name scratch_pushcube

Variants: ``mlp``/``gated``/``decoded`` are SAC Flow with that velocity field; ``gaussian``
is a tanh-Gaussian SAC actor trained by the same loop on the same data (offline-to-online
runs pretrain it by Gaussian behaviour cloning first). Writes results/<name>.json and
results/<name>.png (mean and min-max over seeds). The pretrained policy's success is the
BC-only reference (the curve's value at step 0). Seed 0 of an offline-to-online variant reuses
results/runs/pretrain_<variant> from benchmarks/pretrain_pickcube.py when that run was made with
the same env, data, policy and pretrain settings; a ``finetune.init=PATH`` override starts every
run from PATH instead. Variants
already in results/<name>.json from a run with the same recipe, steps and overrides are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_success_plot, table, write  # noqa: E402


def run_variant(recipe, variant, seed, steps, out, overrides, scratch, results):
    from flowmanip.train.finetune import run_finetune
    from flowmanip.train.pretrain import run_pretrain

    actor = "gaussian" if variant == "gaussian" else "flow"
    velocity = "gated" if variant == "gaussian" else variant
    common = [f"policy.velocity={velocity}", f"policy.actor={actor}", f"out_dir={out}", f"seed={seed}", *overrides]
    reuse = os.path.join(results, "runs", f"pretrain_{variant}", "pretrain")
    named_init = any(o.startswith("finetune.init=") for o in overrides)  # the caller names the start
    if not scratch and not named_init:
        if seed == 0 and same_pretrain(reuse, recipe, common):  # made by benchmarks/pretrain_pickcube.py
            common.append(f"finetune.init={os.path.join(reuse, 'checkpoints', 'last')}")
        else:  # pretrain this variant (the gaussian one by Gaussian behaviour cloning)
            run_pretrain(recipe, common + ["pretrain.eval_every=0"], overwrite=True)
    return run_finetune(recipe, common + [f"finetune.total_env_steps={steps}"], overwrite=True)


def same_pretrain(run: str, recipe: str, overrides: list) -> bool:
    """Whether the pretrain run in ``run`` was made with this recipe's env, data, policy and pretrain settings."""
    import yaml

    from flowmanip.config import from_dict, load_recipe, to_dict

    saved = os.path.join(run, "config.yaml")
    if not os.path.exists(os.path.join(run, "checkpoints", "last")) or not os.path.exists(saved):
        return False
    with open(saved) as f:  # as written, without today's validation (only the weight-shaping keys matter)
        a = to_dict(from_dict(yaml.safe_load(f)))
    b = to_dict(load_recipe(recipe, overrides))
    for d in (a, b):  # evaluation settings do not change the weights
        d["pretrain"] = {k: v for k, v in d["pretrain"].items() if not k.startswith("eval")}
    return all(a[k] == b[k] for k in ("seed", "env", "data", "policy", "pretrain"))


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, runs in curves.items():
        xs = [e["env_steps"] for e in runs[0]]
        ys = np.array([[e["success_once"] for e in run[: len(xs)]] for run in runs])
        ax.plot(xs, ys.mean(0), marker="o", label=variant)
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2)
    save_success_plot(fig, ax, path, title)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/pickcube.yaml")
    parser.add_argument("--variants", nargs="+", default=["gated", "decoded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=50000)
    parser.add_argument("--name", default="finetune_pickcube")
    parser.add_argument("--results", default="results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from flowmanip.config import load_recipe

    scratch = load_recipe(args.recipe).finetune.init in ("none", "scratch")
    curves, rows = {}, []
    for variant in args.variants:
        for seed in args.seeds:
            out = os.path.join(args.results, "runs", args.name, f"{variant}_seed{seed}")
            summary = run_variant(args.recipe, variant, seed, args.steps, out, args.overrides, scratch, args.results)
            curves.setdefault(variant, []).append(summary["evals"])
            first90 = next((e for e in summary["evals"] if e["success_once"] >= 0.9), None)
            rows.append({"variant": variant, "seed": seed, "start": summary["evals"][0]["success_once"],
                         "final": summary["evals"][-1]["success_once"],
                         "min": min(e["success_once"] for e in summary["evals"]),
                         "steps_to_0.90": first90 and first90["env_steps"], "wall_s_to_0.90": first90 and first90["time_s"],
                         "env_steps": summary["env_steps"], "updates": summary["updates"],
                         "wall_s": round(summary["time_s"], 1)})
            print(table(rows, list(rows[0])), flush=True)
    # variants from earlier runs of the same benchmark (same recipe, budget, overrides) are kept, read just
    # before writing, so variants can run in separate (even concurrent) invocations
    previous = os.path.join(args.results, f"{args.name}.json")
    if os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        if (old.get("recipe"), old.get("steps"), old.get("overrides")) == (args.recipe, args.steps, args.overrides):
            keep = [v for v in old["curves"] if v not in curves]
            rows = [r for r in old["rows"] if r["variant"] in keep] + rows
            curves = {**{v: old["curves"][v] for v in keep}, **curves}
    print(table(rows, list(rows[0])), flush=True)
    png = os.path.join(args.results, f"{args.name}.png")
    os.makedirs(args.results, exist_ok=True)
    plot(curves, png, f"{args.name} ({args.recipe})")
    path = write(args.results, args.name, {"recipe": args.recipe, "overrides": args.overrides, "steps": args.steps,
                                           "rows": rows, "curves": curves, "plot": png})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
