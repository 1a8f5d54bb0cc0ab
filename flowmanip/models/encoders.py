"""Observation encoders, shared by actor and critic.

An encoder owns the observation normaliser, so a saved or exported policy needs no
outside statistics. Input: ``{"state": [B, D] float32, "rgb"?: [B, H, W, C] uint8}``;
output: ``z [B, out_dim]``.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from flowmanip.models.layers import mlp


class StateNormalizer(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp(min=1e-3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).clamp(-10.0, 10.0)


class StateEncoder(nn.Module):
    """Normalised state, then an MLP (``kind="mlp"``) or nothing (``"identity"``)."""

    def __init__(self, obs_dim: int, mean: torch.Tensor, std: torch.Tensor, kind: str = "mlp", out_dim: int = 256):
        super().__init__()
        self.normalizer = StateNormalizer(mean, std)
        if kind == "identity":
            self.net = nn.Identity()
            self.out_dim = obs_dim
        else:
            self.net = nn.Sequential(mlp(obs_dim, out_dim, out_dim, 1, layer_norm=True), nn.LayerNorm(out_dim))
            self.out_dim = out_dim

    def forward(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.normalizer(obs["state"]))


class SpatialSoftmax(nn.Module):
    """Feature maps [B, C, H, W] -> [B, 2K] image coordinates in [-1, 1]: a 1x1 conv makes K maps, each
    map's softmax over its pixels (with a learned temperature) weights the pixel grid, so every
    keypoint is the expected (x, y) of where its map is high."""

    def __init__(self, channels: int, height: int, width: int, keypoints: int = 32):
        super().__init__()
        self.to_maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))  # [H*W, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.to_maps(x).flatten(2)  # [B, K, H*W]
        weights = torch.softmax(maps / self.log_temperature.exp(), dim=-1)
        return (weights @ self.grid).flatten(1)  # [B, K*2]


class RGBEncoder(nn.Module):
    """A small CNN over the stacked camera images, fused with the normalised proprioceptive state.
    ``head``: ``avg`` pools the last feature maps to a 4x4 grid; ``spatial_softmax`` turns them into
    keypoint coordinates (``SpatialSoftmax``), which keeps where things are in the image."""

    def __init__(self, obs_dim: int, mean: torch.Tensor, std: torch.Tensor, image_channels: int,
                 channels: int = 32, out_dim: int = 256, head: str = "avg", image_hw: tuple = (64, 64),
                 keypoints: int = 32):
        super().__init__()
        self.normalizer = StateNormalizer(mean, std)
        c = channels
        convs = [
            nn.Conv2d(image_channels, c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=1, padding=1), nn.GELU(),
        ]
        if head == "avg":
            pool = [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * c * 16, out_dim)]
        elif head == "spatial_softmax":
            with torch.no_grad():  # the size of the last feature maps
                h, w = nn.Sequential(*convs)(torch.zeros(1, image_channels, *image_hw)).shape[-2:]
            pool = [SpatialSoftmax(2 * c, h, w, keypoints), nn.Linear(2 * keypoints, out_dim)]
        else:
            raise ValueError(f"unknown rgb encoder head {head!r}: expected avg or spatial_softmax")
        self.cnn = nn.Sequential(*convs, *pool, nn.LayerNorm(out_dim))
        self.fuse = nn.Sequential(mlp(out_dim + obs_dim, out_dim, out_dim, 1, layer_norm=True), nn.LayerNorm(out_dim))
        self.out_dim = out_dim

    def forward(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        image = obs["rgb"].permute(0, 3, 1, 2).float() / 255.0  # HWC uint8 -> CHW in [0, 1]
        features = self.cnn(image)
        return self.fuse(torch.cat([features, self.normalizer(obs["state"])], dim=-1))
