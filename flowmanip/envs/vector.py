"""Vectorised ManiSkill envs that step action chunks.

``CpuVectorEnv`` runs one ``physx_cpu`` env per worker process (the CPU backend refuses
``num_envs > 1`` in one process); ``GpuVectorEnv`` runs ``num_envs`` envs in one
``physx_cuda`` scene and keeps tensors on the GPU. Observations are dicts
``{"state": [N, D] float32, "rgb"?: [N, H, W, C] uint8}``.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import numpy as np
import torch

from flowmanip.errors import FlowmanipError


@dataclass
class ChunkResult:
    """What one ``step_chunk`` returns; every tensor has leading dim N (envs)."""

    next_obs: dict  # obs to act on next (a fresh episode's first obs where one ended)
    final_obs: dict  # obs right after the chunk (the last obs of an episode that ended)
    reward: torch.Tensor  # [N] sum_i gamma^i r_i over the steps taken
    discount: torch.Tensor  # [N] gamma^steps_taken
    terminated: torch.Tensor  # [N] bool, the task ended (success; never with ignore_terminations)
    truncated: torch.Tensor  # [N] bool, time limit
    success: torch.Tensor  # [N, h] bool per executed step (False after an episode ended)
    step_reward: torch.Tensor  # [N, h] undiscounted rewards per step (0 after an episode ended)
    steps: torch.Tensor  # [N] env steps taken (<= h)
    episodes: list  # finished episodes: dicts with return, length, success_once, success_at_end


def resolve_backend(backend: str, setting: str = "env.backend") -> str:
    """``auto`` -> ``gpu`` with CUDA, else ``cpu``; ``gpu`` without CUDA is an error naming ``setting``."""
    if backend == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if backend == "gpu" and not torch.cuda.is_available():
        raise FlowmanipError(f"{setting}=gpu but CUDA is not available; use {setting}=auto or cpu")
    return backend


def env_kwargs(env_cfg, sim_backend: str) -> dict:
    kwargs = dict(obs_mode=env_cfg.obs_mode, control_mode=env_cfg.control_mode, reward_mode=env_cfg.reward_mode,
                  sim_backend=sim_backend, max_episode_steps=env_cfg.max_episode_steps,
                  render_mode="rgb_array")
    if env_cfg.obs_mode == "rgb":
        kwargs["sensor_configs"] = dict(width=env_cfg.camera_size, height=env_cfg.camera_size)
    return {**kwargs, **render_kwargs()}


def render_kwargs() -> dict:
    """Without CUDA, render on the CPU outright: ManiSkill would try CUDA first and warn once per env."""
    return {} if torch.cuda.is_available() else {"render_backend": "sapien_cpu"}


def obs_to_numpy(raw) -> dict:
    """Raw ManiSkill obs (batch of 1 on the CPU) to ``{"state": [D], "rgb"?: [H, W, C]}``."""
    from flowmanip.data.maniskill_io import flatten_obs_tree

    if isinstance(raw, dict):
        tree = {k: ({kk: _np(vv) for kk, vv in v.items()} if k != "sensor_data" else
                    {cam: {kk: _np(vv) for kk, vv in d.items()} for cam, d in v.items()})
                for k, v in raw.items() if k in ("agent", "extra", "sensor_data")}
        flat = flatten_obs_tree(tree)
    else:
        flat = {"state": _np(raw).astype(np.float32)}
    return {k: v[0] for k, v in flat.items()}


def _np(x):
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _scalar(x) -> float:
    return float(_np(x).reshape(-1)[0])


def _worker(remote, env_id: str, kwargs: dict):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    torch.set_num_threads(1)
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as e:  # reported to the parent as one line
        remote.send(("error", f"cannot make {env_id}: {type(e).__name__}: {e}"))
        return
    horizon = kwargs["max_episode_steps"]
    remote.send(("ok", (env.unwrapped.single_action_space.low, env.unwrapped.single_action_space.high)))
    state = {"t": 0, "ret": 0.0, "success_once": False, "obs": None}

    def reset(seed):
        raw, _ = env.reset(seed=seed)
        state.update(t=0, ret=0.0, success_once=False, obs=obs_to_numpy(raw))
        return state["obs"]

    while True:
        cmd, payload = remote.recv()
        if cmd == "reset":
            remote.send(reset(payload))
        elif cmd == "step_chunk":
            actions, gamma, auto_reset, render, ignore_terminations = payload
            h = actions.shape[0]
            success = np.zeros(h, bool)
            step_reward = np.zeros(h, np.float32)
            reward, discount, terminated, truncated, steps, frames = 0.0, 1.0, False, False, 0, []
            for i in range(h):
                raw, r, term, trunc, info = env.step(actions[i][None])
                state["t"] += 1
                steps += 1
                r = _scalar(r)
                reward += discount * r
                discount *= gamma
                step_reward[i] = r
                success[i] = bool(_scalar(info["success"])) if "success" in info else False
                state["ret"] += r
                state["success_once"] |= bool(success[i])
                state["obs"] = obs_to_numpy(raw)
                if render:
                    frames.append(_np(env.render())[0])
                terminated = bool(_scalar(term)) and not ignore_terminations
                truncated = state["t"] >= horizon
                if auto_reset and (terminated or truncated):
                    break
            final_obs = state["obs"]
            episode = None
            if auto_reset and (terminated or truncated):
                episode = {"return": state["ret"], "length": state["t"], "success_once": state["success_once"],
                           "success_at_end": bool(success[steps - 1])}
                reset(None)
            remote.send((state["obs"], final_obs, reward, discount, terminated, truncated, success, step_reward,
                         steps, episode, frames))
        elif cmd == "close":
            env.close()
            remote.close()
            return


def _stack(dicts: list[dict], device) -> dict:
    return {k: torch.as_tensor(np.stack([d[k] for d in dicts]), device=device) for k in dicts[0]}


class CpuVectorEnv:
    """``num_envs`` ``physx_cpu`` envs, one per worker process."""

    def __init__(self, env_cfg, num_envs: int):
        ctx = mp.get_context("forkserver")
        self.num_envs = num_envs
        self.device = torch.device("cpu")
        self.remotes, self.procs = [], []
        kwargs = env_kwargs(env_cfg, "physx_cpu")
        for _ in range(num_envs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, env_cfg.id, kwargs), daemon=True)
            p.start()
            child.close()
            self.remotes.append(parent)
            self.procs.append(p)
        try:
            replies = [r.recv() for r in self.remotes]
        except EOFError:
            self.close()
            raise FlowmanipError(f"a {env_cfg.id} worker process exited during start-up (scripts that make envs "
                                 "need an `if __name__ == '__main__':` guard)") from None
        for status, payload in replies:
            if status == "error":
                self.close()
                raise FlowmanipError(payload)
        low, high = replies[0][1]
        self.action_low = torch.as_tensor(low, dtype=torch.float32)
        self.action_high = torch.as_tensor(high, dtype=torch.float32)

    def reset(self, seeds: list[int] | None = None) -> dict:
        seeds = seeds if seeds is not None else [None] * self.num_envs
        for remote, seed in zip(self.remotes, seeds):
            remote.send(("reset", seed))
        return _stack([r.recv() for r in self.remotes], self.device)

    def step_chunk(self, actions: torch.Tensor, gamma: float = 1.0, auto_reset: bool = True,
                   render: bool = False, ignore_terminations: bool = False) -> ChunkResult:
        actions = actions.detach().cpu().numpy().astype(np.float32)
        for remote, a in zip(self.remotes, actions):
            remote.send(("step_chunk", (a, gamma, auto_reset, render, ignore_terminations)))
        out = [r.recv() for r in self.remotes]
        cols = list(zip(*out))
        t = lambda xs, dtype: torch.as_tensor(np.asarray(xs), dtype=dtype)  # noqa: E731
        result = ChunkResult(
            next_obs=_stack(cols[0], self.device), final_obs=_stack(cols[1], self.device),
            reward=t(cols[2], torch.float32), discount=t(cols[3], torch.float32),
            terminated=t(cols[4], torch.bool), truncated=t(cols[5], torch.bool),
            success=t(np.stack(cols[6]), torch.bool), step_reward=t(np.stack(cols[7]), torch.float32),
            steps=t(cols[8], torch.int64), episodes=[e for e in cols[9] if e is not None])
        self.last_frames = [f for f in cols[10]] if render else None
        return result

    def close(self):
        for remote in self.remotes:
            try:
                remote.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self.remotes, self.procs = [], []


class GpuVectorEnv:
    """``num_envs`` envs in one ``physx_cuda`` scene (ManiSkill's vector env), tensors on the GPU.

    Resets are partial and happen at chunk boundaries: an env whose episode ended inside
    a chunk keeps being stepped until the chunk ends, but those steps are masked out.
    """

    def __init__(self, env_cfg, num_envs: int, sim_backend: str = "physx_cuda"):
        # sim_backend="physx_cpu" (one env) runs this class's bookkeeping on a machine without a GPU (tests)
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        kwargs = env_kwargs(env_cfg, sim_backend)
        if sim_backend.startswith("physx_cuda:"):  # render on the simulating GPU too
            kwargs["render_backend"] = "sapien_cuda:" + sim_backend.split(":")[1]
        try:
            env = gym.make(env_cfg.id, num_envs=num_envs, **kwargs)
        except Exception as e:  # e.g. SAPIEN trying to download its PhysX GPU library on an offline machine
            first = (str(e).splitlines() or [""])[0][:200]
            hint = (". physx_cuda needs SAPIEN's PhysX GPU library in ~/.sapien/physx (SAPIEN fetches it on first "
                    "use); env.backend=cpu does not") if sim_backend.startswith("physx_cuda") else ""
            raise FlowmanipError(f"cannot make {env_cfg.id} on {sim_backend}: {type(e).__name__}: {first}{hint}") from e
        self.env = ManiSkillVectorEnv(env, num_envs, auto_reset=False, ignore_terminations=True, record_metrics=False)
        self.num_envs = num_envs
        self.device = self.env.unwrapped.device
        self.horizon = env_cfg.max_episode_steps
        space = self.env.unwrapped.single_action_space
        self.action_low = torch.as_tensor(space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(space.high, dtype=torch.float32)
        self.t = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.ret = torch.zeros(num_envs, device=self.device)
        self.success_once = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self.obs = None

    def _obs(self, raw) -> dict:
        # same layout as flatten_obs_tree (sorted keys), kept on the GPU
        if not isinstance(raw, dict):
            return {"state": raw.float()}
        parts = {k: v for k, v in raw.items() if k in ("agent", "extra", "sensor_data")}
        state = [v.reshape(v.shape[0], -1).float() if v.ndim > 1 else v[:, None].float()
                 for g in ("agent", "extra") if g in parts for _, v in sorted(parts[g].items())]
        out = {"state": torch.cat(state, dim=-1)}
        if "sensor_data" in parts:
            out["rgb"] = torch.cat([parts["sensor_data"][c]["rgb"] for c in sorted(parts["sensor_data"])], dim=-1)
        return out

    def reset(self, seeds: list[int] | None = None) -> dict:
        raw, _ = self.env.reset(seed=seeds)
        self.t.zero_()
        self.ret.zero_()
        self.success_once.zero_()
        self.obs = self._obs(raw)
        return self.obs

    def step_chunk(self, actions: torch.Tensor, gamma: float = 1.0, auto_reset: bool = True,
                   render: bool = False, ignore_terminations: bool = False) -> ChunkResult:
        N, h = actions.shape[:2]
        dev = self.device
        alive = torch.ones(N, dtype=torch.bool, device=dev)
        reward = torch.zeros(N, device=dev)
        discount = torch.ones(N, device=dev)
        steps = torch.zeros(N, dtype=torch.long, device=dev)
        terminated = torch.zeros(N, dtype=torch.bool, device=dev)
        truncated = torch.zeros(N, dtype=torch.bool, device=dev)
        success = torch.zeros(N, h, dtype=torch.bool, device=dev)
        step_reward = torch.zeros(N, h, device=dev)
        final_obs = None
        frames = []
        for i in range(h):
            raw, r, _, _, info = self.env.step(actions[:, i].to(dev))
            # the wrapper zeroes terminations (it must not auto-reset); a task ends at success or failure
            term = torch.zeros_like(alive)
            for key in ("success", "fail"):
                if key in info:
                    term = term | info[key].bool()
            obs = self._obs(raw)
            if final_obs is None:
                final_obs = {k: v.clone() for k, v in obs.items()}
            else:
                for k in obs:
                    final_obs[k][alive] = obs[k][alive]
            r = r.float() * alive
            reward += discount * r
            discount = torch.where(alive, discount * gamma, discount)
            step_reward[:, i] = r
            s = info["success"].bool() & alive if "success" in info else torch.zeros_like(alive)
            success[:, i] = s
            self.success_once |= s
            self.ret += r
            self.t += alive.long()
            steps += alive.long()
            if render:
                frames.append(self.env.render().cpu().numpy())
            if auto_reset:
                ended_term = term.bool() & alive & (not ignore_terminations)
                ended_trunc = (self.t >= self.horizon) & alive & ~ended_term
                terminated |= ended_term
                truncated |= ended_trunc
                alive &= ~(ended_term | ended_trunc)
        episodes = []
        next_obs = {k: v.clone() for k, v in final_obs.items()}
        done = terminated | truncated
        if auto_reset and done.any():
            idx = done.nonzero().squeeze(-1)
            last = (steps - 1).clamp(min=0)
            for j in idx.tolist():
                episodes.append({"return": float(self.ret[j]), "length": int(self.t[j]),
                                 "success_once": bool(self.success_once[j]),
                                 "success_at_end": bool(success[j, last[j]])})
            raw, _ = self.env.reset(options={"env_idx": idx})
            fresh = self._obs(raw)
            for k in next_obs:
                next_obs[k][idx] = fresh[k][idx] if fresh[k].shape[0] == N else fresh[k]
            self.t[idx] = 0
            self.ret[idx] = 0
            self.success_once[idx] = False
        self.last_frames = [np.stack([f[j] for f in frames]) for j in range(N)] if render else None
        return ChunkResult(next_obs, final_obs, reward, discount, terminated, truncated, success, step_reward,
                           steps, episodes)

    def close(self):
        self.env.close()


def make_vector_env(env_cfg, num_envs: int, backend: str = "auto"):
    """Make ``num_envs`` envs on the resolved backend (``gpu`` -> physx_cuda, ``cpu`` -> worker processes)."""
    if num_envs < 1:
        raise FlowmanipError(f"num_envs must be >= 1, got {num_envs}")
    if resolve_backend(backend) == "gpu":
        # the current CUDA device: Accelerate sets it to the process's local rank, so each rank
        # simulates on its own GPU (plain "physx_cuda" would put every rank's scene on GPU 0)
        return GpuVectorEnv(env_cfg, num_envs, f"physx_cuda:{torch.cuda.current_device()}")
    return CpuVectorEnv(env_cfg, num_envs)
