"""Building blocks shared by encoders, velocity fields and critics."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, layer_norm: bool = False) -> nn.Sequential:
    """``num_layers`` hidden layers of width ``hidden_dim`` (GELU), then a linear output."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers):
        layers.append(nn.Linear(dim, hidden_dim))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim))
        layers.append(nn.GELU())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the flow time t in [0, 1]: ``[B] -> [B, dim]``."""

    def __init__(self, dim: int = 32, max_period: float = 1000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = (t.float() * 1000.0)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
