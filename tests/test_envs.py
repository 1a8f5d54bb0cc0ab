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
