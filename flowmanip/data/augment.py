"""Random-shift augmentation for camera images (as DrQ and ManiSkill's image baselines use it), and
Gaussian state noise for behaviour cloning from few demos.

Each image moves by up to ``pad`` pixels in each direction; the border pixels fill what moves
in (the same as padding with the edge values and cropping back to the original size). Images
stay uint8 ``[B, H, W, C]``, so the encoder sees the same kind of input it gets from the env.
"""

from __future__ import annotations

import torch


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move image ``i`` of ``images [B, H, W, C]`` down by ``dy[i]`` and right by ``dx[i]`` pixels,
    repeating the edge rows and columns into the space left behind."""
    b, h, w = images.shape[:3]
    rows = (torch.arange(h, device=images.device) - dy.to(images.device)[:, None]).clamp(0, h - 1)  # [B, H]
    cols = (torch.arange(w, device=images.device) - dx.to(images.device)[:, None]).clamp(0, w - 1)  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by a uniform integer offset in [-pad, pad] along each axis."""
    if pad <= 0:
        return images
    b = images.shape[0]
    device = generator.device if generator is not None else images.device  # no host-to-GPU copy per batch
    dy = torch.randint(-pad, pad + 1, (b,), generator=generator, device=device)
    dx = torch.randint(-pad, pad + 1, (b,), generator=generator, device=device)
    return shift_images(images, dy, dx)


def jitter_state(obs: dict, noise: float, std: torch.Tensor) -> dict:
    """``obs`` with Gaussian noise of ``noise * std`` (per state dim) added to its ``state``; ``obs`` is not changed."""
    if noise <= 0:
        return obs
    return {**obs, "state": obs["state"] + noise * std * torch.randn_like(obs["state"])}


def augment_obs(obs: dict, pad: int) -> dict:
    """``obs`` with its ``rgb`` images randomly shifted (other keys untouched); ``obs`` itself is not changed."""
    if pad <= 0 or "rgb" not in obs:
        return obs
    return {**obs, "rgb": random_shift(obs["rgb"], pad)}
