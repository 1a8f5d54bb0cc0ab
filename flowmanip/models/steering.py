"""Offline-to-online baselines that keep the pretrained flow policy frozen and learn around it.

- ``ResidualActor`` (as in Policy Decorator): a small tanh-Gaussian SAC policy adds a bounded
  correction ``scale * r``, ``r in [-1, 1]^d``, to the frozen flow policy's action chunk. The
  critic sees the executed chunk.
- ``NoiseSteeringActor`` (as in DSRL): SAC chooses the flow's initial noise ``A_0 = bound * w``,
  ``w in [-1, 1]^d``; the frozen flow maps it to the chunk through its deterministic K-step
  rollout, so RL searches the flow's own action manifold. The critic sees the executed chunk;
  the actor's gradient reaches ``w`` through the frozen rollout, and the entropy term is that
  of ``w`` (the density of the chunk itself has no closed form).

Both expose FlowActor's interface (``dim``, ``sample``, ``deterministic``); ``sample`` returns
the executed chunk. ``deterministic`` returns its pre-tanh value, so that
``tanh(deterministic(z))`` is the policy's action wherever a FlowActor's is expected (eval, export).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from flowmanip.models.flow_policy import FlowActor, gaussian_log_prob, tanh_log_det
from flowmanip.models.layers import mlp


class _TanhGaussian(nn.Module):
    """A small tanh-Gaussian head ``[B, in] -> ([B, d] in [-1, 1], log_prob [B])``; starts near 0 with a small std."""

    def __init__(self, in_dim: int, d: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, 2 * d, num_layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        with torch.no_grad():
            self.net[-1].bias[d:].fill_(math.log(0.3))

    def stats(self, x):
        mean, log_std = self.net(x).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 1.0)

    def sample(self, x, generator: Optional[torch.Generator] = None):
        mean, log_std = self.stats(x)
        u = mean + log_std.exp() * torch.randn(mean.shape, device=x.device, generator=generator)
        return torch.tanh(u), gaussian_log_prob(u, mean, log_std) - tanh_log_det(u)


class ResidualActor(nn.Module):
    def __init__(self, z_dim: int, action_dim: int, cfg, scale: float, hidden_dim: int = 256, num_layers: int = 2):
        super().__init__()
        self.base = FlowActor(z_dim, action_dim, cfg).requires_grad_(False)
        self.dim, self.action_dim, self.chunk, self.flow_steps = self.base.dim, action_dim, cfg.chunk, 0
        self.scale = float(scale)
        self.residual = _TanhGaussian(z_dim + self.dim, self.dim, hidden_dim, num_layers)

    def _base(self, z):
        with torch.no_grad():
            return torch.tanh(self.base.deterministic(z))

    def sample(self, z: torch.Tensor, keep_states: bool = False,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        base = self._base(z)
        r, log_prob = self.residual.sample(torch.cat([z, base], -1), generator)
        # a = base + scale * r: a shift and a scaling of r's density (the clip to [-1, 1] is ignored)
        return (base + self.scale * r).clamp(-1.0, 1.0), log_prob - self.dim * math.log(self.scale), []

    def deterministic(self, z: torch.Tensor, a0: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = self._base(z)
        mean, _ = self.residual.stats(torch.cat([z, base], -1))
        edge = 1.0 - 1e-6  # keeps atanh finite at the bounds (a local: TorchScript exports cannot read globals)
        return torch.atanh((base + self.scale * torch.tanh(mean)).clamp(-edge, edge))


class NoiseSteeringActor(nn.Module):
    def __init__(self, z_dim: int, action_dim: int, cfg, bound: float, hidden_dim: int = 256, num_layers: int = 2):
        super().__init__()
        self.base = FlowActor(z_dim, action_dim, cfg).requires_grad_(False)
        self.dim, self.action_dim, self.chunk, self.flow_steps = self.base.dim, action_dim, cfg.chunk, 0
        self.bound = float(bound)
        self.noise_policy = _TanhGaussian(z_dim, self.dim, hidden_dim, num_layers)

    def sample(self, z: torch.Tensor, keep_states: bool = False,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        w, log_prob = self.noise_policy.sample(z, generator)
        return torch.tanh(self.base.deterministic(z, self.bound * w)), log_prob, []

    def deterministic(self, z: torch.Tensor, a0: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.base.deterministic(z, self.bound * torch.tanh(self.noise_policy.stats(z)[0]))
