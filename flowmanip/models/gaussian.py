"""A tanh-Gaussian actor over the action chunk: the standard SAC baseline, same interface as FlowActor."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from flowmanip.models.flow_policy import gaussian_log_prob, masked_mean, tanh_log_det
from flowmanip.models.layers import mlp


class GaussianActor(nn.Module):
    def __init__(self, z_dim: int, action_dim: int, cfg):
        super().__init__()
        self.action_dim, self.chunk = action_dim, cfg.chunk
        self.dim = action_dim * cfg.chunk
        self.flow_steps = 0
        self.net = mlp(z_dim, cfg.hidden_dim, 2 * self.dim, cfg.num_layers)

    def _stats(self, z):
        mean, log_std = self.net(z).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def deterministic(self, z: torch.Tensor, a0: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._stats(z)[0]

    def sample(self, z: torch.Tensor, keep_states: bool = False,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        mean, log_std = self._stats(z)
        u = mean + log_std.exp() * torch.randn(mean.shape, device=z.device, generator=generator)
        log_prob = gaussian_log_prob(u, mean, log_std) - tanh_log_det(u)
        return torch.tanh(u), log_prob, []

    def flow_matching_loss(self, z: torch.Tensor, action: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Behaviour cloning for the baseline: Gaussian negative log-likelihood of atanh(action), per dimension.

        ``mask [B, d]`` (optional) keeps the dimensions that hold real actions, as in ``FlowActor``'s loss.
        """
        from flowmanip.models.flow_policy import ATANH_EPS

        mean, log_std = self._stats(z)
        u = torch.atanh(action.clamp(-1 + ATANH_EPS, 1 - ATANH_EPS))
        if mask is None:
            return -gaussian_log_prob(u, mean, log_std).mean() / self.dim
        # the same per-dimension terms as gaussian_log_prob, before its sum over the dimensions
        nll = 0.5 * ((u - mean) * torch.exp(-log_std)).pow(2) + log_std + 0.9189385332046727
        return masked_mean(nll, mask)
