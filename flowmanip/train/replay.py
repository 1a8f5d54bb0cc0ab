"""Replay buffer of chunk-level transitions, on the device the envs produce (GPU for physx_cuda)."""

from __future__ import annotations

import torch


class ReplayBuffer:
    """Ring buffer: obs/next_obs dicts, normalised action chunk ``[d]``, chunk reward, discount, terminated."""

    def __init__(self, capacity: int, obs_example: dict, action_dim: int, device):
        self.capacity, self.device = capacity, torch.device(device)
        self.obs = {k: torch.zeros((capacity, *v.shape[1:]), dtype=v.dtype, device=self.device)
                    for k, v in obs_example.items()}
        self.next_obs = {k: torch.zeros_like(v) for k, v in self.obs.items()}
        self.action = torch.zeros(capacity, action_dim, device=self.device)
        self.reward = torch.zeros(capacity, device=self.device)
        self.discount = torch.zeros(capacity, device=self.device)
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.pos, self.size = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: dict, action, reward, discount, terminated, next_obs: dict) -> None:
        n = action.shape[0]
        idx = (torch.arange(n, device=self.device) + self.pos) % self.capacity
        for k in self.obs:
            self.obs[k][idx] = obs[k].to(self.device)
            self.next_obs[k][idx] = next_obs[k].to(self.device)
        self.action[idx] = action.to(self.device)
        self.reward[idx] = reward.to(self.device)
        self.discount[idx] = discount.to(self.device)
        self.terminated[idx] = terminated.to(self.device)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        idx = torch.randint(self.size, (batch_size,), device=self.device, generator=generator)
        return {"obs": {k: v[idx] for k, v in self.obs.items()}, "next_obs": {k: v[idx] for k, v in self.next_obs.items()},
                "action": self.action[idx], "reward": self.reward[idx], "discount": self.discount[idx],
                "terminated": self.terminated[idx]}

    def state_dict(self) -> dict:
        n = self.size
        return {"obs": {k: v[:n].cpu() for k, v in self.obs.items()},
                "next_obs": {k: v[:n].cpu() for k, v in self.next_obs.items()},
                "action": self.action[:n].cpu(), "reward": self.reward[:n].cpu(), "discount": self.discount[:n].cpu(),
                "terminated": self.terminated[:n].cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        n = state["action"].shape[0]
        for k in self.obs:
            self.obs[k][:n] = state["obs"][k].to(self.device)
            self.next_obs[k][:n] = state["next_obs"][k].to(self.device)
        self.action[:n] = state["action"].to(self.device)
        self.reward[:n] = state["reward"].to(self.device)
        self.discount[:n] = state["discount"].to(self.device)
        self.terminated[:n] = state["terminated"].to(self.device)
        self.size, self.pos = n, state["pos"]


def concat_batches(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        out[k] = {kk: torch.cat([a[k][kk], b[k][kk]]) for kk in a[k]} if isinstance(a[k], dict) else torch.cat([a[k], b[k]])
    return out
