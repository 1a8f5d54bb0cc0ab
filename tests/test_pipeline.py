"""End-to-end runs of every recipe with tiny budgets on real ManiSkill (CPU backend), plus kill/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import imageio
import pytest
import torch

from conftest import REPO, run_cli
from flowmanip.train.checkpoint import load_checkpoint

TINY_PRETRAIN = ["pretrain.steps=300", "pretrain.log_every=50", "pretrain.eval_every=300", "pretrain.eval_episodes=2",
                 "pretrain.save_every=300", "policy.hidden_dim=64", "policy.encoder_dim=64", "env.num_eval_envs=2"]
TINY_FINETUNE = ["finetune.total_env_steps=480", "finetune.learning_starts=160", "finetune.batch_size=32",
                 "finetune.log_every=160", "finetune.eval_every=480", "finetune.eval_episodes=2",
                 "finetune.save_every=480", "finetune.utd=2", "env.num_envs=2", "finetune.critic_warmup=0"]


def metrics(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_pickcube_pretrain_eval_finetune(demo_dir, tmp_path):
    out = tmp_path / "run"
    data = f"data.path={demo_dir / 'pick_ee.h5'}"
    run_cli("pretrain", "recipes/pickcube.yaml", data, f"out_dir={out}", *TINY_PRETRAIN)
    stage = out / "pretrain"
    for name in ("config.yaml", "metrics.jsonl", "learning_curve.png", "checkpoints/last/model.safetensors",
                 "checkpoints/last/training_state.pt"):
        assert (stage / name).exists(), name
    assert list((stage / "tensorboard").iterdir())
    rows = [r for r in metrics(stage) if "loss" in r]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # flow matching learns
    meta = json.loads((stage / "checkpoints/last/meta.json").read_text())
    assert meta["env_id"] == "PickCube-v1" and meta["control_mode"] == "pd_ee_delta_pos"
    assert meta["obs_dim"] == 42 and meta["action_dim"] == 4 and meta["step"] == 300
    per_episode = tmp_path / "episodes.json"
    videos = tmp_path / "videos"
    result = json.loads(run_cli("eval", stage, "--episodes", 3, "--json", "--per-episode", per_episode,
                                "--video", videos).stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in videos.iterdir()) == ["seed0.mp4", "seed1.mp4", "seed2.mp4"]  # not the padding
    assert all(p.stat().st_size > 1000 for p in videos.iterdir())
    assert set(result) >= {"success_once", "success_at_end", "return_mean", "episodes", "failed_seeds"}
    assert result["episodes"] == 3 and 0 <= result["success_once"] <= 1 and result["videos"] == str(videos)
    # 3 episodes on 2 eval envs: two rounds, the fourth episode dropped; the records add up to the means
    episodes = json.loads(per_episode.read_text())["per_episode"]
    assert [e["seed"] for e in episodes] == [0, 1, 2]
    assert sum(e["success_once"] for e in episodes) / 3 == pytest.approx(result["success_once"])
    assert sum(e["return"] for e in episodes) / 3 == pytest.approx(result["return_mean"])
    assert result["failed_seeds"] == [e["seed"] for e in episodes if not e["success_once"]]

    # the noise-augmented rollout: with a vanishing sigma it is the deterministic one, with a large one it is not
    quiet, loud = (json.loads(run_cli("eval", stage, "--episodes", 3, "--json", "--sigma", sigma)
                              .stdout.strip().splitlines()[-1]) for sigma in (1e-6, 3.0))
    assert quiet["stochastic"] and quiet["sigma"] == 1e-6
    assert quiet["return_mean"] == pytest.approx(result["return_mean"], rel=1e-2)
    assert loud["return_mean"] != pytest.approx(result["return_mean"], rel=1e-2)
    # more Euler steps of the same field at inference: another deterministic rollout; K < 1 is refused
    # (and a file of the checkpoint works as CKPT too)
    fine = json.loads(run_cli("eval", stage / "checkpoints/last/model.safetensors", "--episodes", 3, "--json",
                              "--flow-steps", 16).stdout.strip().splitlines()[-1])
    assert fine["flow_steps"] == 16 and "stochastic" not in fine
    assert fine["return_mean"] != pytest.approx(result["return_mean"], rel=1e-4)
    wrong = run_cli("eval", stage, "--flow-steps", 0, check=False)
    assert wrong.returncode != 0 and "--flow-steps must be >= 1, got 0" in wrong.stderr

    # fine-tune from that checkpoint (the recipe's default init) and check the critic learns
    # with its own rollout noise: sigma is a fine-tune setting, the pretrain checkpoint's (0.1) must not override it
    done = run_cli("finetune", "recipes/pickcube.yaml", data, f"out_dir={out}", *TINY_PRETRAIN, *TINY_FINETUNE,
                   "policy.sigma=0.05")
    stage = out / "finetune"
    assert f"finetune done: checkpoint {stage / 'checkpoints' / 'last'}" in done.stdout, done.stdout
    assert f"starting from {os.path.realpath(out / 'pretrain' / 'checkpoints')}" in done.stderr
    rows = metrics(stage)
    sigmas = [r["sigma"] for r in rows if "sigma" in r]
    assert sigmas and all(v == pytest.approx(0.05) for v in sigmas), sigmas
    evals = [r for r in rows if "eval/success_once" in r]
    assert [r["step"] for r in evals] == [0, 480]
    logged = [r for r in rows if "critic_loss" in r]
    assert logged and all(k in logged[-1] for k in ("q_mean", "alpha", "entropy_estimate", "sigma", "grad_A0",
                                                    "grad_A3", "env_steps_per_s", "updates_per_s"))
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["env_steps"] >= 480 and summary["updates"] > 0
    assert json.loads((stage / "checkpoints/last/meta.json").read_text())["init"].endswith("pretrain/checkpoints/300")


def test_finetune_improves_q_fit(demo_dir, tmp_path):
    """In-process: a short offline-to-online run; the critic's TD error falls as it fits the returns."""
    from flowmanip.train.finetune import run_finetune

    summary = run_finetune("recipes/pickcube.yaml", [
        f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={tmp_path}", "finetune.init=none",
        "finetune.total_env_steps=640", "finetune.learning_starts=160", "finetune.batch_size=64",
        "finetune.log_every=160", "finetune.eval_every=640", "finetune.eval_episodes=2", "finetune.utd=8",
        "finetune.critic_warmup=0",
        "policy.hidden_dim=64", "policy.encoder_dim=64", "finetune.q_hidden_dim=64", "logging.tensorboard=false"])
    rows = [r for r in metrics(tmp_path / "finetune") if "critic_loss" in r]
    assert len(rows) >= 3
    assert rows[-1]["critic_loss"] < 0.5 * rows[0]["critic_loss"], [r["critic_loss"] for r in rows]
    assert summary["final_eval"]["episodes"] == 2
    # the loop's update count, replayed independently: every iteration steps each of the 2 envs one
    # chunk (H = 8 actions, 4 at the 100-step episode end), and once learning_starts env steps are in,
    # runs utd updates per env
    steps, t, updates = 0, 0, 0
    while steps < 640:
        k = min(8, 100 - t)
        t = (t + k) % 100
        steps += 2 * k
        updates += 8 * 2 if steps >= 160 else 0
    assert summary["env_steps"] == steps and summary["updates"] == updates == 528


def test_gaussian_baseline_pretrain_and_finetune(demo_dir, tmp_path):
    """The Gaussian-SAC baseline: Gaussian behaviour cloning, then the same fine-tune loop from it."""
    data = f"data.path={demo_dir / 'pick_ee.h5'}"
    gauss = ["policy.actor=gaussian", f"out_dir={tmp_path}"]
    run_cli("pretrain", "recipes/pickcube.yaml", data, *gauss, *TINY_PRETRAIN)
    rows = [r for r in metrics(tmp_path / "pretrain") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]  # NLL per dim falls
    assert json.loads((tmp_path / "pretrain/checkpoints/last/meta.json").read_text())["actor"] == "gaussian"
    wrong = run_cli("eval", tmp_path / "pretrain", "--sigma", 0.1, check=False)
    assert wrong.returncode != 0 and "--sigma needs a flow policy" in wrong.stderr
    wrong = run_cli("eval", tmp_path / "pretrain", "--flow-steps", 8, check=False)
    assert wrong.returncode != 0 and "--flow-steps needs a flow policy" in wrong.stderr
    # a flow fine-tune refuses the Gaussian checkpoint before any env starts
    wrong = run_cli("finetune", "recipes/pickcube.yaml", data, f"out_dir={tmp_path}", *TINY_PRETRAIN[-3:],
                    check=False)
    assert wrong.returncode != 0 and "init checkpoint has policy.actor='gaussian'" in wrong.stderr
    run_cli("finetune", "recipes/pickcube.yaml", data, *gauss, *TINY_PRETRAIN[-3:], *TINY_FINETUNE)
    logged = [r for r in metrics(tmp_path / "finetune") if "critic_loss" in r]
    assert logged and "grad_A0" not in logged[-1]  # no flow states to differentiate
    assert any("eval/success_once" in r for r in metrics(tmp_path / "finetune"))


def test_rgb_recipe_pretrain_and_finetune(rgb_demo, tmp_path):
    common = [f"data.path={rgb_demo}", f"out_dir={tmp_path}", "env.camera_size=32", "policy.cnn_channels=8",
              "env.num_eval_envs=1", "pretrain.batch_size=16"]
    run_cli("pretrain", "recipes/pickcube_rgb.yaml", *common, *TINY_PRETRAIN[:1], "pretrain.steps=40",
            "pretrain.eval_every=40", "pretrain.eval_episodes=1", "pretrain.log_every=10", "pretrain.save_every=40",
            "policy.hidden_dim=32", "policy.encoder_dim=32")
    meta = json.loads((tmp_path / "pretrain/checkpoints/last/meta.json").read_text())
    assert meta["rgb_shape"] == [32, 32, 3] and meta["obs_dim"] == 29
    # the video shows the (square) render view and, right of it, the 32x32 camera image scaled to its height
    run_cli("eval", tmp_path / "pretrain", "--episodes", 1, "--num-envs", 1, "--video", tmp_path / "videos")
    frames = imageio.v3.imread(tmp_path / "videos/seed0.mp4")
    assert frames.ndim == 4 and frames.shape[2] == 2 * frames.shape[1], frames.shape
    run_cli("finetune", "recipes/pickcube_rgb.yaml", *common, "policy.hidden_dim=32", "policy.encoder_dim=32",
            "finetune.total_env_steps=64", "finetune.learning_starts=32", "finetune.batch_size=16",
            "finetune.critic_warmup=0", "finetune.log_every=32", "finetune.eval_every=64", "finetune.eval_episodes=1",
            "finetune.save_every=64", "env.num_envs=1")
    rows = metrics(tmp_path / "finetune")
    assert any("critic_loss" in r for r in rows) and any("eval/success_once" in r for r in rows)


def test_pushcube_scratch_recipe(tmp_path):
    run_cli("finetune", "recipes/pushcube_scratch.yaml", f"out_dir={tmp_path}", "finetune.total_env_steps=256",
            "finetune.random_warmup=64", "finetune.learning_starts=64", "finetune.batch_size=32",
            "finetune.log_every=64", "finetune.eval_every=256", "finetune.eval_episodes=2",
            "finetune.save_every=256", "policy.hidden_dim=64", "policy.encoder_dim=64")
    ckpt = load_checkpoint(str(tmp_path / "finetune"))
    assert ckpt["meta"]["env_id"] == "PushCube-v1" and ckpt["meta"]["init"] is None
    # obs statistics came from the random warm-up, not the identity placeholder
    assert ckpt["spec"]["obs_std"] != [1.0] * ckpt["spec"]["obs_dim"]
    # the learned noise scale is logged, inside its bounds
    rows = [json.loads(line) for line in open(tmp_path / "finetune/metrics.jsonl")]
    sigmas = [r["sigma"] for r in rows if "sigma" in r]
    assert sigmas and all(0.0 < s <= 1.0 for s in sigmas), sigmas


def _kill_when(proc, path, timeout=300):
    start = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "flowmanip", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _assert_continuous(steps, every, last):
    assert steps == list(range(every, last + 1, every)), steps


def test_pretrain_resume_after_kill(demo_dir, tmp_path):
    args = ["pretrain", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={tmp_path}",
            "pretrain.steps=1500", "pretrain.save_every=100", "pretrain.log_every=50", "pretrain.eval_every=0",
            "policy.hidden_dim=64", "policy.encoder_dim=64", "env.num_eval_envs=1"]
    _kill_when(_popen(*args), tmp_path / "pretrain/checkpoints/200/model.safetensors")
    last = int(os.readlink(tmp_path / "pretrain/checkpoints/last"))
    assert 200 <= last < 1500
    run_cli(*args, "--resume")
    steps = [r["step"] for r in metrics(tmp_path / "pretrain") if "loss" in r]
    _assert_continuous(steps, 50, 1500)  # nothing lost, nothing repeated


def test_finetune_resume_after_kill(demo_dir, tmp_path):
    args = ["finetune", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={tmp_path}",
            "finetune.init=none", "finetune.total_env_steps=4000", "finetune.learning_starts=160",
            "finetune.batch_size=32", "finetune.log_every=160", "finetune.eval_every=0", "finetune.save_every=320",
            "finetune.save_buffer=true", "policy.hidden_dim=64", "policy.encoder_dim=64", "finetune.q_hidden_dim=64"]
    _kill_when(_popen(*args), tmp_path / "finetune/checkpoints/last")
    first = torch.load(tmp_path / "finetune/checkpoints/last/training_state.pt", weights_only=True)
    assert first["counters"]["env_steps"] >= 320 and len(first["buffer"]["action"]) > 0
    run_cli(*args, "--resume")
    rows = [r for r in metrics(tmp_path / "finetune") if "critic_loss" in r or "alpha" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] >= 4000  # continues, no repeats
    final = torch.load(tmp_path / "finetune/checkpoints/last/training_state.pt", weights_only=True)
    assert final["counters"]["updates"] > first["counters"]["updates"]


def test_accelerate_two_processes_keep_identical_parameters(demo_dir, tmp_path):
    """Real multi-process training on the CPU: `accelerate launch --multi_gpu` falls back to gloo (MULTI_CPU) when
    there is no GPU, so this is the multi-GPU code path minus the devices, which CI cannot have."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowmanip", "finetune", "recipes/pickcube.yaml",
           f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={tmp_path}", "finetune.init=none",
           "finetune.total_env_steps=640", "finetune.learning_starts=160", "finetune.batch_size=32",
           "finetune.log_every=320", "finetune.eval_every=640", "finetune.eval_episodes=1", "env.num_envs=1",
           "env.num_eval_envs=1", "policy.hidden_dim=64", "policy.encoder_dim=64", "finetune.q_hidden_dim=64",
           "finetune.critic_warmup=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "finetune/summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["updates"] > 0
    assert summary["param_max_abs_diff_across_ranks"] == 0.0


def test_finetune_resume_without_buffer_collects_before_updating(demo_dir, tmp_path):
    """A checkpoint saved without its replay buffer restarts with an empty one: the resumed run must collect
    learning_starts new env steps before its first update, not replay a handful of transitions over and over."""
    args = ["finetune", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}", f"out_dir={tmp_path}",
            "finetune.init=none", "finetune.learning_starts=320", "finetune.batch_size=32", "finetune.log_every=80",
            "finetune.eval_every=640", "finetune.eval_episodes=1", "env.num_eval_envs=1", "finetune.save_every=640",
            "finetune.save_buffer=false", "env.num_envs=2", "policy.hidden_dim=64", "policy.encoder_dim=64",
            "finetune.q_hidden_dim=64", "finetune.critic_warmup=0"]
    run_cli(*args, "finetune.total_env_steps=640")
    first = torch.load(tmp_path / "finetune/checkpoints/last/training_state.pt", weights_only=True)
    assert "buffer" not in first and first["counters"]["updates"] > 0
    proc = run_cli(*args, "finetune.total_env_steps=1280", "--resume")
    assert "empty replay buffer" in proc.stderr  # the user is told why updates pause
    evals = [e["env_steps"] for e in json.loads((tmp_path / "finetune/summary.json").read_text())["evals"]]
    assert evals[0] == 0 and evals[-1] >= 1280 and len(evals) == len(set(evals)) >= 3  # the whole run's evaluations
    start, done = first["counters"]["env_steps"], first["counters"]["updates"]
    resumed = [(r["step"], r["updates"]) for r in metrics(tmp_path / "finetune")
               if r["step"] > start and "updates" in r]
    waiting = [u for step, u in resumed if step < start + 320]
    assert len(waiting) >= 2 and all(u == done for u in waiting)  # fewer than learning_starts new steps: no update
    assert resumed[-1][0] >= 1280 and resumed[-1][1] > done  # and it learns again once they are collected


@pytest.mark.parametrize("learn_padding", [False, True])
def test_pretraining_masks_the_padding_past_an_episode_end_unless_asked_to_learn_it(tmp_path, monkeypatch,
                                                                                     learn_padding):
    """In-process, a few pretraining steps on 3 shipped demos: every flow-matching loss the loop computes gets
    the per-dimension action mask. With data.learn_padding=false its false entries are exactly the chunk steps
    past an episode's end (the padding that repeats the last action); with true (the default) it is all true,
    so BC learns to hold the last action once the demo is over."""
    from flowmanip.models.flow_policy import FlowActor
    from flowmanip.train.pretrain import run_pretrain

    calls = []
    original = FlowActor.flow_matching_loss

    def spy(self, z, action, mask=None):
        calls.append((action.detach().clone(), None if mask is None else mask.detach().clone()))
        return original(self, z, action) if mask is None else original(self, z, action, mask)

    monkeypatch.setattr(FlowActor, "flow_matching_loss", spy)
    run_pretrain("recipes/pickcube.yaml", [
        "data.max_episodes=3", f"out_dir={tmp_path}", "pretrain.steps=3", "pretrain.log_every=1",
        "pretrain.eval_every=0", "pretrain.save_every=3", "policy.hidden_dim=32", "env.num_eval_envs=1",
        "logging.tensorboard=false", f"data.learn_padding={str(learn_padding).lower()}"])
    assert len(calls) == 3
    padded_rows = 0
    for action, mask in calls:
        assert mask is not None and mask.shape == action.shape == (256, 8 * 4)
        steps = mask.reshape(256, 8, 4)
        if learn_padding:
            assert steps.all()
            continue
        assert steps.all(-1).eq(steps.any(-1)).all()  # whole chunk steps, all 4 action dims alike
        real = steps[:, :, 0]
        n = real.sum(1)
        assert n.min() >= 1 and torch.equal(real, torch.arange(8)[None, :] < n[:, None])  # a prefix of the chunk
        chunks = action.reshape(256, 8, 4)
        for i in (n < 8).nonzero().flatten().tolist():  # the masked steps are the padding: the last real action
            assert torch.equal(chunks[i, n[i]:], chunks[i, n[i] - 1].expand(8 - int(n[i]), 4))
        padded_rows += int((n < 8).sum())
    assert padded_rows > 0 or learn_padding  # 21 of the ~230 windows of 3 episodes run past the end
