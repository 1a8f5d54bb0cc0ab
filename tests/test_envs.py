"""The CPU vector env on real ManiSkill: chunk stepping, and what a success does to an episode."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import REPO
from flowmanip.config import EnvConfig
from flowmanip.data.maniskill_io import read_maniskill
from flowmanip.envs.vector import CpuVectorEnv

DEMOS = os.path.join(REPO, "datasets", "pickcube", "pickcube_pd_ee_delta_pos.h5")


def replay(ignore_terminations: bool):
    """Replay the first shipped demo (it ends in success) open loop in chunks of 8."""
    _, episodes = read_maniskill(DEMOS, max_episodes=1)
    ep = episodes[0]
    env = CpuVectorEnv(EnvConfig(id="PickCube-v1", control_mode="pd_ee_delta_pos", obs_mode="state",
                                 reward_mode="normalized_dense", max_episode_steps=100), 1)
    try:
        env.reset([ep.seed])
        results = []
        for start in range(0, len(ep.actions), 8):
            chunk = torch.as_tensor(ep.actions[start:start + 8])[None]
            results.append(env.step_chunk(chunk, gamma=0.9, ignore_terminations=ignore_terminations))
            if results[-1].episodes:
                break
        return ep, results
    finally:
        env.close()


def test_success_ends_the_episode_unless_terminations_are_ignored():
    ep, ended = replay(ignore_terminations=False)
    assert ep.success is not None and ep.success[-1]
    assert ended[-1].terminated.item() and ended[-1].episodes[0]["success_once"]
    steps = sum(int(r.steps.sum()) for r in ended)
    assert steps <= len(ep.actions)
    assert ended[-1].success[0, int(ended[-1].steps[0]) - 1]  # the last step taken is the successful one

    _, running = replay(ignore_terminations=True)
    assert not any(r.terminated.any() for r in running)
    assert not any(r.episodes for r in running)  # 100-step horizon, the demo is shorter: still running
    assert sum(int(r.steps.sum()) for r in running) == len(ep.actions)
    assert any(r.success.any() for r in running)  # it did succeed on the way
    # chunk reward is the discounted sum of the per-step rewards
    r = running[0]
    n = int(r.steps[0])
    expected = float((r.step_reward[0, :n].numpy() * 0.9 ** np.arange(n)).sum())
    assert r.reward.item() == pytest.approx(expected, rel=1e-5)
    assert r.discount.item() == pytest.approx(0.9 ** n, rel=1e-6)


def step_both(env_cfg, seed: int, chunks: list[torch.Tensor], ignore_terminations: bool):
    """Step the worker-process env and the one-scene vector env (on the CPU sim) through the same chunks."""
    from flowmanip.envs.vector import GpuVectorEnv

    out = []
    for make in (lambda: CpuVectorEnv(env_cfg, 1), lambda: GpuVectorEnv(env_cfg, 1, sim_backend="physx_cpu")):
        env = make()
        try:
            env.reset([seed])
            results = []
            for chunk in chunks:
                results.append(env.step_chunk(chunk[None], gamma=0.9, ignore_terminations=ignore_terminations))
                if results[-1].episodes:
                    break
            out.append(results)
        finally:
            env.close()
    return out


@pytest.mark.parametrize("ending", ["success", "time_limit"])
def test_gpu_vector_env_bookkeeping_matches_the_worker_env(ending):
    """GpuVectorEnv (masking after an episode ends inside a chunk, partial resets) runs here on the CPU sim with
    one env: no GPU exists on this machine. Same seed, same actions: the chunk results must agree with CpuVectorEnv."""
    _, episodes = read_maniskill(DEMOS, max_episodes=1)
    ep = episodes[0]
    horizon = 100 if ending == "success" else 20  # 20 = 8 + 8 + 4: the time limit falls inside the third chunk
    env_cfg = EnvConfig(id="PickCube-v1", control_mode="pd_ee_delta_pos", obs_mode="state",
                        reward_mode="normalized_dense", max_episode_steps=horizon)
    chunks = [torch.as_tensor(ep.actions[s:s + 8]) for s in range(0, len(ep.actions), 8)]
    cpu, gpu = step_both(env_cfg, ep.seed, chunks, ignore_terminations=False)
    assert len(cpu) == len(gpu) and cpu[-1].episodes and gpu[-1].episodes
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.steps.cpu(), b.steps.cpu())
        assert torch.equal(a.terminated.cpu(), b.terminated.cpu())
        assert torch.equal(a.truncated.cpu(), b.truncated.cpu())
        assert torch.equal(a.success.cpu(), b.success.cpu())
        assert torch.allclose(a.reward.cpu(), b.reward.cpu(), atol=1e-5)
        assert torch.allclose(a.discount.cpu(), b.discount.cpu())
        assert torch.allclose(a.step_reward.cpu(), b.step_reward.cpu(), atol=1e-5)
        assert torch.allclose(a.final_obs["state"].cpu(), b.final_obs["state"].cpu(), atol=1e-5)
    last = gpu[-1]
    if ending == "success":
        assert last.terminated.item() and not last.truncated.item()
    else:
        assert last.truncated.item() and not last.terminated.item() and int(last.steps[0]) == 4
    ca, ga = cpu[-1].episodes[0], gpu[-1].episodes[0]
    assert ca["length"] == ga["length"] == sum(int(r.steps[0]) for r in gpu)
    assert ca["success_once"] == ga["success_once"] and ca["success_at_end"] == ga["success_at_end"]
    assert ca["return"] == pytest.approx(ga["return"], abs=1e-4)
    # after the partial reset the next obs is a fresh episode's, not the final obs of the one that ended
    assert not torch.allclose(last.next_obs["state"].cpu(), last.final_obs["state"].cpu())



def test_a_scene_that_cannot_be_made_is_one_error():
    """A failing gym.make inside the one-scene vector env (on a GPU machine: SAPIEN's PhysX GPU library missing
    offline) becomes one FlowmanipError naming the task and the backend, not a traceback from deep in SAPIEN."""
    from flowmanip.envs.vector import GpuVectorEnv
    from flowmanip.errors import FlowmanipError

    with pytest.raises(FlowmanipError, match="cannot make NoSuchTask-v1 on physx_cpu"):
        GpuVectorEnv(EnvConfig(id="NoSuchTask-v1"), 1, sim_backend="physx_cpu")


# --- the chunk bookkeeping of GpuVectorEnv, with many envs and no GPU -------------------------------------
# physx_cuda cannot start here, and physx_cpu refuses more than one env per scene, so a scripted stand-in for
# ManiSkill's vector env (same interface: step, partial reset by env_idx, unwrapped.device) drives the real
# GpuVectorEnv.step_chunk through fabricated success/fail/time-limit patterns, checked against a step-by-step
# Python reference written like the worker env's loop (one env, stop where the episode ends).

class ScriptedVectorEnv:
    """N envs whose per-step reward, success and fail come from fixed tables; obs say which step made them."""

    def __init__(self, n: int, steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.reward = torch.rand(steps, n, generator=g)
        self.success = torch.rand(steps, n, generator=g) < 0.12
        self.fail = (torch.rand(steps, n, generator=g) < 0.05) & ~self.success
        self.k = 0  # env steps so far (all envs step together)
        self.resets = []  # env_idx of every partial reset
        self.unwrapped = self
        self.device = torch.device("cpu")
        from gymnasium.spaces import Box

        self.single_action_space = Box(-1.0, 1.0, (2,))

    def obs(self, marker: float) -> dict:
        """agent/qpos [N, 2] = (marker, env index); extra/flag [N] = 1: the state is [marker, j, 1]."""
        j = torch.arange(self.n, dtype=torch.float32)
        return {"agent": {"qpos": torch.stack([torch.full((self.n,), marker), j], -1)},
                "extra": {"flag": torch.ones(self.n)}}

    def reset(self, seed=None, options=None):
        if options is not None:
            self.resets.append(options["env_idx"].tolist())
        return self.obs(-1.0 - self.k), {}  # a fresh episode's first obs: marker -1 - (steps so far)

    def step(self, action):
        k = self.k
        self.k += 1
        zeros = torch.zeros(self.n, dtype=torch.bool)
        return (self.obs(float(k)), self.reward[k], zeros, zeros,
                {"success": self.success[k], "fail": self.fail[k]})


def reference_chunks(table: ScriptedVectorEnv, chunks: int, h: int, gamma: float, horizon: int,
                     ignore_terminations: bool, t0: list[int]) -> list[dict]:
    """What every chunk must report, computed env by env and step by step in plain Python (episode clocks
    start at ``t0``)."""
    n = table.n
    t, ret, once = list(t0), [0.0] * n, [False] * n
    out = []
    for c in range(chunks):
        res = {"reward": [], "discount": [], "steps": [], "terminated": [], "truncated": [], "success": [],
               "step_reward": [], "final": [], "next": [], "episodes": [], "reset": []}
        for j in range(n):
            reward, discount, steps, term, trunc = 0.0, 1.0, 0, False, False
            succ, rews, last = [False] * h, [0.0] * h, None
            for i in range(h):
                k = c * h + i
                r, s = float(table.reward[k, j]), bool(table.success[k, j])
                t[j] += 1
                steps += 1
                reward += discount * r
                discount *= gamma
                ret[j] += r
                once[j] |= s
                succ[i], rews[i], last = s, r, k
                term = (s or bool(table.fail[k, j])) and not ignore_terminations
                trunc = t[j] >= horizon
                if term or trunc:
                    break
            for key, value in (("reward", reward), ("discount", discount), ("steps", steps), ("terminated", term),
                               ("truncated", trunc), ("success", succ), ("step_reward", rews)):
                res[key].append(value)
            res["final"].append([float(last), j, 1.0])
            if term or trunc:
                res["episodes"].append({"return": ret[j], "length": t[j], "success_once": once[j],
                                        "success_at_end": succ[steps - 1]})
                res["reset"].append(j)
                res["next"].append([-1.0 - (c + 1) * h, j, 1.0])  # reset after the chunk's h env steps
                t[j], ret[j], once[j] = 0, 0.0, False
            else:
                res["next"].append([float(last), j, 1.0])
        out.append(res)
    return out


@pytest.mark.parametrize("ignore_terminations", [False, True])
def test_gpu_vector_env_chunks_of_many_envs_match_a_step_by_step_reference(ignore_terminations):
    from flowmanip.envs.vector import EpisodeStats, GpuVectorEnv

    n, h, chunks, horizon, gamma = 10, 4, 12, 11, 0.9  # the time limit falls inside chunks, at varying steps
    table = ScriptedVectorEnv(n, chunks * h, seed=3)
    env = GpuVectorEnv.__new__(GpuVectorEnv)
    env._setup(table, n, horizon)
    first = env.reset()
    assert first["state"].tolist() == [[-1.0, j, 1.0] for j in range(n)]
    # episodes under way at different points, so that time limits fall on different steps too
    t0 = [(3 * j) % horizon for j in range(n)]
    env.stats = EpisodeStats(torch.tensor(t0), torch.zeros(n), torch.zeros(n, dtype=torch.bool))
    expected = reference_chunks(table, chunks, h, gamma, horizon, ignore_terminations, t0)
    mixed = 0
    for c, ref in enumerate(expected):
        resets_before = len(table.resets)
        got = env.step_chunk(torch.zeros(n, h, 2), gamma=gamma, ignore_terminations=ignore_terminations)
        assert got.steps.tolist() == ref["steps"], c
        assert got.terminated.tolist() == ref["terminated"], c
        assert got.truncated.tolist() == ref["truncated"], c
        assert got.success.tolist() == ref["success"], c
        torch.testing.assert_close(got.step_reward, torch.tensor(ref["step_reward"]))
        torch.testing.assert_close(got.reward, torch.tensor(ref["reward"]))
        torch.testing.assert_close(got.discount, torch.tensor(ref["discount"]))
        assert got.final_obs["state"].tolist() == ref["final"], c
        assert got.next_obs["state"].tolist() == ref["next"], c
        assert table.resets[resets_before:] == ([ref["reset"]] if ref["reset"] else []), c
        assert len(got.episodes) == len(ref["episodes"])
        for a, b in zip(got.episodes, ref["episodes"]):
            assert a["return"] == pytest.approx(b["return"], abs=1e-5)
            assert (a["length"], a["success_once"], a["success_at_end"]) == (
                b["length"], b["success_once"], b["success_at_end"])
        mixed += 0 < len(ref["reset"]) < n and min(ref["steps"]) < h
    # the patterns did what the test is for: chunks where some envs ended early and others ran on
    assert mixed >= chunks // 2, mixed
    if ignore_terminations:
        assert not any(any(r["terminated"]) for r in expected)
    else:
        assert any(any(r["terminated"]) for r in expected) and any(any(r["truncated"]) for r in expected)


def test_chunk_bookkeeping_without_auto_reset_counts_every_step():
    """Evaluation (auto_reset=False): nothing ends inside a chunk, whatever the envs report; the functions are pure."""
    from flowmanip.envs.vector import EpisodeStats, finish_chunk, start_chunk, tally_step

    n, h = 8, 5
    g = torch.Generator().manual_seed(0)
    rewards, terms = torch.rand(h, n, generator=g), torch.rand(h, n, generator=g) < 0.5
    stats = EpisodeStats(torch.full((n,), 7), torch.zeros(n), torch.zeros(n, dtype=torch.bool))
    tally = start_chunk(stats)
    for i in range(h):
        before = tally
        tally, counted, r, _ = tally_step(tally, rewards[i], terms[i], terms[i], gamma=0.5, horizon=8,
                                          auto_reset=False)
        assert counted.all() and torch.equal(r, rewards[i])
        assert before.steps.tolist() == [i] * n  # the input tally is not modified
    assert tally.steps.tolist() == [h] * n and tally.stats.t.tolist() == [7 + h] * n
    assert not tally.terminated.any() and not tally.truncated.any()
    torch.testing.assert_close(tally.reward, (rewards * 0.5 ** torch.arange(h)[:, None]).sum(0))
    done, episodes, nxt = finish_chunk(tally, auto_reset=False)
    assert not done.any() and episodes == [] and nxt.t.tolist() == [7 + h] * n


def test_rgb_obs_of_the_gpu_env_skip_cameras_without_rgb_like_the_cpu_path():
    from flowmanip.data.maniskill_io import flatten_obs_tree
    from flowmanip.envs.vector import GpuVectorEnv

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 255, (3, 8, 8, 3), dtype=torch.uint8, generator=g)
    raw = {"agent": {"qvel": torch.randn(3, 2, generator=g), "qpos": torch.randn(3, 4, generator=g)},
           "extra": {"is_grasped": torch.tensor([True, False, True]), "tcp_pose": torch.randn(3, 7, generator=g)},
           "sensor_param": {"base_camera": {"intrinsic_cv": torch.randn(3, 3, 3, generator=g)}},
           "sensor_data": {"base_camera": {"rgb": rgb}, "depth_only": {"depth": torch.rand(3, 8, 8, 1, generator=g)}}}
    got = GpuVectorEnv.__new__(GpuVectorEnv)._obs(raw)
    expected = flatten_obs_tree({k: ({kk: {kkk: vvv.numpy() for kkk, vvv in vv.items()} for kk, vv in v.items()}
                                     if k == "sensor_data" else {kk: vv.numpy() for kk, vv in v.items()})
                                 for k, v in raw.items() if k != "sensor_param"})
    assert set(got) == set(expected) == {"state", "rgb"}
    np.testing.assert_array_equal(got["state"].numpy(), expected["state"])
    np.testing.assert_array_equal(got["rgb"].numpy(), expected["rgb"])
    assert got["rgb"].dtype == torch.uint8


def test_mid_chunk_endings_reach_the_buffer_and_the_critic_target():
    """Real PickCube, chunks of 8: the first shipped demo succeeds inside a chunk (a termination) and a 13-step
    horizon cuts a replay's second chunk after 5 steps (a truncation). The replay buffer stores the episode's
    last observation (not the next episode's first), gamma^n for the n steps taken, and the termination flag;
    the critic target bootstraps through the truncation and not through the termination."""
    from test_sac_flow import perturb, q_by_hand

    from flowmanip.algos.sac_flow import SACFlow
    from flowmanip.config import FinetuneConfig, PolicyConfig
    from flowmanip.models.policy import Policy, build_critic
    from flowmanip.train.replay import ReplayBuffer

    _, (ep,) = read_maniskill(DEMOS, max_episodes=1)
    transitions = []  # (obs, chunk, ChunkResult) of each chunk that ends an episode
    for horizon, ignore in ((100, False), (13, False)):
        env = CpuVectorEnv(EnvConfig(id="PickCube-v1", control_mode="pd_ee_delta_pos", obs_mode="state",
                                     reward_mode="normalized_dense", max_episode_steps=horizon), 1)
        try:
            obs = env.reset([ep.seed])
            for start in range(0, len(ep.actions), 8):
                chunk = torch.zeros(8, ep.actions.shape[1])  # the demo's tail padded with zero actions
                part = torch.as_tensor(ep.actions[start:start + 8], dtype=torch.float32)
                chunk[:len(part)] = part
                result = env.step_chunk(chunk[None], gamma=0.9, ignore_terminations=ignore)
                if result.episodes:
                    transitions.append((obs, chunk.reshape(1, -1), result))
                    break
                obs = result.next_obs
        finally:
            env.close()
    (obs_t, a_t, term), (obs_c, a_c, trunc) = transitions
    n_term = int(term.steps[0])
    assert term.terminated.item() and not term.truncated.item() and 0 < n_term < 8, "success inside the chunk"
    assert trunc.truncated.item() and not trunc.terminated.item() and int(trunc.steps[0]) == 13 - 8
    for r in (term, trunc):  # the auto-reset gave a new episode's first obs; the transition keeps the old last one
        assert not torch.allclose(r.final_obs["state"], r.next_obs["state"])

    buffer = ReplayBuffer(4, obs_t, a_t.shape[1], "cpu")
    for o, a, r in ((obs_t, a_t, term), (obs_c, a_c, trunc)):
        buffer.add(o, a, r.reward, r.discount, r.terminated, r.final_obs)
    torch.testing.assert_close(buffer.next_obs["state"][:2], torch.cat([term.final_obs["state"], trunc.final_obs["state"]]))
    torch.testing.assert_close(buffer.discount[:2], torch.tensor([0.9 ** n_term, 0.9 ** 5]))
    assert buffer.terminated[:2].tolist() == [True, False]

    dim = obs_t["state"].shape[1]
    spec = {"obs_dim": dim, "obs_mean": [0.0] * dim, "obs_std": [1.0] * dim, "action_dim": 4,
            "action_low": [-1.0] * 4, "action_high": [1.0] * 4, "env_low": [-1.0] * 4, "env_high": [1.0] * 4,
            "rgb_shape": None}
    pcfg = PolicyConfig(velocity="gated", flow_steps=2, chunk=8, hidden_dim=32, num_layers=2, encoder="identity")
    fcfg = FinetuneConfig(init_alpha=0.2, num_q=2, q_hidden_dim=16, q_layers=1, ignore_terminations=False, gamma=0.9)
    torch.manual_seed(0)
    policy = Policy(spec, pcfg)
    agent = SACFlow(policy, build_critic(policy.encoder.out_dim, spec, pcfg, fcfg), fcfg)
    perturb(agent.target_critic, seed=1)

    def one(i):
        return {"obs": {"state": buffer.obs["state"][i:i + 1]}, "next_obs": {"state": buffer.next_obs["state"][i:i + 1]},
                **{k: getattr(buffer, k)[i:i + 1] for k in ("action", "reward", "discount", "terminated")}}

    _, info = agent.critic_loss(one(0))  # terminal: the target is the chunk reward alone
    assert info["target_mean"].item() == pytest.approx(term.reward.item(), abs=1e-6)
    torch.manual_seed(3)
    _, info = agent.critic_loss(one(1))
    torch.manual_seed(3)
    with torch.no_grad():
        z_next = agent.encoder(one(1)["next_obs"])
        a_next, logp, _ = agent.actor.sample(z_next)
        q_next = q_by_hand(agent.target_critic, agent.target_encoder(one(1)["next_obs"]), a_next).min(0).values
    expected = trunc.reward + 0.9 ** 5 * (q_next - 0.2 * logp)
    assert info["target_mean"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - trunc.reward.item()) > 1e-3  # the bootstrap term is really there
