"""Behaviour-cloning losses on demo samples, used by pretraining and as SAC Flow's BC term."""

from __future__ import annotations

from typing import Optional

import torch

from flowmanip.models.flow_policy import masked_mean


def bc_loss(actor, z: torch.Tensor, demo_action: torch.Tensor, kind: str = "flow_matching",
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``demo_action [B, d]`` normalised to [-1, 1]. Both kinds average over the batch and the d
    dimensions, so one BC weight means the same for either; with ``mask [B, d]`` (bool or 0/1; see
    ``action_dim_mask``) over the dimensions that hold real actions only (not a chunk's padding past an
    episode's end).

    ``flow_matching``: the pretraining loss ``||v(x_t, t, z) - (x_1 - x_0)||^2 / d`` in pre-tanh space.
    ``action_mse``: ``||a_theta - a_demo||^2 / d`` with ``a_theta`` the noise-augmented rollout's action.
    """
    if kind == "flow_matching":
        return actor.flow_matching_loss(z, demo_action, mask)
    if kind == "action_mse":
        action, _, _ = actor.sample(z)
        return masked_mean((action - demo_action).pow(2), mask)
    raise ValueError(f"unknown bc_type {kind!r}")


def action_dim_mask(action_mask: torch.Tensor, action_dim: int) -> torch.Tensor:
    """A demo batch's per-step ``action_mask [B, H]`` as the per-dimension mask ``[B, H * action_dim]`` of the
    flattened chunk (step-major, as ``actions.reshape(B, -1)`` flattens it)."""
    return action_mask[:, :, None].expand(-1, -1, action_dim).reshape(action_mask.shape[0], -1)
