"""Stage directories (``<out_dir>/pretrain``, ``<out_dir>/finetune``) and the policy a checkpoint holds."""

from __future__ import annotations

import os
import shutil

from flowmanip.errors import FlowmanipError
from flowmanip.models.policy import Policy


def policy_from_checkpoint(ckpt: dict, ema: bool = True) -> Policy:
    recipe = ckpt["recipe"]
    policy = Policy(ckpt["spec"], recipe.policy, ckpt["meta"].get("actor", "flow"))
    weights = ckpt["weights"]
    policy.load_state_dict(weights["policy_ema"] if ema and "policy_ema" in weights else weights["policy"])
    return policy.eval()


def prepare_stage_dir(stage_dir: str, resume: bool, overwrite: bool = False) -> None:
    has_ckpt = os.path.isdir(os.path.join(stage_dir, "checkpoints"))
    if resume:
        if not has_ckpt:
            raise FlowmanipError(f"{stage_dir}: nothing to resume (no checkpoints/ there)")
        return
    if has_ckpt and not overwrite:
        raise FlowmanipError(f"{stage_dir}: already holds a run; pass --resume to continue it, --overwrite to "
                             "start again, or out_dir=... for a new run")
    if has_ckpt:
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir, exist_ok=True)
