"""What a policy needs to know about its data and its env: one typed record, written to ``spec.json``.

A spec is a plain dict (so it round-trips through JSON and checkpoints unchanged) with exactly these
keys; ``make_spec`` is the one place that builds one and ``check_spec`` the one place that validates
one read from a file.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, TypedDict

from flowmanip.errors import FlowmanipError


class Spec(TypedDict):
    obs_dim: int                      # length of the flat ``state`` observation
    obs_mean: list[float]             # its normaliser: (state - obs_mean) / obs_std
    obs_std: list[float]
    action_dim: int                   # per env step
    action_low: list[float]           # the policy's [-1, 1] maps onto [action_low, action_high] ...
    action_high: list[float]
    env_low: list[float]              # ... clipped to the env's bounds
    env_high: list[float]
    rgb_shape: Optional[list[int]]    # [H, W, C] of the ``rgb`` observation, or None for state-only policies


FLOAT_LISTS = {"obs_mean": "obs_dim", "obs_std": "obs_dim", "action_low": "action_dim",
               "action_high": "action_dim", "env_low": "action_dim", "env_high": "action_dim"}


def _floats(values) -> list[float]:
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def make_spec(*, obs_dim: int, action_low: Sequence[float], action_high: Sequence[float],
              env_low: Sequence[float], env_high: Sequence[float], obs_mean: Optional[Sequence[float]] = None,
              obs_std: Optional[Sequence[float]] = None, rgb_shape: Optional[Sequence[int]] = None) -> Spec:
    """A checked spec; without ``obs_mean``/``obs_std`` the normaliser is the identity (set it later)."""
    spec: Spec = {
        "obs_dim": int(obs_dim),
        "obs_mean": _floats(obs_mean) if obs_mean is not None else [0.0] * int(obs_dim),
        "obs_std": _floats(obs_std) if obs_std is not None else [1.0] * int(obs_dim),
        "action_dim": len(action_low),
        "action_low": _floats(action_low), "action_high": _floats(action_high),
        "env_low": _floats(env_low), "env_high": _floats(env_high),
        "rgb_shape": [int(v) for v in rgb_shape] if rgb_shape is not None else None,
    }
    return check_spec(spec, "<spec>")


def check_spec(spec: dict, source: str) -> Spec:
    """A copy of ``spec`` if it is a valid spec, else one error naming ``source`` and what is wrong."""
    spec = {"rgb_shape": None, **spec}  # specs written before image policies have no rgb_shape
    missing = [k for k in Spec.__annotations__ if k not in spec]
    if missing:
        raise FlowmanipError(f"{source}: spec lacks {', '.join(missing)}")
    for key in ("obs_dim", "action_dim"):
        if not isinstance(spec[key], int) or spec[key] < 1:
            raise FlowmanipError(f"{source}: spec {key} must be a positive integer, got {spec[key]!r}")
    for key, dim in FLOAT_LISTS.items():
        values = spec[key]
        if not isinstance(values, list) or len(values) != spec[dim] or \
                not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise FlowmanipError(f"{source}: spec {key} must be {spec[dim]} finite numbers ({dim}), got {values!r}")
    if any(s < 0 for s in spec["obs_std"]):
        raise FlowmanipError(f"{source}: spec obs_std must not be negative")
    if any(lo >= hi for lo, hi in zip(spec["action_low"], spec["action_high"])):
        raise FlowmanipError(f"{source}: spec action_low must be below action_high in every dimension")
    rgb = spec["rgb_shape"]
    if rgb is not None and (not isinstance(rgb, list) or len(rgb) != 3 or not all(isinstance(v, int) and v > 0 for v in rgb)):
        raise FlowmanipError(f"{source}: spec rgb_shape must be null or [H, W, C], got {rgb!r}")
    return spec  # type: ignore[return-value]
