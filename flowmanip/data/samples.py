"""Demonstrations as training samples: (obs, action chunk, chunk reward, done, next obs).

A sample at step t of an episode of length T holds the H actions ``a[t : t+H]`` (padded
with the last action past the end, where ``action_mask`` is False), the chunk reward
``sum_{i<n} gamma^i r_{t+i}`` over the ``n = min(H, T-t)`` real steps, ``discount =
gamma^n``, ``terminated``, and the obs at ``t + n``. Observations are stored once per
episode step and indexed, so image datasets are not copied H times.

Terminations follow the online MDP (``finetune.ignore_terminations``). Ignored (the
default), every episode runs to its last step and ``terminated`` is only informative (set
when a terminated step lies inside the chunk; targets bootstrap anyway). Used, an episode
ends at its first terminated step, as an online episode does (the env resets there): the
episode is cut after that step T' (recorded demos keep ``terminated`` for a few steps after
the first success), ``n = min(H, T'-t)``, and only the chunks that reach step T' are terminal.
"""

from __future__ import annotations

import numpy as np
import torch

from flowmanip.errors import FlowmanipError
from flowmanip.spec import Spec, make_spec


def normalization_stats(episodes, env_low, env_high, margin: float = 0.05) -> Spec:
    """Obs mean/std and the per-dim action range of the data, widened by ``margin`` on each side.

    Dims that never vary fall back to the env's bounds. Actions are clipped to the env's
    bounds when they are mapped back (ActionScaler), not here, so that data at the bound
    (a gripper at +-1) stays inside the open interval that atanh needs.
    """
    states = np.concatenate([e.obs["state"] for e in episodes])
    actions = np.concatenate([e.actions for e in episodes])
    low, high = actions.min(0), actions.max(0)
    width = high - low
    env_low, env_high = np.asarray(env_low, np.float32), np.asarray(env_high, np.float32)
    flat = width < 1e-6
    low = np.where(flat, env_low, low - margin * width)
    high = np.where(flat, env_high, high + margin * width)
    return make_spec(obs_dim=states.shape[1], obs_mean=states.mean(0), obs_std=states.std(0),
                     action_low=low.astype(np.float32), action_high=high.astype(np.float32),
                     env_low=env_low, env_high=env_high,
                     rgb_shape=episodes[0].obs["rgb"].shape[1:] if "rgb" in episodes[0].obs else None)


class DemoSamples:
    """All windows of a list of episodes, as CPU tensors; ``sample(batch)`` draws uniformly.

    ``ignore_terminations=False`` cuts each episode at its first terminated step (module docstring).
    ``learn_padding=True`` marks the padding past an episode's end as real (``action_mask`` all True),
    so that BC learns to hold the last action once the demonstration is over.
    """

    def __init__(self, episodes, chunk: int, gamma: float = 0.99, ignore_terminations: bool = True,
                 learn_padding: bool = False):
        if not episodes:
            raise FlowmanipError("no episodes to train on")
        obs_keys = list(episodes[0].obs.keys())
        obs_parts = {k: [] for k in obs_keys}
        actions, masks, rewards, discounts, terminated, idx_obs, idx_next = [], [], [], [], [], [], []
        offset = 0
        for ep in episodes:
            T = ep.length
            ends = np.flatnonzero(ep.terminated) if not ignore_terminations else []
            if len(ends):  # the episode ends at its first termination: later steps are not in the MDP
                T = int(ends[0]) + 1
            for k in obs_keys:
                obs_parts[k].append(ep.obs[k][:T + 1])
            r = ep.rewards if ep.rewards is not None else np.zeros(T, np.float32)
            padded = np.concatenate([ep.actions[:T], np.repeat(ep.actions[T - 1:T], chunk - 1, axis=0)])
            for t in range(T):
                n = min(chunk, T - t)
                actions.append(padded[t:t + chunk])
                masks.append(np.arange(chunk) < (chunk if learn_padding else n))
                rewards.append(float(np.sum(r[t:t + n] * gamma ** np.arange(n))))
                discounts.append(gamma ** n)
                # with terminations used, steps [t, t + n) hold a terminated step only if t + n == T
                terminated.append(bool(ep.terminated[t:t + n].any()))
                idx_obs.append(offset + t)
                idx_next.append(offset + t + n)
            offset += T + 1
        self.obs = {k: torch.as_tensor(np.concatenate(v)) for k, v in obs_parts.items()}
        self.actions = torch.as_tensor(np.stack(actions), dtype=torch.float32)  # [N, H, A] env units
        self.action_mask = torch.as_tensor(np.stack(masks))
        self.reward = torch.as_tensor(rewards, dtype=torch.float32)
        self.discount = torch.as_tensor(discounts, dtype=torch.float32)
        self.terminated = torch.as_tensor(terminated)
        self.idx_obs = torch.as_tensor(idx_obs)
        self.idx_next = torch.as_tensor(idx_next)
        self.has_rewards = all(e.rewards is not None for e in episodes)

    def __len__(self) -> int:
        return self.actions.shape[0]

    def get(self, idx: torch.Tensor) -> dict:
        return {
            "obs": {k: v[self.idx_obs[idx]] for k, v in self.obs.items()},
            "next_obs": {k: v[self.idx_next[idx]] for k, v in self.obs.items()},
            "action": self.actions[idx],
            "action_mask": self.action_mask[idx],
            "reward": self.reward[idx],
            "discount": self.discount[idx],
            "terminated": self.terminated[idx],
        }

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))
