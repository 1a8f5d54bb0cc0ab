"""Typed recipes.

A recipe is a YAML file validated against the dataclasses below (OmegaConf structured
configs: types are checked, unknown keys rejected). ``key=value`` overrides use dotted
paths (``pretrain.steps=2000``). Every error names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from flowmanip.errors import FlowmanipError

CHOICES = {
    "env.backend": ("auto", "gpu", "cpu"),
    "env.obs_mode": ("state", "rgb"),
    "policy.velocity": ("mlp", "gated", "decoded"),
    "policy.encoder": ("mlp", "identity"),
    "policy.decoder_tokens": ("single", "chunk"),
    "policy.sigma_mode": ("fixed", "learned"),
    "policy.cnn_head": ("avg", "spatial_softmax"),
    "finetune.q_aggregation": ("min", "mean"),
    "finetune.bc_type": ("flow_matching", "action_mse", "none"),
    "policy.actor": ("flow", "gaussian", "residual", "noise"),  # the last two: FROZEN_FLOW_ACTORS
    "finetune.compile": ("auto", "off", "on"),
}
FROZEN_FLOW_ACTORS = ("residual", "noise")  # policy.actor values that train a SAC policy beside a frozen flow


@dataclass
class EnvConfig:
    id: str = "PickCube-v1"  # ManiSkill task id
    control_mode: str = "pd_ee_delta_pos"  # must match the demos' control mode
    obs_mode: str = "state"  # state | rgb (cameras + proprioception)
    reward_mode: str = "normalized_dense"  # online rewards; demo rewards must be in the same mode
    max_episode_steps: int = 100  # PickCube demos run 60-92 steps; the env default (50) cuts them off
    backend: str = "auto"  # auto: physx_cuda when CUDA is available, else physx_cpu worker processes
    num_envs: int = 2  # training envs (GPU: hundreds; CPU: one process each)
    num_eval_envs: int = 2  # separate envs for evaluation (main process only)
    camera_size: int = 64  # rgb only: camera width = height


@dataclass
class DataConfig:
    path: str = "datasets/pickcube/pickcube_pd_ee_delta_pos.h5"  # ManiSkill .h5 (+ .json) or robomimic .hdf5
    max_episodes: Optional[int] = None  # use only the first N episodes (null: all)
    action_margin: float = 0.05  # widen the data's action range by this fraction on each side
    learn_padding: bool = True  # BC also learns the chunk padding past an episode's end (the last action held); false masks it out
    random_shift: int = 0  # rgb only: shift training images by up to this many pixels (pretrain and fine-tune batches); 0 = off


@dataclass
class PolicyConfig:
    # flow (SAC Flow) | gaussian (tanh-Gaussian SAC baseline) | residual (a SAC policy adds a bounded correction
    # to the frozen flow policy, as Policy Decorator) | noise (SAC picks the frozen flow's initial noise, as DSRL).
    # gaussian also pretrains a Gaussian policy; residual and noise pretrain a plain flow policy.
    actor: str = "flow"
    velocity: str = "gated"  # mlp (naive) | gated (Flow-G) | decoded (Flow-T)
    flow_steps: int = 4  # K
    chunk: int = 8  # H: actions predicted per decision
    execute: int = 0  # actions executed per decision before replanning (0 = all H)
    hidden_dim: int = 512  # velocity MLPs (mlp, gated); 512 fits PickCube far better than 256 (docs/notes/pickcube-pretraining.md)
    num_layers: int = 3  # hidden layers of the velocity MLPs
    gate_hidden_dim: int = 0  # Flow-G's gate MLP: width (0: hidden_dim) ...
    gate_layers: int = 0  # ... and hidden layers (0: num_layers); 256 x 1 is the paper's small head (docs/design.md)
    decoder_layers: int = 2  # Flow-T
    decoder_heads: int = 4  # Flow-T attention heads (must divide decoder_dim)
    decoder_dim: int = 128  # Flow-T token width
    decoder_tokens: str = "single"  # Flow-T query tokens: single (one for the whole chunk) | chunk (one per step, H x compute)
    decoder_memory_tokens: int = 4  # Flow-T: the observation embedding as this many tokens (1: attention cannot see the query)
    encoder: str = "identity"  # state obs: identity (normalised state) | mlp
    encoder_dim: int = 256  # features out of the mlp / rgb encoder
    cnn_channels: int = 32  # rgb encoder width
    cnn_head: str = "avg"  # rgb encoder head: avg (4x4 average pool) | spatial_softmax (keypoint coordinates)
    sigma_mode: str = "fixed"  # noise of the SAC rollout: fixed | learned (state-conditioned head)
    sigma: float = 0.1  # noise std per flow step (fixed mode; the learned head's initial value)
    # std of A_0 in the noise-augmented (SAC) rollout: 1 samples N(0, I) as the paper does; 0 starts
    # at A_0 = 0 like the deterministic rollout used for eval, so SAC trains the policy it is scored on
    init_std: float = 1.0
    residual_scale: float = 0.2  # policy.actor=residual: bound of the correction, in normalised action units
    noise_bound: float = 1.5  # policy.actor=noise: SAC's initial noise A_0 lies in [-noise_bound, noise_bound]^d
    log_sigma_min: float = -5.0  # clamp of the learned head's log sigma
    log_sigma_max: float = 0.0


@dataclass
class PretrainConfig:
    steps: int = 10000  # gradient steps
    batch_size: int = 256
    lr: float = 3e-4  # AdamW, cosine schedule with warm-up
    weight_decay: float = 1e-6
    ema: float = 0.999  # EMA of weights used for eval/checkpoints (0 disables)
    # Gaussian noise added to each training state (not the images), in units of the demos' per-dim std
    # (the normaliser's): a regulariser for few demos. 0 = off
    obs_noise: float = 0.0
    log_every: int = 100  # steps between metrics rows
    eval_every: int = 5000  # steps between evaluations (0: none)
    eval_episodes: int = 20
    save_every: int = 5000


@dataclass
class FinetuneConfig:
    init: Optional[str] = None  # default: out_dir/pretrain/checkpoints/last; "none" trains from scratch
    total_env_steps: int = 50000  # online env steps, all envs and processes together
    learning_starts: int = 1000  # env steps before updates start
    random_warmup: int = 0  # env steps of uniform random actions (from-scratch runs)
    batch_size: int = 256
    utd: float = 1.0  # critic updates per decision step (per env step / H, all envs)
    actor_delay: int = 1  # critic updates per actor update
    critic_warmup: int = 0  # critic-only updates run at once when learning starts, so Q fits the initial policy
    # before the actor follows it (offline-to-online: demos + the first online data)
    gamma: float = 0.99
    # Training episodes run to the time limit, as eval episodes do, and success is not an
    # absorbing state: every target bootstraps (demo transitions too). With dense rewards
    # in [0, 1] a terminal success would be worth less than hovering next to the goal.
    ignore_terminations: bool = True
    tau: float = 0.005  # Polyak rate of the target critic and target encoder
    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    # the critic step's learning rate for the shared encoder's weights (null: lr_critic). The actor reads
    # the encoder's features detached, so a lower rate slows how fast the critic moves them under it
    lr_encoder: Optional[float] = None
    lr_alpha: float = 3e-4
    init_alpha: float = 0.01
    target_entropy: Optional[float] = None  # default: -d, d = action_dim * H (the chunk's dimension)
    # learn alpha towards target_entropy. null (auto): yes, except for a flow actor with
    # policy.sigma_mode=fixed, whose entropy has a ceiling set by sigma and K, below -d at the
    # defaults (see flow_entropy_ceiling); there alpha stays at init_alpha
    learn_alpha: Optional[bool] = None
    num_q: int = 2  # critic ensemble size
    q_aggregation: str = "min"  # min | mean over the ensemble, for targets and the actor
    q_hidden_dim: int = 256  # critic MLP width (q_layers hidden layers)
    q_layers: int = 3
    grad_clip: float = 10.0  # gradient-norm clip for actor and critic
    buffer_size: int = 1000000  # online transitions kept per process (demos are held apart)
    demo_fraction: Optional[float] = 0.5  # RLPD-style share of demos per batch; None = uniform over the union
    bc_type: str = "flow_matching"  # BC term on demo batches: flow_matching | action_mse | none
    bc_weight: float = 1.0  # beta: weight of the BC term in the actor loss
    normalize_q: bool = True  # divide the SAC actor loss by mean |Q| so bc_weight is scale-free (as in TD3+BC, FQL)
    # weight of ||mu(s) - mu_0(s)||^2 on the batch's states: keeps the deterministic policy near the
    # initial (pretrained) one where demos do not constrain it (0 = off)
    anchor_weight: float = 0.0
    anchor_batch_size: int = 64  # states of the batch the anchor is computed on (its two extra rollouts dominate an update)
    bc_decay_steps: int = 0  # BC weight decays linearly to 0 over this many updates after critic_warmup (0: off)
    anchor_decay_steps: int = 0  # likewise for anchor_weight: hold a weak start early, let go later (0: off)
    log_every: int = 1000  # env steps
    eval_every: int = 10000  # env steps
    eval_episodes: int = 20
    save_every: int = 10000
    # torch.compile the update's losses: on | off | auto (on when the networks train on a GPU, with CUDA graphs;
    # off on the CPU, where it does not pay: docs/results.md#fine-tune-loop-throughput). The default is off
    # until compiled updates have been measured on a GPU
    compile: str = "off"
    save_buffer: bool = False  # store the replay buffer in checkpoints (large) so resume keeps it


@dataclass
class EvalConfig:
    episodes: int = 100  # `flowmanip eval`'s default --episodes
    seed: int = 0  # evaluation episodes use seeds seed, seed + 1, ... (training evals; `flowmanip eval`'s default --seed)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False  # also log to wandb (WANDB_MODE=offline works without a network)
    wandb_project: str = "flowmanip"


@dataclass
class Recipe:
    name: str = "pickcube"
    out_dir: str = "runs/pickcube"  # stages write out_dir/pretrain and out_dir/finetune
    seed: int = 0  # weights, env seeds (per rank) and sampling
    # where the networks train: auto = the GPU when CUDA is available (also under env.backend=cpu: CPU
    # simulation, GPU learner), else the CPU
    device: str = "auto"
    env: EnvConfig = field(default_factory=EnvConfig)
    data: Optional[DataConfig] = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted setting of a config dataclass (``seed``, ``pretrain.steps``, ...), not the section names."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys += _all_keys(sub, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _omegaconf_error(e, source: str, key_hint: str = "?") -> FlowmanipError:
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(e, "full_key", None) or key_hint
    if isinstance(e, ConfigKeyError):
        typed = key_hint if key_hint.startswith(key) else key  # the whole dotted key, where the user typed one
        close = difflib.get_close_matches(typed, _all_keys(Recipe), n=1, cutoff=0.8)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return FlowmanipError(f"{source}: unknown config key '{key}'{hint}")
    if isinstance(e, ValidationError):
        return FlowmanipError(f"{source}: bad value for '{key}': {str(e).splitlines()[0]}")
    where = f"'{key}': " if key != "?" else ""
    return FlowmanipError(f"{source}: {where}{str(e).splitlines()[0]}")


# settings that moved: old dotted key -> new one. Recipes, overrides and stored checkpoint configs that use the
# old name still load (recipes and overrides with a one-line notice)
MOVED = {"finetune.actor": "policy.actor"}


def _notice_moved(old: str, source: str) -> None:
    print(f"flowmanip: {source}: {old} is now {MOVED[old]}; reading it as {MOVED[old]}", file=sys.stderr)


def move_legacy_keys(d, source: str | None = None):
    """Move settings under their old names (``MOVED``) to the new ones in a recipe mapping, in place.
    ``source``: where the mapping came from, for the notice (None: silent, for checkpoints)."""
    for old, new in MOVED.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        section = d.get(old_section)
        if section is None or old_name not in section:
            continue
        value = section.pop(old_name)
        if new_section not in d or d[new_section] is None:
            d[new_section] = {}
        d[new_section].setdefault(new_name, value)
        if source is not None:
            _notice_moved(old, source)
    return d


def _recipe_layers(path: str, seen: tuple) -> list:
    """The YAML of ``path`` after that of its ``base:`` recipe (a path relative to the file), recursively."""
    from omegaconf import DictConfig, OmegaConf

    if not os.path.isfile(path):
        raise FlowmanipError(f"{seen[-1] + ': base ' if seen else ''}{path}: recipe file not found")
    if os.path.abspath(path) in seen:
        raise FlowmanipError(f"{path}: recipe 'base:' chain loops back to this file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise FlowmanipError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise FlowmanipError(f"{path}: a recipe maps sections to settings (env:, policy:, ...), "
                             f"got a YAML {type(loaded).__name__.replace('Config', '').lower()}")
    move_legacy_keys(loaded, path)
    base = loaded.pop("base", None)
    if base is None:
        return [loaded]
    if not isinstance(base, str):
        raise FlowmanipError(f"{path}: base must be the path of another recipe, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return [*_recipe_layers(base_path, (*seen, os.path.abspath(path))), loaded]


def load_recipe(path: str | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe (over its ``base:`` recipe, if it names one) onto the schema, apply overrides, validate."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Recipe)
    cfg = schema
    if path is not None:
        try:
            cfg = OmegaConf.merge(schema, *_recipe_layers(path, ()))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, path) from None
    for item in overrides:
        if "=" not in item:
            raise FlowmanipError(f"override '{item}': expected key=value, e.g. pretrain.steps=2000")
        key, value = item.split("=", 1)
        if key in MOVED:
            _notice_moved(key, f"override '{item}'")
            item = f"{MOVED[key]}={value}"
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, f"override '{item}'", item.split("=", 1)[0]) from None
    try:  # interpolations (${...}) resolve here
        recipe: Recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, path or "<recipe>") from None
    validate(recipe, (path or "<recipe>") + (" with overrides" if overrides else ""))
    if recipe.finetune.learn_alpha is None:  # auto: see FinetuneConfig.learn_alpha
        f = recipe.finetune
        f.learn_alpha = not (recipe.policy.actor == "flow" and recipe.policy.sigma_mode == "fixed")
    return recipe


def flow_entropy_ceiling(policy: PolicyConfig) -> float:
    """Largest entropy per action dimension a fixed-sigma flow rollout can have, in nats.

    With a fixed sigma each of the K steps adds ``sigma eps`` whatever the weights, so the
    path's entropy estimate ``-E log pi`` is at most ``K (c + log sigma)`` plus the start's
    ``c + log init_std`` (c = (1 + log 2 pi) / 2); the tanh correction only lowers it. A
    learned temperature whose target lies above this ceiling can only grow.
    """
    c = 0.5 * (1.0 + math.log(2 * math.pi))
    start = c + math.log(policy.init_std) if policy.init_std > 0 else 0.0
    return policy.flow_steps * (c + math.log(policy.sigma)) + start


def check_reachable_entropy(r: Recipe, d: int | None, source: str) -> None:
    """Refuse a learned temperature the fixed-sigma flow can never satisfy (``d``: chunk dim, if known)."""
    p, f = r.policy, r.finetune
    if p.actor != "flow" or p.sigma_mode != "fixed" or not f.learn_alpha:
        return
    ceiling = flow_entropy_ceiling(p)
    if f.target_entropy is None:
        target, what = -1.0, "the default target -d (-1 per dimension)"
    elif d is None:
        return
    else:
        target = f.target_entropy / d
        what = f"finetune.target_entropy={f.target_entropy} ({target:.2f} per dimension, d = {d})"
    if target >= ceiling:
        raise FlowmanipError(
            f"{source}: finetune.learn_alpha=true with policy.sigma_mode=fixed cannot work: the flow's entropy "
            f"is at most {ceiling:.2f} nats per action dimension (policy.sigma={p.sigma}, "
            f"policy.flow_steps={p.flow_steps}, policy.init_std={p.init_std}), below {what}, "
            "so alpha would grow without bound; set policy.sigma_mode=learned, "
            "finetune.learn_alpha=false, or a lower finetune.target_entropy")


def check_finetune_settings(r: Recipe, source: str = "<recipe>") -> None:
    """Settings ``flowmanip finetune`` cannot run with (``validate`` does not know the stage).

    ``policy.execute < policy.chunk``: the fine-tune steps whole H-step chunks (its transitions, chunk
    rewards and ``gamma^n`` are those of H steps) while evaluation replans after ``execute`` actions, so the
    policy it scores is not the one it trains.
    """
    p, f = r.policy, r.finetune
    if p.actor in FROZEN_FLOW_ACTORS:
        if f.bc_weight > 0 and f.bc_type != "none" or f.anchor_weight > 0:
            raise FlowmanipError(f"{source}: policy.actor={p.actor} keeps the flow policy frozen, so it has no BC or "
                                 "anchor term: set finetune.bc_weight=0 and finetune.anchor_weight=0")
        if f.init is not None and f.init.lower() in ("none", "scratch", ""):
            raise FlowmanipError(f"{source}: policy.actor={p.actor} starts from a pretrained flow policy; "
                                 "finetune.init=none has none")
    if 0 < p.execute < p.chunk:
        raise FlowmanipError(
            f"{source}: policy.execute={p.execute} with policy.chunk={p.chunk}: flowmanip finetune trains on whole "
            f"{p.chunk}-step chunks but evaluation would execute {p.execute} actions per decision; set "
            f"policy.execute=0 (all H) or policy.execute={p.chunk} to fine-tune (execute < chunk works for "
            "pretrain and eval)")


# keys validate checks, in this order: POSITIVE >= 1, NON_NEGATIVE >= 0 (0 turns it off), RATES > 0
POSITIVE = (
    "env.num_envs", "env.num_eval_envs", "env.max_episode_steps", "policy.flow_steps", "policy.chunk",
    "pretrain.batch_size", "finetune.batch_size", "finetune.num_q", "finetune.actor_delay", "finetune.buffer_size",
    "policy.decoder_memory_tokens", "env.camera_size",
    "eval.episodes", "policy.hidden_dim", "policy.num_layers",
    "policy.decoder_layers", "policy.decoder_heads", "policy.decoder_dim", "policy.encoder_dim",
    "policy.cnn_channels", "pretrain.steps", "pretrain.log_every", "pretrain.save_every",
    "finetune.total_env_steps", "finetune.log_every", "finetune.save_every", "finetune.q_hidden_dim",
    "finetune.q_layers", "finetune.anchor_batch_size",
)
NON_NEGATIVE = (
    "finetune.critic_warmup", "finetune.learning_starts", "finetune.random_warmup", "finetune.eval_every",
    "finetune.eval_episodes", "finetune.anchor_weight", "finetune.bc_weight", "finetune.bc_decay_steps",
    "finetune.anchor_decay_steps",
    "pretrain.eval_every", "pretrain.eval_episodes", "pretrain.weight_decay", "pretrain.obs_noise", "policy.gate_hidden_dim", "policy.gate_layers",
)
RATES = ("policy.residual_scale", "policy.noise_bound", "pretrain.lr", "finetune.lr_actor", "finetune.lr_critic", "finetune.lr_alpha", "finetune.init_alpha")


def _value(r: Recipe, key: str):
    section, name = key.split(".")
    return getattr(getattr(r, section), name)


def validate(r: Recipe, source: str) -> None:
    for key, choices in CHOICES.items():
        value = _value(r, key)
        if value not in choices:
            raise FlowmanipError(f"{source}: {key}={value!r} is not one of {list(choices)}")
    if r.device not in ("auto", "cpu", "cuda"):
        raise FlowmanipError(f"{source}: device={r.device!r} is not one of ['auto', 'cpu', 'cuda']")
    positive = [(key, _value(r, key)) for key in POSITIVE]
    if r.data is not None and r.data.max_episodes is not None:
        positive.append(("data.max_episodes", r.data.max_episodes))
    for key, value in positive:
        if value < 1:
            raise FlowmanipError(f"{source}: {key} must be >= 1, got {value}")
    non_negative = [(key, _value(r, key)) for key in NON_NEGATIVE]
    if r.data is not None:
        non_negative.append(("data.random_shift", r.data.random_shift))
    for key, value in non_negative:
        if value < 0:
            raise FlowmanipError(f"{source}: {key} must be >= 0 (0 turns it off), got {value}")
    for key in RATES:
        if _value(r, key) <= 0:
            raise FlowmanipError(f"{source}: {key} must be > 0, got {_value(r, key)}")
    if r.finetune.lr_encoder is not None and r.finetune.lr_encoder < 0:
        raise FlowmanipError(f"{source}: finetune.lr_encoder must be >= 0 (0 freezes the encoder) or null "
                             f"(lr_critic), got {r.finetune.lr_encoder}")
    if not 0 <= r.pretrain.ema < 1:
        raise FlowmanipError(f"{source}: pretrain.ema must be in [0, 1) (0 turns it off), got {r.pretrain.ema}")
    if r.policy.init_std < 0 or r.policy.sigma <= 0:
        raise FlowmanipError(f"{source}: policy.init_std must be >= 0 and policy.sigma > 0")
    if r.finetune.utd <= 0:
        raise FlowmanipError(f"{source}: finetune.utd must be > 0, got {r.finetune.utd}")
    if not 0 <= r.policy.execute <= r.policy.chunk:
        raise FlowmanipError(f"{source}: policy.execute must be in [0, policy.chunk={r.policy.chunk}], got {r.policy.execute}")
    if r.finetune.demo_fraction is not None and not 0 <= r.finetune.demo_fraction <= 1:
        raise FlowmanipError(f"{source}: finetune.demo_fraction must be in [0, 1] or null")
    if not 0 < r.finetune.gamma <= 1 or not 0 < r.finetune.tau <= 1:
        raise FlowmanipError(f"{source}: finetune.gamma and finetune.tau must be in (0, 1]")
    if r.policy.decoder_dim % r.policy.decoder_heads:
        raise FlowmanipError(f"{source}: policy.decoder_dim must be divisible by policy.decoder_heads")
    check_reachable_entropy(r, None, source)  # the default target; an explicit one is checked once d is known


def to_yaml(r: Recipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(r))


def upgrade_checkpoint_config(d: dict) -> dict:
    """A checkpoint's stored recipe, with settings added after it was written set to the values that
    reproduce its weights (their new defaults would build other shapes)."""
    move_legacy_keys(d)  # finetune.actor before 2026-12-02
    policy = d.setdefault("policy", {})
    policy.setdefault("decoder_tokens", "chunk")  # before 2026-11-26 Flow-T had per-step tokens ...
    policy.setdefault("decoder_memory_tokens", 1)  # ... and one memory token
    policy.setdefault("gate_hidden_dim", policy.get("hidden_dim", 512))  # before 2026-12-01 the Flow-G gate
    policy.setdefault("gate_layers", policy.get("num_layers", 3))  # was a second full MLP
    return d


def from_dict(d: dict) -> Recipe:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(d)))


def to_dict(r: Recipe) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(r))
