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
    """Accept a checkpoint dir or its policy.pt, a stage dir (…/pretrain), or a run dir (its finetune
    stage when it has one, else its pretrain stage)."""
    if os.path.basename(path) == "policy.pt" and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    candidates = [path, os.path.join(path, "checkpoints", "last")]
    for stage in ("finetune", "pretrain"):
        candidates.append(os.path.join(path, stage, "checkpoints", "last"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "policy.pt")):
            return os.path.realpath(c)
    raise FlowmanipError(f"{path}: no checkpoint found (expected a directory with policy.pt, "
                         "e.g. runs/pickcube/pretrain/checkpoints/last)")


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with compiled code in it; a torch.save file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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
        if _is_torchscript(os.path.join(path, "policy.pt")):
            raise FlowmanipError(f"{path}/policy.pt: is an exported policy (TorchScript), not a training checkpoint; "
                                 "give the checkpoint directory it was exported from") from None
        raise FlowmanipError(f"{path}/policy.pt: cannot load checkpoint ({type(e).__name__}: {e})") from None
    ckpt["path"] = path
    if with_training_state:
        ts = os.path.join(path, "training_state.pt")
        if not os.path.isfile(ts):
            raise FlowmanipError(f"{path}: has no training_state.pt, cannot resume from it")
        try:
            ckpt["training_state"] = torch.load(ts, map_location="cpu", weights_only=False)
        except Exception as e:
            raise FlowmanipError(f"{ts}: cannot load training state ({type(e).__name__}: {e}; "
                                 "truncated or corrupt?), cannot resume from it") from None
    return ckpt


def architecture_keys(policy_cfg, actor: str, rgb: bool) -> list[str]:
    """The policy settings that shape the weights an init checkpoint must load into (settings the
    network does not use, such as Flow-T's for a Flow-G checkpoint, may differ)."""
    keys = ["velocity", "sigma_mode"]
    if actor == "gaussian" or policy_cfg.velocity != "decoded":
        keys += ["hidden_dim", "num_layers"]
    else:
        keys += ["decoder_layers", "decoder_heads", "decoder_dim", "decoder_tokens", "decoder_memory_tokens"]
    if rgb:
        keys += ["cnn_channels", "encoder_dim"]
    else:
        keys += ["encoder"] + (["encoder_dim"] if policy_cfg.encoder != "identity" else [])
    return keys


def check_init_matches(meta: dict, recipe, source: str, obs_dim: int | None, init_policy,
                       what: str = "init checkpoint") -> None:
    """A checkpoint to start from (``what``: an init checkpoint, or the run to resume) must be for the
    same env, control mode, obs mode, action chunk, actor and network shapes as the recipe."""
    for key, name, want in (("env_id", "env.id", recipe.env.id),
                            ("control_mode", "env.control_mode", recipe.env.control_mode),
                            ("obs_mode", "env.obs_mode", recipe.env.obs_mode),
                            ("chunk", "policy.chunk", recipe.policy.chunk),
                            ("actor", "finetune.actor", recipe.finetune.actor)):
        have = meta.get(key, "flow" if key == "actor" else None)  # checkpoints before the Gaussian baseline
        if have != want:
            raise FlowmanipError(f"{source}: {what} has {name}={have!r}, the recipe wants {want!r}")
    for key in architecture_keys(init_policy, meta.get("actor", "flow"), bool(meta.get("rgb_shape"))):
        have, want = getattr(init_policy, key), getattr(recipe.policy, key)
        if have != want:
            raise FlowmanipError(f"{source}: {what} has policy.{key}={have!r}, the recipe wants {want!r} "
                                 f"(set policy.{key}={have} to use it)")
    if obs_dim is not None and meta["obs_dim"] != obs_dim:
        raise FlowmanipError(f"{source}: {what} expects obs_dim {meta['obs_dim']}, the data has {obs_dim}")
