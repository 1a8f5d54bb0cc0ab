"""Self-describing, atomically written checkpoints.

``<stage_dir>/checkpoints/<step>/`` holds ``policy.pt`` (weights, spec, resolved config,
env id, control mode, version, step), ``training_state.pt`` (optimisers, RNG states,
counters; what ``--resume`` needs) and ``meta.json`` (the same metadata, readable by
people). ``checkpoints/last`` is a symlink to the newest one.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from flowmanip import __version__
from flowmanip.config import from_dict, to_dict
from flowmanip.errors import FlowmanipError
from flowmanip.utils import atomic_output


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(stage_dir: str, step: int, recipe, spec: dict, weights: dict, training_state: dict | None,
                    stage: str, extra_meta: dict | None = None) -> str:
    ckpt_root = os.path.join(stage_dir, "checkpoints")
    path = os.path.join(ckpt_root, str(step))
    meta = {
        "flowmanip_version": __version__, "stage": stage, "step": int(step),
        "env_id": recipe.env.id, "control_mode": recipe.env.control_mode, "obs_mode": recipe.env.obs_mode,
        "reward_mode": recipe.env.reward_mode, "max_episode_steps": recipe.env.max_episode_steps,
        "velocity": recipe.policy.velocity, "actor": recipe.finetune.actor,
        "flow_steps": recipe.policy.flow_steps, "chunk": recipe.policy.chunk,
        "obs_dim": spec["obs_dim"], "rgb_shape": spec["rgb_shape"], "action_dim": spec["action_dim"],
        **(extra_meta or {}),
    }
    with atomic_output(path, replace_dir=True) as tmp:
        os.makedirs(tmp)
        torch.save({"meta": meta, "spec": spec, "config": to_dict(recipe), "weights": weights},
                   os.path.join(tmp, "policy.pt"))
        if training_state is not None:
            torch.save(training_state, os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    link = os.path.join(ckpt_root, "last")
    tmp_link = link + ".tmp"
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(str(step), tmp_link)
    os.replace(tmp_link, link)
    return path


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint dir, a stage dir (…/pretrain) or a run dir with one stage."""
    candidates = [path, os.path.join(path, "checkpoints", "last")]
    for stage in ("finetune", "pretrain"):
        candidates.append(os.path.join(path, stage, "checkpoints", "last"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "policy.pt")):
            return os.path.realpath(c)
    raise FlowmanipError(f"{path}: no checkpoint found (expected a directory with policy.pt, "
                         "e.g. runs/pickcube/pretrain/checkpoints/last)")


def load_checkpoint(path: str, with_training_state: bool = False) -> dict:
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(os.path.join(path, "policy.pt"), map_location="cpu", weights_only=False)
        # older checkpoints lack keys whose new defaults change Flow-T's weights (both added 2026-11-26):
        # before decoder_tokens Flow-T had per-step tokens, before decoder_memory_tokens one memory token
        policy = ckpt["config"].setdefault("policy", {})
        policy.setdefault("decoder_tokens", "chunk")
        policy.setdefault("decoder_memory_tokens", 1)
        ckpt["recipe"] = from_dict(ckpt["config"])
    except Exception as e:
        raise FlowmanipError(f"{path}/policy.pt: cannot load checkpoint ({type(e).__name__}: {e})") from None
    ckpt["path"] = path
    if with_training_state:
        ts = os.path.join(path, "training_state.pt")
        if not os.path.isfile(ts):
            raise FlowmanipError(f"{path}: has no training_state.pt, cannot resume from it")
        ckpt["training_state"] = torch.load(ts, map_location="cpu", weights_only=False)
    return ckpt
