"""Read ManiSkill trajectory files (``.h5`` + ``.json``) into plain episodes.

A ManiSkill dataset is an HDF5 file with one group ``traj_<i>`` per episode
(``actions [T, A]``, ``obs`` with T+1 entries, ``rewards``, ``terminated``,
``truncated``, ``success``) and a JSON file beside it that says which env, control
mode and obs mode the actions belong to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from flowmanip.errors import FlowmanipError


@dataclass
class Episode:
    """One demonstration. ``obs`` maps ``"state"`` to ``[T+1, D]`` float32 and, for
    image datasets, ``"rgb"`` to ``[T+1, H, W, C]`` uint8 (cameras stacked on C)."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray  # [T, A] float32
    rewards: np.ndarray | None  # [T] float32, None when the file has none
    terminated: np.ndarray  # [T] bool
    success: np.ndarray | None  # [T] bool
    seed: int | None = None

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


@dataclass
class DatasetMeta:
    env_id: str
    control_mode: str
    obs_mode: str
    reward_mode: str | None
    source: str
    extra: dict = field(default_factory=dict)


def flatten_obs_tree(tree, is_h5: bool = False) -> dict[str, np.ndarray]:
    """Turn a ManiSkill obs dict (or h5 group) into ``{"state": [..., D], "rgb"?: [..., H, W, C]}``.

    State parts are every array under ``agent`` and ``extra``, in sorted key order
    (h5py lists keys sorted, so sorting makes files and live envs agree); camera RGB
    images under ``sensor_data/<cam>/rgb`` are concatenated on the channel axis.
    """
    state_parts, rgb_parts = [], []
    for group in ("agent", "extra"):
        if group in tree:
            for key in sorted(tree[group].keys()):
                value = np.asarray(tree[group][key][()] if is_h5 else tree[group][key])
                if value.ndim == 1:
                    value = value[:, None]
                state_parts.append(value.reshape(value.shape[0], -1).astype(np.float32))
    if "sensor_data" in tree:
        for cam in sorted(tree["sensor_data"].keys()):
            if "rgb" in tree["sensor_data"][cam]:
                rgb_parts.append(np.asarray(tree["sensor_data"][cam]["rgb"][()] if is_h5 else tree["sensor_data"][cam]["rgb"]))
    if not state_parts:
        raise ValueError("no state arrays under obs/agent or obs/extra")
    lengths = {part.shape[0] for part in state_parts + rgb_parts}
    if len(lengths) > 1:
        raise ValueError(f"obs arrays have different lengths {sorted(lengths)}")
    out = {"state": np.concatenate(state_parts, axis=-1)}
    if rgb_parts:
        out["rgb"] = np.concatenate(rgb_parts, axis=-1).astype(np.uint8)
    return out


def json_path_for(h5_path: str) -> str:
    return os.path.splitext(h5_path)[0] + ".json"


def read_maniskill_meta(h5_path: str) -> tuple[DatasetMeta, dict]:
    from flowmanip.data.validate import check_h5_path

    check_h5_path(h5_path)
    json_path = json_path_for(h5_path)
    if not os.path.exists(json_path):
        raise FlowmanipError(
            f"{h5_path}: ManiSkill datasets need their JSON file beside them; {json_path} does not exist"
        )
    try:
        with open(json_path) as f:
            info = json.load(f)
        env_info = info["env_info"]
        kwargs = env_info.get("env_kwargs", {})
        meta = DatasetMeta(
            env_id=env_info["env_id"],
            control_mode=kwargs.get("control_mode", "pd_joint_pos"),
            obs_mode=kwargs.get("obs_mode") or "none",
            reward_mode=kwargs.get("reward_mode"),
            source=h5_path,
            extra={"max_episode_steps": env_info.get("max_episode_steps")},
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FlowmanipError(f"{json_path}: not a ManiSkill trajectory JSON ({type(e).__name__}: {e})") from None
    return meta, info


def read_maniskill(h5_path: str, max_episodes: int | None = None,
                   require_obs: bool = True) -> tuple[DatasetMeta, list[Episode]]:
    """Load a ManiSkill ``.h5`` (+ ``.json``) file. Raises FlowmanipError on bad files. With
    ``require_obs=False`` an episode recorded without observations loads with ``obs == {}``."""
    from flowmanip.data.validate import check_episode, check_same_shapes, open_h5

    meta, info = read_maniskill_meta(h5_path)
    episodes = []
    json_eps = info.get("episodes", [])
    with open_h5(h5_path) as f:
        if max_episodes is not None:
            json_eps = json_eps[:max_episodes]
        if not json_eps:
            raise FlowmanipError(f"{h5_path}: the dataset has no episodes")
        for i, ep in enumerate(json_eps):
            if not isinstance(ep, dict) or "episode_id" not in ep:
                raise FlowmanipError(f"{json_path_for(h5_path)}: episodes[{i}] has no 'episode_id'")
            key = f"traj_{ep['episode_id']}"
            where = f"{h5_path}:{key}"
            if key not in f:
                raise FlowmanipError(f"{where}: episode listed in the JSON is missing from the HDF5 file")
            g = f[key]
            if "actions" not in g:
                raise FlowmanipError(f"{where}: missing key 'actions'")
            has_obs = "obs" in g and not (isinstance(g["obs"], h5py.Group) and len(g["obs"]) == 0)
            if require_obs and not has_obs:
                missing = "" if "obs" in g else "missing key 'obs': "
                raise FlowmanipError(
                    f"{where}: {missing}the episode has no observations "
                    "(recorded with obs_mode='none'); convert it first, "
                    f"e.g. flowmanip demos replay {h5_path} -c pd_ee_delta_pos --output OUT.h5")
            try:
                if not has_obs:
                    obs = {}
                elif isinstance(g["obs"], h5py.Dataset):
                    obs = {"state": np.asarray(g["obs"][()], dtype=np.float32)}
                else:
                    obs = flatten_obs_tree(g["obs"], is_h5=True)
                actions = np.asarray(g["actions"][()], dtype=np.float32)
                T = actions.shape[0]
                rewards = np.asarray(g["rewards"][()], dtype=np.float32) if "rewards" in g else None
                terminated = np.asarray(g["terminated"][()], dtype=bool) if "terminated" in g else np.zeros(T, bool)
                success = np.asarray(g["success"][()], dtype=bool) if "success" in g else None
            except (OSError, KeyError, ValueError) as e:
                raise FlowmanipError(f"{where}: cannot read episode data ({e})") from None
            episode = Episode(obs, actions, rewards, terminated, success, seed=ep.get("episode_seed"))
            check_episode(episode, where)
            episodes.append(episode)
    check_same_shapes(episodes, [f"traj_{ep['episode_id']}" for ep in json_eps], h5_path)
    return meta, episodes
