"""Fine-tune loop throughput against raw env stepping, same env config.

    python benchmarks/throughput.py [--num-envs 2] [--steps 4000] [--backend auto] [--raw-only] [--name throughput]
        [key=value ...]

Raw: the vector env stepping zero-action chunks. Loop: ``flowmanip finetune`` with the
recipe's networks for ``--steps`` env steps, updates starting at half of them. Reports
env steps/s, updates/s and the overhead ratio (raw / loop). ``--raw-only`` skips the loop (to see how
raw stepping scales with many GPU envs). Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/pickcube.yaml")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="throughput")
    parser.add_argument("--raw-only", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from flowmanip.config import load_recipe
    from flowmanip.envs import make_vector_env, resolve_backend
    from flowmanip.train.finetune import run_finetune
    from flowmanip.utils import device_for

    base = [f"env.num_envs={args.num_envs}", f"env.backend={args.backend}", *args.overrides]
    recipe = load_recipe(args.recipe, base)
    env = make_vector_env(recipe.env, args.num_envs, args.backend)
    try:
        env.reset(list(range(args.num_envs)))
        zeros = torch.zeros(args.num_envs, recipe.policy.chunk, env.action_low.shape[0], device=env.device)
        start, steps = time.time(), 0
        while steps < args.steps:
            steps += int(env.step_chunk(zeros, 0.99).steps.sum())
        raw = steps / (time.time() - start)
    finally:
        env.close()
    common = {"backend": resolve_backend(args.backend), "num_envs": args.num_envs,
              "raw_env_steps_per_s": round(raw, 1)}
    if args.raw_only:
        print(table([common], list(common)))
        print(f"wrote {write(args.results, args.name, {'recipe': args.recipe, 'overrides': args.overrides, 'rows': [common]})}")
        return
    out = os.path.join(args.results, "runs", args.name)
    summary = run_finetune(args.recipe, base + [f"out_dir={out}", f"finetune.total_env_steps={args.steps}",
                                                f"finetune.learning_starts={args.steps // 2}", "finetune.eval_every=0",
                                                "finetune.critic_warmup=0",
                                                f"finetune.log_every={args.steps // 4}", "finetune.init=none"],
                           overwrite=True)
    import json

    rows_metrics = [json.loads(line) for line in open(os.path.join(out, "finetune", "metrics.jsonl"))]
    learning = [r for r in rows_metrics if r.get("updates", 0) > 0]
    # rate over the learning phase only: (steps, updates, time) between the first and last log with updates
    first, last = learning[0], learning[-1]
    dt = last["time_s"] - first["time_s"]
    loop_steps = (last["step"] - first["step"]) / dt if dt > 0 else float("nan")
    updates = (last["updates"] - first["updates"]) / dt if dt > 0 else float("nan")
    row = {**common, "learner": device_for(recipe.device).type, "loop_env_steps_per_s": round(loop_steps, 1),
           "updates_per_s": round(updates, 1), "overhead_ratio": round(raw / loop_steps, 2),
           "utd": recipe.finetune.utd, "chunk": recipe.policy.chunk,
           "batch_size": recipe.finetune.batch_size, "total_wall_s": round(summary["time_s"], 1)}
    print(table([row], list(row)))
    print(f"wrote {write(args.results, args.name, {'recipe': args.recipe, 'overrides': args.overrides, 'rows': [row]})}")


if __name__ == "__main__":
    main()
