"""Demo generation, conversion, loading and inspection on real ManiSkill files."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from flowmanip.data import read_dataset, read_maniskill, read_robomimic
from flowmanip.data.samples import DemoSamples, normalization_stats


def test_generated_demos_are_successful_maniskill_files(demo_dir):
    info = json.loads((demo_dir / "pick.json").read_text())
    assert info["env_info"]["env_id"] == "PickCube-v1"
    assert len(info["episodes"]) == 4
    assert all(ep["success"] for ep in info["episodes"])
    assert all(ep["control_mode"] == "pd_joint_pos" for ep in info["episodes"])
    with h5py.File(demo_dir / "pick.h5") as f:
        assert f["traj_0/actions"].shape[1] == 8  # 7 joints + gripper


def test_converted_demos_load_with_values_from_the_source(demo_dir):
    meta, episodes = read_maniskill(str(demo_dir / "pick_ee.h5"))
    assert (meta.env_id, meta.control_mode, meta.obs_mode, meta.reward_mode) == (
        "PickCube-v1", "pd_ee_delta_pos", "state", "normalized_dense")
    assert len(episodes) == 4
    with h5py.File(demo_dir / "pick_ee.h5") as f:
        for i, ep in enumerate(episodes):
            g = f[f"traj_{i}"]
            np.testing.assert_array_equal(ep.actions, g["actions"][()])
            np.testing.assert_array_equal(ep.obs["state"], g["obs"][()])
            np.testing.assert_array_equal(ep.rewards, g["rewards"][()])
            assert ep.actions.shape[1] == 4 and ep.obs["state"].shape == (ep.length + 1, 42)
            assert ep.success[-1]
            assert 0 <= ep.rewards.min() and ep.rewards.max() <= 1  # normalized_dense


def test_robomimic_round_trip_and_robomimic_reads_it(demo_dir):
    _, ms = read_maniskill(str(demo_dir / "pick_ee.h5"))
    meta, rm = read_robomimic(str(demo_dir / "pick_ee.hdf5"))
    assert (meta.env_id, meta.control_mode, meta.obs_mode) == ("PickCube-v1", "pd_ee_delta_pos", "state")
    for a, b in zip(ms, rm):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.obs["state"], b.obs["state"])
        np.testing.assert_array_equal(a.rewards, b.rewards)
    # robomimic's own dataset class reads the file we wrote
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    ObsUtils.initialize_obs_modality_mapping_from_dict({"low_dim": ["state"]})
    ds = SequenceDataset(hdf5_path=str(demo_dir / "pick_ee.hdf5"), obs_keys=["state"],
                         dataset_keys=["actions", "rewards", "dones"], seq_length=8, pad_seq_length=True,
                         hdf5_cache_mode=None, hdf5_use_swmr=False)
    assert len(ds) == sum(e.length for e in ms)
    item = ds[0]
    assert item["actions"].shape == (8, 4)
    np.testing.assert_allclose(item["actions"], ms[0].actions[:8])


def test_samples_windows_chunks_rewards_and_next_obs(demo_dir):
    _, episodes = read_dataset(str(demo_dir / "pick_ee.h5"))
    H, gamma = 4, 0.9
    s = DemoSamples(episodes, H, gamma)
    assert len(s) == sum(e.length for e in episodes)
    ep = episodes[0]
    T = ep.length
    b = s.get(np.array([0, T - 2]))
    np.testing.assert_array_equal(b["action"][0].numpy(), ep.actions[:H])
    np.testing.assert_allclose(b["reward"][0].item(), sum(gamma ** i * ep.rewards[i] for i in range(H)), rtol=1e-5)
    np.testing.assert_array_equal(b["next_obs"]["state"][0].numpy(), ep.obs["state"][H])
    # the last window runs off the end: 2 real steps, padding repeats the last action
    assert b["action_mask"][1].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(b["action"][1, 2].numpy(), ep.actions[-1])
    assert b["discount"][1].item() == pytest.approx(gamma ** 2)
    np.testing.assert_array_equal(b["next_obs"]["state"][1].numpy(), ep.obs["state"][T])
    # data.learn_padding: the same windows, the padding counts as data (what BC learns to do after the end)
    held = DemoSamples(episodes, H, gamma, learn_padding=True).get(np.array([0, T - 2]))
    assert held["action_mask"].all()
    for key in ("action", "reward", "discount"):
        assert torch.equal(held[key], b[key]), key
    spec = normalization_stats(episodes, -np.ones(4), np.ones(4))
    actions = np.concatenate([e.actions for e in episodes])
    assert np.all(np.array(spec["action_low"]) < actions.min(0)) and np.all(np.array(spec["action_high"]) > actions.max(0))


def test_inspect_prints_summary(demo_dir):
    out = run_cli("demos", "inspect", demo_dir / "pick_ee.hdf5", "--json").stdout
    summary = json.loads(out)
    assert summary["episodes"] == 4 and summary["control_mode"] == "pd_ee_delta_pos"
    assert summary["obs_shapes"] == {"state": [42]} and summary["success_at_end"] == 1.0


def test_inspect_summarises_demos_recorded_without_observations(demo_dir):
    """Fresh `demos generate` output has actions only; inspect still summarises it and says so."""
    summary = json.loads(run_cli("demos", "inspect", demo_dir / "pick.h5", "--json").stdout)
    assert summary["episodes"] == 4 and summary["control_mode"] == "pd_joint_pos"
    assert summary["success_at_end"] == 1.0 and summary["obs_shapes"] == {} and "demos replay" in summary["note"]


def test_rgb_conversion_has_images_and_state(rgb_demo):
    meta, episodes = read_maniskill(str(rgb_demo))
    assert meta.obs_mode == "rgb" and len(episodes) == 2
    rgb = episodes[0].obs["rgb"]
    assert rgb.shape[1:] == (32, 32, 3) and rgb.dtype == np.uint8 and rgb.std() > 0
    assert episodes[0].obs["state"].shape[1] == 29  # qpos, qvel, is_grasped, tcp_pose, goal_pos


# --- bad input: one line naming the file, exit code 2, no traceback, nothing half-written ---------------

def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("flowmanip: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs(demo_dir, tmp_path):
    out = tmp_path / "out.hdf5"
    # nonexistent path
    _assert_user_error(run_cli("demos", "inspect", tmp_path / "nope.h5", check=False), "nope.h5", "no such file")
    # not HDF5
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    _assert_user_error(run_cli("demos", "inspect", junk, check=False), "junk.h5", "not an HDF5 file")
    # truncated HDF5
    data = (demo_dir / "pick_ee.h5").read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 3])
    shutil.copy(demo_dir / "pick_ee.json", tmp_path / "trunc.json")
    _assert_user_error(run_cli("demos", "inspect", trunc, check=False), "trunc.h5")
    # ManiSkill .h5 without its .json
    lonely = tmp_path / "lonely.h5"
    shutil.copy(demo_dir / "pick_ee.h5", lonely)
    _assert_user_error(run_cli("demos", "to-robomimic", lonely, "--output", out, check=False), "lonely.json")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    # NaN in actions
    nan = tmp_path / "nan.h5"
    shutil.copy(demo_dir / "pick_ee.h5", nan)
    shutil.copy(demo_dir / "pick_ee.json", tmp_path / "nan.json")
    with h5py.File(nan, "r+") as f:
        f["traj_1/actions"][3, 0] = np.nan
    _assert_user_error(run_cli("demos", "to-robomimic", nan, "--output", out, check=False),
                       "nan.h5:traj_1", "NaN")
    assert not out.exists()
    # a dataset whose control mode differs from what the recipe asks for
    _assert_user_error(run_cli("pretrain", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick_ee.h5'}",
                               "env.control_mode=pd_ee_delta_pose", f"out_dir={tmp_path / 'run'}", check=False),
                       "pick_ee.h5", "control_mode", "pd_ee_delta_pose")
    # raw demos recorded without observations
    _assert_user_error(run_cli("pretrain", "recipes/pickcube.yaml", f"data.path={demo_dir / 'pick.h5'}",
                               "env.control_mode=pd_joint_pos", f"out_dir={tmp_path / 'run'}", check=False),
                       "pick.h5", "no observations")
    assert not (tmp_path / "run").exists()


def test_obs_shape_mismatch_is_reported(demo_dir, tmp_path):
    # cut the state vector of every episode: the env gives 42 dims, the file 40
    bad = tmp_path / "short.hdf5"
    shutil.copy(demo_dir / "pick_ee.hdf5", bad)
    with h5py.File(bad, "r+") as f:
        for k in f["data"]:
            for group in ("obs", "next_obs"):
                v = f[f"data/{k}/{group}/state"][()][:, :40]
                del f[f"data/{k}/{group}/state"]
                f[f"data/{k}/{group}/state"] = v
    proc = run_cli("pretrain", "recipes/pickcube.yaml", f"data.path={bad}", "pretrain.steps=1",
                   f"out_dir={tmp_path / 'run'}", check=False)
    _assert_user_error(proc, "short.hdf5", "42", "40")


def test_malformed_files_give_one_error_naming_the_key(demo_dir, tmp_path):
    """Files that parse as HDF5/JSON but break the layout: FlowmanipError naming file and key, no traceback."""
    from flowmanip.errors import FlowmanipError

    def copy(stem, ext):
        dst = tmp_path / f"{stem}{ext}"
        shutil.copy(demo_dir / f"pick_ee{ext}", dst)
        if ext == ".h5":
            shutil.copy(demo_dir / "pick_ee.json", tmp_path / f"{stem}.json")
        return dst

    def fails(path, *needles):
        with pytest.raises(FlowmanipError) as err:
            read_dataset(str(path))
        for needle in needles:
            assert needle in str(err.value), str(err.value)

    no_id = copy("no_id", ".h5")  # a JSON episode without its id
    info = json.loads((tmp_path / "no_id.json").read_text())
    del info["episodes"][1]["episode_id"]
    (tmp_path / "no_id.json").write_text(json.dumps(info))
    fails(no_id, "no_id.json", "episodes[1]", "episode_id")

    no_state = copy("no_state", ".h5")  # an obs dict with neither agent nor extra
    with h5py.File(no_state, "r+") as f:
        n = f["traj_0/obs"].shape[0]
        del f["traj_0/obs"]
        f["traj_0/obs/sensor_param/x"] = np.zeros((n, 3), np.float32)
    fails(no_state, "no_state.h5:traj_0", "no state arrays")

    wide = copy("wide", ".h5")  # one episode with a 5-dim action
    with h5py.File(wide, "r+") as f:
        a = f["traj_1/actions"][()]
        del f["traj_1/actions"]
        f["traj_1/actions"] = np.concatenate([a, a[:, :1]], axis=1)
    fails(wide, "wide.h5:traj_1", "'actions' has shape [5]", "traj_0 has shape [4]")

    no_next = copy("no_next", ".hdf5")  # robomimic obs key without its next_obs
    with h5py.File(no_next, "r+") as f:
        del f["data/demo_0/next_obs/state"]
    fails(no_next, "no_next.hdf5:data/demo_0", "next_obs/state")


def test_replay_errors_give_the_cause_not_progress_bars(demo_dir, tmp_path):
    out = tmp_path / "out.h5"
    proc = run_cli("demos", "replay", demo_dir / "pick.h5", "-c", "pd_ee_delta", "--output", out, check=False)
    _assert_user_error(proc, "pick.h5")
    cause = proc.stderr.split("failed:", 1)[1]
    assert "pd_ee_delta" in cause and "Error" in cause, cause  # ManiSkill's own reason, passed through
    assert "step/s" not in proc.stderr and "%|" not in proc.stderr
    # -o is the obs mode here (as in ManiSkill's replay tool), and a robomimic file is not a replay source
    _assert_user_error(run_cli("demos", "replay", demo_dir / "pick.h5", "-c", "pd_ee_delta_pos", "-o", out,
                               "--output", out, check=False), "-o is the observation mode")
    _assert_user_error(run_cli("demos", "replay", demo_dir / "pick_ee.hdf5", "-c", "pd_ee_delta_pos",
                               "--output", out, check=False), "pick_ee.hdf5", "ManiSkill .h5")
    assert not out.exists()


def test_an_output_path_that_is_a_directory_is_refused_and_kept(demo_dir, tmp_path):
    folder = tmp_path / "out.hdf5"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    _assert_user_error(run_cli("demos", "to-robomimic", demo_dir / "pick_ee.h5", "--output", folder, check=False),
                       "out.hdf5 is a directory")
    assert (folder / "keep.txt").read_text() == "mine"


def _episode(T: int, terminated_from: int | None, seed: int = 0):
    from flowmanip.data.maniskill_io import Episode

    rng = np.random.default_rng(seed)
    terminated = np.zeros(T, bool)
    if terminated_from is not None:  # as recorded demos do: terminated stays set for the steps after success
        terminated[terminated_from:] = True
    return Episode({"state": np.arange(T + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)},
                   rng.uniform(-1, 1, (T, 2)).astype(np.float32), rng.uniform(0, 1, T).astype(np.float32),
                   terminated, terminated.copy())


def _online_chunks(ep, H: int, gamma: float):
    """The transitions an online episode with these rewards and terminations would give, with terminations
    used (finetune.ignore_terminations=false): chunks from every step, each stopping at the first termination,
    where the episode ends (the env resets). Step by step, like the worker env's loop."""
    out = []
    for t in range(ep.length):
        if ep.terminated[:t].any():  # the episode already ended
            break
        reward, discount, n, term = 0.0, 1.0, 0, False
        for i in range(t, min(t + H, ep.length)):
            reward += discount * float(ep.rewards[i])
            discount *= gamma
            n += 1
            term = bool(ep.terminated[i])
            if term:
                break
        out.append({"t": t, "n": n, "reward": reward, "discount": discount, "terminated": term,
                    "next": float(ep.obs["state"][t + n, 0])})
    return out


@pytest.mark.parametrize("terminated_from", [None, 5, 9, 11])
def test_demo_transitions_end_at_the_first_termination_when_terminations_are_used(terminated_from):
    """finetune.ignore_terminations=false: a demo episode ends at its first terminated step, as an online one
    does. Chunks stop there (reward and gamma^n over the steps up to and including it, next obs right after
    it), only those chunks are terminal, and no window starts after it. Ignored (the default), nothing changes."""
    H, gamma = 4, 0.9
    episodes = [_episode(12, terminated_from, seed=1), _episode(7, None, seed=2)]
    s = DemoSamples(episodes, H, gamma, ignore_terminations=False)
    expected = [c for ep in episodes for c in _online_chunks(ep, H, gamma)]
    assert len(s) == len(expected)
    b = s.get(torch.arange(len(s)))
    assert b["terminated"].tolist() == [c["terminated"] for c in expected]
    assert b["action_mask"].sum(1).tolist() == [c["n"] for c in expected]
    np.testing.assert_allclose(b["reward"].numpy(), [c["reward"] for c in expected], rtol=1e-5)
    np.testing.assert_allclose(b["discount"].numpy(), [c["discount"] for c in expected], rtol=1e-6)
    assert b["next_obs"]["state"][:, 0].tolist() == [c["next"] for c in expected]
    assert b["obs"]["state"][:, 0].tolist() == [float(c["t"]) for c in expected]
    first = episodes[0]
    for i, c in enumerate(_online_chunks(first, H, gamma)):  # the episode's actions, padded past its (cut) end
        n = c["n"]
        np.testing.assert_array_equal(b["action"][i, :n].numpy(), first.actions[c["t"]:c["t"] + n])
        np.testing.assert_array_equal(b["action"][i, n:].numpy(), np.repeat(first.actions[c["t"] + n - 1:c["t"] + n],
                                                                             H - n, axis=0))
    if terminated_from is not None:
        assert sum(b["terminated"].tolist()) == min(H, terminated_from + 1)

    # ignored: every window of the whole episode, as before
    kept = DemoSamples(episodes, H, gamma)
    assert len(kept) == 12 + 7
    assert torch.equal(kept.action_mask.sum(1), torch.tensor([min(H, 12 - t) for t in range(12)] +
                                                             [min(H, 7 - t) for t in range(7)]))


def test_shipped_pickcube_demos_follow_the_online_mdp_with_terminations():
    """The shipped PickCube episodes keep terminated=True for 2-8 steps after the first success; with
    terminations used, each contributes exactly one terminal chunk per start step that reaches its first
    success, and none after it."""
    from flowmanip.data.maniskill_io import read_maniskill

    _, episodes = read_maniskill(os.path.join(REPO, "datasets", "pickcube", "pickcube_pd_ee_delta_pos.h5"),
                                 max_episodes=6)
    assert all(e.terminated.sum() >= 2 for e in episodes)  # what makes the cut matter
    H, gamma = 8, 0.9
    s = DemoSamples(episodes, H, gamma, ignore_terminations=False)
    firsts = [int(np.flatnonzero(e.terminated)[0]) for e in episodes]
    assert len(s) == sum(f + 1 for f in firsts)
    assert int(s.terminated.sum()) == sum(min(H, f + 1) for f in firsts)
    expected = [c for ep in episodes for c in _online_chunks(ep, H, gamma)]
    np.testing.assert_allclose(s.reward.numpy(), [c["reward"] for c in expected], rtol=1e-5)
    assert s.terminated.tolist() == [c["terminated"] for c in expected]
