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
from flowmanip.train.stages import policy_from_checkpoint


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


@pytest.fixture(scope="module")
def rgb_ckpt(rgb_demo, tmp_path_factory):
    """A tiny image policy, pretrained then fine-tuned (the whole path a camera policy takes to the arm):
    32x32 camera + proprioception (29 numbers), a small CNN shared by actor and critic."""
    out = tmp_path_factory.mktemp("export_rgb")
    common = [f"data.path={rgb_demo}", f"out_dir={out}", "env.camera_size=32", "policy.cnn_channels=8",
              "policy.hidden_dim=32", "policy.encoder_dim=32", "env.num_eval_envs=1", "env.num_envs=1"]
    run_cli("pretrain", "recipes/pickcube_rgb.yaml", *common, "pretrain.batch_size=16", "pretrain.steps=40",
            "pretrain.eval_every=0", "pretrain.save_every=40")
    run_cli("finetune", "recipes/pickcube_rgb.yaml", *common, "finetune.total_env_steps=48",
            "finetune.learning_starts=32", "finetune.batch_size=16", "finetune.critic_warmup=0",
            "finetune.eval_every=0", "finetune.log_every=48", "finetune.save_every=48", "logging.tensorboard=false")
    return out / "finetune"


@pytest.fixture(scope="module")
def finetune_ckpt(state_ckpt, demo_dir, tmp_path_factory):
    """A tiny fine-tune of the Flow-G state policy: 240 env steps on one env, some 50 SAC Flow updates."""
    out = tmp_path_factory.mktemp("export_finetune")
    run_cli("finetune", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={out}",
            f"finetune.init={state_ckpt / 'checkpoints' / 'last'}", "policy.velocity=gated",
            "policy.hidden_dim=64", "policy.encoder_dim=64", "policy.decoder_dim=32", "env.num_envs=1",
            "env.num_eval_envs=1", "finetune.total_env_steps=240", "finetune.learning_starts=80",
            "finetune.critic_warmup=0", "finetune.batch_size=32", "finetune.utd=2", "finetune.q_hidden_dim=64",
            "finetune.eval_every=0", "finetune.log_every=240", "finetune.save_every=240", "logging.tensorboard=false")
    return out / "finetune"


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


TORCH_ONLY_RGB = TORCH_ONLY.replace("policy(obs)", "policy({'rgb': obs['rgb'], 'state': obs['state']})")


@pytest.mark.parametrize("which", ["state_ckpt", "decoded_ckpt", "finetune_ckpt"])
def test_torchscript_parity_in_a_torch_only_process(which, request, tmp_path):
    state_ckpt = request.getfixturevalue(which)
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "--format", "torchscript", "-o", path)
    ckpt = load_checkpoint(str(state_ckpt))
    policy = policy_from_checkpoint(ckpt)
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
    assert meta["obs_dim"] == 42 and meta["K"] == 4 and meta["H"] == 8
    assert meta["checkpoint_step"] == ckpt["meta"]["step"] == (240 if which == "finetune_ckpt" else 200)
    assert meta["stage"] == ("finetune" if which == "finetune_ckpt" else "pretrain")
    with torch.no_grad():
        expected = policy.act({"state": obs})
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == (16, 8, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if which == "finetune_ckpt":  # the fine-tuned weights, not those it started from
        init = policy_from_checkpoint(load_checkpoint(str(request.getfixturevalue("state_ckpt"))))
        with torch.no_grad():
            assert not torch.allclose(init.act({"state": obs}), got, atol=1e-4)


def test_image_policy_parity_at_training_and_camera_resolutions_in_a_torch_only_process(rgb_ckpt, tmp_path):
    """uint8 HWC frames at the training size give the Policy's actions; a 48x64 camera frame gives the Policy's
    actions on its centre 48x48 crop resized (antialiased bilinear, rounded to uint8) to 32x32."""
    import torch.nn.functional as F

    path = tmp_path / "policy.pt"
    run_cli("export", rgb_ckpt, "-o", path)
    policy = policy_from_checkpoint(load_checkpoint(str(rgb_ckpt)))
    g = torch.Generator().manual_seed(0)
    state = torch.randn(4, 29, generator=g)
    small = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g)
    camera = torch.randint(0, 256, (4, 48, 64, 3), dtype=torch.uint8, generator=g)
    script = tmp_path / "load.py"
    script.write_text(TORCH_ONLY_RGB)
    outputs = {}
    for name, rgb in (("small", small), ("camera", camera)):
        torch.save({"rgb": rgb, "state": state}, tmp_path / f"{name}.pt")
        proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / f"{name}.pt"),
                               str(tmp_path / f"{name}_out.pt")], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs[name] = torch.load(tmp_path / f"{name}_out.pt")
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["obs"]["rgb"]["shape"] == ["B", 32, 32, 3] and meta["obs"]["rgb"]["layout"] == "HWC"
    assert meta["obs"]["rgb"]["channel_order"] == "RGB"
    assert (meta["rgb_height"], meta["rgb_width"], meta["rgb_channels"]) == (32, 32, 3)
    crop = camera[:, :, 8:56].permute(0, 3, 1, 2).float()
    resized = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    resized = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(outputs["small"], policy.act({"rgb": small, "state": state}), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["camera"], policy.act({"rgb": resized, "state": state}), atol=1e-5, rtol=1e-5)
        # a plain crop is not what the module does: the tiny policy barely looks at the image, but its action
        # on the plain crop is further from the module's than the 1e-5 the parity above allows
        plain = policy.act({"rgb": camera[:, 8:40, 16:48], "state": state})
        assert (outputs["camera"] - plain).abs().max() > 2e-5
    bad = subprocess.run([sys.executable, "-c", "import sys, torch; p = torch.jit.load(sys.argv[1]); "
                          "p({'rgb': torch.zeros(1, 32, 32, 4, dtype=torch.uint8), 'state': torch.zeros(1, 29)})",
                          str(path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "[B, H, W, 3]" in bad.stderr  # the channel count still has to match
    tiny = subprocess.run([sys.executable, "-c", "import sys, torch; p = torch.jit.load(sys.argv[1]); "
                           "p({'rgb': torch.zeros(1, 8, 40, 3, dtype=torch.uint8), 'state': torch.zeros(1, 29)})",
                           str(path)], capture_output=True, text=True)
    assert tiny.returncode != 0 and "frames of 8x40 are too small" in tiny.stderr


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


STOCHASTIC_STREAM = r"""
import sys, torch
policy = torch.jit.load(sys.argv[1])
obs = torch.zeros(4, 42)
with torch.no_grad():
    stream = [policy(obs)]
    torch.manual_seed(int(sys.argv[4]))  # the global RNG is not the module's: seeding it changes nothing
    torch.randn(100)
    stream += [policy(obs), policy(obs)]
    torch.save(torch.stack(stream), sys.argv[2])
    policy.reseed(int(sys.argv[3]))  # restarts the stream
    stream.append(policy(obs))
    policy.reseed(int(sys.argv[3]))
    stream.append(policy(obs))
    torch.jit.save(policy, sys.argv[2] + ".mid.pt")  # saved one call in: a reload continues from there
    stream.append(torch.jit.load(sys.argv[2] + ".mid.pt")(obs))
torch.save(torch.stack(stream), sys.argv[2])
assert "flowmanip" not in sys.modules
"""


def test_stochastic_export_is_seeded(state_ckpt, tmp_path):
    """``--stochastic --seed S``: the module seeds its own noise, so two fresh torch-only processes that load the
    file (and never call torch.manual_seed before it) get the same action stream; another seed another one."""
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "--stochastic", "--seed", 3, "-o", path)
    other = tmp_path / "other.pt"
    run_cli("export", state_ckpt, "--stochastic", "--seed", 4, "-o", other)
    extra = {"meta.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["meta.json"])
    assert meta["stochastic"] and meta["seed"] == 3
    script = tmp_path / "stream.py"
    script.write_text(STOCHASTIC_STREAM)

    def stream(policy_file, out, reseed, global_seed):
        proc = subprocess.run([sys.executable, str(script), str(policy_file), str(tmp_path / out), str(reseed),
                               str(global_seed)], capture_output=True, text=True, cwd=tmp_path)
        return proc, torch.load(tmp_path / out)

    (pa, a), (pb, b) = stream(path, "a.pt", 3, 1234), stream(path, "b.pt", 3, 99)
    pc, c = stream(other, "c.pt", 4, 1234)
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=0)  # same file, same stream in two fresh processes
    assert not torch.allclose(c[0], a[0])  # another seed, another stream
    for proc in (pa, pb, pc):
        assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])  # noise, call after call
    assert not torch.allclose(a[0, 0], a[0, 1])  # and across the batch
    torch.testing.assert_close(a[3], a[0], rtol=0, atol=0)  # reseed(3) restarts the seed-3 stream
    torch.testing.assert_close(a[5], a[1], rtol=0, atol=0)  # a module saved mid-stream continues it
    torch.testing.assert_close(c[3], c[0], rtol=0, atol=0)
    deterministic = policy_from_checkpoint(load_checkpoint(str(state_ckpt))).act({"state": torch.zeros(4, 42)})
    assert not torch.allclose(a[0], deterministic)


def test_onnx_refuses_a_stochastic_export(state_ckpt, tmp_path):
    from test_data import _assert_user_error

    _assert_user_error(run_cli("export", state_ckpt, "--stochastic", "-o", tmp_path / "p.onnx", check=False),
                       "--stochastic", "*.pt")
    assert not (tmp_path / "p.onnx").exists()


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


@pytest.fixture(scope="module")
def run_policy_binary(tmp_path_factory):
    """examples/cpp built against the torch wheel's libtorch."""
    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("needs cmake and g++")
    build = tmp_path_factory.mktemp("cpp_build")
    torch_root = os.path.dirname(torch.__file__)
    subprocess.run(["cmake", "-S", os.path.join(REPO, "examples/cpp"), "-B", str(build), f"-DTORCH_ROOT={torch_root}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build / "run_policy"


def first_action(stdout: str) -> list[float]:
    return [float(x) for x in stdout.strip().splitlines()[-1].split(":")[1].split()]


def test_cpp_example_loads_the_policy(state_ckpt, run_policy_binary, tmp_path):
    path = tmp_path / "policy.pt"
    run_cli("export", state_ckpt, "-o", path)
    out = subprocess.run([str(run_policy_binary), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "obs_dim 42 action_dim 4 output [1, 8, 4]" in out.stdout
    expected = torch.jit.load(str(path))(torch.zeros(1, 42))[0, 0]
    np.testing.assert_allclose(first_action(out.stdout), expected.tolist(), atol=1e-5)


def test_cpp_example_runs_an_image_policy_at_a_camera_resolution(rgb_ckpt, run_policy_binary, tmp_path):
    path = tmp_path / "policy.pt"
    run_cli("export", rgb_ckpt, "-o", path)
    out = subprocess.run([str(run_policy_binary), str(path), "48", "64"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rgb input 48x64" in out.stdout and "action_dim 4 output [1, 8, 4]" in out.stdout
    with torch.no_grad():
        h, w, c = torch.arange(48).view(1, 48, 1, 1), torch.arange(64).view(1, 1, 64, 1), torch.arange(3).view(1, 1, 1, 3)
        frame = ((3 * h + 5 * w + 7 * c) % 256).to(torch.uint8)  # the C++ example's synthetic frame
        module = torch.jit.load(str(path))
        expected = module({"rgb": frame, "state": torch.zeros(1, 29)})[0, 0]
        flat = module({"rgb": torch.zeros(1, 48, 64, 3, dtype=torch.uint8), "state": torch.zeros(1, 29)})[0, 0]
    # the frame reaches the action: the tiny policy barely looks at it, but by more than the 1e-5 compared below
    assert (expected - flat).abs().max() > 2e-5
    np.testing.assert_allclose(first_action(out.stdout), expected.tolist(), atol=1e-5)


@pytest.mark.parametrize("which", ["state_ckpt", "finetune_ckpt", "rgb_ckpt"])
def test_exported_policy_in_closed_loop_matches_the_policy_step_by_step(which, request, tmp_path):
    """Along a real rollout driven by the exported module, the checkpoint's Policy gives the same action chunk
    at every decision (the observations the robot actually meets, not random ones); `flowmanip eval` runs
    the checkpoint."""
    from flowmanip.envs import make_vector_env
    from flowmanip.train.evaluate import evaluate_policy

    ckpt_dir = request.getfixturevalue(which)
    path = tmp_path / "policy.pt"
    run_cli("export", ckpt_dir, "-o", path)
    exported = torch.jit.load(str(path))
    ckpt = load_checkpoint(str(ckpt_dir))
    policy = policy_from_checkpoint(ckpt)
    recipe = ckpt["recipe"]
    seen, gaps = [], []

    def act(obs):
        chunk = exported({"rgb": obs["rgb"], "state": obs["state"]} if "rgb" in obs else obs["state"])
        gaps.append((chunk - policy.act(obs)).abs().max().item())
        seen.append(obs["state"].clone())
        return chunk

    env = make_vector_env(recipe.env, 1, "cpu")
    try:
        with torch.no_grad():
            result = evaluate_policy(act, env, 1, recipe.env.max_episode_steps, recipe.policy.chunk, seed=0)
    finally:
        env.close()
    assert len(gaps) == -(-recipe.env.max_episode_steps // recipe.policy.chunk)  # one per decision, all episode
    assert max(gaps) < 1e-5, gaps
    assert all(not torch.allclose(a, b) for a, b in zip(seen, seen[1:]))  # the robot moved between decisions
    via_eval = json.loads(run_cli("eval", ckpt_dir, "--episodes", 1, "--json").stdout.strip().splitlines()[-1])
    assert via_eval["step"] == ckpt["meta"]["step"] and via_eval["episodes"] == 1
    assert via_eval["return_mean"] == pytest.approx(result["return_mean"], abs=1e-3)  # same policy, same seed
