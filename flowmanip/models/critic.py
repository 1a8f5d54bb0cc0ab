"""Q ensemble on (z, action chunk), all heads in one batched matmul per layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class QEnsemble(nn.Module):
    """``num_q`` independent Q heads. ``forward(z [B, z_dim], a [B, d]) -> [num_q, B]``.

    Each head is an MLP with ``num_layers`` hidden layers (Linear, LayerNorm, GELU) and a
    linear output, as ``layers.mlp(..., layer_norm=True)`` builds; the heads' weights are
    stacked (``weight_i [num_q, in, out]``) so a layer of the whole ensemble is one ``baddbmm``.
    Heads are initialised like ``nn.Linear`` / ``nn.LayerNorm``, independently.
    """

    def __init__(self, z_dim: int, action_dim: int, num_q: int = 2, hidden_dim: int = 256, num_layers: int = 3):
        super().__init__()
        self.num_q, self.num_layers = num_q, num_layers
        dims = [z_dim + action_dim] + [hidden_dim] * num_layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init
            self.weights.append(nn.Parameter(torch.empty(num_q, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, fan_out).uniform_(-bound, bound)))
        self.ln_weights = nn.ParameterList([nn.Parameter(torch.ones(num_q, 1, hidden_dim)) for _ in range(num_layers)])
        self.ln_biases = nn.ParameterList([nn.Parameter(torch.zeros(num_q, 1, hidden_dim)) for _ in range(num_layers)])

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, action], dim=-1).expand(self.num_q, -1, -1)
        for i in range(self.num_layers):
            x = torch.baddbmm(self.biases[i], x, self.weights[i])
            x = F.layer_norm(x, x.shape[-1:]) * self.ln_weights[i] + self.ln_biases[i]
            x = F.gelu(x)
        return torch.baddbmm(self.biases[-1], x, self.weights[-1]).squeeze(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the batched layout hold ``heads.<j>.<k>.weight`` per head
        (``nn.Sequential`` of Linear, LayerNorm, GELU, ..., Linear): stack them into this layout."""
        old = f"{prefix}heads.0.0.weight"
        if old in state_dict:
            per_layer = 3  # Linear, LayerNorm, GELU
            for i in range(self.num_layers + 1):
                k = i * per_layer
                w = [state_dict.pop(f"{prefix}heads.{j}.{k}.weight") for j in range(self.num_q)]
                b = [state_dict.pop(f"{prefix}heads.{j}.{k}.bias") for j in range(self.num_q)]
                state_dict[f"{prefix}weights.{i}"] = torch.stack([t.t() for t in w])
                state_dict[f"{prefix}biases.{i}"] = torch.stack(b)[:, None, :]
                if i < self.num_layers:
                    lw = [state_dict.pop(f"{prefix}heads.{j}.{k + 1}.weight") for j in range(self.num_q)]
                    lb = [state_dict.pop(f"{prefix}heads.{j}.{k + 1}.bias") for j in range(self.num_q)]
                    state_dict[f"{prefix}ln_weights.{i}"] = torch.stack(lw)[:, None, :]
                    state_dict[f"{prefix}ln_biases.{i}"] = torch.stack(lb)[:, None, :]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
