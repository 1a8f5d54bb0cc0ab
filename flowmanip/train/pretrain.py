"""``flowmanip pretrain``: fit a flow policy to demonstrations with flow matching.

Writes ``<out_dir>/pretrain/``: ``config.yaml``, ``metrics.jsonl``, TensorBoard events,
``checkpoints/<step>/`` + ``checkpoints/last``, ``learning_curve.png``.
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch
from tqdm import tqdm

from flowmanip.config import load_recipe, to_yaml
from flowmanip.data import load_demos
from flowmanip.models.policy import Policy
from flowmanip.train.stages import prepare_stage_dir
from flowmanip.utils import atomic_output, check_output_dir, device_for, to_device


def cosine_lr(step: int, total: int, warmup: int = 500, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def run_pretrain(recipe_path: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> dict:
    from flowmanip.algos.flow_matching import action_dim_mask
    from flowmanip.data.augment import augment_obs, jitter_state
    from flowmanip.data.samples import DemoSamples, normalization_stats
    from flowmanip.envs import make_vector_env
    from flowmanip.train.checkpoint import (check_init_matches, load_checkpoint, rng_state, save_checkpoint,
                                            set_rng_state)
    from flowmanip.train.evaluate import check_env_matches_spec, evaluate_policy
    from flowmanip.train.logger import MetricsLogger, plot_curves
    from flowmanip.utils import set_seed

    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.pretrain
    stage_dir = os.path.join(recipe.out_dir, "pretrain")
    check_output_dir(stage_dir)  # before the demos load: out_dir=policy.pt is a typo, not a run
    _, episodes = load_demos(recipe)
    prepare_stage_dir(stage_dir, resume, overwrite)
    start_step, ckpt = 0, None
    if resume:  # the run to continue must have this recipe's env and network shapes
        ckpt = load_checkpoint(os.path.join(stage_dir, "checkpoints", "last"), with_training_state=True)
        check_init_matches(ckpt["meta"], recipe, ckpt["path"], episodes[0].obs["state"].shape[-1],
                           ckpt["recipe"].policy, what="the run to resume")
        start_step = ckpt["meta"]["step"]
    set_seed(recipe.seed)
    device = device_for(recipe.device)

    env = make_vector_env(recipe.env, recipe.env.num_eval_envs, recipe.env.backend)
    logger = None
    try:
        if resume:
            spec = ckpt["spec"]
        else:
            spec = normalization_stats(episodes, env.action_low.numpy(), env.action_high.numpy(),
                                       recipe.data.action_margin)
        check_env_matches_spec(env, spec, env.reset(), recipe.data.path)
        with atomic_output(os.path.join(stage_dir, "config.yaml")) as tmp, open(tmp, "w") as f:
            f.write(to_yaml(recipe))

        # policy.actor=gaussian pretrains the Gaussian SAC baseline by Gaussian behaviour cloning
        # (residual and noise-steering fine-tunes start from a flow policy)
        actor = "gaussian" if recipe.policy.actor == "gaussian" else "flow"
        policy = Policy(spec, recipe.policy, actor).to(device)
        ema_policy = copy.deepcopy(policy).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, cfg.steps))
        if ckpt is not None:
            policy.load_state_dict(ckpt["weights"]["policy"])
            ema_policy.load_state_dict(ckpt["weights"]["policy_ema"])
            optimizer.load_state_dict(ckpt["training_state"]["optimizer"])
            scheduler.load_state_dict(ckpt["training_state"]["scheduler"])
            set_rng_state(ckpt["training_state"]["rng"])

        samples = DemoSamples(episodes, recipe.policy.chunk, learn_padding=recipe.data.learn_padding)
        actions = policy.scaler.to_normalized(samples.actions.to(device)).reshape(len(samples), -1)
        # a chunk that runs past its episode's end is padded with the last action: no loss there
        # unless data.learn_padding
        action_masks = action_dim_mask(samples.action_mask, spec["action_dim"]).to(device)
        obs_all = to_device(samples.obs, device)
        idx_obs = samples.idx_obs.to(device)
        logger = MetricsLogger(stage_dir, recipe, "pretrain", resume_step=start_step if resume else None)
        execute = recipe.policy.execute or recipe.policy.chunk

        def evaluate(step):
            result = evaluate_policy(ema_policy.act, env, cfg.eval_episodes, recipe.env.max_episode_steps,
                                     execute, seed=recipe.eval.seed, device=device)
            logger.log(step, {f"eval/{k}": v for k, v in result.items()})
            return result

        def save(step):
            weights = {"policy": policy.state_dict(), "policy_ema": ema_policy.state_dict()}
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
            save_checkpoint(stage_dir, step, recipe, spec, weights, state, "pretrain")

        t0 = time.time()
        last_eval = None
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="pretrain",
                   dynamic_ncols=True)
        for step in bar:
            idx = torch.randint(len(samples), (cfg.batch_size,), device=device)
            obs = augment_obs({k: v[idx_obs[idx]] for k, v in obs_all.items()}, recipe.data.random_shift)
            obs = jitter_state(obs, cfg.obs_noise, policy.encoder.normalizer.std)
            loss = policy.actor.flow_matching_loss(policy.encoder(obs), actions[idx], action_masks[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                decay = cfg.ema if cfg.ema > 0 else 0.0
                for p_ema, p in zip(ema_policy.parameters(), policy.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.log(done, {"loss": loss.item(), "grad_norm": grad_norm.item(),
                                  "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps) and cfg.eval_episodes > 0:
                last_eval = evaluate(done)
                bar.write(f"step {done}: success_once={last_eval['success_once']:.3f} "
                          f"success_at_end={last_eval['success_at_end']:.3f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                save(done)
        if start_step >= cfg.steps:
            bar.write(f"{stage_dir}: already at step {start_step} of pretrain.steps={cfg.steps}; nothing to train "
                      "(raise pretrain.steps to continue it)")
            save(cfg.steps)
        plot_curves(logger.path, os.path.join(stage_dir, "learning_curve.png"),
                    ["loss", "eval/success_once", "eval/success_at_end"], title=f"{recipe.name} pretrain")
        return {"stage_dir": stage_dir, "eval": last_eval, "time_s": time.time() - t0}
    finally:
        env.close()
        if logger is not None:
            logger.close()
