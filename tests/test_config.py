"""Recipe schema, overrides, and the errors users see before any environment starts."""

from __future__ import annotations

import glob
import os

import pytest

from conftest import REPO, run_cli
from flowmanip.config import load_recipe, to_dict
from flowmanip.errors import FlowmanipError


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))))
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.env.id.endswith("-v1") and recipe.out_dir


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name, changed", [("pickcube_flowt.yaml", {"policy.velocity": "decoded",
                                                                     "pretrain.steps": 30000}),
                                           ("pickcube_rgb.yaml", {"env.obs_mode": "rgb", "pretrain.steps": 10000, "data.random_shift": 0})])
def test_a_recipe_with_a_base_changes_only_its_own_keys(name, changed):
    """These recipes name recipes/pickcube.yaml as their base: every key they do not set is the base's."""
    import yaml

    with open(os.path.join(REPO, "recipes", name)) as f:
        own = _flatten(yaml.safe_load(f))
    assert own.pop("base") == "pickcube.yaml"
    base, child = (_flatten(to_dict(load_recipe(os.path.join(REPO, "recipes", f)))) for f in ("pickcube.yaml", name))
    assert {k: child[k] for k in changed} == changed and "base" not in child
    assert {k: child[k] for k in own} == own  # the file's own keys win
    assert {k: v for k, v in child.items() if k not in own} == {k: v for k, v in base.items() if k not in own}


def test_a_learned_temperature_the_fixed_sigma_flow_cannot_reach_is_refused():
    """Fixed sigma caps the flow's entropy (config.flow_entropy_ceiling); a target above it makes alpha diverge."""
    pickcube = os.path.join(REPO, "recipes/pickcube.yaml")
    with pytest.raises(FlowmanipError) as err:  # K = 4, sigma = 0.1, A_0 = 0: at most -3.53 nats per dim < -1
        load_recipe(pickcube, ["finetune.learn_alpha=true"])
    assert "finetune.learn_alpha=true with policy.sigma_mode=fixed" in str(err.value) and "-3.53" in str(err.value)
    for fix in ("policy.sigma_mode=learned", "policy.actor=gaussian", "policy.sigma=1.0"):
        load_recipe(pickcube, ["finetune.learn_alpha=true", fix])  # reachable: no error
    # auto (null, the default; the PickCube recipe says false): learned unless the flow's sigma is fixed
    auto = "finetune.learn_alpha=null"
    assert load_recipe(pickcube, [auto]).finetune.learn_alpha is False
    assert load_recipe(pickcube, [auto, "policy.actor=gaussian"]).finetune.learn_alpha is True
    assert load_recipe(pickcube, [auto, "policy.sigma_mode=learned"]).finetune.learn_alpha is True
    # an explicit target is checked against d = H x action_dim once the env has given the action dim
    r = load_recipe(pickcube, ["finetune.learn_alpha=true", "policy.sigma=1.0", "finetune.target_entropy=-40"])
    from flowmanip.config import check_reachable_entropy

    check_reachable_entropy(r, 32, "r")  # -1.25 per dim against a ceiling of 5.68 (K = 4, sigma = 1)
    r.policy.sigma = 0.1
    with pytest.raises(FlowmanipError, match=r"below finetune.target_entropy=-40.0 \(-1.25 per dimension, d = 32\)"):
        check_reachable_entropy(r, 32, "r")


@pytest.mark.parametrize("text, needle", [
    ("- env\n- policy\n", "a recipe maps sections to settings (env:, policy:, ...), got a YAML list"),
    ("base: nowhere.yaml\n", "nowhere.yaml: recipe file not found"),
    ("base: me.yaml\n", "chain loops back"),
    ("base: [1, 2]\n", "base must be the path of another recipe"),
])
def test_a_bad_recipe_file_is_one_error(tmp_path, text, needle):
    (tmp_path / "me.yaml").write_text(text)
    with pytest.raises(FlowmanipError) as err:
        load_recipe(str(tmp_path / "me.yaml"))
    assert needle in str(err.value)


def test_overrides_are_typed():
    r = load_recipe(os.path.join(REPO, "recipes/pickcube.yaml"), ["pretrain.steps=123", "policy.velocity=decoded",
                                                                  "finetune.demo_fraction=null"])
    assert r.pretrain.steps == 123 and r.policy.velocity == "decoded" and r.finetune.demo_fraction is None


@pytest.mark.parametrize("override, needle", [
    ("pretrain.stepz=5", "unknown config key 'pretrain.stepz'"),
    ("policy.velocity=lstm", "policy.velocity='lstm' is not one of ['mlp', 'gated', 'decoded']"),
    ("pretrain.steps=many", "pretrain.steps"),
    ("env.num_envs=0", "env.num_envs must be >= 1"),
    ("finetune.utd=0", "finetune.utd must be > 0"),
    ("nonsense", "expected key=value"),
    ("device=tpu", "device='tpu' is not one of ['auto', 'cpu', 'cuda']"),
    ("pretrain.log_every=0", "pretrain.log_every must be >= 1, got 0"),  # used to divide by zero mid-run
    ("finetune.save_every=0", "finetune.save_every must be >= 1, got 0"),
    ("data.max_episodes=-1", "data.max_episodes must be >= 1, got -1"),  # used to drop the last episode
    ("policy.hidden_dim=0", "policy.hidden_dim must be >= 1, got 0"),
    ("finetune.eval_every=-5", "finetune.eval_every must be >= 0 (0 turns it off), got -5"),
    ("finetune.lr_critic=-0.001", "finetune.lr_critic must be > 0"),
    ("finetune.lr_encoder=-0.001", "finetune.lr_encoder must be >= 0 (0 freezes the encoder) or null"),
    ("pretrain.ema=1.5", "pretrain.ema must be in [0, 1)"),
    ("pretrain.steps=${nowhere}", "'pretrain.steps': Interpolation key 'nowhere' not found"),
    ("env=3", "bad value for 'env'"),
    ("pretrain.step=5", "unknown config key 'pretrain.step'; did you mean 'pretrain.steps'?"),
    ("policy.hidden_dim=0", "pickcube.yaml with overrides: policy.hidden_dim"),  # the value came from the command line
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(FlowmanipError, match=None) as err:
        load_recipe(os.path.join(REPO, "recipes/pickcube.yaml"), [override])
    assert needle in str(err.value)


def test_device_resolves_to_the_cpu_without_cuda():
    """auto falls back to the CPU; asking for cuda where there is none is one clear error (CI has no GPU)."""
    import torch

    from flowmanip.utils import device_for

    assert device_for("cpu").type == "cpu"
    assert device_for("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FlowmanipError, match="device=cuda but CUDA is not available"):
            device_for("cuda")


def test_bad_recipe_files(tmp_path):
    with pytest.raises(FlowmanipError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  idd: PickCube-v1\n")
    with pytest.raises(FlowmanipError, match="unknown config key 'env.idd'"):
        load_recipe(str(bad))


def _checkpoint_for(tmp_path, overrides, obs_dim=42, training_state=None):
    """A real (untrained) checkpoint saved for a recipe with the given overrides."""
    from flowmanip.models.policy import Policy
    from flowmanip.train.checkpoint import save_checkpoint

    recipe = load_recipe(os.path.join(REPO, "recipes/pickcube.yaml"), overrides)
    spec = {"obs_dim": obs_dim, "obs_mean": [0.0] * obs_dim, "obs_std": [1.0] * obs_dim, "action_dim": 4,
            "action_low": [-1.0] * 4, "action_high": [1.0] * 4, "env_low": [-1.0] * 4, "env_high": [1.0] * 4,
            "rgb_shape": None}
    policy = Policy(spec, recipe.policy)
    return save_checkpoint(str(tmp_path), 1, recipe, spec, {"policy": policy.state_dict()}, training_state,
                           "pretrain")


def test_finetune_rejects_bad_init_before_any_env_starts(tmp_path):
    cases = [
        ([f"finetune.init={tmp_path / 'nope'}"], "does not exist"),
        ([f"finetune.init={_checkpoint_for(tmp_path / 'a', ['env.id=PushCube-v1'])}"], "env.id='PushCube-v1'"),
        ([f"finetune.init={_checkpoint_for(tmp_path / 'b', ['policy.chunk=4'])}"], "chunk=4"),
        ([f"finetune.init={_checkpoint_for(tmp_path / 'c', [], obs_dim=40)}"], "obs_dim 40"),
        ([f"finetune.init={_checkpoint_for(tmp_path / 'd', ['policy.velocity=decoded', 'policy.decoder_tokens=chunk'])}",
          "policy.velocity=decoded"], "policy.decoder_tokens='chunk', the recipe wants 'single'"),
        ([f"finetune.init={_checkpoint_for(tmp_path / 'e', ['policy.velocity=mlp'])}"], "policy.velocity='mlp'"),
        (["env.num_envs=0"], "env.num_envs must be >= 1"),
        (["finetune.utd=-1"], "finetune.utd must be > 0"),
    ]
    for overrides, needle in cases:
        proc = run_cli("finetune", "recipes/pickcube.yaml", f"out_dir={tmp_path / 'run'}", *overrides, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
        assert "sapien" not in proc.stderr.lower()  # failed before ManiSkill made an env
        assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_network_or_a_corrupt_state_before_any_env_starts(tmp_path):
    ckpt = _checkpoint_for(tmp_path / "run" / "finetune", [], training_state={"updates": 0})
    _checkpoint_for(tmp_path / "run" / "pretrain", [], training_state={"step": 1})
    for stage in ("pretrain", "finetune"):
        proc = run_cli(stage, "--resume", "recipes/pickcube.yaml", f"out_dir={tmp_path / 'run'}",
                       "policy.hidden_dim=256", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "the run to resume has policy.hidden_dim=512, the recipe wants 256" in proc.stderr, proc.stderr
        assert "sapien" not in proc.stderr.lower()
    with open(os.path.join(ckpt, "training_state.pt"), "wb") as f:
        f.write(b"not a torch file")
    proc = run_cli("finetune", "--resume", "recipes/pickcube.yaml", f"out_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "training_state.pt: cannot load training state" in proc.stderr and "cannot resume" in proc.stderr


def test_init_check_ignores_settings_the_network_does_not_use(tmp_path):
    """A Flow-G checkpoint made when Flow-T's memory-token default was 1 still fine-tunes; shapes still must match."""
    from flowmanip.train.checkpoint import load_checkpoint
    from flowmanip.train.checkpoint import check_init_matches

    recipe = load_recipe(os.path.join(REPO, "recipes/pickcube.yaml"))
    ckpt = load_checkpoint(_checkpoint_for(tmp_path / "g", ["policy.decoder_memory_tokens=1", "policy.encoder_dim=64"]))
    check_init_matches(ckpt["meta"], recipe, ckpt["path"], 42, ckpt["recipe"].policy)  # gated, identity encoder
    ckpt = load_checkpoint(_checkpoint_for(tmp_path / "h", ["policy.hidden_dim=256"]))
    with pytest.raises(FlowmanipError, match="policy.hidden_dim=256, the recipe wants 512"):
        check_init_matches(ckpt["meta"], recipe, ckpt["path"], 42, ckpt["recipe"].policy)
    flowt = load_recipe(os.path.join(REPO, "recipes/pickcube_flowt.yaml"))
    ckpt = load_checkpoint(_checkpoint_for(tmp_path / "t", ["policy.velocity=decoded", "policy.decoder_memory_tokens=1"]))
    with pytest.raises(FlowmanipError, match="policy.decoder_memory_tokens=1, the recipe wants 4"):
        check_init_matches(ckpt["meta"], flowt, ckpt["path"], 42, ckpt["recipe"].policy)


def test_cli_reads_what_users_type_and_refuses_files_where_directories_go(tmp_path):
    """Overrides after --overwrite and --debug after the subcommand parse; a file given as out_dir or as
    eval's --video directory is one error before any env starts, and the file is left as it was."""
    a_file = tmp_path / "policy.pt"
    a_file.write_text("mine")
    for stage in ("pretrain", "finetune"):
        proc = run_cli(stage, "recipes/pickcube.yaml", "--overwrite", f"out_dir={a_file}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "policy.pt: is a file; out_dir must be a directory" in proc.stderr, proc.stderr
    proc = run_cli("eval", tmp_path, "--video", a_file, check=False)
    assert proc.returncode == 2 and "--video" in proc.stderr and "is a file" in proc.stderr, proc.stderr
    assert a_file.read_text() == "mine"
    proc = run_cli("pretrain", "--debug", "recipes/nope.yaml", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "recipe file not found" in proc.stderr
    proc = run_cli("pretrain", "recipes/pickcube.yaml", "--resume", "not_an_override", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: not_an_override" in proc.stderr


def test_finetune_refuses_executing_fewer_actions_than_it_trains_on():
    """Fine-tuning steps whole H-step chunks while evaluation would execute policy.execute < H of them per
    decision: refused with an error naming policy.execute. Pretraining and evaluation may use it."""
    from flowmanip.config import check_finetune_settings

    recipe = os.path.join(REPO, "recipes", "pickcube.yaml")
    partial = load_recipe(recipe, ["policy.execute=4"])  # loading (pretrain, eval) is fine
    with pytest.raises(FlowmanipError, match=r"policy\.execute=4") as err:
        check_finetune_settings(partial, recipe)
    assert "policy.chunk=8" in str(err.value) and recipe in str(err.value)
    for execute in (0, 8):  # all H
        check_finetune_settings(load_recipe(recipe, [f"policy.execute={execute}"]))
    for path in sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))):  # the shipped recipes fine-tune
        check_finetune_settings(load_recipe(path))


def test_the_actor_setting_under_its_old_name_still_loads(tmp_path, capsys):
    """finetune.actor moved to policy.actor: recipes and overrides with the old name load with a notice, and a
    stored checkpoint config with it (read through upgrade_checkpoint_config) loads silently."""
    from flowmanip.config import from_dict, upgrade_checkpoint_config

    old = tmp_path / "old.yaml"
    old.write_text(f"base: {os.path.join(REPO, 'recipes/pickcube_10demos.yaml')}\n"
                   "finetune:\n  actor: residual\n  bc_weight: 0\n  anchor_weight: 0\n")
    assert load_recipe(str(old)).policy.actor == "residual"
    assert f"{old}: finetune.actor is now policy.actor" in capsys.readouterr().err
    pickcube = os.path.join(REPO, "recipes/pickcube.yaml")
    assert load_recipe(pickcube, ["finetune.actor=gaussian"]).policy.actor == "gaussian"
    assert "override 'finetune.actor=gaussian': finetune.actor is now policy.actor" in capsys.readouterr().err
    stored = to_dict(load_recipe(pickcube))
    del stored["policy"]["actor"]  # a checkpoint from before the move has only the old key
    stored["finetune"]["actor"] = "noise"
    assert from_dict(upgrade_checkpoint_config(stored)).policy.actor == "noise"
    assert capsys.readouterr().err == ""
    with pytest.raises(FlowmanipError, match="policy.actor='bogus' is not one of"):
        load_recipe(pickcube, ["finetune.actor=bogus"])
