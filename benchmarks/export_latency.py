"""Latency per action query at batch 1 on the CPU: exported TorchScript vs the eager module.

    python benchmarks/export_latency.py [--repeats 1000] [--threads 1]

Policies are built at their recipe sizes with random weights (latency does not depend on
the weights): state Flow-G and Flow-T with K = 4, and the RGB Flow-G policy (64x64 camera).
Writes results/export_latency.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def timed(fn, obs, repeats):
    with torch.no_grad():
        for _ in range(20):
            fn(obs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(obs)
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from flowmanip.config import load_recipe
    from flowmanip.export.torchscript import DictPolicy, StatePolicy
    from flowmanip.spec import make_spec
    from flowmanip.models.policy import Policy

    cases = [("state gated", "recipes/pickcube.yaml", ["policy.velocity=gated"]),
             ("state decoded", "recipes/pickcube.yaml", ["policy.velocity=decoded"]),
             ("rgb gated", "recipes/pickcube_rgb.yaml", [])]
    rows = []
    for name, path, overrides in cases:
        recipe = load_recipe(path, ["policy.flow_steps=4", *overrides])
        rgb = recipe.env.obs_mode == "rgb"
        obs_dim = 29 if rgb else 42
        low, high = [-1.0] * 4, [1.0] * 4
        spec = make_spec(obs_dim=obs_dim, action_low=low, action_high=high, env_low=low, env_high=high,
                         rgb_shape=[recipe.env.camera_size, recipe.env.camera_size, 3] if rgb else None)
        policy = Policy(spec, recipe.policy).eval()
        module = (DictPolicy if rgb else StatePolicy)(policy).eval()
        scripted = torch.jit.script(module)
        if rgb:
            obs = {"rgb": torch.randint(0, 255, (1, *spec["rgb_shape"]), dtype=torch.uint8),
                   "state": torch.randn(1, obs_dim)}
        else:
            obs = torch.randn(1, obs_dim)
        for kind, fn in (("eager", module), ("torchscript", scripted)):
            median, p99 = timed(fn, obs, args.repeats)
            rows.append({"policy": name, "runtime": kind, "K": recipe.policy.flow_steps, "H": recipe.policy.chunk,
                         "median_ms": round(median, 3), "p99_ms": round(p99, 3)})
        print(table(rows, list(rows[0])), flush=True)
    print(f"wrote {write(args.results, 'export_latency', {'threads': args.threads, 'rows': rows})}")


if __name__ == "__main__":
    main()
