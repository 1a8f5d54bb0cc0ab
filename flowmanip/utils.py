"""Small helpers used across the package."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Works for files and directories: nothing half-written is ever left at ``path``.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def set_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_for(device: str):
    """The recipe's ``device`` (auto | cpu | cuda) as a torch device: where the networks train."""
    import torch

    from flowmanip.errors import FlowmanipError

    if device == "cuda" and not torch.cuda.is_available():
        raise FlowmanipError("device=cuda but CUDA is not available; use device=auto or cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
