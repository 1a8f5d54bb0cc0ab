"""Which PickCube initial states a policy fails on, and what they have in common.

    flowmanip eval CKPT_A --episodes 100 --per-episode a.json
    flowmanip eval CKPT_B --episodes 100 --per-episode b.json
    python benchmarks/pickcube_failures.py a.json b.json [--name pickcube_failures]

Evaluation seeds fix the initial state, so the failed seeds of two checkpoints can be
compared directly: the same seeds failing before and after fine-tuning means systematic
failures, different ones means noise. For every seed the script resets PickCube-v1 and
records the cube's position and the goal's, then compares the seeds that failed in every
file with those that succeeded in every file. Prints a table, writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def load_episodes(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        episodes = data["per_episode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{path}: expected the JSON that `flowmanip eval --per-episode` writes ({type(e).__name__}: {e})")
    meta_path = os.path.join(data.get("checkpoint", ""), "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            env_id = json.load(f).get("env_id")
        if env_id != "PickCube-v1":
            sys.exit(f"{path}: evaluated on {env_id}; this script reads PickCube-v1 initial states")
    return {e["seed"]: e["success_once"] for e in episodes}


def initial_states(seeds: list[int]) -> dict:
    """Cube xy, cube yaw (degrees, modulo the cube's 90-degree symmetry), goal xyz, cube-goal distance."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    env = gym.make("PickCube-v1", obs_mode="state", control_mode="pd_ee_delta_pos")
    states = {}
    for seed in seeds:
        env.reset(seed=seed)
        u = env.unwrapped
        cube, goal = u.cube.pose.p[0].tolist(), u.goal_site.pose.p[0].tolist()
        w, _, _, z = u.cube.pose.q[0].tolist()
        states[seed] = {"cube_x": cube[0], "cube_y": cube[1], "yaw": math.degrees(2 * math.atan2(z, w)) % 90,
                        "goal_z": goal[2], "distance": math.dist(cube, goal)}
    env.close()
    return states


def summary(name: str, seeds: list[int], states: dict) -> dict:
    row = {"seeds": name, "count": len(seeds)}
    if seeds:
        mean = lambda f: sum(f(states[s]) for s in seeds) / len(seeds)  # noqa: E731
        row.update({"|cube_x| (m)": mean(lambda s: abs(s["cube_x"])), "|cube_y| (m)": mean(lambda s: abs(s["cube_y"])),
                    "max(|x|,|y|) (m)": mean(lambda s: max(abs(s["cube_x"]), abs(s["cube_y"]))),
                    "goal_z (m)": mean(lambda s: s["goal_z"]), "distance (m)": mean(lambda s: s["distance"])})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON files from `flowmanip eval --per-episode`")
    parser.add_argument("--name", default="pickcube_failures")
    parser.add_argument("--results", default="results")
    args = parser.parse_args()

    runs = {path: load_episodes(path) for path in args.files}
    common_seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not common_seeds:
        sys.exit("the files share no evaluation seeds")
    always_failed = [s for s in common_seeds if not any(r[s] for r in runs.values())]
    always_solved = [s for s in common_seeds if all(r[s] for r in runs.values())]
    states = initial_states(common_seeds)

    for path, r in runs.items():
        failed = [s for s in common_seeds if not r[s]]
        print(f"{path}: success_once {1 - len(failed) / len(common_seeds):.2f}, failed seeds {failed}")
    print(f"failed in every file: {always_failed}\n")
    rows = [summary("failed in every file", always_failed, states),
            summary("solved in every file", always_solved, states),
            summary("all", common_seeds, states)]
    print(table(rows, list(rows[-1])))
    path = write(args.results, args.name, {"files": args.files, "always_failed": always_failed,
                                           "always_solved": always_solved, "rows": rows, "states": states})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
