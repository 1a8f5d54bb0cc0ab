"""Export a checkpoint as one file a robot controller loads with nothing but torch (or onnxruntime).

The TorchScript module bakes in the observation normaliser, the encoder, the K-step
rollout, tanh and the mapping to the env's action units. Its metadata is the extra file
``meta.json``: ``torch.jit.load(path, _extra_files={"meta.json": ""})``.

Inputs: state policies take ``obs [B, obs_dim] float32``; RGB policies take a dict
``{"rgb": [B, H, W, C] uint8 (HWC, cameras stacked on C), "state": [B, obs_dim] float32}``.
Output: ``[B, H_chunk, action_dim]`` float32 in env units (``[B, action_dim]`` when H_chunk = 1).
A ``--stochastic`` export draws its noise from its own generator, seeded by ``--seed`` (``meta["seed"]``):
two processes that load the file get the same stream; ``module.reseed(S)`` restarts it from ``S``.
"""

from flowmanip.export.torchscript import export_checkpoint

__all__ = ["export_checkpoint"]
