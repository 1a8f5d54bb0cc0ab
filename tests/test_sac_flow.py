"""SAC Flow losses against hand computations: targets, signs, temperature, target networks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flowmanip.algos.sac_flow import SACFlow, aggregate, flow_state_grad_norms
from flowmanip.config import FinetuneConfig, PolicyConfig
from flowmanip.models.policy import Policy, build_critic

SPEC = {"obs_dim": 5, "obs_mean": [0.0] * 5, "obs_std": [1.0] * 5, "action_dim": 2, "action_low": [-1.0] * 2,
        "action_high": [1.0] * 2, "env_low": [-1.0] * 2, "env_high": [1.0] * 2, "rgb_shape": None}


def make_agent(velocity="gated", **finetune):
    pcfg = PolicyConfig(velocity=velocity, flow_steps=3, chunk=2, hidden_dim=32, num_layers=2, encoder="mlp",
                        encoder_dim=16, decoder_dim=16, decoder_heads=2)
    fcfg = FinetuneConfig(**{"init_alpha": 0.2, "num_q": 2, "q_hidden_dim": 16, "q_layers": 1, **finetune})
    policy = Policy(SPEC, pcfg)
    critic = build_critic(policy.encoder.out_dim, SPEC, pcfg, fcfg)
    return SACFlow(policy, critic, fcfg)


def batch(B=6):
    torch.manual_seed(1)
    return {"obs": {"state": torch.randn(B, 5)}, "next_obs": {"state": torch.randn(B, 5)},
            "action": torch.rand(B, 4) * 2 - 1, "reward": torch.rand(B), "discount": torch.full((B,), 0.9),
            "terminated": torch.tensor([False, True, False, False, True, False])}


def set_constant(critic, values):
    """Make head j output values[j] for every input."""
    with torch.no_grad():
        for head, v in zip(critic.heads, values):
            nn.init.zeros_(head[-1].weight)
            head[-1].bias.fill_(v)


def test_aggregate():
    q = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    assert aggregate(q, "min").tolist() == [1.0, 2.0]
    assert aggregate(q, "mean").tolist() == [2.0, 3.5]


@pytest.mark.parametrize("how,ignore_terminations", [("min", False), ("mean", False), ("min", True)])
def test_critic_target_matches_hand_computation(how, ignore_terminations):
    agent = make_agent(q_aggregation=how, ignore_terminations=ignore_terminations)
    set_constant(agent.critic, [1.0, 3.0])
    set_constant(agent.target_critic, [2.0, 4.0])
    b = batch()
    torch.manual_seed(7)
    loss, info = agent.critic_loss(b)
    torch.manual_seed(7)  # replay the next-action sample
    _, next_log_prob, _ = agent.actor.sample(agent.encoder(b["next_obs"]))
    q_next = 2.0 if how == "min" else 3.0
    alpha = 0.2
    # terminal transitions bootstrap only when terminations are ignored (success is not absorbing)
    not_done = torch.ones(6) if ignore_terminations else (~b["terminated"]).float()
    y = b["reward"] + 0.9 * not_done * (q_next - alpha * next_log_prob)
    expected = 0.5 * ((1.0 - y) ** 2 + (3.0 - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(info["target_mean"], y.mean().detach())


class QuadraticCritic(nn.Module):
    """Q(z, a) = -||a - target||^2 for both heads."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z, a):
        q = -(a - self.target).pow(2).sum(-1) + 0 * self.dummy
        return torch.stack([q, q])


@pytest.mark.parametrize("velocity", ["mlp", "gated", "decoded"])
def test_actor_loss_climbs_q(velocity):
    torch.manual_seed(0)
    agent = make_agent(velocity, init_alpha=1e-4, normalize_q=False)
    target = torch.tensor([0.5, -0.5, 0.3, 0.2])
    agent.critic = QuadraticCritic(target)
    b = batch()
    opt = torch.optim.Adam(agent.actor_parameters(), lr=3e-3)

    def distance():
        torch.manual_seed(3)
        with torch.no_grad():
            a, _, _ = agent.actor.sample(agent.encoder(b["obs"]))
        return (a - target).pow(2).sum(-1).mean().item()

    before = distance()
    for _ in range(150):
        loss, _, _ = agent.actor_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert distance() < 0.3 * before


def test_normalized_actor_loss_is_scale_free():
    agent = make_agent(init_alpha=1e-8)
    b = batch()
    agent.critic = QuadraticCritic(torch.zeros(4))
    torch.manual_seed(0)
    small, _, _ = agent.actor_loss(b)
    agent.critic = nn.Module()
    agent.critic.forward = lambda z, a: 10 * QuadraticCritic(torch.zeros(4))(z, a)
    torch.manual_seed(0)
    large, _, _ = agent.actor_loss(b)
    assert small.item() == pytest.approx(large.item(), rel=1e-4)


def test_bc_term_is_added_with_its_weight():
    agent = make_agent(bc_type="flow_matching")
    b = batch()
    torch.manual_seed(0)
    no_bc, _, _ = agent.actor_loss(b)
    torch.manual_seed(0)
    with_bc, info, _ = agent.actor_loss(b, demo_batch=b, bc_weight=2.0)
    assert with_bc.item() == pytest.approx(no_bc.item() + 2.0 * info["bc_loss"].item(), rel=1e-5)


def test_anchor_keeps_the_deterministic_policy_near_its_start():
    """With the Q term pulling toward a far target, the anchored actor's executed action moves less."""
    target = torch.tensor([0.9, -0.9, 0.9, -0.9])
    b = batch()
    moved = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        agent = make_agent(init_alpha=1e-4, normalize_q=False, anchor_weight=weight)
        agent.critic = QuadraticCritic(target)
        z = agent.encoder(b["obs"]).detach()
        start = torch.tanh(agent.actor.deterministic(z)).detach()
        opt = torch.optim.Adam(agent.actor_parameters(), lr=3e-3)
        for step in range(100):
            loss, info, _ = agent.actor_loss(b)
            if step == 0 and weight > 0:
                assert info["anchor_loss"].item() == pytest.approx(0.0, abs=1e-10)  # starts at the frozen copy
            opt.zero_grad()
            loss.backward()
            opt.step()
        moved[weight] = (torch.tanh(agent.actor.deterministic(z)) - start).pow(2).sum(-1).mean().item()
        assert all(not p.requires_grad for p in (agent.anchor_actor.parameters() if weight else []))
    assert moved[0.0] > 0.05  # the Q term alone moves the policy
    assert moved[50.0] < 0.25 * moved[0.0]


def test_temperature_moves_towards_the_target_entropy():
    agent = make_agent(target_entropy=-4.0)
    opt = torch.optim.SGD([agent.log_alpha], lr=0.1)
    start = agent.log_alpha.item()
    opt.zero_grad()
    agent.alpha_loss(torch.full((8,), 6.0)).backward()  # log_prob = 6: entropy estimate -6, below the target -4
    opt.step()
    assert agent.log_alpha.item() > start  # too little entropy: alpha rises
    start = agent.log_alpha.item()
    opt.zero_grad()
    agent.alpha_loss(torch.full((8,), 1.0)).backward()  # entropy -1 above target -4
    opt.step()
    assert agent.log_alpha.item() < start


def test_polyak_update_and_detached_actor_features():
    agent = make_agent(tau=0.25)
    before = copy.deepcopy(agent.target_critic.state_dict())
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    agent.update_targets()
    for name, p in agent.target_critic.state_dict().items():
        online = agent.critic.state_dict()[name]
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * online)
    # the actor loss does not train the shared encoder
    loss, _, _ = agent.actor_loss(batch())
    loss.backward()
    assert all(p.grad is None for p in agent.encoder.parameters())


def test_gradient_diagnostics_cover_every_flow_state():
    agent = make_agent()
    loss, _, states = agent.actor_loss(batch(), keep_states=True)
    norms = flow_state_grad_norms(loss, states)
    assert len(norms) == 3 and all(n > 0 for n in norms)


def test_both_bc_kinds_average_over_batch_and_dimensions():
    """bc_weight must mean the same for either BC kind: both are per-dimension means."""
    from flowmanip.algos.flow_matching import bc_loss
    from flowmanip.models.flow_policy import ATANH_EPS

    agent = make_agent()
    z = torch.randn(6, agent.policy.encoder.out_dim)
    demo = torch.rand(6, agent.actor.dim) * 2 - 1
    torch.manual_seed(3)
    loss = bc_loss(agent.actor, z, demo, "action_mse")
    torch.manual_seed(3)  # the same rollout noise, by hand
    action, _, _ = agent.actor.sample(z)
    assert loss.item() == pytest.approx(((action - demo) ** 2).sum().item() / (6 * agent.actor.dim), rel=1e-6)
    torch.manual_seed(4)
    loss = bc_loss(agent.actor, z, demo, "flow_matching")
    torch.manual_seed(4)
    x1 = torch.atanh(demo.clamp(-1 + ATANH_EPS, 1 - ATANH_EPS))
    x0 = torch.randn_like(x1)
    t = torch.rand(6)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    target = x1 - x0
    by_hand = ((agent.actor.velocity(xt, t, z) - target) ** 2).sum() / (6 * agent.actor.dim)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_bc_weight_decays_from_the_end_of_the_critic_warmup():
    """The actor first updates after the critic warm-up, so the decay starts there, not at update 0."""
    from flowmanip.train.finetune import bc_weight_at

    cfg = FinetuneConfig(bc_weight=2.0, bc_decay_steps=100, critic_warmup=500)
    assert bc_weight_at(cfg, 0) == 2.0
    assert bc_weight_at(cfg, 500) == 2.0  # the first actor update gets the full weight
    assert bc_weight_at(cfg, 550) == pytest.approx(1.0)
    assert bc_weight_at(cfg, 600) == 0.0 and bc_weight_at(cfg, 10_000) == 0.0
    assert bc_weight_at(FinetuneConfig(bc_weight=2.0, bc_decay_steps=0, critic_warmup=500), 10_000) == 2.0
