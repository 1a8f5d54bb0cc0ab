"""How a fine-tune starts: the from-scratch observation normaliser, and the random stream of a resumed run."""

from __future__ import annotations

import json

import torch

from conftest import run_cli
from flowmanip.train.checkpoint import rng_state
from flowmanip.train.finetune_setup import seed_sampling


def test_a_resumed_run_continues_its_saved_random_stream():
    torch.manual_seed(123)
    torch.rand(5)
    saved = rng_state()
    expected = torch.rand(8)
    torch.manual_seed(999)  # whatever happened in between (the weights' initialisation, env set-up)
    seed_sampling(0, 0, 4000, saved)
    torch.testing.assert_close(torch.rand(8), expected)
    seed_sampling(0, 0, 4000, None)  # a new run: a stream set by seed, rank and step, not the saved one
    fresh = torch.rand(8)
    seed_sampling(0, 1, 4000, None)
    assert not torch.equal(fresh, expected) and not torch.equal(torch.rand(8), fresh)


def test_from_scratch_normaliser_comes_from_the_collected_states(tmp_path):
    """No demos, no random warm-up: the observation statistics must come from the first learning_starts env
    steps, not from the reset states, where joint velocities are all 0 and their std would sit at the clamp."""
    run_cli("finetune", "recipes/pushcube_scratch.yaml", f"out_dir={tmp_path}", "finetune.random_warmup=0",
            "finetune.learning_starts=160", "finetune.total_env_steps=192", "finetune.batch_size=32",
            "finetune.eval_every=0", "finetune.save_every=192", "finetune.log_every=96", "policy.hidden_dim=32",
            "finetune.q_hidden_dim=32", "env.num_envs=2")
    spec = json.loads((tmp_path / "finetune/checkpoints/last/spec.json").read_text())
    std = spec["obs_std"]
    # the state starts with the arm's 9 joint positions and 9 joint velocities; at reset the velocities are all 0,
    # so statistics from the reset states put every one of them at the 1e-3 clamp
    assert min(std[9:18]) > 1e-2, std[9:18]
    # what stays at the clamp is what never moves here (the resting cube's height and orientation, the goal's height)
    assert sum(s <= 1.001e-3 for s in std) <= 8, std
