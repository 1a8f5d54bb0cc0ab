"""How a PickCube-v1 policy's episodes go, step by step, for chosen seeds: grasp, carry, place.

    python benchmarks/pickcube_trace.py CHECKPOINT --seeds 5 34 43 [--name pickcube_trace]

For each seed (the same seeds ``flowmanip eval`` uses, so the failed seeds from
``flowmanip eval --per-episode`` can be traced) it runs the deterministic policy for the
recipe's horizon on ``physx_cpu``, executing as many actions per decision as ``flowmanip
eval`` does, and reports: the first step the cube is grasped, the closest the cube came to
the goal and when, the distance at the end, whether the robot is static at the end, the
first success step and the return. PickCube counts a success when
the cube is within 2.5 cm of the goal and the robot is static. Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def trace(policy, env, seed: int, horizon: int, execute: int) -> dict:
    from flowmanip.envs.vector import obs_to_numpy

    raw, _ = env.reset(seed=seed)
    task = env.unwrapped
    steps = []
    while len(steps) < horizon:
        obs = {k: torch.as_tensor(v)[None] for k, v in obs_to_numpy(raw).items()}
        with torch.no_grad():
            chunk = policy.act(obs)[0].numpy()
        for action in chunk[:execute][: horizon - len(steps)]:
            raw, reward, _, _, info = env.step(action)
            distance = float(torch.linalg.norm(task.goal_site.pose.p - task.cube.pose.p))
            steps.append({"reward": float(reward), "grasped": bool(info["is_grasped"]), "distance": distance,
                          "static": bool(info["is_robot_static"]), "success": bool(info["success"])})

    def first(key):
        return next((t for t, s in enumerate(steps) if s[key]), None)

    closest = min(range(horizon), key=lambda t: steps[t]["distance"])
    return {"seed": seed, "first_grasp": first("grasped"), "closest_m": round(steps[closest]["distance"], 4),
            "closest_at": closest, "final_m": round(steps[-1]["distance"], 4), "final_static": steps[-1]["static"],
            "first_success": first("success"), "return": round(sum(s["reward"] for s in steps), 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="pickcube_trace")
    args = parser.parse_args()

    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    from flowmanip.envs.vector import env_kwargs
    from flowmanip.errors import FlowmanipError
    from flowmanip.train.checkpoint import load_checkpoint
    from flowmanip.train.stages import policy_from_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except FlowmanipError as e:
        sys.exit(f"pickcube_trace: {e}")
    recipe = ckpt["recipe"]
    if recipe.env.id != "PickCube-v1" or recipe.env.obs_mode != "state":
        sys.exit(f"pickcube_trace: {ckpt['path']} is for {recipe.env.id} ({recipe.env.obs_mode} obs); "
                 "this script traces PickCube-v1 state policies")
    torch.set_num_threads(1)
    policy = policy_from_checkpoint(ckpt)
    env = gym.make(recipe.env.id, **env_kwargs(recipe.env, "physx_cpu"))
    try:
        execute = recipe.policy.execute or recipe.policy.chunk  # actions run per decision, as flowmanip eval does
        rows = [trace(policy, env, seed, recipe.env.max_episode_steps, execute) for seed in args.seeds]
    finally:
        env.close()
    print(table(rows, list(rows[0])))
    print(f"wrote {write(args.results, args.name, {'checkpoint': ckpt['path'], 'rows': rows})}")


if __name__ == "__main__":
    main()
