"""Evaluation the way ManiSkill's demo-learning baselines do it.

Separate eval envs, ``ignore_terminations`` (every episode runs the full horizon), no
partial resets, fixed seeds ``seed, seed+1, ...``. Reports ``success_once`` (success at
any step), ``success_at_end`` (success at the last step), ``return_mean``, ``episodes``;
with ``per_episode=True`` also one record per episode (its seed, the two successes and
its return), so two checkpoints can be compared seed by seed.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from flowmanip.errors import FlowmanipError
from flowmanip.utils import to_device


def check_env_matches_spec(env, spec: dict, obs: dict, source: str) -> None:
    if obs["state"].shape[-1] != spec["obs_dim"]:
        raise FlowmanipError(f"{source}: the policy expects state obs of dim {spec['obs_dim']}, "
                             f"the environment gives {obs['state'].shape[-1]}")
    if spec.get("rgb_shape") and list(obs["rgb"].shape[1:]) != list(spec["rgb_shape"]):
        raise FlowmanipError(f"{source}: the policy expects rgb {spec['rgb_shape']}, "
                             f"the environment gives {list(obs['rgb'].shape[1:])}")
    if env.action_low.shape[0] != spec["action_dim"]:
        raise FlowmanipError(f"{source}: the policy has action_dim {spec['action_dim']}, "
                             f"the environment {env.action_low.shape[0]}")


@torch.no_grad()
def evaluate_policy(act, env, episodes: int, horizon: int, execute: int, seed: int = 0,
                    video_dir: str | None = None, device=None, per_episode: bool = False) -> dict:
    """Run ``episodes`` episodes with ``act(obs) -> [N, H, A]`` env actions, executing ``execute`` per decision."""
    successes_once, successes_end, returns, all_seeds = [], [], [], []
    rounds = -(-episodes // env.num_envs)
    for rnd in range(rounds):
        seeds = [seed + rnd * env.num_envs + i for i in range(env.num_envs)]
        obs = env.reset(seeds)
        success_any = torch.zeros(env.num_envs, dtype=torch.bool)
        success_last = torch.zeros(env.num_envs, dtype=torch.bool)
        ret = torch.zeros(env.num_envs)
        frames = []
        t = 0
        while t < horizon:
            if device is not None:
                obs = to_device(obs, device)
            actions = act(obs)[:, :execute][:, : horizon - t]
            result = env.step_chunk(actions, auto_reset=False, render=video_dir is not None)
            success_any |= result.success.any(1).cpu()
            success_last = result.success[:, -1].cpu()
            ret += result.step_reward.sum(1).cpu()
            if video_dir is not None:
                frames.append(env.last_frames)
            t += actions.shape[1]
            obs = result.next_obs
        successes_once += success_any.tolist()
        successes_end += success_last.tolist()
        returns += ret.tolist()
        all_seeds += seeds
        if video_dir is not None:  # the last round's padding envs beyond ``episodes`` get no video
            _write_videos(video_dir, frames, seeds[: episodes - rnd * env.num_envs])
    n = episodes
    result = {
        "success_once": float(np.mean(successes_once[:n])),
        "success_at_end": float(np.mean(successes_end[:n])),
        "return_mean": float(np.mean(returns[:n])),
        "episodes": n,
    }
    if per_episode:
        result["per_episode"] = [
            {"seed": s, "success_once": bool(o), "success_at_end": bool(e), "return": float(r)}
            for s, o, e, r in zip(all_seeds[:n], successes_once[:n], successes_end[:n], returns[:n])]
    return result


def _write_videos(video_dir: str, frames: list, seeds: list[int]) -> None:
    import imageio

    os.makedirs(video_dir, exist_ok=True)
    for j, seed in enumerate(seeds):
        clip = np.concatenate([chunk[j] for chunk in frames])
        imageio.mimsave(os.path.join(video_dir, f"seed{seed}.mp4"), clip, fps=20)


def evaluate_checkpoint(path: str, episodes: int | None = None, seed: int | None = None, num_envs: int | None = None,
                        backend: str | None = None, video_dir: str | None = None,
                        per_episode: bool = False, stochastic: bool = False, sigma: float | None = None,
                        flow_steps: int | None = None) -> dict:
    """Evaluate a checkpoint's deterministic rollout, or with ``stochastic`` its noise-augmented one
    (the fine-tune's behaviour policy; ``sigma`` replaces a flow policy's rollout noise, ``flow_steps``
    its number of Euler steps K). ``episodes`` and ``seed`` default to the checkpoint recipe's ``eval``
    settings."""
    from flowmanip.envs import make_vector_env, resolve_backend
    from flowmanip.train.checkpoint import load_checkpoint
    from flowmanip.train.stages import policy_from_checkpoint

    if episodes is not None and episodes < 1:
        raise FlowmanipError(f"--episodes must be >= 1, got {episodes}")
    if sigma is not None and sigma <= 0:
        raise FlowmanipError(f"--sigma must be > 0, got {sigma}")
    if flow_steps is not None and flow_steps < 1:
        raise FlowmanipError(f"--flow-steps must be >= 1, got {flow_steps}")
    if num_envs is not None and num_envs < 1:
        raise FlowmanipError(f"--num-envs must be >= 1, got {num_envs}")
    if backend is not None:
        resolve_backend(backend, "--backend")  # before the checkpoint loads
    stochastic = stochastic or sigma is not None
    ckpt = load_checkpoint(path)
    recipe = ckpt["recipe"]
    episodes = episodes or recipe.eval.episodes
    seed = recipe.eval.seed if seed is None else seed
    policy = policy_from_checkpoint(ckpt)
    actor = ckpt["meta"].get("actor", "flow")  # as policy_from_checkpoint reads it
    for option, value in (("--sigma", sigma), ("--flow-steps", flow_steps)):
        if value is not None and actor != "flow":
            raise FlowmanipError(f"{ckpt['path']}: {option} needs a flow policy, this checkpoint has a {actor} actor")
    if sigma is not None:
        policy.actor.reset_sigma(sigma)
    if flow_steps is not None:
        policy.actor.flow_steps = flow_steps
    if stochastic:
        torch.manual_seed(seed)  # the rollout noise, so that a stochastic evaluation repeats

        def act(obs):
            return policy.act(obs, deterministic=False)
    else:
        act = policy.act
    env = make_vector_env(recipe.env, num_envs or min(recipe.env.num_eval_envs, episodes),
                          backend or recipe.env.backend)
    try:
        policy.to(env.device)
        check_env_matches_spec(env, ckpt["spec"], env.reset(), ckpt["path"])
        result = evaluate_policy(act, env, episodes, recipe.env.max_episode_steps,
                                 recipe.policy.execute or recipe.policy.chunk, seed, video_dir,
                                 per_episode=per_episode)
    finally:
        env.close()
    if stochastic:
        result["stochastic"] = True
        if sigma is not None:
            result["sigma"] = sigma
    if flow_steps is not None:
        result["flow_steps"] = flow_steps
    result["checkpoint"] = ckpt["path"]
    result["step"] = ckpt["meta"]["step"]
    return result
