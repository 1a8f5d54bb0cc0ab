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

    FIELDS = ("action", "reward", "discount", "terminated")

    def state_dict(self) -> dict:
        """The stored transitions, oldest first (so a buffer of another capacity can load them)."""
        n = self.size
        order = _oldest_first(n, self.pos)

        def saved(v):  # to the CPU first: reordering on the GPU would briefly double the buffer there
            return v[:n].cpu()[order]

        return {"obs": {k: saved(v) for k, v in self.obs.items()},
                "next_obs": {k: saved(v) for k, v in self.next_obs.items()},
                **{k: saved(getattr(self, k)) for k in self.FIELDS}, "pos": 0}

    def load_state_dict(self, state: dict) -> None:
        """Load transitions saved by ``state_dict`` (older files: in ring order with their ``pos``); when
        they do not fit, the newest ``capacity`` are kept. The next ``add`` continues after them."""
        n = state["action"].shape[0]
        order = _oldest_first(n, state["pos"])
        keep = order[n - min(n, self.capacity):]
        m = len(keep)
        for group in ("obs", "next_obs"):
            for k, v in getattr(self, group).items():
                v[:m] = state[group][k][keep].to(self.device)
        for k in self.FIELDS:
            getattr(self, k)[:m] = state[k][keep].to(self.device)
        self.size, self.pos = m, m % self.capacity


def _oldest_first(n: int, pos: int) -> torch.Tensor:
    """Indices that put ``n`` ring-buffer rows written up to ``pos`` oldest first (before the ring is
    full, ``pos == n`` and the rows are already in order)."""
    return (torch.arange(n) + pos) % max(n, 1)


def concat_batches(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        out[k] = {kk: torch.cat([a[k][kk], b[k][kk]]) for kk in a[k]} if isinstance(a[k], dict) else torch.cat([a[k], b[k]])
    return out
