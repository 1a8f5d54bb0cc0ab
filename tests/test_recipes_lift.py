"""The lift recipes (PickCube from 10 demos, StackCube) and the frozen-flow baselines, end to end on tiny budgets
with the shipped datasets and real ManiSkill (CPU backend)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from flowmanip.train.checkpoint import load_checkpoint
from flowmanip.train.stages import policy_from_checkpoint
from test_pipeline import TINY_FINETUNE, TINY_PRETRAIN, metrics


@pytest.mark.parametrize("recipe,env_id", [("recipes/pickcube_10demos.yaml", "PickCube-v1"),
                                           ("recipes/stackcube.yaml", "StackCube-v1")])
def test_lift_recipe_pretrain_then_finetune(tmp_path, recipe, env_id):
    run_cli("pretrain", recipe, f"out_dir={tmp_path}", *TINY_PRETRAIN)
    meta = json.loads((tmp_path / "pretrain/checkpoints/last/meta.json").read_text())
    assert meta["env_id"] == env_id and meta["max_episode_steps"] == (220 if env_id == "StackCube-v1" else 100)
    run_cli("finetune", recipe, f"out_dir={tmp_path}", *TINY_PRETRAIN[-3:], *TINY_FINETUNE)
    summary = json.loads((tmp_path / "finetune/summary.json").read_text())
    assert summary["updates"] > 0 and summary["final_eval"]["episodes"] == 2
    assert any("actor_loss" in r for r in metrics(tmp_path / "finetune"))


@pytest.mark.parametrize("actor", ["residual", "noise"])
def test_frozen_flow_baselines_finetune_from_a_flow_pretrain(tmp_path, actor):
    recipe = "recipes/pickcube_10demos.yaml"
    run_cli("pretrain", recipe, f"out_dir={tmp_path}", *TINY_PRETRAIN)
    run_cli("finetune", recipe, f"out_dir={tmp_path}", f"policy.actor={actor}", "finetune.bc_weight=0",
            *TINY_PRETRAIN[-3:], *TINY_FINETUNE)
    meta = json.loads((tmp_path / "finetune/checkpoints/last/meta.json").read_text())
    assert meta["actor"] == actor
    result = json.loads(run_cli("eval", tmp_path / "finetune", "--episodes", 2, "--json").stdout.strip().splitlines()[-1])
    assert result["episodes"] == 2
    # the export bakes the frozen flow and the SAC policy into one module that acts as the checkpoint does
    run_cli("export", tmp_path / "finetune", "-o", tmp_path / "policy.pt")
    extra = {"meta.json": ""}
    module = torch.jit.load(str(tmp_path / "policy.pt"), _extra_files=extra)
    assert json.loads(extra["meta.json"])["actor"] == actor
    policy = policy_from_checkpoint(load_checkpoint(str(tmp_path / "finetune")))
    state = torch.randn(5, meta["obs_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module(state), policy.act({"state": state}), atol=1e-5, rtol=1e-5)
    # a BC term cannot train a frozen policy: refused, naming the setting
    bad = run_cli("finetune", recipe, f"out_dir={tmp_path / 'bad'}", f"policy.actor={actor}", check=False)
    assert bad.returncode == 2 and "finetune.bc_weight=0" in bad.stderr
