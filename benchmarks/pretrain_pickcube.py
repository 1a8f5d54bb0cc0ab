"""Pretraining on the shipped PickCube demos: train time and success over 100 episodes per velocity field.

    python benchmarks/pretrain_pickcube.py [--velocities mlp gated decoded gaussian] [--episodes 100] [key=value ...]

``gaussian`` is the tanh-Gaussian baseline actor fitted by Gaussian behaviour cloning (the
starting point of the Gaussian-SAC fine-tune in benchmarks/finetune_curves.py).

Writes results/pretrain_pickcube.json and prints a table. About 5-8 minutes per velocity
field on a 2-core CPU (training plus a 100-episode evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/pickcube.yaml")
    parser.add_argument("--velocities", nargs="+", default=["mlp", "gated", "decoded"],
                        choices=["mlp", "gated", "decoded", "gaussian"])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--results", default="results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from flowmanip.train.evaluate import evaluate_checkpoint
    from flowmanip.train.pretrain import run_pretrain

    # rows of earlier runs (other velocity fields, same recipe and overrides) are kept, so the sweep can be split
    previous = os.path.join(args.results, "pretrain_pickcube.json")
    rows = []
    if os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        if old.get("recipe") == args.recipe and old.get("overrides") == args.overrides:
            rows = [r for r in old["rows"] if r["velocity"] not in args.velocities]
    for velocity in args.velocities:
        out = os.path.join(args.results, "runs", f"pretrain_{velocity}")
        start = time.time()
        actor = ["policy.actor=gaussian"] if velocity == "gaussian" else [f"policy.velocity={velocity}"]
        run_pretrain(args.recipe, [*actor, f"out_dir={out}", "pretrain.eval_every=0", *args.overrides],
                     overwrite=True)
        train_s = time.time() - start
        result = evaluate_checkpoint(os.path.join(out, "pretrain"), episodes=args.episodes)
        rows.append({"velocity": velocity, "train_time_s": round(train_s, 1), **result})
        print(table(rows, ["velocity", "train_time_s", "success_once", "success_at_end", "return_mean", "episodes"]),
              flush=True)
        # written after every variant, so a long sweep that is stopped keeps what it measured
        path = write(args.results, "pretrain_pickcube", {"recipe": args.recipe, "overrides": args.overrides,
                                                         "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
