"""Export: a torch-only process reproduces the eager policy; C++ loads it; closed-loop success matches eval."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from flowmanip.train.checkpoint import load_checkpoint
from flowmanip.train.pretrain import policy_from_checkpoint


def _pretrained(velocity, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"export_{velocity}")
    run_cli("pretrain", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={out}",
            f"policy.velocity={velocity}", "pretrain.steps=200", "pretrain.eval_every=0", "pretrain.save_every=200",
            "policy.hidden_dim=64", "policy.encoder_dim=64", "policy.decoder_dim=32", "env.num_eval_envs=1")
    return out / "pretrain"


@pytest.fixture(scope="module")
def state_ckpt(demo_dir, tmp_path_factory):
    """A tiny Flow-G state policy."""
    return _pretrained("gated", demo_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def decoded_ckpt(demo_dir, tmp_path_factory):
    """A tiny Flow-T state policy (Transformer-decoder layers must script too)."""
    return _pretrained("decoded", demo_dir, tmp_path_factory)


TORCH_ONLY = r"""
import sys, json, torch
extra = {"meta.json": ""}
policy = torch.jit.load(sys.argv[1], _extra_files=extra)
obs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(policy(obs), sys.argv[3])
assert "flowmanip" not in sys.modules
meta = extra["meta.json"]
print(meta.decode() if isinstance(meta, bytes) else meta)  # torch returns bytes
"""


@pytest.mark.parametrize("which", ["state_ckpt", "decoded_ckpt"])
def test_torchscript_parity_in_a_torch_only_process(which, request, tmp_path):
    state_ckpt = request.getfixturevalue(which)
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "--format", "torchscript", "-o", path)
    policy = policy_from_checkpoint(load_checkpoint(str(state_ckpt)))
    obs = torch.randn(16, 42) * 2
    torch.save(obs, tmp_path / "obs.pt")
    script = tmp_path / "load.py"
    script.write_text(TORCH_ONLY)
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "obs.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("env_id", "control_mode", "obs_dim", "action_dim", "action_low", "action_high", "K", "H",
                "flowmanip_version", "checkpoint_step"):
        assert key in meta, key
    assert meta["obs_dim"] == 42 and meta["K"] == 4 and meta["H"] == 8 and meta["checkpoint_step"] == 200
    with torch.no_grad():
        expected = policy.act({"state": obs})
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == (16, 8, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_exported_module_rejects_bad_input(state_ckpt, tmp_path):
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "-o", path)
    policy = torch.jit.load(str(path))
    with pytest.raises(Exception, match=r"\[B, 42\]"):
        policy(torch.zeros(1, 41))
    with pytest.raises(Exception, match="float32"):
        policy(torch.zeros(1, 42, dtype=torch.float64))
    assert not policy(torch.zeros(1, 42)).requires_grad  # a controller's call builds no autograd graph
    proc = run_cli("eval", path, check=False)  # the exported file is not a checkpoint: say so
    assert proc.returncode == 2 and "is an exported policy (TorchScript)" in proc.stderr, proc.stderr


def test_export_format_follows_the_file_name(state_ckpt, tmp_path):
    from test_data import _assert_user_error

    pytest.importorskip("onnx")
    run_cli("export", state_ckpt, "-o", tmp_path / "policy.onnx")
    assert (tmp_path / "policy.onnx").read_bytes()[:4] != b"PK\x03\x04"  # ONNX protobuf, not a TorchScript zip
    _assert_user_error(run_cli("export", state_ckpt, "--format", "torchscript", "-o", tmp_path / "p.onnx",
                               check=False), "p.onnx", "*.pt")
    _assert_user_error(run_cli("export", state_ckpt, "--seed", 3, "-o", tmp_path / "p.pt", check=False),
                       "--stochastic")
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "p.pt").exists()


def test_stochastic_export_is_seeded(state_ckpt, tmp_path):
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "--stochastic", "--seed", 3, "-o", path)
    extra = {"meta.json": ""}
    policy = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["meta.json"])
    assert meta["stochastic"] and meta["seed"] == 3
    obs = torch.zeros(4, 42)
    torch.manual_seed(meta["seed"])
    a = policy(obs)
    torch.manual_seed(meta["seed"])
    torch.testing.assert_close(policy(obs), a)
    assert not torch.allclose(policy(obs), a)


def test_onnx_export_matches_onnxruntime(state_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "policy.onnx"
    run_cli("export", state_ckpt, "--format", "onnx", "-o", path)
    policy = policy_from_checkpoint(load_checkpoint(str(state_ckpt)))
    obs = torch.randn(5, 42)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {"obs": obs.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, policy.act({"state": obs}).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("g++")), reason="needs cmake and g++")
def test_cpp_example_loads_the_policy(state_ckpt, tmp_path):
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "-o", path)
    build = tmp_path / "build"
    torch_root = os.path.dirname(torch.__file__)
    subprocess.run(["cmake", "-S", os.path.join(REPO, "examples/cpp"), "-B", str(build), f"-DTORCH_ROOT={torch_root}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = subprocess.run([str(build / "run_policy"), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "obs_dim 42 action_dim 4 output [1, 8, 4]" in out.stdout
    values = [float(x) for x in out.stdout.strip().splitlines()[-1].split(":")[1].split()]
    expected = torch.jit.load(str(path))(torch.zeros(1, 42))[0, 0]
    np.testing.assert_allclose(values, expected.tolist(), atol=1e-5)


def test_exported_policy_in_closed_loop_matches_eval(state_ckpt, tmp_path):
    from flowmanip.envs import make_vector_env
    from flowmanip.train.evaluate import evaluate_policy

    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "-o", path)
    exported = torch.jit.load(str(path))
    ckpt = load_checkpoint(str(state_ckpt))
    recipe = ckpt["recipe"]
    via_eval = json.loads(run_cli("eval", state_ckpt, "--episodes", 2, "--json").stdout.strip().splitlines()[-1])
    env = make_vector_env(recipe.env, 2, "cpu")
    try:
        with torch.no_grad():
            result = evaluate_policy(lambda obs: exported(obs["state"]), env, 2, recipe.env.max_episode_steps,
                                     recipe.policy.chunk, seed=0)
    finally:
        env.close()
    assert result["success_once"] == via_eval["success_once"]
    assert result["success_at_end"] == via_eval["success_at_end"]
    assert result["return_mean"] == pytest.approx(via_eval["return_mean"], abs=1e-3)
