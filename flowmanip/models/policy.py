"""A complete policy: encoder + actor + action scaling, built from a self-describing spec.

``spec`` (stored in every checkpoint) holds what the policy needs to run anywhere:
``obs_dim``, ``rgb_shape`` (or None), ``action_dim``, ``obs_mean/obs_std``, ``action_low/high``
(the normalisation range) and ``env_low/high`` (the env's bounds).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from flowmanip.models.critic import QEnsemble
from flowmanip.models.encoders import RGBEncoder, StateEncoder
from flowmanip.models.flow_policy import FlowActor
from flowmanip.models.gaussian import GaussianActor
from flowmanip.models.steering import NoiseSteeringActor, ResidualActor


class ActionScaler(nn.Module):
    """Maps normalised actions in [-1, 1] to env units within the env's bounds, and back."""

    def __init__(self, low, high, env_low, env_high):
        super().__init__()
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        self.register_buffer("env_low", torch.as_tensor(env_low, dtype=torch.float32))
        self.register_buffer("env_high", torch.as_tensor(env_high, dtype=torch.float32))

    def to_env(self, a: torch.Tensor) -> torch.Tensor:
        a = self.low + (a + 1.0) * 0.5 * (self.high - self.low)
        return torch.maximum(torch.minimum(a, self.env_high), self.env_low)

    def to_normalized(self, a: torch.Tensor) -> torch.Tensor:
        return (2.0 * (a - self.low) / (self.high - self.low) - 1.0).clamp(-1.0, 1.0)


def build_encoder(spec: dict, cfg) -> nn.Module:
    mean = torch.as_tensor(spec["obs_mean"], dtype=torch.float32)
    std = torch.as_tensor(spec["obs_std"], dtype=torch.float32)
    if spec.get("rgb_shape"):
        return RGBEncoder(spec["obs_dim"], mean, std, spec["rgb_shape"][-1], cfg.cnn_channels, cfg.encoder_dim,
                          head=cfg.cnn_head, image_hw=tuple(spec["rgb_shape"][:2]))
    return StateEncoder(spec["obs_dim"], mean, std, cfg.encoder, cfg.encoder_dim)


class Policy(nn.Module):
    """Encoder + actor + scaler. ``forward(obs) -> [B, H, action_dim]`` env actions (deterministic)."""

    def __init__(self, spec: dict, policy_cfg, actor_kind: str = "flow"):
        super().__init__()
        self.spec = dict(spec)
        self.encoder = build_encoder(spec, policy_cfg)
        z_dim, action_dim = self.encoder.out_dim, spec["action_dim"]
        if actor_kind == "residual":
            self.actor = ResidualActor(z_dim, action_dim, policy_cfg, policy_cfg.residual_scale)
        elif actor_kind == "noise":
            self.actor = NoiseSteeringActor(z_dim, action_dim, policy_cfg, policy_cfg.noise_bound)
        else:
            self.actor = (GaussianActor if actor_kind == "gaussian" else FlowActor)(z_dim, action_dim, policy_cfg)
        self.scaler = ActionScaler(spec["action_low"], spec["action_high"], spec["env_low"], spec["env_high"])
        self.chunk, self.action_dim = policy_cfg.chunk, spec["action_dim"]

    def forward(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.act(obs, deterministic=True)

    def act(self, obs: Dict[str, torch.Tensor], deterministic: bool = True) -> torch.Tensor:
        z = self.encoder(obs)
        if deterministic:
            a = torch.tanh(self.actor.deterministic(z))
        else:
            a = self.actor.sample(z)[0]
        return self.scaler.to_env(a.reshape(-1, self.chunk, self.action_dim))


    def load_init(self, state: dict) -> None:
        """Load a pretrained policy's weights; a residual or noise-steering actor takes them as its frozen base."""
        if isinstance(self.actor, (ResidualActor, NoiseSteeringActor)):
            state = {("actor.base." + k[6:] if k.startswith("actor.") else k): v for k, v in state.items()}
            missing, unexpected = self.load_state_dict(state, strict=False)
            fresh = [k for k in missing if not k.startswith("actor.base.")]
            if unexpected or len(fresh) != len(missing):
                raise RuntimeError(f"init weights do not fit the policy: missing {missing}, unexpected {unexpected}")
        else:
            self.load_state_dict(state)


def build_critic(encoder_dim: int, spec: dict, policy_cfg, finetune_cfg) -> QEnsemble:
    return QEnsemble(encoder_dim, spec["action_dim"] * policy_cfg.chunk, finetune_cfg.num_q,
                     finetune_cfg.q_hidden_dim, finetune_cfg.q_layers)
