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


@dataclass
class EpisodeStats:
    """What each env's running episode has accumulated, carried from chunk to chunk ([N] tensors)."""

    t: torch.Tensor  # long: env steps taken in the episode
    ret: torch.Tensor  # float: undiscounted return
    success_once: torch.Tensor  # bool: success at some step

    @classmethod
    def zeros(cls, n: int, device=None) -> EpisodeStats:
        return cls(torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device))


@dataclass
class ChunkTally:
    """One chunk's bookkeeping so far ([N] tensors); ``tally_step`` returns the next one."""

    stats: EpisodeStats
    alive: torch.Tensor  # bool: the episode has not ended inside this chunk, so the env's next step counts
    reward: torch.Tensor  # sum_i gamma^i r_i over the counted steps
    discount: torch.Tensor  # gamma^steps
    steps: torch.Tensor  # long: counted steps
    terminated: torch.Tensor  # bool: the episode ended inside the chunk by termination (success/failure)
    truncated: torch.Tensor  # bool: ... by the time limit (both can be set, as in gymnasium)
    last_success: torch.Tensor  # bool: success at the last counted step


def start_chunk(stats: EpisodeStats) -> ChunkTally:
    n, dev = stats.t.shape[0], stats.t.device
    false = torch.zeros(n, dtype=torch.bool, device=dev)
    return ChunkTally(stats, ~false, torch.zeros(n, device=dev), torch.ones(n, device=dev),
                      torch.zeros(n, dtype=torch.long, device=dev), false, false, false)


def tally_step(tally: ChunkTally, reward: torch.Tensor, term: torch.Tensor, success: torch.Tensor, *, gamma: float,
               horizon: int, auto_reset: bool = True, ignore_terminations: bool = False):
    """Account for one env step of every env (a pure function: no input is modified).

    ``reward [N]``, ``term [N]`` (the task ended: success or failure) and ``success [N]`` are what the
    envs returned for this step. Only envs whose episode is still running in this chunk (``tally.alive``)
    count the step: their reward is added with weight ``gamma^steps``, their episode clock advances, and
    with ``auto_reset`` their episode ends at a termination (unless ``ignore_terminations``) or when the
    clock reaches ``horizon``; later steps of the chunk do not count for them. Without ``auto_reset``
    (evaluation) nothing ends and ``terminated``/``truncated`` stay False.

    Returns ``(next tally, counted [N] bool, step_reward [N], step_success [N])``, the last two zero where
    the step does not count.
    """
    counted = tally.alive
    r = torch.where(counted, reward.to(tally.reward.dtype), torch.zeros_like(tally.reward))
    s = success.bool() & counted
    stats = EpisodeStats(tally.stats.t + counted.long(), tally.stats.ret + r, tally.stats.success_once | s)
    terminated, truncated, alive = tally.terminated, tally.truncated, counted
    if auto_reset:
        ended_term = counted & term.bool() & (not ignore_terminations)
        ended_trunc = counted & (stats.t >= horizon)
        terminated, truncated = terminated | ended_term, truncated | ended_trunc
        alive = counted & ~(ended_term | ended_trunc)
    nxt = ChunkTally(stats, alive, tally.reward + tally.discount * r,
                     torch.where(counted, tally.discount * gamma, tally.discount), tally.steps + counted.long(),
                     terminated, truncated, torch.where(counted, s, tally.last_success))
    return nxt, counted, r, s


def finish_chunk(tally: ChunkTally, auto_reset: bool = True):
    """After the chunk: ``(done [N] bool, episodes, next_stats)``. ``done`` are the envs whose episode
    ended (reset them before the next chunk); ``episodes`` one record per done env in env order (return,
    length, success_once, success_at_end); ``next_stats`` the stats the next chunk starts from (zeros for
    the done envs)."""
    st = tally.stats
    done = (tally.terminated | tally.truncated) if auto_reset else torch.zeros_like(tally.alive)
    episodes = [{"return": float(st.ret[j]), "length": int(st.t[j]), "success_once": bool(st.success_once[j]),
                 "success_at_end": bool(tally.last_success[j])} for j in done.nonzero().flatten().tolist()]
    nxt = EpisodeStats(torch.where(done, torch.zeros_like(st.t), st.t), torch.where(done, torch.zeros_like(st.ret), st.ret),
                       st.success_once & ~done)
    return done, episodes, nxt


def where_obs(mask: torch.Tensor, new: dict, old: dict) -> dict:
    """Per env, ``new``'s obs where ``mask [N]`` is set, else ``old``'s (new tensors; inputs untouched)."""
    return {k: torch.where(mask.reshape(-1, *([1] * (v.dim() - 1))), new[k], v) for k, v in old.items()}


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


def with_camera_view(frame: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    """A video frame: the render view ``[H, W, 3]``, and right of it each camera image of an rgb obs
    (``[h, w, 3 * cameras]``, what the policy sees) scaled to height H by nearest neighbour."""
    if rgb is None:
        return frame
    height = frame.shape[0]
    width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
    rows = np.arange(height) * rgb.shape[0] // height
    cols = np.arange(width) * rgb.shape[1] // width
    cams = [rgb[rows][:, cols, c:c + 3] for c in range(0, rgb.shape[2], 3)]
    return np.concatenate([frame, *[c.astype(frame.dtype) for c in cams]], axis=1)


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
    state = {"stats": EpisodeStats.zeros(1), "obs": None}

    def reset(seed):
        raw, _ = env.reset(seed=seed)
        state.update(stats=EpisodeStats.zeros(1), obs=obs_to_numpy(raw))
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
            tally, frames = start_chunk(state["stats"]), []
            for i in range(h):  # the same bookkeeping as GpuVectorEnv, for one env that stops where its episode ends
                raw, r, term, trunc, info = env.step(actions[i][None])
                s = bool(_scalar(info["success"])) if "success" in info else False
                tally, _, r_i, s_i = tally_step(tally, torch.tensor([_scalar(r)]), torch.tensor([bool(_scalar(term))]),
                                                torch.tensor([s]), gamma=gamma, horizon=horizon, auto_reset=auto_reset,
                                                ignore_terminations=ignore_terminations)
                step_reward[i], success[i] = float(r_i[0]), bool(s_i[0])
                state["obs"] = obs_to_numpy(raw)
                if render:
                    frames.append(with_camera_view(_np(env.render())[0], state["obs"].get("rgb")))
                if not tally.alive[0]:
                    break
            final_obs = state["obs"]
            done, episodes, state["stats"] = finish_chunk(tally, auto_reset)
            if done[0]:
                reset(None)
            remote.send((state["obs"], final_obs, float(tally.reward[0]), float(tally.discount[0]),
                         bool(tally.terminated[0]), bool(tally.truncated[0]), success, step_reward,
                         int(tally.steps[0]), episodes[0] if episodes else None, frames))
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
        self._setup(ManiSkillVectorEnv(env, num_envs, auto_reset=False, ignore_terminations=True,
                                       record_metrics=False), num_envs, env_cfg.max_episode_steps)

    def _setup(self, env, num_envs: int, horizon: int) -> None:
        """Attach to ``env``, a batched env with ManiSkill's vector interface (tests pass a scripted stand-in)."""
        self.env = env
        self.num_envs = num_envs
        self.device = torch.device(self.env.unwrapped.device)
        self.horizon = horizon
        space = self.env.unwrapped.single_action_space
        self.action_low = torch.as_tensor(space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(space.high, dtype=torch.float32)
        self.stats = EpisodeStats.zeros(num_envs, self.device)
        self.obs = None

    @staticmethod
    def _obs(raw) -> dict:
        # same layout as flatten_obs_tree (sorted keys, cameras without an rgb image skipped), kept on the GPU
        if not isinstance(raw, dict):  # a copy: final_obs keeps it while the env steps on
            return {"state": raw.to(torch.float32, copy=True)}
        parts = {k: v for k, v in raw.items() if k in ("agent", "extra", "sensor_data")}
        state = [v.reshape(v.shape[0], -1).float() if v.ndim > 1 else v[:, None].float()
                 for g in ("agent", "extra") if g in parts for _, v in sorted(parts[g].items())]
        out = {"state": torch.cat(state, dim=-1)}
        cams = parts.get("sensor_data", {})
        rgb = [cams[c]["rgb"] for c in sorted(cams) if "rgb" in cams[c]]
        if rgb:
            out["rgb"] = torch.cat(rgb, dim=-1).to(torch.uint8)
        return out

    def reset(self, seeds: list[int] | None = None) -> dict:
        raw, _ = self.env.reset(seed=seeds)
        self.stats = EpisodeStats.zeros(self.num_envs, self.device)
        self.obs = self._obs(raw)
        return self.obs

    def step_chunk(self, actions: torch.Tensor, gamma: float = 1.0, auto_reset: bool = True,
                   render: bool = False, ignore_terminations: bool = False) -> ChunkResult:
        N, h = actions.shape[:2]
        dev = self.device
        success = torch.zeros(N, h, dtype=torch.bool, device=dev)
        step_reward = torch.zeros(N, h, device=dev)
        tally = start_chunk(self.stats)
        final_obs = None
        frames = []
        for i in range(h):
            raw, r, _, _, info = self.env.step(actions[:, i].to(dev))
            # the wrapper zeroes terminations (it must not auto-reset); a task ends at success or failure
            term = torch.zeros(N, dtype=torch.bool, device=dev)
            for key in ("success", "fail"):
                if key in info:
                    term = term | info[key].bool()
            s = info["success"].bool() if "success" in info else torch.zeros_like(term)
            tally, counted, step_reward[:, i], success[:, i] = tally_step(
                tally, r.reshape(N), term.reshape(N), s.reshape(N), gamma=gamma, horizon=self.horizon,
                auto_reset=auto_reset, ignore_terminations=ignore_terminations)
            obs = self._obs(raw)
            # the obs after each env's last counted step (the first step counts for every env)
            final_obs = obs if final_obs is None else where_obs(counted, obs, final_obs)
            if render:
                view = self.env.render().cpu().numpy()
                cams = obs["rgb"].cpu().numpy() if "rgb" in obs else [None] * N
                frames.append(np.stack([with_camera_view(view[j], cams[j]) for j in range(N)]))
        done, episodes, self.stats = finish_chunk(tally, auto_reset)
        next_obs = final_obs
        if done.any():
            idx = done.nonzero().flatten()
            raw, _ = self.env.reset(options={"env_idx": idx})
            fresh = self._obs(raw)
            if next(iter(fresh.values())).shape[0] != N:  # only the reset envs' obs came back
                fresh = {k: torch.zeros_like(v).index_copy_(0, idx, fresh[k]) for k, v in final_obs.items()}
            next_obs = where_obs(done, fresh, final_obs)
        self.obs = next_obs
        self.last_frames = [np.stack([f[j] for f in frames]) for j in range(N)] if render else None
        return ChunkResult(next_obs, final_obs, tally.reward, tally.discount, tally.terminated, tally.truncated,
                           success, step_reward, tally.steps, episodes)

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
