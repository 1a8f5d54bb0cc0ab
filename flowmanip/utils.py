"""Small helpers used across the package."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def check_output_dir(path: str, what: str = "out_dir") -> None:
    """``path`` can become a directory: no part of it is an existing file (checked before any work)."""
    from flowmanip.errors import FlowmanipError

    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):  # e.g. out_dir=policy.pt
        raise FlowmanipError(f"{parent}: is a file; {what} must be a directory (or a path that does not exist yet)")


def check_output_file(path: str) -> None:
    """Refuse an output path that is an existing directory, or lies below a file (before any work is done)."""
    from flowmanip.errors import FlowmanipError

    if os.path.isdir(path):
        raise FlowmanipError(f"{path} is a directory; expected the path of a file to write")
    check_output_dir(os.path.dirname(path) or ".", "the output's folder")


@contextlib.contextmanager
def atomic_output(path: str, replace_dir: bool = False):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Works for files and directories: nothing half-written is ever left at ``path``. An existing
    directory at ``path`` is replaced only when ``replace_dir`` (checkpoints); otherwise it is an
    error raised before any work, so a mistyped output path never deletes a folder.
    """
    path = os.path.abspath(path)
    if not replace_dir:
        check_output_file(path)
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


def to_device(batch: dict, device) -> dict:
    """``batch`` with every tensor moved to ``device``, nested dicts (observations) included."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}
