"""robomimic ``.hdf5`` files: write them from ManiSkill episodes and read them back.

Layout (robomimic's convention): ``data/demo_<i>/{obs/<key>, next_obs/<key>, actions,
rewards, dones}`` with ``num_samples`` on each demo and ``total`` + ``env_args`` (JSON)
on ``data``. ``env_args`` carries the env id and the ``control_mode``/``obs_mode``/
``reward_mode`` the actions belong to, so a converted file never loses them.
"""

from __future__ import annotations

import json

import numpy as np

from flowmanip.data.maniskill_io import DatasetMeta, Episode
from flowmanip.data.validate import check_episode, check_same_shapes, open_h5
from flowmanip.errors import FlowmanipError
from flowmanip.utils import atomic_output

# robomimic's EnvType for gym-style environments (robomimic.envs.env_base.EnvType.GYM_TYPE)
GYM_ENV_TYPE = 2


def write_robomimic(path: str, meta: DatasetMeta, episodes: list[Episode]) -> None:
    import h5py

    env_args = {
        "env_name": meta.env_id,
        "type": GYM_ENV_TYPE,
        "env_kwargs": {"control_mode": meta.control_mode, "obs_mode": meta.obs_mode,
                       "reward_mode": meta.reward_mode, "max_episode_steps": meta.extra.get("max_episode_steps")},
    }
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for i, ep in enumerate(episodes):
                g = data.create_group(f"demo_{i}")
                T = ep.length
                for key, value in ep.obs.items():
                    g.create_dataset(f"obs/{key}", data=value[:-1], compression="gzip" if key == "rgb" else None)
                    g.create_dataset(f"next_obs/{key}", data=value[1:], compression="gzip" if key == "rgb" else None)
                g.create_dataset("actions", data=ep.actions)
                rewards = ep.rewards if ep.rewards is not None else np.zeros(T, np.float32)
                g.create_dataset("rewards", data=rewards)
                dones = ep.terminated.astype(np.int64)
                dones[-1] = 1
                g.create_dataset("dones", data=dones)
                if ep.success is not None:
                    g.create_dataset("success", data=ep.success)
                g.attrs["num_samples"] = T
                if ep.seed is not None:
                    g.attrs["seed"] = int(ep.seed)
                total += T
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["has_rewards"] = all(e.rewards is not None for e in episodes)


def read_robomimic(path: str, max_episodes: int | None = None) -> tuple[DatasetMeta, list[Episode]]:
    """Read a robomimic file. Env metadata goes through robomimic's own reader."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # robomimic prints a macro-file notice on import
        import robomimic.utils.file_utils as robomimic_files

    with open_h5(path) as f:
        if "data" not in f:
            raise FlowmanipError(f"{path}: not a robomimic dataset (no 'data' group)")
        if "env_args" not in f["data"].attrs:
            raise FlowmanipError(f"{path}: robomimic dataset lacks data.attrs['env_args'] (env id, control mode)")
        demo_keys = sorted(f["data"].keys(), key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else -1)
        if max_episodes is not None:
            demo_keys = demo_keys[:max_episodes]
        if not demo_keys:
            raise FlowmanipError(f"{path}: the dataset has no demos")
        has_rewards = bool(f["data"].attrs.get("has_rewards", True))
        episodes = []
        for key in demo_keys:
            g = f["data"][key]
            where = f"{path}:data/{key}"
            for required in ("obs", "next_obs", "actions"):
                if required not in g:
                    raise FlowmanipError(f"{where}: missing key '{required}'")
            if "state" not in g["obs"]:
                raise FlowmanipError(f"{where}: missing key 'obs/state'")
            obs = {}
            for k in g["obs"].keys():
                if k not in g["next_obs"]:
                    raise FlowmanipError(f"{where}: 'obs/{k}' has no matching 'next_obs/{k}'")
                try:
                    obs[k] = np.concatenate([g["obs"][k][()], g["next_obs"][k][-1:]])
                except ValueError as e:
                    raise FlowmanipError(f"{where}: 'obs/{k}' and 'next_obs/{k}' do not fit together ({e})") from None
            obs["state"] = obs["state"].astype(np.float32)
            actions = np.asarray(g["actions"][()], dtype=np.float32)
            rewards = np.asarray(g["rewards"][()], dtype=np.float32) if has_rewards and "rewards" in g else None
            dones = np.asarray(g["dones"][()], dtype=bool) if "dones" in g else np.zeros(len(actions), bool)
            success = np.asarray(g["success"][()], dtype=bool) if "success" in g else None
            seed = int(g.attrs["seed"]) if "seed" in g.attrs else None
            # robomimic marks the last step done even on timeouts; only success terminates.
            terminated = dones & success if success is not None else dones
            ep = Episode(obs, actions, rewards, terminated, success, seed)
            check_episode(ep, where)
            episodes.append(ep)
        check_same_shapes(episodes, [f"data/{k}" for k in demo_keys], path)
    try:
        env_meta = robomimic_files.get_env_metadata_from_dataset(path)
        kwargs = env_meta.get("env_kwargs", {})
        meta = DatasetMeta(env_id=env_meta["env_name"], control_mode=kwargs["control_mode"],
                           obs_mode=kwargs["obs_mode"], reward_mode=kwargs.get("reward_mode"), source=path,
                           extra={"max_episode_steps": kwargs.get("max_episode_steps")})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise FlowmanipError(f"{path}: data.attrs['env_args'] must name env_name and env_kwargs.control_mode/obs_mode ({e})") from None
    return meta, episodes


def read_dataset(path: str, max_episodes: int | None = None,
                 require_obs: bool = True) -> tuple[DatasetMeta, list[Episode]]:
    """Read either format, chosen by extension (``.h5`` ManiSkill, ``.hdf5`` robomimic); ``require_obs=False``
    lets a ManiSkill file recorded without observations load (``demos inspect``)."""
    from flowmanip.data.maniskill_io import read_maniskill

    if path.endswith(".hdf5"):
        return read_robomimic(path, max_episodes)
    if path.endswith(".h5"):
        return read_maniskill(path, max_episodes, require_obs)
    raise FlowmanipError(f"{path}: unknown dataset format; expected a ManiSkill .h5 (+ .json) or a robomimic .hdf5 file")
