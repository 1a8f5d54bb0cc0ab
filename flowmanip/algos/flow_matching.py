"""Behaviour-cloning losses on demo samples, used by pretraining and as SAC Flow's BC term."""

from __future__ import annotations

import torch


def bc_loss(actor, z: torch.Tensor, demo_action: torch.Tensor, kind: str = "flow_matching") -> torch.Tensor:
    """``demo_action [B, d]`` normalised to [-1, 1]. Both kinds average over the batch and the d
    dimensions, so one BC weight means the same for either.

    ``flow_matching``: the pretraining loss ``||v(x_t, t, z) - (x_1 - x_0)||^2 / d`` in pre-tanh space.
    ``action_mse``: ``||a_theta - a_demo||^2 / d`` with ``a_theta`` the noise-augmented rollout's action.
    """
    if kind == "flow_matching":
        return actor.flow_matching_loss(z, demo_action)
    if kind == "action_mse":
        action, _, _ = actor.sample(z)
        return (action - demo_action).pow(2).mean()
    raise ValueError(f"unknown bc_type {kind!r}")
