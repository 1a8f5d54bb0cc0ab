"""Replay buffer: ring order, and saving / loading across capacities (resume with another buffer_size)."""

from __future__ import annotations

import torch

from flowmanip.train.replay import ReplayBuffer


def filled(capacity, n):
    """A buffer that has seen transitions 0..n-1; transition i has reward i and obs [i, -i]."""
    buf = ReplayBuffer(capacity, {"state": torch.zeros(1, 2)}, 3, "cpu")
    for i in range(n):
        x = torch.tensor([[float(i), -float(i)]])
        buf.add({"state": x}, torch.full((1, 3), float(i)), torch.tensor([float(i)]), torch.tensor([0.9]),
                torch.tensor([False]), {"state": x + 0.5})
    return buf


def test_ring_keeps_the_newest_and_saves_them_oldest_first():
    buf = filled(5, 7)  # wrapped: holds 2..6
    assert len(buf) == 5 and sorted(buf.reward.tolist()) == [2, 3, 4, 5, 6]
    state = buf.state_dict()
    assert state["reward"].tolist() == [2, 3, 4, 5, 6] and state["obs"]["state"][:, 1].tolist() == [-2, -3, -4, -5, -6]
    assert state["next_obs"]["state"][:, 0].tolist() == [2.5, 3.5, 4.5, 5.5, 6.5]


def test_loading_into_a_larger_or_smaller_buffer_keeps_the_newest_and_continues_after_them():
    state = filled(5, 7).state_dict()
    big = ReplayBuffer(8, {"state": torch.zeros(1, 2)}, 3, "cpu")
    big.load_state_dict(state)
    assert len(big) == 5 and big.reward[:5].tolist() == [2, 3, 4, 5, 6]
    big.add({"state": torch.zeros(1, 2)}, torch.zeros(1, 3), torch.tensor([7.0]), torch.tensor([0.9]),
            torch.tensor([False]), {"state": torch.zeros(1, 2)})
    assert len(big) == 6 and big.reward[:6].tolist() == [2, 3, 4, 5, 6, 7]  # nothing overwritten, no empty rows
    small = ReplayBuffer(3, {"state": torch.zeros(1, 2)}, 3, "cpu")
    small.load_state_dict(state)
    assert len(small) == 3 and small.reward.tolist() == [4, 5, 6] and small.pos == 0
    assert small.action[:, 0].tolist() == [4, 5, 6] and small.obs["state"][:, 0].tolist() == [4, 5, 6]


def test_older_files_in_ring_order_load_oldest_first():
    buf = filled(5, 7)
    n = buf.size  # what state_dict wrote before it saved oldest first: ring order and pos
    old = {"obs": {"state": buf.obs["state"][:n].clone()}, "next_obs": {"state": buf.next_obs["state"][:n].clone()},
           "action": buf.action[:n].clone(), "reward": buf.reward[:n].clone(), "discount": buf.discount[:n].clone(),
           "terminated": buf.terminated[:n].clone(), "pos": buf.pos}
    fresh = ReplayBuffer(5, {"state": torch.zeros(1, 2)}, 3, "cpu")
    fresh.load_state_dict(old)
    assert fresh.reward.tolist() == [2, 3, 4, 5, 6] and fresh.pos == 0
