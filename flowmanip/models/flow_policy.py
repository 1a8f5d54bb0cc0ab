"""The flow policy: a K-step rollout of a velocity field, squashed by tanh.

Shapes: ``z [B, z_dim]``; the rollout state ``A_k [B, d]`` with ``d = H * action_dim``;
the action ``tanh(A_K)`` is the chunk in normalised units ``[-1, 1]``.

- deterministic: ``A_{k+1} = A_k + dt * v(A_k, t_k, z)``
- noise-augmented: ``A_0 ~ N(0, s0^2 I)``, ``A_{k+1} = A_k + dt * v(A_k, t_k, z) + sigma * eps_k``;
  its path log-likelihood is SAC's entropy term (the first term is dropped when s0 = 0):
  ``log N(A_0; 0, s0^2 I) + sum_k log N(A_{k+1}; A_k + dt v_k, sigma^2 I) - sum_j log(1 - tanh(A_K,j)^2 + 1e-6)``
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from flowmanip.models.velocity import make_velocity

ATANH_EPS = 1e-3  # flow-matching targets are atanh(clip(a, -1 + eps, 1 - eps))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of log N(x; mean, exp(log_std)^2), in float32."""
    x, mean, log_std = x.float(), mean.float(), log_std.float()
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.9189385332046727).sum(-1)  # 0.5 * log(2 pi), literal for TorchScript


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` (same shape, bool or 0/1) is set; all of them without a mask."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def tanh_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of log(1 - tanh(u)^2 + 1e-6)."""
    return torch.log(1.0 - torch.tanh(pre_tanh.float()).pow(2) + 1e-6).sum(-1)


class FlowActor(nn.Module):
    def __init__(self, z_dim: int, action_dim: int, cfg):
        super().__init__()
        self.action_dim = action_dim
        self.chunk = cfg.chunk
        self.flow_steps = cfg.flow_steps
        self.dim = action_dim * cfg.chunk
        self.velocity = make_velocity(cfg.velocity, z_dim, action_dim, cfg)
        self.init_std = float(cfg.init_std)  # A_0 ~ N(0, init_std^2 I); 0 starts where the deterministic rollout does
        self.log_init_std = math.log(self.init_std) if self.init_std > 0 else 0.0
        self.sigma_mode = cfg.sigma_mode
        self.log_sigma_min, self.log_sigma_max = cfg.log_sigma_min, cfg.log_sigma_max
        self.register_buffer("fixed_log_sigma", torch.tensor(math.log(cfg.sigma)))
        # state-conditioned noise scale: starts at the configured fixed sigma
        self.sigma_head = nn.Linear(z_dim, self.dim)
        self.reset_sigma(cfg.sigma)

    @torch.no_grad()
    def reset_sigma(self, sigma: float) -> None:
        """Set the rollout noise to ``sigma`` (fixed, and the learned head's starting point).

        Both live in the state dict, so loading a pretrain checkpoint brings its recipe's sigma
        along; fine-tuning calls this after loading so that the fine-tune recipe's sigma holds.
        """
        self.fixed_log_sigma.fill_(math.log(sigma))
        nn.init.zeros_(self.sigma_head.weight)
        nn.init.constant_(self.sigma_head.bias, math.log(sigma))

    def log_sigma(self, z: torch.Tensor) -> torch.Tensor:
        if self.sigma_mode == "learned":
            return self.sigma_head(z).clamp(self.log_sigma_min, self.log_sigma_max)
        return self.fixed_log_sigma.expand(z.shape[0], self.dim)

    def deterministic(self, z: torch.Tensor, a0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pre-tanh ``A_K [B, d]`` of the noise-free rollout (``A_0`` is zeros unless given)."""
        a = torch.zeros(z.shape[0], self.dim, device=z.device) if a0 is None else a0
        dt = 1.0 / self.flow_steps
        for k in range(self.flow_steps):
            t = torch.full((z.shape[0],), k * dt, device=z.device)
            a = a + dt * self.velocity(a, t, z)
        return a

    def sample(self, z: torch.Tensor, keep_states: bool = False,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Noise-augmented rollout. Returns ``(action [B, d] in [-1, 1], log_prob [B], states)``.

        ``states`` holds ``A_0 .. A_{K-1}`` (when ``keep_states``) for gradient diagnostics.
        The action is reparameterised through all K steps.
        """
        B = z.shape[0]
        dt = 1.0 / self.flow_steps
        a = torch.randn(B, self.dim, device=z.device, generator=generator) * self.init_std
        if keep_states:
            a.requires_grad_(True)  # so that d loss / d A_0 exists for the diagnostics
        if self.init_std > 0:
            log_prob = gaussian_log_prob(a, torch.zeros_like(a), torch.full_like(a, self.log_init_std))
        else:  # A_0 is fixed: the path density is that of the K noisy steps alone
            log_prob = torch.zeros(B, device=z.device)
        log_sigma = self.log_sigma(z)
        sigma = log_sigma.exp()
        states: List[torch.Tensor] = []
        for k in range(self.flow_steps):
            if keep_states:
                states.append(a)
            t = torch.full((B,), k * dt, device=z.device)
            mean = a + dt * self.velocity(a, t, z)
            noise = torch.randn(B, self.dim, device=z.device, generator=generator)
            a = mean + sigma * noise
            log_prob = log_prob + gaussian_log_prob(a, mean, log_sigma)
        log_prob = log_prob - tanh_log_det(a)
        return torch.tanh(a), log_prob, states

    def flow_matching_loss(self, z: torch.Tensor, action: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Conditional flow matching in pre-tanh space. ``action [B, d]`` normalised to [-1, 1].

        ``mask [B, d]`` (optional, bool or 0/1) marks the dimensions that hold real actions: the loss
        averages over those only, so the padding past an episode's end (``action_mask``) teaches nothing.
        """
        x1 = torch.atanh(action.clamp(-1 + ATANH_EPS, 1 - ATANH_EPS))
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return masked_mean((self.velocity(xt, t, z) - (x1 - x0)).pow(2), mask)
