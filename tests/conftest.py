"""Shared fixtures: a few real ManiSkill demos, made once per test session with ManiSkill's own tools."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)  # the tests' networks are tiny; extra threads only contend with env workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, check=True, timeout=900, env=None):
    """Run ``python -m flowmanip ARGS`` in the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "flowmanip", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"flowmanip {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """4 motion-planning PickCube demos (pd_joint_pos), converted to pd_ee_delta_pos/state with rewards,
    and to robomimic. Real ManiSkill, CPU backend."""
    d = tmp_path_factory.mktemp("demos")
    raw = d / "pick.h5"
    run_cli("demos", "generate", "PickCube-v1", "-n", 4, "--seed-start", 100, "--workers", 2, "-o", raw)
    state = d / "pick_ee.h5"
    run_cli("demos", "replay", raw, "-c", "pd_ee_delta_pos", "-o", "state", "--workers", 2, "--output", state)
    run_cli("demos", "to-robomimic", state, "--output", d / "pick_ee.hdf5")
    return d


@pytest.fixture(scope="session")
def rgb_demo(demo_dir):
    """The same demos with 32x32 camera images + proprioception."""
    out = demo_dir / "pick_rgb.h5"
    run_cli("demos", "replay", demo_dir / "pick.h5", "-c", "pd_ee_delta_pos", "-o", "rgb", "--camera-size", 32,
            "--count", 2, "--output", out)
    return out
