"""What a fine-tune starts from, checked before any env starts; and the small pieces the loop calls
(resume, the observation normaliser of a from-scratch run, earlier evaluations on resume, the logged
noise scale, evaluation, checkpoints)."""

from __future__ import annotations

import os
import sys

import torch

from flowmanip.config import check_finetune_settings
from flowmanip.errors import FlowmanipError
from flowmanip.spec import Spec, make_spec
from flowmanip.train.checkpoint import check_init_matches, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from flowmanip.train.logger import read_metrics
from flowmanip.utils import check_output_dir

MIN_STATS_STEPS = 64  # from scratch: env steps the observation normaliser is computed from, at least


def resolve_init(recipe) -> str | None:
    init = recipe.finetune.init
    if init is None:
        return os.path.join(recipe.out_dir, "pretrain", "checkpoints", "last")
    return None if init.lower() in ("none", "scratch", "") else init


def earlier_evals(metrics_path: str) -> list[dict]:
    """The evaluations logged in ``metrics_path``, as ``summary.json`` lists them. A resumed run's
    logger has already cut the file back to the checkpoint, so these are the ones made before it;
    their ``time_s`` is None: it belonged to the earlier process."""
    evals = []
    for row in read_metrics(metrics_path) if os.path.exists(metrics_path) else []:
        if "eval/success_once" in row:
            e = {"env_steps": row["step"], "time_s": None,
                 **{k[5:]: v for k, v in row.items() if k.startswith("eval/")}}
            if "episodes" in e:  # the logger writes every value as a float
                e["episodes"] = int(e["episodes"])
            evals.append(e)
    return evals


def check_start(recipe, recipe_path: str, stage_dir: str, resume: bool):
    """Everything that can fail on user input, before any env starts. Returns ``(episodes or None,
    checkpoint to start from or None)``."""
    from flowmanip.data import load_demos

    cfg = recipe.finetune
    check_output_dir(stage_dir)  # out_dir=policy.pt is a typo, not a run
    check_finetune_settings(recipe, recipe_path)
    episodes = None
    if recipe.data is not None and bool(recipe.data.path) and (cfg.bc_weight > 0 or cfg.demo_fraction != 0):
        meta, episodes = load_demos(recipe)
        if not all(e.rewards is not None for e in episodes):
            raise FlowmanipError(f"{recipe.data.path}: demos have no rewards; convert them with `flowmanip demos "
                                 f"replay FILE -c {recipe.env.control_mode} --reward-mode {recipe.env.reward_mode} "
                                 "--output OUT.h5`")
        if meta.reward_mode is not None and meta.reward_mode != recipe.env.reward_mode:
            raise FlowmanipError(f"{recipe.data.path}: demo rewards are {meta.reward_mode!r}, "
                                 f"the recipe's env.reward_mode is {recipe.env.reward_mode!r}")
    init_path = resolve_init(recipe)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(os.path.join(stage_dir, "checkpoints", "last"), with_training_state=True)
    elif init_path is not None:
        if not os.path.exists(init_path):
            raise FlowmanipError(f"finetune.init: {init_path} does not exist; run `flowmanip pretrain` first, "
                                 "or set finetune.init=none to train from scratch")
        ckpt = load_checkpoint(init_path)
    if ckpt is not None:
        check_init_matches(ckpt["meta"], recipe, ckpt["path"], episodes[0].obs["state"].shape[-1] if episodes else None,
                           ckpt["recipe"].policy, what="the run to resume" if resume else "init checkpoint")
    elif episodes is None and max(cfg.random_warmup, cfg.learning_starts) < MIN_STATS_STEPS:
        raise FlowmanipError(f"{recipe_path}: from scratch without demos, the observation normaliser is computed "
                             f"from the first max(finetune.random_warmup, finetune.learning_starts) env steps; "
                             f"set one of them to at least {MIN_STATS_STEPS}")
    return episodes, ckpt


def buffer_capacity(recipe, world: int) -> int:
    """Replay slots per process: one transition per decision, so at most total/H full chunks plus one short
    chunk per episode, and a margin of two chunks per env (capped at ``finetune.buffer_size``)."""
    per_rank = -(-recipe.finetune.total_env_steps // world)
    decisions = (-(-per_rank // recipe.policy.chunk) + -(-per_rank // recipe.env.max_episode_steps)
                 + 2 * recipe.env.num_envs)
    return min(recipe.finetune.buffer_size, decisions)


def restore_training(agent, buffer, counters: dict, ckpt, cfg, is_main: bool) -> int:
    """Resume: the learner's weights and optimisers, the loop's counters and (if saved) the replay buffer.
    Returns the env step updates start at again."""
    agent.load_state_dict(ckpt["weights"]["agent"])
    ts = ckpt["training_state"]
    counters.update(ts["counters"])
    agent.load_training_state(ts["agent"] if "agent" in ts else {**ts, "updates": ts["counters"]["updates"]})
    if "buffer" in ts:
        buffer.load_state_dict(ts["buffer"])
        return cfg.learning_starts
    # collect learning_starts env steps again before updating, so that the first updates do not replay a
    # handful of transitions over and over
    if is_main:
        print(f"resuming at env step {counters['env_steps']} with an empty replay buffer (the run was saved with "
              f"finetune.save_buffer=false): updates restart after {cfg.learning_starts} new env steps "
              "(finetune.learning_starts)", file=sys.stderr)
    return counters["env_steps"] + cfg.learning_starts


def scratch_spec(env, obs) -> Spec:
    """From scratch: the env's action bounds; observation statistics are set once enough states are in."""
    return make_spec(obs_dim=obs["state"].shape[-1], action_low=env.action_low, action_high=env.action_high,
                     env_low=env.action_low, env_high=env.action_high,
                     rgb_shape=obs["rgb"].shape[1:] if "rgb" in obs else None)


def set_obs_stats(accelerator, buffer, agent, spec, device) -> None:
    """Observation mean and std from every state collected so far (all processes)."""
    n = len(buffer)
    states = torch.cat([buffer.obs["state"][:n], buffer.next_obs["state"][:n]]).to(device)
    states = accelerator.gather(states)
    mean, std = states.mean(0), states.std(0).clamp(min=1e-3)
    for module in (agent.encoder, agent.target_encoder, agent.anchor_encoder):
        if module is None:  # no anchor
            continue
        module.normalizer.mean.copy_(mean)
        module.normalizer.std.copy_(std)
    spec["obs_mean"], spec["obs_std"] = mean.tolist(), std.tolist()


@torch.no_grad()
def mean_sigma(policy, obs) -> float:
    """Mean per-step noise scale of the noise-augmented rollout at ``obs`` (0 for actors without one)."""
    if not hasattr(policy.actor, "log_sigma"):
        return 0.0
    return float(policy.actor.log_sigma(policy.encoder(obs)).exp().mean())


def log_row(info: dict, agent, sigma: float, episodes: list, elapsed: float, steps: int, updates: int) -> dict:
    """A metrics row: the last update's scalars, the temperature and noise, rates since this process started,
    and the (main rank's) training episodes since the last row."""
    row = {k: float(v) for k, v in info.items()}
    row.update(alpha=float(agent.alpha), updates=agent.updates, time_s=elapsed, sigma=sigma,
               env_steps_per_s=steps / elapsed, updates_per_s=updates / elapsed)
    if episodes:
        row["train/return"] = sum(e["return"] for e in episodes) / len(episodes)
        row["train/success_once"] = sum(e["success_once"] for e in episodes) / len(episodes)
    return row


def seed_sampling(seed: int, rank: int, env_steps: int, saved_rng: dict | None = None) -> None:
    """The random stream of batch sampling and rollout noise: a resumed main process continues the one its
    checkpoint saved (``saved_rng``); a new run, and every other process, gets one of its own per rank."""
    if saved_rng is not None:
        set_rng_state(saved_rng)
    else:
        torch.manual_seed(seed + 1000 * rank + env_steps)


def save_finetune(stage_dir, recipe, spec, agent, buffer, counters: dict, ckpt, resume: bool) -> None:
    """A checkpoint at the current env step: weights, optimisers, counters, RNG (and the buffer if asked)."""
    counters["updates"] = agent.updates
    state = {"agent": agent.training_state(), "counters": dict(counters), "rng": rng_state()}
    if recipe.finetune.save_buffer:
        state["buffer"] = buffer.state_dict()
    save_checkpoint(stage_dir, counters["env_steps"], recipe, spec,
                    {"policy": agent.policy.state_dict(), "agent": agent.state_dict()}, state, "finetune",
                    {"init": ckpt["path"] if ckpt is not None and not resume else None})


def evaluate_stage(policy, eval_env, recipe, device) -> dict:
    """The deterministic policy over ``finetune.eval_episodes`` episodes from the recipe's eval seeds."""
    from flowmanip.train.evaluate import evaluate_policy

    policy.eval()
    try:
        return evaluate_policy(policy.act, eval_env, recipe.finetune.eval_episodes, recipe.env.max_episode_steps,
                               recipe.policy.execute or recipe.policy.chunk, seed=recipe.eval.seed, device=device)
    finally:
        policy.train()
