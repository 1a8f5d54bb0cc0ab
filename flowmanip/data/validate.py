"""Checks shared by the loaders and ``tools/inspect_dataset.py``."""

from __future__ import annotations

import contextlib
import os

import h5py
import numpy as np

from flowmanip.errors import FlowmanipError


def check_h5_path(path: str) -> None:
    if not os.path.exists(path):
        raise FlowmanipError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FlowmanipError(f"{path}: is a directory, expected an HDF5 file")
    if not h5py.is_hdf5(path):
        raise FlowmanipError(f"{path}: not an HDF5 file")


@contextlib.contextmanager
def open_h5(path: str, mode: str = "r"):
    """Open an HDF5 file for reading, turning every failure into one clear error."""
    check_h5_path(path)
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        raise FlowmanipError(f"{path}: cannot open HDF5 file (truncated or corrupt?): {e}") from None
    try:
        yield f
    except OSError as e:
        raise FlowmanipError(f"{path}: cannot read HDF5 data (truncated or corrupt?): {e}") from None
    finally:
        f.close()


def check_episode(episode, where: str) -> None:
    """Shapes agree and nothing is NaN/inf. ``where`` names the file and episode."""
    T = episode.actions.shape[0]
    if episode.actions.ndim != 2 or T == 0:
        raise FlowmanipError(f"{where}: 'actions' should be [T, action_dim] with T > 0, got {episode.actions.shape}")
    for key, value in episode.obs.items():
        if value.shape[0] != T + 1:
            raise FlowmanipError(
                f"{where}: obs '{key}' has {value.shape[0]} entries, expected T+1 = {T + 1} for {T} actions")
    for name, value in (("rewards", episode.rewards), ("terminated", episode.terminated), ("success", episode.success)):
        if value is not None and value.shape[0] != T:
            raise FlowmanipError(f"{where}: '{name}' has {value.shape[0]} entries, expected {T}")
    for name, value in (("actions", episode.actions), ("obs/state", episode.obs.get("state")), ("rewards", episode.rewards)):
        if value is not None and not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.isfinite(value)))
            raise FlowmanipError(f"{where}: '{name}' contains {bad} NaN/inf values")


def _step_shapes(episode) -> dict:
    return {"actions": episode.actions.shape[1:], **{f"obs/{k}": v.shape[1:] for k, v in episode.obs.items()}}


def check_same_shapes(episodes, names: list[str], source: str) -> None:
    """Every episode has the first one's action dim and obs shapes (``names[i]`` names episode i)."""
    want = _step_shapes(episodes[0])
    for name, ep in zip(names[1:], episodes[1:]):
        have = _step_shapes(ep)
        if have != want:
            key = next(k for k in [*want, *have] if have.get(k) != want.get(k))
            described = [f"shape {list(d[key])}" if key in d else "no such key" for d in (have, want)]
            raise FlowmanipError(f"{source}:{name}: '{key}' has {described[0]} per step, "
                                 f"but {names[0]} has {described[1]}; all episodes must match")


def summarize(meta, episodes) -> dict:
    """Numbers a user wants before training on a dataset."""
    lengths = np.array([e.length for e in episodes])
    actions = np.concatenate([e.actions for e in episodes])
    success = [bool(e.success[-1]) if e.success is not None else None for e in episodes]
    known = [s for s in success if s is not None]
    summary = {
        "file": meta.source,
        "env_id": meta.env_id,
        "control_mode": meta.control_mode,
        "obs_mode": meta.obs_mode,
        "reward_mode": meta.reward_mode,
        "episodes": len(episodes),
        "steps": int(lengths.sum()),
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "obs_shapes": {k: list(v.shape[1:]) for k, v in episodes[0].obs.items()},
        "action_dim": int(actions.shape[1]),
        "action_min": [round(float(x), 4) for x in actions.min(0)],
        "action_max": [round(float(x), 4) for x in actions.max(0)],
        "success_at_end": float(np.mean(known)) if known else None,
        "has_rewards": all(e.rewards is not None for e in episodes),
    }
    if not episodes[0].obs:
        summary["note"] = "actions only, no observations: `flowmanip demos replay` records them"
    return summary


def format_summary(summary: dict) -> str:
    rows = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        rows.append(f"{key:>16}: {value}")
    return "\n".join(rows)


def check_matches(meta, episodes, *, env_id: str, control_mode: str, obs_mode: str, source: str,
                  obs_shapes: dict | None = None) -> None:
    """The dataset was recorded for the env/control/obs mode the recipe asks for."""
    for key, have, want in (("env.id", meta.env_id, env_id), ("env.control_mode", meta.control_mode, control_mode),
                            ("env.obs_mode", meta.obs_mode, obs_mode)):
        if have != want:
            raise FlowmanipError(
                f"{source}: dataset has {key.split('.')[1]}={have!r} but the recipe's {key} is {want!r}; "
                f"convert the demos (tools/convert_demos.py) or change the recipe")
    if obs_shapes:
        for key, shape in obs_shapes.items():
            have = tuple(episodes[0].obs[key].shape[1:]) if key in episodes[0].obs else None
            if have != tuple(shape):
                raise FlowmanipError(f"{source}: obs '{key}' has shape {have}, the environment gives {tuple(shape)}")
