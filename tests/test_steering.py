"""The frozen-flow baselines: a residual SAC policy over the flow's chunk, and SAC over the flow's initial noise."""

from __future__ import annotations

import math

import pytest
import torch

from flowmanip.config import FinetuneConfig, PolicyConfig
from flowmanip.models.policy import Policy, build_critic
from flowmanip.algos.sac_flow import SACFlow

SPEC = {"obs_dim": 5, "obs_mean": [0.0] * 5, "obs_std": [1.0] * 5, "action_dim": 2, "action_low": [-1.0] * 2,
        "action_high": [1.0] * 2, "env_low": [-1.0] * 2, "env_high": [1.0] * 2, "rgb_shape": None}
PCFG = PolicyConfig(velocity="gated", flow_steps=3, chunk=2, hidden_dim=32, num_layers=2, residual_scale=0.1,
                    noise_bound=1.5)


def pretrained_flow():
    torch.manual_seed(0)
    return Policy(SPEC, PCFG, "flow")


@pytest.mark.parametrize("kind", ["residual", "noise"])
def test_base_loads_frozen_and_sac_moves_only_the_new_head(kind):
    flow = pretrained_flow()
    policy = Policy(SPEC, PCFG, kind)
    policy.load_init(flow.state_dict())
    obs = {"state": torch.randn(16, 5)}
    z = policy.encoder(obs)
    base = torch.tanh(flow.actor.deterministic(z))
    # at the start, the executed policy is the pretrained one's (zero residual; zero noise is the flow's own start)
    torch.testing.assert_close(torch.tanh(policy.actor.deterministic(z)), base, atol=1e-5, rtol=0)
    fcfg = FinetuneConfig(init_alpha=0.01, num_q=2, q_hidden_dim=16, q_layers=1, bc_weight=0.0, lr_actor=1e-2)
    agent = SACFlow(policy, build_critic(policy.encoder.out_dim, SPEC, PCFG, fcfg), fcfg)
    before = {k: v.clone() for k, v in policy.actor.base.state_dict().items()}
    b = {"obs": obs, "next_obs": {"state": torch.randn(16, 5)}, "action": torch.rand(16, 4) * 2 - 1,
         "reward": torch.rand(16), "discount": torch.full((16,), 0.9), "terminated": torch.zeros(16, dtype=torch.bool)}
    for _ in range(5):
        agent.update(b)
    for k, v in policy.actor.base.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    moved = torch.tanh(policy.actor.deterministic(z))
    assert (moved - base).abs().max() > 1e-4
    if kind == "residual":  # the correction stays within its bound
        assert (moved - base).abs().max() <= 0.1 + 1e-5


def test_residual_log_prob_is_the_scaled_head_density():
    """a = base + s r: log p(a) = log p(r) - d log s, with r's own tanh-Gaussian density computed by hand."""
    policy = Policy(SPEC, PCFG, "residual")
    policy.load_init(pretrained_flow().state_dict())
    actor = policy.actor
    z = torch.randn(4, 5)
    torch.manual_seed(3)
    a, log_prob, _ = actor.sample(z)
    base = torch.tanh(actor.base.deterministic(z))
    mean, log_std = actor.residual.stats(torch.cat([z, base], -1))
    r = (a - base) / 0.1
    u = torch.atanh(r)
    by_hand = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - torch.log(1 - r ** 2 + 1e-6)).sum(-1)
    torch.testing.assert_close(log_prob, by_hand - 4 * math.log(0.1), atol=1e-3, rtol=1e-4)


def test_noise_noiseing_executes_the_frozen_flow_from_the_chosen_noise():
    """The executed chunk is the pretrained flow's deterministic rollout from A_0 = bound * w, and the actor's
    gradient reaches w's policy through the frozen rollout."""
    policy = Policy(SPEC, PCFG, "noise")
    flow = pretrained_flow()
    policy.load_init(flow.state_dict())
    z = torch.randn(4, 5)
    torch.manual_seed(2)
    a, log_prob, _ = policy.actor.sample(z)
    torch.manual_seed(2)
    w, log_prob_w = policy.actor.noise_policy.sample(z)
    torch.testing.assert_close(a, torch.tanh(flow.actor.deterministic(z, 1.5 * w)))
    torch.testing.assert_close(log_prob, log_prob_w)
    a.sum().backward()
    assert policy.actor.noise_policy.net[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.actor.base.parameters())
