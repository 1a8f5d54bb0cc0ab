"""``flowmanip finetune``: SAC Flow online, offline-to-online or from scratch, under Accelerate.

One process per device (``accelerate launch -m flowmanip finetune ...``), each with its
own envs and replay data; gradients are averaged across processes before every
optimiser step, so parameters stay identical; the main process logs, evaluates and
writes checkpoints. Writes ``<out_dir>/finetune/`` like pretrain does.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from flowmanip.config import check_reachable_entropy, load_recipe, to_yaml
from flowmanip.errors import FlowmanipError
from flowmanip.models.policy import Policy, build_critic


def resolve_init(recipe) -> str | None:
    init = recipe.finetune.init
    if init is None:
        return os.path.join(recipe.out_dir, "pretrain", "checkpoints", "last")
    return None if init.lower() in ("none", "scratch", "") else init


def earlier_evals(metrics_path: str) -> list[dict]:
    """The evaluations logged in ``metrics_path``, as ``summary.json`` lists them. A resumed run's
    logger has already cut the file back to the checkpoint, so these are the ones made before it;
    their ``time_s`` is None: it belonged to the earlier process."""
    from flowmanip.train.logger import read_metrics

    evals = []
    for row in read_metrics(metrics_path) if os.path.exists(metrics_path) else []:
        if "eval/success_once" in row:
            e = {"env_steps": row["step"], "time_s": None,
                 **{k[5:]: v for k, v in row.items() if k.startswith("eval/")}}
            if "episodes" in e:  # the logger writes every value as a float
                e["episodes"] = int(e["episodes"])
            evals.append(e)
    return evals


def next_multiple(step: int, every: int) -> int:
    """The first multiple of ``every`` after ``step`` (schedules catch up when one loop passes several)."""
    return (step // every + 1) * every


def bc_weight_at(cfg, updates: int) -> float:
    """The BC weight after `updates` critic updates: full until the actor starts (after the critic warm-up),
    then a linear decay to 0 over `bc_decay_steps` updates when that is > 0."""
    if cfg.bc_decay_steps <= 0:
        return cfg.bc_weight
    since_warmup = max(0, updates - cfg.critic_warmup)
    return cfg.bc_weight * max(0.0, 1.0 - since_warmup / cfg.bc_decay_steps)


def batch_to(batch: dict, device) -> dict:
    """Move a batch (tensors and obs dicts of tensors) to ``device``."""
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


def sync_gradients(accelerator, params) -> None:
    """Average gradients over processes (the all-reduce DDP would do), in one flat tensor."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_parameters(accelerator, module) -> None:
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def optimizer_step(accelerator, optimizer, loss, params, clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync_gradients(accelerator, params)
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.tensor(0.0)
    optimizer.step()
    return float(norm)


@torch.no_grad()
def mean_sigma(policy, obs) -> float:
    """Mean per-step noise scale of the noise-augmented rollout at ``obs`` (0 for actors without one)."""
    if not hasattr(policy.actor, "log_sigma"):
        return 0.0
    return float(policy.actor.log_sigma(policy.encoder(obs)).exp().mean())


def run_finetune(recipe_path: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> dict:
    from accelerate import Accelerator

    from flowmanip.algos.sac_flow import SACFlow, flow_state_grad_norms
    from flowmanip.data.samples import DemoSamples, normalization_stats
    from flowmanip.envs import make_vector_env, resolve_backend
    from flowmanip.train.checkpoint import (check_init_matches, load_checkpoint, rng_state, save_checkpoint,
                                            set_rng_state)
    from flowmanip.train.evaluate import check_env_matches_spec, evaluate_policy
    from flowmanip.train.logger import MetricsLogger, plot_curves
    from flowmanip.train.pretrain import load_demos, prepare_stage_dir
    from flowmanip.train.replay import ReplayBuffer, concat_batches
    from flowmanip.utils import atomic_output, check_output_dir, device_for, set_seed

    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.finetune
    backend = resolve_backend(recipe.env.backend)
    accelerator = Accelerator(cpu=device_for(recipe.device).type == "cpu")
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    if backend == "cpu":
        # env workers and updates share the cores; oversubscribed OpenMP threads spin and stall both
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * world)))
    stage_dir = os.path.join(recipe.out_dir, "finetune")
    check_output_dir(stage_dir)  # before anything loads: out_dir=policy.pt is a typo, not a run

    # --- everything that can fail on user input, before any env starts -------------------
    use_demos = recipe.data is not None and bool(recipe.data.path) and (cfg.bc_weight > 0 or cfg.demo_fraction != 0)
    episodes = None
    if use_demos:
        meta, episodes = load_demos(recipe)
        if not all(e.rewards is not None for e in episodes):
            raise FlowmanipError(f"{recipe.data.path}: demos have no rewards; convert them with `flowmanip demos "
                                 f"replay FILE -c {recipe.env.control_mode} --reward-mode {recipe.env.reward_mode} "
                                 "--output OUT.h5`")
        if meta.reward_mode is not None and meta.reward_mode != recipe.env.reward_mode:
            raise FlowmanipError(f"{recipe.data.path}: demo rewards are {meta.reward_mode!r}, "
                                 f"the recipe's env.reward_mode is {recipe.env.reward_mode!r}")
    init_path = resolve_init(recipe)
    init_ckpt = None
    if resume:
        init_ckpt = load_checkpoint(os.path.join(stage_dir, "checkpoints", "last"), with_training_state=True)
    elif init_path is not None:
        if not os.path.exists(init_path):
            raise FlowmanipError(f"finetune.init: {init_path} does not exist; run `flowmanip pretrain` first, "
                                 "or set finetune.init=none to train from scratch")
        init_ckpt = load_checkpoint(init_path)
    if init_ckpt is not None:
        check_init_matches(init_ckpt["meta"], recipe, init_ckpt["path"],
                           episodes[0].obs["state"].shape[-1] if episodes else None, init_ckpt["recipe"].policy,
                           what="the run to resume" if resume else "init checkpoint")
    if is_main:
        prepare_stage_dir(stage_dir, resume, overwrite)
        source = "resuming " + init_ckpt["path"] if resume else (
            "starting from " + init_ckpt["path"] if init_ckpt is not None else "from scratch (finetune.init=none)")
        print(f"finetune: {source}", file=sys.stderr)
    accelerator.wait_for_everyone()

    # --- envs, models ----------------------------------------------------------------------
    set_seed(recipe.seed)  # the same on every rank: identical initial weights
    env = make_vector_env(recipe.env, recipe.env.num_envs, backend)
    eval_env = make_vector_env(recipe.env, recipe.env.num_eval_envs, backend) if is_main else None
    logger = None
    try:
        obs = env.reset([recipe.seed * 100003 + rank * recipe.env.num_envs + i for i in range(recipe.env.num_envs)])
        if init_ckpt is not None:
            spec = init_ckpt["spec"]
        elif episodes is not None:
            spec = normalization_stats(episodes, env.action_low.numpy(), env.action_high.numpy(),
                                       recipe.data.action_margin)
        else:  # from scratch: env bounds; obs statistics are set after the random warm-up
            d = obs["state"].shape[-1]
            spec = {"obs_dim": d, "obs_mean": [0.0] * d, "obs_std": [1.0] * d,
                    "action_dim": int(env.action_low.shape[0]), "action_low": env.action_low.tolist(),
                    "action_high": env.action_high.tolist(), "env_low": env.action_low.tolist(),
                    "env_high": env.action_high.tolist(),
                    "rgb_shape": list(obs["rgb"].shape[1:]) if "rgb" in obs else None}
        check_env_matches_spec(env, spec, obs, init_ckpt["path"] if init_ckpt else recipe_path)

        policy = Policy(spec, recipe.policy, cfg.actor).to(device)
        if init_ckpt is not None and not resume:
            w = init_ckpt["weights"]
            policy.load_state_dict(w.get("policy_ema", w["policy"]))
            if cfg.actor == "flow":  # the noise is a fine-tune setting: this recipe's, not the init's
                policy.actor.reset_sigma(recipe.policy.sigma)
        check_reachable_entropy(recipe, policy.actor.dim, recipe_path)  # an explicit target needs d
        critic = build_critic(policy.encoder.out_dim, spec, recipe.policy, cfg).to(device)
        agent = SACFlow(policy, critic, cfg).to(device)
        actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=cfg.lr_actor)
        critic_opt = torch.optim.Adam(agent.critic_parameters(), lr=cfg.lr_critic)
        alpha_opt = torch.optim.Adam([agent.log_alpha], lr=cfg.lr_alpha)
        broadcast_parameters(accelerator, agent)

        d = policy.actor.dim
        buffer = ReplayBuffer(min(cfg.buffer_size, cfg.total_env_steps // world + 10 * recipe.env.num_envs),
                              obs, d, env.device)
        counters = {"env_steps": 0, "updates": 0, "update_budget": 0.0, "obs_stats_set": init_ckpt is not None
                    or episodes is not None}
        learn_from = cfg.learning_starts
        if resume:
            agent.load_state_dict(init_ckpt["weights"]["agent"])
            ts = init_ckpt["training_state"]
            actor_opt.load_state_dict(ts["actor_opt"])
            critic_opt.load_state_dict(ts["critic_opt"])
            alpha_opt.load_state_dict(ts["alpha_opt"])
            counters.update(ts["counters"])
            if "buffer" in ts:
                buffer.load_state_dict(ts["buffer"])
            else:  # collect learning_starts env steps again before updating, so that the first
                # updates do not replay a handful of transitions over and over
                learn_from = counters["env_steps"] + cfg.learning_starts
                if is_main:
                    print(f"resuming at env step {counters['env_steps']} with an empty replay buffer (the run was "
                          f"saved with finetune.save_buffer=false): updates restart after {cfg.learning_starts} "
                          "new env steps (finetune.learning_starts)", file=sys.stderr)
            set_rng_state(ts["rng"])
        torch.manual_seed(recipe.seed + 1000 * rank + counters["env_steps"])  # per-rank sampling and noise

        demos = None
        if episodes is not None:
            demos = DemoSamples(episodes, recipe.policy.chunk, cfg.gamma)
            # demo samples stay on the CPU until a batch is drawn (batch_to); the scaler lives on the device
            demo_actions = policy.scaler.to_normalized(demos.actions.to(device)).reshape(len(demos), -1).cpu()

        def sample_demos(n):
            idx = torch.randint(len(demos), (n,))
            b = demos.get(idx)
            b["action"] = demo_actions[idx]
            b.pop("action_mask")
            return batch_to(b, device)

        def sample_batch():
            n = cfg.batch_size
            if demos is None or cfg.demo_fraction == 0:
                n_demo = 0
            elif cfg.demo_fraction is None:
                n_demo = int(round(n * len(demos) / (len(demos) + len(buffer))))
            else:
                n_demo = int(round(n * cfg.demo_fraction))
            online = buffer.sample(n - n_demo)
            online = batch_to(online, device)
            return online if n_demo == 0 else concat_batches(online, sample_demos(n_demo))

        execute = recipe.policy.execute or recipe.policy.chunk
        H, A = recipe.policy.chunk, spec["action_dim"]
        if is_main:
            with atomic_output(os.path.join(stage_dir, "config.yaml")) as tmp, open(tmp, "w") as f:
                f.write(to_yaml(recipe))
            logger = MetricsLogger(stage_dir, recipe, "finetune",
                                   resume_step=counters["env_steps"] if resume else None)

        def evaluate():
            policy.eval()
            r = evaluate_policy(policy.act, eval_env, cfg.eval_episodes, recipe.env.max_episode_steps, execute,
                                seed=recipe.eval.seed, device=device)
            policy.train()
            return r

        def save():
            weights = {"policy": policy.state_dict(), "agent": agent.state_dict()}
            state = {"actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                     "alpha_opt": alpha_opt.state_dict(), "counters": dict(counters), "rng": rng_state()}
            if cfg.save_buffer:
                state["buffer"] = buffer.state_dict()
            save_checkpoint(stage_dir, counters["env_steps"], recipe, spec, weights, state, "finetune",
                            {"init": init_ckpt["path"] if init_ckpt is not None and not resume else None})

        def critic_update():
            batch = sample_batch()
            critic_loss, info = agent.critic_loss(batch)
            info["critic_grad_norm"] = optimizer_step(accelerator, critic_opt, critic_loss,
                                                      agent.critic_parameters(), cfg.grad_clip)
            counters["updates"] += 1
            agent.update_targets()
            return batch, info

        # --- the loop -----------------------------------------------------------------
        t0 = time.time()
        # only the main rank has a logger, which cut metrics.jsonl back to the checkpoint when it was made
        history = earlier_evals(logger.path) if resume and is_main else []
        recent, info = [], {}
        next_log = next_multiple(counters["env_steps"], cfg.log_every)
        if cfg.eval_every <= 0 or cfg.eval_episodes <= 0:
            next_eval = float("inf")
        else:
            next_eval = next_multiple(counters["env_steps"], cfg.eval_every) if resume else 0
        next_save = next_multiple(counters["env_steps"], cfg.save_every)
        bar = tqdm(total=cfg.total_env_steps, initial=counters["env_steps"], desc="finetune", unit="step",
                   dynamic_ncols=True, disable=not is_main)
        steps_at_start, updates_at_start = counters["env_steps"], counters["updates"]
        while True:
            if is_main and counters["env_steps"] >= next_eval:
                result = evaluate()
                history.append({"env_steps": counters["env_steps"], "time_s": round(time.time() - t0, 1), **result})
                logger.log(counters["env_steps"], {f"eval/{k}": v for k, v in result.items()})
                bar.write(f"env step {counters['env_steps']}: success_once={result['success_once']:.3f} "
                          f"success_at_end={result['success_at_end']:.3f} return={result['return_mean']:.2f}")
                next_eval = next_multiple(counters["env_steps"], cfg.eval_every)
            if counters["env_steps"] >= cfg.total_env_steps:
                break

            # act: one decision (an H-step chunk) in every env
            with torch.no_grad():
                obs_dev = {k: v.to(device) for k, v in obs.items()}
                if counters["env_steps"] < cfg.random_warmup:
                    action = torch.rand(env.num_envs, d, device=device) * 2 - 1
                else:
                    action, _, _ = policy.actor.sample(policy.encoder(obs_dev))
            result = env.step_chunk(policy.scaler.to_env(action.reshape(-1, H, A)), gamma=cfg.gamma,
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

            if not counters["obs_stats_set"] and counters["env_steps"] >= cfg.random_warmup:
                states = accelerator.gather(buffer.obs["state"][:len(buffer)].to(device))
                mean = states.mean(0)
                # one state (one env, no warm-up) has no spread: leave that scale at 1
                std = states.std(0).clamp(min=1e-3) if len(states) > 1 else torch.ones_like(mean)
                for module in (policy.encoder, agent.target_encoder):
                    module.normalizer.mean.copy_(mean)
                    module.normalizer.std.copy_(std)
                spec["obs_mean"], spec["obs_std"] = mean.tolist(), std.tolist()
                counters["obs_stats_set"] = True

            # learn: utd critic updates per collected transition
            if counters["env_steps"] >= learn_from and len(buffer) >= 2:
                if not counters.get("critic_warmed", False):
                    # fit Q to the initial policy before the actor may follow it
                    for _ in tqdm(range(cfg.critic_warmup), desc="critic warm-up", leave=False,
                                  disable=not is_main or cfg.critic_warmup == 0, dynamic_ncols=True):
                        batch, info = critic_update()
                    counters["critic_warmed"] = True
                counters["update_budget"] += cfg.utd * env.num_envs
                while counters["update_budget"] >= 1:
                    counters["update_budget"] -= 1
                    batch, info = critic_update()
                    if counters["updates"] % cfg.actor_delay == 0:
                        bc_weight = bc_weight_at(cfg, counters["updates"])
                        demo_batch = sample_demos(cfg.batch_size) if demos is not None and bc_weight > 0 else None
                        diagnose = is_main and counters["env_steps"] >= next_log and counters["update_budget"] < 1
                        actor_loss, actor_info, states = agent.actor_loss(batch, demo_batch, bc_weight, diagnose)
                        if diagnose:
                            for k, g in enumerate(flow_state_grad_norms(actor_loss, states)):
                                actor_info[f"grad_A{k}"] = g
                        actor_info["actor_grad_norm"] = optimizer_step(accelerator, actor_opt, actor_loss,
                                                                       agent.actor_parameters(), cfg.grad_clip)
                        if cfg.learn_alpha:
                            optimizer_step(accelerator, alpha_opt, agent.alpha_loss(actor_info["log_prob"]),
                                           [agent.log_alpha], 0)
                        info.update(actor_info)

            if counters["env_steps"] >= next_log:
                if is_main:
                    elapsed = time.time() - t0
                    row = {k: float(v) for k, v in info.items()}
                    row.update(alpha=float(agent.alpha), updates=counters["updates"], time_s=elapsed,
                               sigma=mean_sigma(policy, obs_dev),
                               env_steps_per_s=(counters["env_steps"] - steps_at_start) / max(elapsed, 1e-6),
                               updates_per_s=(counters["updates"] - updates_at_start) / max(elapsed, 1e-6))
                    if recent:  # the main rank's training episodes
                        row["train/return"] = sum(e["return"] for e in recent) / len(recent)
                        row["train/success_once"] = sum(e["success_once"] for e in recent) / len(recent)
                    logger.log(counters["env_steps"], row)
                    bar.set_postfix(q=f"{row.get('q_mean', 0):.2f}", alpha=f"{row['alpha']:.3g}")
                recent = []
                next_log = next_multiple(counters["env_steps"], cfg.log_every)
            if counters["env_steps"] >= next_save:
                if is_main:
                    save()
                next_save = next_multiple(counters["env_steps"], cfg.save_every)
        bar.close()
        # parameters must be identical on every rank (gradients were averaged before each step)
        flat = torch.cat([p.detach().reshape(-1) for p in agent.parameters()]).to(device)
        gathered = accelerator.gather(flat[None]).reshape(world, -1)
        rank_diff = float((gathered - gathered[0:1]).abs().max())
        summary = {"env_steps": counters["env_steps"], "updates": counters["updates"], "world_size": world,
                   "param_max_abs_diff_across_ranks": rank_diff, "time_s": time.time() - t0,
                   "final_eval": history[-1] if history else None, "evals": history}
        if is_main:
            save()
            import json

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
