"""Training batches for the fine-tune: online transitions mixed with demonstration chunks."""

from __future__ import annotations

import torch

from flowmanip.algos.flow_matching import action_dim_mask
from flowmanip.data.augment import augment_obs
from flowmanip.train.replay import concat_batches
from flowmanip.utils import to_device


class BatchSampler:
    """Draws ``batch_size`` transitions: a ``demo_fraction`` share from the demos (RLPD-style; None draws
    uniformly over demos and online data together), the rest from the replay buffer.

    Demo actions are normalised once, here, with the policy's scaler. Demo samples stay on
    the CPU until drawn; batches come back on ``device``.
    """

    def __init__(self, buffer, demos, scaler, cfg, device, random_shift: int = 0):
        self.buffer, self.demos, self.cfg, self.device = buffer, demos, cfg, device
        self.random_shift = random_shift  # rgb augmentation of obs and next_obs (data.random_shift)
        self.demo_actions = None
        if demos is not None:
            with torch.no_grad():
                self.demo_actions = scaler.to_normalized(demos.actions.to(device)).reshape(len(demos), -1).cpu()

    @property
    def has_demos(self) -> bool:
        return self.demos is not None

    def augment(self, b: dict) -> dict:
        for key in ("obs", "next_obs"):
            if key in b:
                b[key] = augment_obs(b[key], self.random_shift)
        return b

    def demo_batch(self, n: int) -> dict:
        return self.augment(self.raw_demo_batch(n))

    def raw_demo_batch(self, n: int) -> dict:
        idx = torch.randint(len(self.demos), (n,))
        b = self.demos.get(idx)
        b["action"] = self.demo_actions[idx]
        # the BC term ignores the padding past an episode's end; the critic batch takes only the online keys
        b["action_mask"] = action_dim_mask(b["action_mask"], self.demo_actions.shape[1] // b["action_mask"].shape[1])
        return to_device(b, self.device)

    def num_demo(self) -> int:
        n, fraction = self.cfg.batch_size, self.cfg.demo_fraction
        if self.demos is None or fraction == 0:
            return 0
        if fraction is None:
            return int(round(n * len(self.demos) / (len(self.demos) + len(self.buffer))))
        return int(round(n * fraction))

    def batch(self) -> dict:
        n_demo = self.num_demo()
        online = to_device(self.buffer.sample(self.cfg.batch_size - n_demo), self.device)
        return self.augment(online if n_demo == 0 else concat_batches(online, self.raw_demo_batch(n_demo)))
