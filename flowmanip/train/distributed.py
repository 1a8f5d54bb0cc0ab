"""Keeping several learner processes identical: gradients averaged before each optimiser step,
parameters broadcast once at the start, and a check at the end that they never drifted."""

from __future__ import annotations

import torch


def gradient_averager(accelerator):
    """A ``grad_sync`` for ``SACFlow``: the all-reduce DDP would do, over one flat tensor; None for one process."""
    if accelerator.num_processes == 1:
        return None

    def average(params) -> None:
        params = [p for p in params if p.grad is not None]
        flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    return average


def broadcast_parameters(accelerator, module) -> None:
    """Give every process the main process's parameters and buffers."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def max_parameter_drift(accelerator, module, device) -> float:
    """Largest difference of any parameter between a process and the main one (0 when in sync)."""
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(device)
    gathered = accelerator.gather(flat[None]).reshape(accelerator.num_processes, -1)
    return float((gathered - gathered[0:1]).abs().max())
