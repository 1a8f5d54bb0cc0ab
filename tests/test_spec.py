"""The policy spec: one builder, one validator, both naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowmanip.errors import FlowmanipError
from flowmanip.spec import check_spec, make_spec


def test_make_spec_fills_an_identity_normaliser_and_is_plain_json():
    spec = make_spec(obs_dim=np.int64(3), action_low=torch.tensor([-1.0, -2.0]), action_high=np.array([1.0, 2.0]),
                     env_low=[-1, -2], env_high=[1, 2], rgb_shape=torch.Size([64, 64, 3]))
    assert spec == {"obs_dim": 3, "obs_mean": [0.0] * 3, "obs_std": [1.0] * 3, "action_dim": 2,
                    "action_low": [-1.0, -2.0], "action_high": [1.0, 2.0], "env_low": [-1.0, -2.0],
                    "env_high": [1.0, 2.0], "rgb_shape": [64, 64, 3]}
    assert json.loads(json.dumps(spec)) == spec


@pytest.mark.parametrize("change, message", [
    ({"obs_std": [1.0, 1.0]}, "spec obs_std must be 3 finite numbers (obs_dim)"),
    ({"action_high": [1.0, float("nan")]}, "spec action_high must be 2 finite numbers (action_dim)"),
    ({"action_low": [1.0, -1.0]}, "action_low must be below action_high"),
    ({"obs_dim": 0}, "spec obs_dim must be a positive integer"),
    ({"rgb_shape": [64, 64]}, "spec rgb_shape must be null or [H, W, C]"),
])
def test_check_spec_names_the_file_and_the_key(change, message):
    good = make_spec(obs_dim=3, action_low=[-1.0, -1.0], action_high=[1.0, 1.0], env_low=[-1.0, -1.0],
                     env_high=[1.0, 1.0])
    with pytest.raises(FlowmanipError, match="^ckpt/spec.json: ") as e:
        check_spec({**good, **change}, "ckpt/spec.json")
    assert message in str(e.value)


def test_check_spec_accepts_what_older_checkpoints_hold_and_refuses_missing_keys():
    good = make_spec(obs_dim=3, action_low=[-1.0, -1.0], action_high=[1.0, 1.0], env_low=[-1.0, -1.0],
                     env_high=[1.0, 1.0])
    constant_dim = {**good, "obs_std": [1.0, 0.0, 2.0]}  # data stats of a state entry that never varies
    assert check_spec(constant_dim, "x") == constant_dim
    older = {k: v for k, v in good.items() if k != "rgb_shape"}  # written before image policies
    assert check_spec(older, "x")["rgb_shape"] is None and "rgb_shape" not in older  # the input is not changed
    with pytest.raises(FlowmanipError, match="^ckpt/spec.json: spec lacks obs_mean$"):
        check_spec({k: v for k, v in good.items() if k != "obs_mean"}, "ckpt/spec.json")
