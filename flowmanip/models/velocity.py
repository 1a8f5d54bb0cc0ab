"""Velocity fields ``v(A_k, t_k, z)`` of the flow rollout (docs/design.md).

All take ``a [B, d]`` (d = H * action_dim), ``t [B]`` and ``z [B, z_dim]`` and return ``[B, d]``.
"""

from __future__ import annotations

import torch
from torch import nn

from flowmanip.models.layers import TimeEmbedding, mlp


class MLPVelocity(nn.Module):
    """Naive field: ``v = MLP([z, A_k, emb(t_k)])``."""

    def __init__(self, z_dim: int, action_dim: int, chunk: int, hidden_dim: int = 256, num_layers: int = 3):
        super().__init__()
        d = action_dim * chunk
        self.time = TimeEmbedding(32)
        self.net = mlp(z_dim + d + 32, hidden_dim, d, num_layers)

    def forward(self, a: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, a, self.time(t)], dim=-1))


class GatedVelocity(nn.Module):
    """Flow-G: ``v = g * (h - A_k)`` with ``g = sigmoid(MLP_g(.))``, ``h = MLP_h(.)``.

    A step is then ``A_{k+1} = (1 - dt*g) A_k + dt*g*h``: a GRU-like leaky update whose
    gate bounds how much each step can amplify gradients. The gate's last layer starts
    at weight 0 and bias 5 (g ~ 0.993). By default the gate is as deep and wide as the
    candidate ``h``; a small head (``policy.gate_hidden_dim=256 policy.gate_layers=1``, as in the
    paper's offline-to-online code) is cheaper but fit PickCube's demos worse (docs/design.md).
    """

    def __init__(self, z_dim: int, action_dim: int, chunk: int, hidden_dim: int = 256, num_layers: int = 3,
                 gate_hidden_dim: int = 0, gate_layers: int = 0):
        super().__init__()
        d = action_dim * chunk
        self.time = TimeEmbedding(32)
        # 0 follows the candidate (policy.gate_hidden_dim / policy.gate_layers)
        self.gate = mlp(z_dim + d + 32, gate_hidden_dim or hidden_dim, d, gate_layers or num_layers)
        self.candidate = mlp(z_dim + d + 32, hidden_dim, d, num_layers)
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.constant_(self.gate[-1].bias, 5.0)

    def forward(self, a: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, a, self.time(t)], dim=-1)
        g = torch.sigmoid(self.gate(x))
        return g * (self.candidate(x) - a)


class DecodedVelocity(nn.Module):
    """Flow-T: post-norm Transformer-decoder layers over query tokens made from ``A_k``.

    ``tokens="single"`` (the reference design): one query token ``Linear(A_k) + TimeMLP(t_k)`` for the
    whole chunk. ``tokens="chunk"``: one token per chunk step, ``Linear(a_h)`` plus a learned
    position and ``TimeMLP(t_k)``, so self-attention runs across the H chunk steps (H times
    the compute). The memory is ``StateMLP(z)`` split into ``memory_tokens`` tokens; each layer
    does self-attention, cross-attention to the memory and a feed-forward block;
    ``v = Linear(x)``. Each flow step is evaluated on its own (no attention across flow steps).

    Why more than one memory token: attention over a single key has softmax weight 1, so its
    output is ``W_o W_v m`` whatever the query. With one memory token the action tokens and
    the observation only meet additively, and the single-token self-attention is a fixed linear
    map too. Several memory tokens make the cross-attention weights depend on ``A_k`` and ``t``.
    """

    def __init__(self, z_dim: int, action_dim: int, chunk: int, width: int = 128, num_layers: int = 2,
                 num_heads: int = 4, tokens: str = "single", memory_tokens: int = 4):
        super().__init__()
        if tokens not in ("single", "chunk"):
            raise ValueError(f"policy.decoder_tokens must be 'single' or 'chunk', got {tokens!r}")
        self.num_tokens = chunk if tokens == "chunk" else 1
        self.token_dim = action_dim * chunk // self.num_tokens
        self.time = TimeEmbedding(32)
        self.action_in = nn.Linear(self.token_dim, width)
        self.position = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.time_mlp = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width))
        self.memory_tokens = memory_tokens
        self.state_mlp = nn.Sequential(nn.Linear(z_dim, width), nn.GELU(), nn.Linear(width, width * memory_tokens))
        layer = nn.TransformerDecoderLayer(width, num_heads, dim_feedforward=2 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=False)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.out = nn.Linear(width, self.token_dim)

    def forward(self, a: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B = a.shape[0]
        tokens = self.action_in(a.reshape(B, self.num_tokens, self.token_dim)) + self.position
        tokens = tokens + self.time_mlp(self.time(t))[:, None, :]
        memory = self.state_mlp(z).reshape(B, self.memory_tokens, -1)
        x = self.decoder(tokens, memory)
        return self.out(x).reshape(B, self.num_tokens * self.token_dim)


def make_velocity(kind: str, z_dim: int, action_dim: int, cfg) -> nn.Module:
    if kind == "mlp":
        return MLPVelocity(z_dim, action_dim, cfg.chunk, cfg.hidden_dim, cfg.num_layers)
    if kind == "gated":
        return GatedVelocity(z_dim, action_dim, cfg.chunk, cfg.hidden_dim, cfg.num_layers, cfg.gate_hidden_dim,
                             cfg.gate_layers)
    if kind == "decoded":
        return DecodedVelocity(z_dim, action_dim, cfg.chunk, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_heads,
                               cfg.decoder_tokens, cfg.decoder_memory_tokens)
    raise ValueError(f"unknown velocity field {kind!r}")
