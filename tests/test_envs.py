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
