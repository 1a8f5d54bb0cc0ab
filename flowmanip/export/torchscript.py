"""TorchScript (and ONNX) export of a policy checkpoint."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import torch
from torch import nn

from flowmanip import __version__
from flowmanip.errors import FlowmanipError
from flowmanip.utils import atomic_output


class _Rollout(nn.Module):
    """Encoder features -> env actions: the K-step rollout (noise-free or noise-augmented), tanh, scaling.

    The noise-augmented rollout draws from its own generator, never torch's global one: call ``n``
    (0, 1, ... since the module was exported or ``reseed`` was called) seeds a fresh generator with
    ``seed * 1000003 + n``, so every process that loads the file gets the same action stream, and the
    position in the stream (``noise_calls``) is saved with the module.
    """

    def __init__(self, policy, stochastic: bool, seed: int = 0):
        super().__init__()
        self.actor = policy.actor
        self.scaler = policy.scaler
        self.stochastic = stochastic
        self.seed = int(seed)
        self.noise_calls = 0
        self.chunk, self.action_dim = policy.chunk, policy.action_dim
        self.squeeze_chunk = policy.chunk == 1

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.noise_calls = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.stochastic:
            generator = torch.Generator(device=z.device)
            generator.manual_seed(self.seed * 1000003 + self.noise_calls)
            self.noise_calls += 1
            a = self.actor.sample(z, False, generator)[0]
        else:
            a = torch.tanh(self.actor.deterministic(z, None))
        a = self.scaler.to_env(a.reshape(z.shape[0], self.chunk, self.action_dim))
        return a[:, 0] if self.squeeze_chunk else a


class StatePolicy(nn.Module):
    def __init__(self, policy, stochastic: bool = False, seed: int = 0):
        super().__init__()
        self.encoder = policy.encoder
        self.rollout = _Rollout(policy, stochastic, seed)
        self.obs_dim = int(policy.spec["obs_dim"])

    @torch.jit.export
    def reseed(self, seed: int) -> None:
        """Restart the noise stream of a ``--stochastic`` export from ``seed`` (no effect on a deterministic one)."""
        self.rollout.reseed(seed)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dtype != torch.float32:
            raise ValueError("obs must be float32 with shape [B, " + str(self.obs_dim) + "]; convert it with .float()")
        if obs.dim() != 2 or obs.size(1) != self.obs_dim:
            raise ValueError("obs must have shape [B, " + str(self.obs_dim) + "], got " + str(list(obs.shape)))
        return self.rollout(self.encoder({"state": obs}))


def fit_image(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A camera's uint8 ``[B, h, w, C]`` frame to the ``[B, height, width, C]`` the policy trained on: the
    centre crop with the training aspect ratio, then an antialiased bilinear resize, rounded back to uint8
    (the simulator rendered the training images at ``height x width`` directly). Frames already at that
    size pass through untouched."""
    h, w = rgb.size(1), rgb.size(2)
    if h == height and w == width:
        return rgb
    if h * width > w * height:  # taller than the training images: crop rows
        keep = (w * height + width // 2) // width
        top = (h - keep) // 2
        rgb = rgb[:, top:top + keep]
    elif h * width < w * height:  # wider: crop columns
        keep = (h * width + height // 2) // height
        left = (w - keep) // 2
        rgb = rgb[:, :, left:left + keep]
    x = rgb.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=[height, width], mode="bilinear", align_corners=False,
                                        antialias=True)
    return x.round().clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)


class DictPolicy(nn.Module):
    """``{"rgb": [B, h, w, C] uint8, "state": [B, D] float32}`` -> actions. ``C`` must match the training
    cameras (stacked on channels); ``h x w`` may be a camera's native resolution (see ``fit_image``)."""

    def __init__(self, policy, stochastic: bool = False, seed: int = 0):
        super().__init__()
        self.encoder = policy.encoder
        self.rollout = _Rollout(policy, stochastic, seed)
        self.obs_dim = int(policy.spec["obs_dim"])
        self.rgb_shape = [int(x) for x in policy.spec["rgb_shape"]]

    @torch.jit.export
    def reseed(self, seed: int) -> None:
        """Restart the noise stream of a ``--stochastic`` export from ``seed`` (no effect on a deterministic one)."""
        self.rollout.reseed(seed)

    def forward(self, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        if "rgb" not in obs or "state" not in obs:
            raise ValueError("obs must be a dict with keys 'rgb' and 'state'")
        rgb, state = obs["rgb"], obs["state"]
        if rgb.dtype != torch.uint8:
            raise ValueError("obs['rgb'] must be uint8 (0-255, HWC), as the env gives it; convert with .to(torch.uint8)")
        if rgb.dim() != 4 or rgb.size(3) != self.rgb_shape[2]:
            raise ValueError("obs['rgb'] must be uint8 with shape [B, H, W, " + str(self.rgb_shape[2])
                             + "] (HWC, cameras stacked on C; any H x W, resized to " + str(self.rgb_shape[0]) + "x"
                             + str(self.rgb_shape[1]) + "), got shape " + str(list(rgb.shape)))
        if state.dtype != torch.float32 or state.dim() != 2 or state.size(1) != self.obs_dim:
            raise ValueError("obs['state'] must be float32 with shape [B, " + str(self.obs_dim) + "], got shape "
                             + str(list(state.shape)))
        if rgb.size(1) < self.rgb_shape[0] // 2 or rgb.size(2) < self.rgb_shape[1] // 2:
            raise ValueError("obs['rgb'] frames of " + str(rgb.size(1)) + "x" + str(rgb.size(2)) + " are too small: "
                             + "the policy trained on " + str(self.rgb_shape[0]) + "x" + str(self.rgb_shape[1]))
        rgb = fit_image(rgb, self.rgb_shape[0], self.rgb_shape[1])
        return self.rollout(self.encoder({"rgb": rgb, "state": state}))


def export_metadata(ckpt: dict, stochastic: bool, seed: int, fmt: str) -> dict:
    spec, meta, recipe = ckpt["spec"], ckpt["meta"], ckpt["recipe"]
    rgb = spec.get("rgb_shape")
    chunk = recipe.policy.chunk
    return {
        "format": fmt, "flowmanip_version": __version__, "checkpoint": ckpt["path"], "checkpoint_step": meta["step"],
        "stage": meta["stage"], "env_id": meta["env_id"], "control_mode": meta["control_mode"],
        "obs_mode": meta["obs_mode"],
        "obs_dim": spec["obs_dim"],
        "obs": ({"rgb": {"shape": ["B", *rgb], "dtype": "uint8", "layout": "HWC", "channel_order": "RGB",
                         "cameras_stacked_on": "C",
                         "other_sizes": "any H x W: centre crop to the training aspect ratio, antialiased "
                                        f"bilinear resize to {rgb[0]}x{rgb[1]} inside the module"},
                 "state": {"shape": ["B", spec["obs_dim"]], "dtype": "float32"}} if rgb else
                {"shape": ["B", spec["obs_dim"]], "dtype": "float32"}),
        "action_dim": spec["action_dim"],
        "rgb_height": rgb[0] if rgb else None, "rgb_width": rgb[1] if rgb else None,
        "rgb_channels": rgb[2] if rgb else None,
        "output_shape": ["B", spec["action_dim"]] if chunk == 1 else ["B", chunk, spec["action_dim"]],
        "action_low": spec["env_low"], "action_high": spec["env_high"],
        "K": recipe.policy.flow_steps, "H": chunk, "execute": recipe.policy.execute or chunk,
        "velocity": meta.get("velocity"), "actor": meta.get("actor", "flow"),
        "stochastic": stochastic, "seed": seed if stochastic else None,
        "max_episode_steps": meta.get("max_episode_steps"),
    }


def export_checkpoint(checkpoint: str, output: str, fmt: str = "torchscript", stochastic: bool = False,
                      seed: int = 0) -> str:
    from flowmanip.train.checkpoint import load_checkpoint
    from flowmanip.train.stages import policy_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    policy = policy_from_checkpoint(ckpt).cpu()
    module_cls = DictPolicy if ckpt["spec"].get("rgb_shape") else StatePolicy
    module = module_cls(policy, stochastic, seed).eval().requires_grad_(False)  # a controller needs no autograd graph
    meta = export_metadata(ckpt, stochastic, seed, fmt)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream but still supported
            try:
                scripted = torch.jit.script(module)
            except Exception as e:  # a model TorchScript cannot compile is a bug, but say so in one line
                raise FlowmanipError(f"{checkpoint}: TorchScript could not compile the policy: {e}") from None
            with atomic_output(output) as tmp:
                torch.jit.save(scripted, tmp, _extra_files={"meta.json": json.dumps(meta)})
    elif fmt == "onnx":
        if module_cls is DictPolicy or stochastic:
            what = "--stochastic (its seeded noise stream is a TorchScript module's state)" if stochastic else \
                "image policies"
            raise FlowmanipError(f"ONNX export supports deterministic state policies, not {what}; name the output "
                                 "*.pt for TorchScript")
        example = torch.zeros(1, ckpt["spec"]["obs_dim"])
        with atomic_output(output) as tmp:
            torch.onnx.export(module, (example,), tmp, input_names=["obs"], output_names=["action"],
                              dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}}, dynamo=False)
            import onnx

            model = onnx.load(tmp)
            entry = model.metadata_props.add()
            entry.key, entry.value = "meta.json", json.dumps(meta)
            onnx.save(model, tmp)
    else:
        raise FlowmanipError(f"--format must be torchscript or onnx, got {fmt!r}")
    return os.path.abspath(output)
