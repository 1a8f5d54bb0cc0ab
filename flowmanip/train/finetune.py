"""``flowmanip finetune``: SAC Flow online, offline-to-online or from scratch, under Accelerate.

The loop: collect one decision (an H-step chunk) in every env -> add it to the replay
buffer -> ``agent.update`` as often as the update-to-data ratio asks -> log / evaluate /
save. The update itself lives in ``flowmanip/algos/sac_flow.py``.

One process per device (``accelerate launch -m flowmanip finetune ...``), each with its own
envs and replay data; gradients are averaged across processes before every optimiser step,
so parameters stay identical; the main process logs, evaluates and writes checkpoints.
Writes ``<out_dir>/finetune/`` like pretrain does.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from tqdm import tqdm

from flowmanip.algos.sac_flow import SACFlow
from flowmanip.config import check_reachable_entropy, load_recipe, to_yaml
from flowmanip.models.policy import Policy, build_critic
from flowmanip.train.distributed import broadcast_parameters, gradient_averager, max_parameter_drift
from flowmanip.train.finetune_setup import (buffer_capacity, check_start, earlier_evals, evaluate_stage, log_row,
                                           mean_sigma, restore_training, save_finetune, scratch_spec, seed_sampling,
                                           set_obs_stats)
from flowmanip.train.logger import MetricsLogger, plot_curves
from flowmanip.train.replay import ReplayBuffer
from flowmanip.train.sampler import BatchSampler
from flowmanip.utils import atomic_output, device_for, to_device


def next_multiple(step: int, every: int) -> int:
    """The first multiple of ``every`` after ``step`` (schedules catch up when one loop passes several)."""
    return (step // every + 1) * every


def run_finetune(recipe_path: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> dict:
    from accelerate import Accelerator

    from flowmanip.data.samples import DemoSamples, normalization_stats
    from flowmanip.envs import make_vector_env, resolve_backend
    from flowmanip.train.evaluate import check_env_matches_spec
    from flowmanip.train.stages import prepare_stage_dir

    recipe = load_recipe(recipe_path, overrides)
    cfg, H = recipe.finetune, recipe.policy.chunk
    backend = resolve_backend(recipe.env.backend)
    accelerator = Accelerator(cpu=device_for(recipe.device).type == "cpu")
    rank, world, is_main, device = (accelerator.process_index, accelerator.num_processes,
                                    accelerator.is_main_process, accelerator.device)
    if backend == "cpu":  # env workers and updates share the cores; oversubscribed OpenMP threads stall both
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * world)))
    stage_dir = os.path.join(recipe.out_dir, "finetune")
    episodes, ckpt = check_start(recipe, recipe_path, stage_dir, resume)
    if is_main:
        prepare_stage_dir(stage_dir, resume, overwrite)
        source = "resuming " + ckpt["path"] if resume else (
            "starting from " + ckpt["path"] if ckpt is not None else "from scratch (finetune.init=none)")
        print(f"finetune: {source}", file=sys.stderr)
    accelerator.wait_for_everyone()

    torch.manual_seed(recipe.seed)  # the same on every rank: identical initial weights
    env = make_vector_env(recipe.env, recipe.env.num_envs, backend)
    eval_env = make_vector_env(recipe.env, recipe.env.num_eval_envs, backend) if is_main else None
    logger = None
    try:
        obs = env.reset([recipe.seed * 100003 + rank * recipe.env.num_envs + i for i in range(recipe.env.num_envs)])
        if ckpt is not None:
            spec = ckpt["spec"]
        elif episodes is not None:
            spec = normalization_stats(episodes, env.action_low.numpy(), env.action_high.numpy(),
                                       recipe.data.action_margin)
        else:
            spec = scratch_spec(env, obs)
        check_env_matches_spec(env, spec, obs, ckpt["path"] if ckpt else recipe_path)

        policy = Policy(spec, recipe.policy, recipe.policy.actor).to(device)
        if ckpt is not None and not resume:
            w = ckpt["weights"]
            policy.load_init(w.get("policy_ema", w["policy"]))
            if recipe.policy.actor == "flow":  # the noise is a fine-tune setting: this recipe's, not the init's
                policy.actor.reset_sigma(recipe.policy.sigma)
        check_reachable_entropy(recipe, policy.actor.dim, recipe_path)  # an explicit target needs d
        critic = build_critic(policy.encoder.out_dim, spec, recipe.policy, cfg).to(device)
        agent = SACFlow(policy, critic, cfg, grad_sync=gradient_averager(accelerator)).to(device)
        if cfg.compile == "on" or cfg.compile == "auto" and device.type == "cuda":
            agent.compile_losses()
        broadcast_parameters(accelerator, agent)

        buffer = ReplayBuffer(buffer_capacity(recipe, world), obs, policy.actor.dim, env.device)
        counters = {"env_steps": 0, "update_budget": 0.0, "obs_stats_set": ckpt is not None or episodes is not None}
        learn_from = restore_training(agent, buffer, counters, ckpt, cfg, is_main) if resume else cfg.learning_starts
        seed_sampling(recipe.seed, rank, counters["env_steps"], ckpt["training_state"]["rng"] if resume and is_main else None)
        stats_at = max(cfg.random_warmup, cfg.learning_starts)

        demos = DemoSamples(episodes, H, cfg.gamma, cfg.ignore_terminations,
                            recipe.data.learn_padding) if episodes is not None else None
        sampler = BatchSampler(buffer, demos, policy.scaler, cfg, device,
                               recipe.data.random_shift if recipe.data is not None else 0)
        if is_main:
            with atomic_output(os.path.join(stage_dir, "config.yaml")) as tmp, open(tmp, "w") as f:
                f.write(to_yaml(recipe))
            logger = MetricsLogger(stage_dir, recipe, "finetune", resume_step=counters["env_steps"] if resume else None)

        t0 = time.time()
        # only the main rank has a logger, which cut metrics.jsonl back to the checkpoint when it was made
        history = earlier_evals(logger.path) if resume and is_main else []
        recent, info = [], {}
        next_log, next_save = next_multiple(counters["env_steps"], cfg.log_every), next_multiple(counters["env_steps"], cfg.save_every)
        next_eval = float("inf") if cfg.eval_every <= 0 or cfg.eval_episodes <= 0 else (
            next_multiple(counters["env_steps"], cfg.eval_every) if resume else 0)
        bar = tqdm(total=cfg.total_env_steps, initial=counters["env_steps"], desc="finetune", unit="step",
                   dynamic_ncols=True, disable=not is_main)
        steps_at_start, updates_at_start = counters["env_steps"], agent.updates
        while True:
            if is_main and counters["env_steps"] >= next_eval:
                result = evaluate_stage(policy, eval_env, recipe, device)
                history.append({"env_steps": counters["env_steps"], "time_s": round(time.time() - t0, 1), **result})
                logger.log(counters["env_steps"], {f"eval/{k}": v for k, v in result.items()})
                bar.write(f"env step {counters['env_steps']}: success_once={result['success_once']:.3f} "
                          f"success_at_end={result['success_at_end']:.3f} return={result['return_mean']:.2f}")
                next_eval = next_multiple(counters["env_steps"], cfg.eval_every)
            if counters["env_steps"] >= cfg.total_env_steps:
                break

            # collect: one decision (an H-step chunk) in every env
            with torch.no_grad():
                obs_dev = to_device(obs, device)
                if counters["env_steps"] < cfg.random_warmup:
                    action = torch.rand(env.num_envs, policy.actor.dim, device=device) * 2 - 1
                else:
                    action = policy.actor.sample(policy.encoder(obs_dev))[0]
            result = env.step_chunk(policy.scaler.to_env(action.reshape(-1, H, policy.action_dim)), gamma=cfg.gamma,
                                    ignore_terminations=cfg.ignore_terminations)
            buffer.add(obs, action, result.reward, result.discount, result.terminated, result.final_obs)
            obs = result.next_obs
            recent += result.episodes
            steps = result.steps.sum().to(device)
            # ranks differ when chunks end early (terminations), and every rank must cross the same
            # thresholds (learning starts, the end) at the same iteration, or their collectives mismatch
            new_steps = int(accelerator.reduce(steps, "sum")) if world > 1 else int(steps)
            counters["env_steps"] += new_steps
            bar.update(new_steps)
            if not counters["obs_stats_set"] and counters["env_steps"] >= stats_at:
                set_obs_stats(accelerator, buffer, agent, spec, device)
                counters["obs_stats_set"] = True

            # learn: utd updates per decision in every env; the critic warms up first, alone
            if counters["env_steps"] >= learn_from and len(buffer) >= 2:
                if not counters.get("critic_warmed", False):
                    for _ in tqdm(range(cfg.critic_warmup), desc="critic warm-up", leave=False,
                                  disable=not is_main or cfg.critic_warmup == 0, dynamic_ncols=True):
                        info = agent.update(sampler.batch(), critic_only=True)
                    counters["critic_warmed"] = True
                counters["update_budget"] += cfg.utd * env.num_envs
                while counters["update_budget"] >= 1:
                    counters["update_budget"] -= 1
                    demo_batch = sampler.demo_batch(cfg.batch_size) if sampler.has_demos and agent.bc_weight > 0 else None
                    diagnose = is_main and counters["env_steps"] >= next_log and counters["update_budget"] < 1
                    info = agent.update(sampler.batch(), demo_batch, diagnose=diagnose)

            if counters["env_steps"] >= next_log:
                if is_main:
                    elapsed = max(time.time() - t0, 1e-6)
                    row = log_row(info, agent, mean_sigma(policy, obs_dev), recent, elapsed,
                                  counters["env_steps"] - steps_at_start, agent.updates - updates_at_start)
                    logger.log(counters["env_steps"], row)
                    bar.set_postfix(q=f"{row.get('q_mean', 0):.2f}", alpha=f"{row['alpha']:.3g}")
                recent = []
                next_log = next_multiple(counters["env_steps"], cfg.log_every)
            if counters["env_steps"] >= next_save:
                if is_main:
                    save_finetune(stage_dir, recipe, spec, agent, buffer, counters, ckpt, resume)
                next_save = next_multiple(counters["env_steps"], cfg.save_every)
        bar.close()
        summary = {"env_steps": counters["env_steps"], "updates": agent.updates, "world_size": world,
                   "param_max_abs_diff_across_ranks": max_parameter_drift(accelerator, agent, device),
                   "time_s": time.time() - t0, "final_eval": history[-1] if history else None, "evals": history}
        if is_main:
            save_finetune(stage_dir, recipe, spec, agent, buffer, counters, ckpt, resume)
            with atomic_output(os.path.join(stage_dir, "summary.json")) as tmp, open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            plot_curves(logger.path, os.path.join(stage_dir, "learning_curve.png"),
                        ["eval/success_once", "q_mean", "alpha", "critic_loss"], title=f"{recipe.name} finetune")
        accelerator.wait_for_everyone()
        return {"stage_dir": stage_dir, "is_main": is_main, **summary}
    finally:
        env.close()
        if eval_env is not None:
            eval_env.close()
        if logger is not None:
            logger.close()
