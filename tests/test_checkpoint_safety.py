"""Checkpoints are safe to share: opening one never unpickles arbitrary objects; earlier pickled
checkpoints are refused (and converted only on request); writes survive SIGKILL; damage is one clear error."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from flowmanip.config import load_recipe, to_dict
from flowmanip.errors import FlowmanipError
from flowmanip.models.policy import Policy
from flowmanip.train.checkpoint import (load_checkpoint, load_training_state, resolve_checkpoint, rng_state,
                                        save_checkpoint, set_rng_state)

OBS_DIM, ACTION_DIM = 42, 4  # PickCube-v1, state obs, pd_ee_delta_pos: what recipes/pickcube.yaml checks against


def _recipe(*overrides):
    return load_recipe(os.path.join(REPO, "recipes/pickcube.yaml"),
                       ["policy.hidden_dim=32", "policy.encoder_dim=32", *overrides])


def _spec():
    gen = torch.Generator().manual_seed(0)
    return {"obs_dim": OBS_DIM, "obs_mean": torch.randn(OBS_DIM, generator=gen).tolist(),
            "obs_std": (torch.rand(OBS_DIM, generator=gen) + 0.5).tolist(), "action_dim": ACTION_DIM,
            "action_low": [-0.9] * ACTION_DIM, "action_high": [0.8] * ACTION_DIM,
            "env_low": [-1.0] * ACTION_DIM, "env_high": [1.0] * ACTION_DIM, "rgb_shape": None}


def _policy(recipe, spec, seed=0):
    torch.manual_seed(seed)
    policy = Policy(spec, recipe.policy)
    with torch.no_grad():  # not the init values: gates, sigma heads and all carry information
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


def _obs(n=16):
    return {"state": torch.randn(n, OBS_DIM, generator=torch.Generator().manual_seed(1)) * 2}


def policy_from_checkpoint(ckpt, ema=True):
    """The policy a checkpoint holds (its EMA weights when it has them), as eval and export build it."""
    weights = ckpt["weights"]
    policy = Policy(ckpt["spec"], ckpt["recipe"].policy, ckpt["meta"].get("actor", "flow"))
    policy.load_state_dict(weights["policy_ema"] if ema and "policy_ema" in weights else weights["policy"])
    return policy.eval()


def _actions(policy):
    with torch.no_grad():
        return policy.act(_obs(), deterministic=True)


class _Payload:
    """Unpickling this creates ``path``: what a malicious checkpoint could do (and worse)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _legacy_checkpoint(directory, recipe, spec, policy, payload=None, training_state=True):
    """A checkpoint as flowmanip wrote it before the safe format: pickled policy.pt (+ training_state.pt), meta.json."""
    os.makedirs(directory)
    meta = {"flowmanip_version": "0.1.0", "stage": "pretrain", "step": 5, "env_id": recipe.env.id,
            "control_mode": recipe.env.control_mode, "obs_mode": recipe.env.obs_mode,
            "reward_mode": recipe.env.reward_mode, "max_episode_steps": recipe.env.max_episode_steps,
            "velocity": recipe.policy.velocity, "actor": recipe.policy.actor, "flow_steps": recipe.policy.flow_steps,
            "chunk": recipe.policy.chunk, "obs_dim": spec["obs_dim"], "rgb_shape": spec["rgb_shape"],
            "action_dim": spec["action_dim"]}
    ckpt = {"meta": meta, "spec": spec, "config": to_dict(recipe),
            "weights": {"policy": policy.state_dict(), "policy_ema": policy.state_dict()}}
    if payload is not None:
        ckpt["note"] = _Payload(payload)
    torch.save(ckpt, os.path.join(directory, "policy.pt"))
    if training_state:
        policy = copy.deepcopy(policy)  # an optimiser state with something in it, the saved weights untouched
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        policy.actor.flow_matching_loss(policy.encoder(_obs(4)), torch.zeros(4, policy.actor.dim)).backward()
        opt.step()
        opt.zero_grad()
        state = {"optimizer": opt.state_dict(), "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                                          "torch": torch.get_rng_state()}}
        if payload is not None:
            state["note"] = _Payload(payload)
        torch.save(state, os.path.join(directory, "training_state.pt"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(directory)


def _refused(proc, marker, needle="convert-checkpoint"):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("flowmanip: error: "), proc.stderr[-2000:]
    assert needle in lines[-1], lines[-1]
    assert not os.path.exists(marker), "the checkpoint was unpickled"


def test_crafted_old_checkpoint_is_refused_everywhere_without_being_unpickled(tmp_path):
    recipe, spec = _recipe(), _spec()
    marker = tmp_path / "pwned"
    old = _legacy_checkpoint(tmp_path / "old", recipe, spec, _policy(recipe, spec), payload=marker)
    _refused(run_cli("eval", old, "--episodes", 1, "--num-envs", 1, check=False), marker)
    _refused(run_cli("eval", os.path.join(old, "policy.pt"), "--episodes", 1, check=False), marker)
    _refused(run_cli("export", old, "-o", tmp_path / "exported.pt", check=False), marker)
    assert not (tmp_path / "exported.pt").exists()
    _refused(run_cli("finetune", "recipes/pickcube.yaml", f"out_dir={tmp_path / 'run'}", f"finetune.init={old}",
                     "policy.hidden_dim=32", "policy.encoder_dim=32", check=False), marker)
    # a run made by an earlier version: --resume opens checkpoints/last, and refuses it just the same
    for stage in ("finetune", "pretrain"):
        ckpts = tmp_path / "old_run" / stage / "checkpoints"
        _legacy_checkpoint(ckpts / "5", recipe, spec, _policy(recipe, spec), payload=marker)
        os.symlink("5", ckpts / "last")
        _refused(run_cli(stage, "recipes/pickcube.yaml", f"out_dir={tmp_path / 'old_run'}", "--resume",
                         "policy.hidden_dim=32", "policy.encoder_dim=32", check=False), marker)
        assert sorted(os.listdir(ckpts)) == ["5", "last"]  # nothing was written either
    # converting does not unpickle it either, unless asked to with --trust
    _refused(run_cli("convert-checkpoint", old, tmp_path / "new", check=False), marker, needle="--trust")
    assert not (tmp_path / "new").exists()


def test_convert_with_trust_unpickles_after_a_warning(tmp_path):
    recipe, spec = _recipe(), _spec()
    marker = tmp_path / "ran"
    policy = _policy(recipe, spec)
    old = _legacy_checkpoint(tmp_path / "old", recipe, spec, policy, payload=marker, training_state=False)
    proc = run_cli("convert-checkpoint", old, tmp_path / "new", "--trust")
    assert "flowmanip: warning: unpickling" in proc.stderr and "--trust" in proc.stderr, proc.stderr
    assert marker.exists()  # the user asked for it
    assert torch.equal(_actions(policy_from_checkpoint(load_checkpoint(str(tmp_path / "new")))), _actions(policy))


def test_new_checkpoint_round_trips_and_needs_no_unpickling(tmp_path):
    recipe, spec = _recipe("policy.chunk=4", "policy.velocity=gated"), _spec()
    policy, ema = _policy(recipe, spec, seed=0), _policy(recipe, spec, seed=1)
    # the agent's state dict holds the policy's own tensors (shared storage) next to the critic's
    agent = torch.nn.ModuleDict({"policy": policy, "critic": torch.nn.Linear(OBS_DIM, 1)})
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    agent["critic"](_obs()["state"]).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "counters": {"env_steps": np.int64(320), "update_budget": 0.5, "obs_stats_set": True},
             "buffer": {"obs": {"state": torch.randn(8, OBS_DIM)}, "action": np.ones((8, 16), np.float32), "pos": 0}}
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state["rng"] = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = save_checkpoint(str(tmp_path / "stage"), 320, recipe, spec,
                           {"policy": policy.state_dict(), "policy_ema": ema.state_dict(), "agent": agent.state_dict()},
                           state, "finetune", {"init": None})
    assert sorted(os.listdir(path)) == ["config.yaml", "meta.json", "model.safetensors", "spec.json",
                                        "training_state.pt"]
    assert os.readlink(tmp_path / "stage/checkpoints/last") == "320"
    # the training state is tensors and plain data: torch's restricted unpickler reads it
    raw = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    assert raw["counters"] == {"env_steps": 320, "update_budget": 0.5, "obs_stats_set": True}
    assert torch.equal(raw["buffer"]["action"], torch.ones(8, 16))

    for where in (path, os.path.join(path, "model.safetensors"), str(tmp_path / "stage"),
                  str(tmp_path / "stage/checkpoints/last")):
        assert resolve_checkpoint(where) == os.path.realpath(path)
    ckpt = load_checkpoint(str(tmp_path / "stage"), with_training_state=True)
    assert set(ckpt) == {"meta", "spec", "config", "recipe", "weights", "path", "training_state"}
    assert ckpt["spec"] == spec and ckpt["config"] == to_dict(recipe) and to_dict(ckpt["recipe"]) == to_dict(recipe)
    assert ckpt["meta"]["step"] == 320 and ckpt["meta"]["init"] is None and ckpt["meta"]["env_id"] == "PickCube-v1"
    assert list(ckpt["weights"]) == ["policy", "policy_ema", "agent"]
    for name, module in (("policy", policy), ("policy_ema", ema), ("agent", agent)):
        saved = module.state_dict()
        assert list(ckpt["weights"][name]) == list(saved)  # names and order
        assert all(torch.equal(ckpt["weights"][name][k], v) for k, v in saved.items())
    # the same actions, from the EMA weights policy_from_checkpoint picks and from the raw ones
    assert torch.equal(_actions(policy_from_checkpoint(ckpt)), _actions(ema))
    assert torch.equal(_actions(policy_from_checkpoint(ckpt, ema=False)), _actions(policy))
    restored = torch.nn.ModuleDict({"policy": Policy(spec, recipe.policy), "critic": torch.nn.Linear(OBS_DIM, 1)})
    restored.load_state_dict(ckpt["weights"]["agent"])
    opt2 = torch.optim.Adam(restored.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["training_state"]["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][len(list(restored.parameters())) - 1]["exp_avg"],
                       opt.state_dict()["state"][len(list(agent.parameters())) - 1]["exp_avg"])
    # RNG streams continue where they were saved
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(ckpt["training_state"]["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_converted_old_checkpoint_acts_identically(tmp_path):
    recipe, spec = _recipe("policy.chunk=4"), _spec()
    policy = _policy(recipe, spec)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    old = _legacy_checkpoint(tmp_path / "old", recipe, spec, policy)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    with pytest.raises(FlowmanipError, match="convert-checkpoint"):
        load_checkpoint(old)
    proc = run_cli("convert-checkpoint", os.path.join(old, "policy.pt"), tmp_path / "new")
    assert "warning" not in proc.stderr, proc.stderr  # plain tensors, NumPy arrays and data: no unpickling needed
    assert proc.stdout.strip() == f"wrote {tmp_path / 'new'}"
    ckpt = load_checkpoint(str(tmp_path / "new"), with_training_state=True)
    assert torch.equal(_actions(policy_from_checkpoint(ckpt)), _actions(policy))
    assert ckpt["meta"]["converted_from"] == os.path.realpath(os.path.join(old, "policy.pt"))
    assert ckpt["meta"]["step"] == 5 and ckpt["spec"] == spec and to_dict(ckpt["recipe"]) == to_dict(recipe)
    torch.load(tmp_path / "new/training_state.pt", weights_only=True)
    set_rng_state(ckpt["training_state"]["rng"])  # the earlier NumPy/Python RNG tuples, now lists and tensors
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    # the converted one serves where the old one was refused
    out = tmp_path / "exported.pt"
    run_cli("export", tmp_path / "new", "-o", out)
    actions = _actions(policy)
    torch.testing.assert_close(torch.jit.load(str(out))(_obs()["state"]).reshape(actions.shape), actions)
    again = run_cli("convert-checkpoint", old, tmp_path / "new", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_damaged_checkpoint_files_are_one_clear_error(tmp_path):
    recipe, spec = _recipe(), _spec()
    policy = _policy(recipe, spec)
    path = save_checkpoint(str(tmp_path / "stage"), 1, recipe, spec, {"policy": policy.state_dict()},
                           {"rng": rng_state(), "x": torch.randn(1000)}, "pretrain")
    pristine = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    damage = {"truncated": lambda b: b[: len(b) // 2], "garbage": lambda b: b"\x00\xff" * 64, "empty": lambda b: b""}
    for name, data in pristine.items():
        for how, fn in damage.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(fn(data))
            with pytest.raises(FlowmanipError) as e:
                load_checkpoint(path, with_training_state=True)
            message = str(e.value)
            assert os.path.join(path, name) in message and "\n" not in message, (name, how, message)
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    load_checkpoint(path, with_training_state=True)
    # an edit that keeps the file valid is found too: it no longer matches the record in model.safetensors
    edited = pristine["config.yaml"].replace(b"hidden_dim: 32", b"hidden_dim: 33")
    assert edited != pristine["config.yaml"]
    with open(os.path.join(path, "config.yaml"), "wb") as f:
        f.write(edited)
    with pytest.raises(FlowmanipError, match="config.yaml: cannot load checkpoint \\(its contents changed"):
        load_checkpoint(path)
    with open(os.path.join(path, "config.yaml"), "wb") as f:
        f.write(pristine["config.yaml"])
    os.remove(os.path.join(path, "spec.json"))
    with pytest.raises(FlowmanipError, match=re.escape(os.path.join(path, "spec.json")) + ": missing"):
        load_checkpoint(path)
    with open(os.path.join(path, "spec.json"), "wb") as f:
        f.write(pristine["spec.json"])
    # through the CLI: one line naming the file, exit code 2
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(pristine["model.safetensors"][:100])
    proc = run_cli("eval", tmp_path / "stage", "--episodes", 1, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"flowmanip: error: {os.path.join(path, 'model.safetensors')}")


def test_pickled_files_in_a_new_checkpoint_are_not_unpickled(tmp_path):
    """Someone swaps a file of a shared checkpoint for a pickle: it is refused, not run."""
    recipe, spec = _recipe(), _spec()
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    path = save_checkpoint(str(run / "finetune"), 1, recipe, spec, {"policy": _policy(recipe, spec).state_dict()},
                           {"counters": {"env_steps": 1}}, "finetune")
    torch.save({"counters": {"env_steps": 1}, "note": _Payload(marker)}, os.path.join(path, "training_state.pt"))
    proc = run_cli("finetune", "recipes/pickcube.yaml", f"out_dir={run}", "--resume", "policy.hidden_dim=32",
                   "policy.encoder_dim=32", check=False)
    _refused(proc, marker, needle="training_state.pt: cannot load training state (")
    with pytest.raises(FlowmanipError, match="cannot load training state \\(it holds objects other than tensors"):
        load_training_state(os.path.join(path, "training_state.pt"))  # even one that matched the recorded size
    assert not marker.exists()
    torch.save({"weights": _Payload(marker)}, os.path.join(path, "model.safetensors"))
    _refused(run_cli("eval", path, "--episodes", 1, check=False), marker, needle="model.safetensors: cannot load")


WRITER = r"""
import json, sys, torch
from flowmanip.config import load_recipe
from flowmanip.models.policy import Policy
from flowmanip.train.checkpoint import rng_state, save_checkpoint
stage, start, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
recipe = load_recipe("recipes/pickcube.yaml", ["policy.hidden_dim=32", "policy.encoder_dim=32"])
policy = Policy(spec, recipe.policy)
big = torch.empty(12_000_000)  # 48 MB of replay buffer: each save takes a while
for i in range(start, start + 10_000):
    big.fill_(i)
    with torch.no_grad():
        policy.actor.fixed_log_sigma.fill_(i)
    weights = {"policy": policy.state_dict(), "agent": {"policy." + k: v for k, v in policy.state_dict().items()}}
    step = 1 + (i // 2) % 3  # 1, 1, 2, 2, 3, 3, 1, ...: every other save rewrites the step `last` points at
    save_checkpoint(stage, step, recipe, spec, weights, {"buffer": big, "rng": rng_state(), "i": i}, "finetune", {"i": i})
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_last_loadable(tmp_path):
    stage = tmp_path / "finetune"
    ckpts = stage / "checkpoints"
    start, seen = 0, []
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(stage), str(start), json.dumps(_spec())], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()  # one save done
            deadline = time.time() + 60
            while not any(n.startswith((".tmp-", ".prev-")) for n in os.listdir(ckpts)):  # a save under way
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
                time.sleep(0.002)
            time.sleep(0.03 * round_)  # early, and later in the write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(str(ckpts / "last"), with_training_state=True)
        i = ckpt["meta"]["i"]  # every file of the checkpoint comes from the same save
        assert ckpt["training_state"]["i"] == i and bool((ckpt["training_state"]["buffer"] == i).all())
        assert float(ckpt["weights"]["policy"]["actor.fixed_log_sigma"]) == i
        assert float(ckpt["weights"]["agent"]["policy.actor.fixed_log_sigma"]) == i
        seen.append(i)
        start = i + 1000  # the next writer's saves are told apart from this one's
    assert len(set(seen)) == 4
    # the next save clears what killed writes left behind
    recipe, spec = _recipe(), _spec()
    save_checkpoint(str(stage), 9, recipe, spec, {"policy": _policy(recipe, spec).state_dict()}, None, "finetune")
    assert not [n for n in os.listdir(ckpts) if n.startswith(".")], os.listdir(ckpts)
    assert load_checkpoint(str(stage))["meta"]["step"] == 9


def test_no_unsafe_torch_load_outside_the_conversion():
    """The only ``weights_only=False`` is the conversion's, taken with --trust after a warning."""
    hits = []
    for top in ("flowmanip", "benchmarks", "tools", "examples"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    text = Path(root, name).read_text()
                    hits += [(os.path.relpath(os.path.join(root, name), REPO), m.start())
                             for m in re.finditer(r"torch\.load\([^)]*weights_only\s*=\s*False|pickle\.loads?\(", text)]
    assert [h[0] for h in hits] == ["flowmanip/train/checkpoint.py"], hits
    source = Path(REPO, "flowmanip/train/checkpoint.py").read_text()
    before = source[:hits[0][1]]
    function = before[before.rindex("\ndef "):]  # the one that holds it
    assert function.startswith("\ndef _load_legacy_file(") and "if not trust:" in function and "warning" in function
