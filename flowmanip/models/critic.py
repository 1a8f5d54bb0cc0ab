"""Q ensemble on (z, action chunk)."""

from __future__ import annotations

import torch
from torch import nn

from flowmanip.models.layers import mlp


class QEnsemble(nn.Module):
    """``num_q`` independent Q heads. ``forward(z [B, z_dim], a [B, d]) -> [num_q, B]``."""

    def __init__(self, z_dim: int, action_dim: int, num_q: int = 2, hidden_dim: int = 256, num_layers: int = 3):
        super().__init__()
        self.heads = nn.ModuleList(
            [mlp(z_dim + action_dim, hidden_dim, 1, num_layers, layer_norm=True) for _ in range(num_q)])

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, action], dim=-1)
        return torch.stack([head(x).squeeze(-1) for head in self.heads])
