"""SAC Flow losses against hand computations: targets, signs, temperature, target networks."""

from __future__ import annotations

import copy
import math
import shutil
import unittest.mock

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


def test_aggregate():
    q = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    assert aggregate(q, "min").tolist() == [1.0, 2.0]
    assert aggregate(q, "mean").tolist() == [2.0, 3.5]


def perturb(module, scale=0.3, seed=11):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def q_by_hand(critic, z, a):
    """The batched QEnsemble written out head by head, layer by layer (Linear, LayerNorm, exact GELU)."""
    x0 = torch.cat([z, a], -1)
    heads = []
    for j in range(critic.num_q):
        x = x0
        for i in range(critic.num_layers):
            x = x @ critic.weights[i][j] + critic.biases[i][j]
            mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * critic.ln_weights[i][j] + critic.ln_biases[i][j]
            x = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
        heads.append((x @ critic.weights[-1][j] + critic.biases[-1][j]).squeeze(-1))
    return torch.stack(heads)


@pytest.mark.parametrize("how,ignore_terminations", [("min", False), ("mean", False), ("min", True)])
def test_critic_target_matches_hand_computation(how, ignore_terminations):
    """Real, input-dependent critics; target encoder and target critic differ from the online ones, so using
    obs for next_obs, the stored action for a', or an online network for the target all change the loss."""
    torch.manual_seed(0)
    agent = make_agent(q_aggregation=how, ignore_terminations=ignore_terminations)
    perturb(agent.target_critic, seed=1)
    perturb(agent.target_encoder, seed=2)
    b = batch()
    torch.manual_seed(7)
    loss, info = agent.critic_loss(b)
    torch.manual_seed(7)  # replay the next-action sample (the actor reads the online encoder's features)
    with torch.no_grad():
        next_action, next_log_prob, _ = agent.actor.sample(agent.encoder(b["next_obs"]))
        q_next = q_by_hand(agent.target_critic, agent.target_encoder(b["next_obs"]), next_action)
        q_next = q_next.min(0).values if how == "min" else q_next.mean(0)
        # terminal transitions bootstrap only when terminations are ignored (success is not absorbing)
        not_done = torch.ones(6) if ignore_terminations else (~b["terminated"]).float()
        y = b["reward"] + b["discount"] * not_done * (q_next - 0.2 * next_log_prob)
        q = q_by_hand(agent.critic, agent.encoder(b["obs"]), b["action"])
    expected = ((q - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(info["target_mean"], y.mean())


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
    """The BC term, recomputed by hand (flow matching in pre-tanh space on the demo batch), times its weight."""
    from flowmanip.models.flow_policy import ATANH_EPS

    agent = make_agent(bc_type="flow_matching")
    b = batch()
    demo = {"obs": {"state": torch.randn(6, 5)}, "action": torch.rand(6, 4) * 1.8 - 0.9}
    torch.manual_seed(0)
    no_bc, _, _ = agent.actor_loss(b)
    torch.manual_seed(0)
    with_bc, _, _ = agent.actor_loss(b, demo_batch=demo, bc_weight=2.0)
    torch.manual_seed(0)
    with torch.no_grad():
        agent.actor.sample(agent.encoder(b["obs"]))  # the SAC term's rollout draws its noise first
        x1 = torch.atanh(demo["action"].clamp(-1 + ATANH_EPS, 1 - ATANH_EPS))
        x0 = torch.randn(6, 4)
        t = torch.rand(6)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        bc = ((agent.actor.velocity(xt, t, agent.encoder(demo["obs"])) - (x1 - x0)) ** 2).mean()
    assert bc.item() > 0.01
    assert with_bc.item() == pytest.approx(no_bc.item() + 2.0 * bc.item(), rel=1e-5)


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


def test_anchor_reference_reads_the_frozen_encoder():
    """The critic trains a learned encoder; the anchor compares the executed policy on observations, so moving the
    live encoder (actor unchanged) opens an anchor loss equal to the policy's change on those observations."""
    torch.manual_seed(0)
    agent = make_agent(anchor_weight=1.0, anchor_batch_size=4)
    obs = batch()["obs"]
    head = {"state": obs["state"][:4]}
    assert agent.anchor_loss(obs).item() == pytest.approx(0.0, abs=1e-10)
    before = torch.tanh(agent.actor.deterministic(agent.encoder(head))).detach()
    perturb(agent.encoder)
    after = torch.tanh(agent.actor.deterministic(agent.encoder(head))).detach()
    expected = (after - before).pow(2).sum(-1).mean().item()
    assert expected > 1e-3
    assert agent.anchor_loss(obs).item() == pytest.approx(expected, rel=1e-5)
    assert all(not p.requires_grad for p in agent.anchor_encoder.parameters())


def test_actor_follows_the_encoder_during_the_critic_warmup():
    """Critic-only updates move a learned encoder. With the anchor on, the actor takes anchor-only steps, so the
    executed policy on the batch's observations stays much nearer its start than with the anchor off (where the
    actor does not move and the encoder's drift changes its actions)."""
    b = batch()
    moved, actor_moved = {}, {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        agent = make_agent(anchor_weight=weight, anchor_batch_size=6, lr_critic=1e-2, lr_actor=3e-3)
        start = torch.tanh(agent.actor.deterministic(agent.encoder(b["obs"]))).detach()
        actor0 = [p.detach().clone() for p in agent.actor_parameters()]
        for _ in range(150):
            info = agent.update(b, critic_only=True)
        assert ("anchor_loss" in info) == (weight > 0)
        now = torch.tanh(agent.actor.deterministic(agent.encoder(b["obs"]))).detach()
        moved[weight] = (now - start).pow(2).sum(-1).mean().item()
        actor_moved[weight] = sum((p - q).abs().sum().item() for p, q in zip(agent.actor_parameters(), actor0))
    assert actor_moved[0.0] == 0.0 and actor_moved[10.0] > 0
    assert moved[0.0] > 1e-4  # the critic moved the encoder, and with it the policy's actions
    assert moved[10.0] < 0.1 * moved[0.0]


def test_identity_encoder_takes_no_warmup_actor_step():
    """With the identity encoder nothing moves under the actor: critic-only updates leave the actor as it was."""
    pcfg = PolicyConfig(velocity="gated", flow_steps=3, chunk=2, hidden_dim=32, num_layers=2, encoder="identity")
    fcfg = FinetuneConfig(init_alpha=0.2, num_q=2, q_hidden_dim=16, q_layers=1, anchor_weight=10.0)
    policy = Policy(SPEC, pcfg)
    agent = SACFlow(policy, build_critic(policy.encoder.out_dim, SPEC, pcfg, fcfg), fcfg)
    actor0 = copy.deepcopy(agent.actor.state_dict())
    for _ in range(3):
        info = agent.update(batch(), critic_only=True)
    assert "anchor_loss" not in info
    for name, p in agent.actor.state_dict().items():
        torch.testing.assert_close(p, actor0[name], rtol=0, atol=0)


def test_checkpoint_without_anchor_encoder_loads():
    """A state dict saved before the anchor kept its own encoder copy loads strictly, the copy taking the saved
    encoder's weights and normaliser."""
    torch.manual_seed(0)
    saved = make_agent(anchor_weight=1.0)
    perturb(saved.encoder)
    with torch.no_grad():
        saved.encoder.normalizer.mean.fill_(0.5)
    old = {k: v for k, v in saved.state_dict().items() if not k.startswith("anchor_encoder.")}
    assert len(old) < len(saved.state_dict())
    fresh = make_agent(anchor_weight=1.0)
    fresh.load_state_dict(old)  # strict
    for name, p in saved.encoder.state_dict().items():
        torch.testing.assert_close(fresh.anchor_encoder.state_dict()[name], p, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in old.items() if not k.startswith("encoder.")})


def test_obs_stats_reach_the_anchor_encoder():
    """A run from scratch measures the observation normaliser from its first env steps: the anchor's frozen
    encoder must read states the same way as the live one (its mean and std are the buffer's, by hand)."""
    from accelerate import Accelerator

    from flowmanip.train.finetune_setup import set_obs_stats
    from flowmanip.train.replay import ReplayBuffer

    agent = make_agent(anchor_weight=1.0)
    b = batch()
    buffer = ReplayBuffer(16, b["obs"], 4, "cpu")
    buffer.add(b["obs"], b["action"], b["reward"], b["discount"], b["terminated"], b["next_obs"])
    spec = dict(SPEC)
    set_obs_stats(Accelerator(cpu=True), buffer, agent, spec, "cpu")
    states = torch.cat([b["obs"]["state"], b["next_obs"]["state"]])
    for module in (agent.encoder, agent.target_encoder, agent.anchor_encoder):
        torch.testing.assert_close(module.normalizer.mean, states.mean(0))
        torch.testing.assert_close(module.normalizer.std, states.std(0).clamp(min=1e-3))


def _moved(params, before) -> torch.Tensor:
    change = torch.cat([(p.detach() - q).abs().flatten() for p, q in zip(params, before)])
    return change[change > 0]


@pytest.mark.parametrize("lr_encoder", [None, 1e-4])
def test_lr_encoder_sets_the_encoders_step(lr_encoder):
    """Adam's first step moves a parameter with gradient g by lr * |g| / (|g| + eps), about lr: with
    finetune.lr_encoder the critic step moves the encoder's weights by that rate, else by lr_critic."""
    torch.manual_seed(0)
    agent = make_agent(lr_critic=1e-2, lr_encoder=lr_encoder, grad_clip=0.0)
    encoder_before = [p.detach().clone() for p in agent.encoder.parameters()]
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    agent.update(batch(), critic_only=True)
    encoder_step = _moved(agent.encoder.parameters(), encoder_before)
    critic_step = _moved(agent.critic.parameters(), critic_before)
    assert len(encoder_step) > 100 and len(critic_step) > 100
    expected = 1e-2 if lr_encoder is None else lr_encoder
    assert encoder_step.max().item() == pytest.approx(expected, rel=1e-3)
    assert critic_step.max().item() == pytest.approx(1e-2, rel=1e-3)


def test_resume_regroups_the_critic_optimizer_and_takes_the_configs_rates():
    """A run resumed with lr_encoder set (or unset) since its checkpoint keeps each parameter's Adam
    moments; the learning rates come from the resumed run's config, not the checkpoint."""
    torch.manual_seed(0)
    saved = make_agent(lr_critic=1e-2)
    saved.update(batch(), critic_only=True)
    resumed = make_agent(lr_critic=2e-2, lr_encoder=1e-4)
    resumed.load_state_dict(saved.state_dict())
    resumed.load_training_state(copy.deepcopy(saved.training_state()))
    assert [g["lr"] for g in resumed.critic_opt.param_groups] == [1e-4, 2e-2]
    for a, b in zip(saved.critic_parameters(), resumed.critic_parameters()):
        assert a.shape == b.shape
        torch.testing.assert_close(saved.critic_opt.state[a]["exp_avg_sq"], resumed.critic_opt.state[b]["exp_avg_sq"])
    back = make_agent(lr_critic=1e-2)
    back.load_training_state(copy.deepcopy(resumed.training_state()))
    assert [g["lr"] for g in back.critic_opt.param_groups] == [1e-2]
    for a, b in zip(saved.critic_parameters(), back.critic_parameters()):
        torch.testing.assert_close(saved.critic_opt.state[a]["exp_avg"], back.critic_opt.state[b]["exp_avg"])
    # the regrouped optimiser steps
    resumed.update(batch(), critic_only=True)
    back.update(batch(), critic_only=True)


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


def test_gradient_diagnostics_match_a_hand_rollout():
    """||dL/dA_k|| for every flow state, against the rollout written out by hand with the same noise:
    L = mean(alpha log pi - min_j Q_j) as a function of the tensor A_k, which enters the density of its own
    step (given the previous mean, or the start density for A_0) and every step after it."""
    torch.manual_seed(0)
    agent = make_agent(normalize_q=False)
    b = batch()
    torch.manual_seed(5)
    loss, _, states = agent.actor_loss(b, keep_states=True)
    norms = flow_state_grad_norms(loss, states)
    actor, K, B, d = agent.actor, 3, 6, 4
    z = agent.encoder(b["obs"]).detach()
    torch.manual_seed(5)
    a0 = torch.randn(B, d) * actor.init_std
    noise = [torch.randn(B, d) for _ in range(K)]
    log_sigma = actor.log_sigma(z).detach()
    sigma = log_sigma.exp()

    def log_normal(x, mean, log_std):
        return (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def loss_from(k, a_k, prev_mean):
        if k == 0:
            logp = log_normal(a_k, torch.zeros(B, d), torch.full((B, d), math.log(actor.init_std)))
        else:
            logp = log_normal(a_k, prev_mean, log_sigma)
        a = a_k
        for j in range(k, K):
            mean = a + actor.velocity(a, torch.full((B,), j / K), z) / K
            a = mean + sigma * noise[j]
            logp = logp + log_normal(a, mean, log_sigma)
        logp = logp - torch.log(1 - torch.tanh(a) ** 2 + 1e-6).sum(-1)
        return (0.2 * logp - q_by_hand(agent.critic, z, torch.tanh(a)).min(0).values).mean()

    a, prev_mean = a0, None
    for k in range(K):
        leaf = a.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_from(k, leaf, prev_mean), leaf)
        assert norms[k] == pytest.approx(grad.norm().item(), rel=1e-4), k
        with torch.no_grad():  # advance the hand rollout one step
            prev_mean = a + actor.velocity(a, torch.full((B,), k / K), z) / K
            a = prev_mean + sigma * noise[k]
    assert len(norms) == K


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
    from flowmanip.algos.sac_flow import bc_weight_at

    cfg = FinetuneConfig(bc_weight=2.0, bc_decay_steps=100, critic_warmup=500)
    assert bc_weight_at(cfg, 0) == 2.0
    assert bc_weight_at(cfg, 500) == 2.0  # the first actor update gets the full weight
    assert bc_weight_at(cfg, 550) == pytest.approx(1.0)
    assert bc_weight_at(cfg, 600) == 0.0 and bc_weight_at(cfg, 10_000) == 0.0
    assert bc_weight_at(FinetuneConfig(bc_weight=2.0, bc_decay_steps=0, critic_warmup=500), 10_000) == 2.0


def test_anchor_weight_decays_from_the_end_of_the_critic_warmup():
    from flowmanip.algos.sac_flow import anchor_weight_at

    cfg = FinetuneConfig(anchor_weight=10.0, anchor_decay_steps=200, critic_warmup=100)
    assert [anchor_weight_at(cfg, n) for n in (0, 100, 150, 250, 300, 5000)] == pytest.approx([10, 10, 7.5, 2.5, 0, 0])
    assert anchor_weight_at(FinetuneConfig(anchor_weight=10.0, critic_warmup=100), 5000) == 10.0


def test_update_scales_the_anchor_by_its_decayed_weight():
    """Halfway through the decay an update's actor loss is the un-anchored loss plus half the weight times the
    anchor; past the decay the update drops the anchor and matches an agent without one, parameter for parameter."""
    b = batch()

    def run(updates_so_far, **finetune):
        torch.manual_seed(0)
        agent = make_agent(**finetune)
        if agent.anchor_actor is not None:
            perturb(agent.anchor_actor)  # so the anchor term is not zero
        agent.updates = updates_so_far
        torch.manual_seed(1)
        return agent, agent.update(b)

    decay = dict(anchor_weight=4.0, anchor_decay_steps=10, anchor_batch_size=4)
    _, plain = run(4)
    _, half = run(4, **decay)  # the update counts itself: 5 of 10 decay steps done, weight 2
    assert half["anchor_loss"].item() > 1e-3
    assert half["actor_loss"].item() == pytest.approx(plain["actor_loss"].item() + 2.0 * half["anchor_loss"].item(),
                                                      rel=1e-5)
    free, info = run(10, **decay)
    ref, _ = run(10)
    assert "anchor_loss" not in info
    for p, q in zip(free.actor_parameters(), ref.actor_parameters()):
        assert torch.equal(p, q)


def test_update_matches_a_hand_written_update():
    """Regression test of ``SACFlow.update``'s maths and order: one critic step (clipped Adam), Polyak targets,
    one actor step (SAC term / mean|Q| + beta * flow-matching BC + lambda * anchor on the first states), one
    temperature step; written out here with plain Adam from the same weights, RNG and batch."""
    from flowmanip.models.flow_policy import ATANH_EPS

    torch.manual_seed(0)
    agent = make_agent(anchor_weight=3.0, anchor_batch_size=4, bc_weight=0.5, learn_alpha=True, grad_clip=0.05,
                       tau=0.1, lr_actor=1e-2, lr_critic=1e-2, lr_alpha=1e-2, target_entropy=-3.0)
    with torch.no_grad():  # the anchor starts away from the actor, so its gradient is not zero
        for p in agent.anchor_actor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = copy.deepcopy(agent)
    b, demo = batch(), {"obs": {"state": torch.randn(6, 5)}, "action": torch.rand(6, 4) * 1.8 - 0.9}

    torch.manual_seed(3)
    info = agent.update(b, demo)

    cfg = ref.cfg
    critic_opt = torch.optim.Adam(ref.critic_parameters(), lr=cfg.lr_critic)
    actor_opt = torch.optim.Adam(ref.actor_parameters(), lr=cfg.lr_actor)
    alpha_opt = torch.optim.Adam([ref.log_alpha], lr=cfg.lr_alpha)

    def step(opt, loss, params, clip):
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    torch.manual_seed(3)
    encoder0 = copy.deepcopy(ref.encoder)  # the encoder before the critic step moves it: the anchor's reference reads it
    alpha = ref.log_alpha.exp().item()
    with torch.no_grad():
        a_next, logp_next, _ = ref.actor.sample(ref.encoder(b["next_obs"]))
        q_next = q_by_hand(ref.target_critic, ref.target_encoder(b["next_obs"]), a_next).min(0).values
        y = b["reward"] + b["discount"] * (q_next - alpha * logp_next)  # terminations ignored (the default)
    q = q_by_hand(ref.critic, ref.encoder(b["obs"]), b["action"])
    step(critic_opt, ((q - y) ** 2).mean(), ref.critic_parameters(), cfg.grad_clip)
    with torch.no_grad():
        for t, p in zip(list(ref.target_encoder.parameters()) + list(ref.target_critic.parameters()),
                        list(ref.encoder.parameters()) + list(ref.critic.parameters())):
            t.copy_((1 - cfg.tau) * t + cfg.tau * p)

    z = ref.encoder(b["obs"]).detach()
    a, logp, _ = ref.actor.sample(z)
    q = q_by_hand(ref.critic, z, a).min(0).values
    loss = (alpha * logp - q).mean() / q.abs().mean().detach()
    x1 = torch.atanh(demo["action"].clamp(-1 + ATANH_EPS, 1 - ATANH_EPS))
    x0, t = torch.randn(6, 4), torch.rand(6)
    v = ref.actor.velocity((1 - t[:, None]) * x0 + t[:, None] * x1, t, ref.encoder(demo["obs"]).detach())
    loss = loss + 0.5 * ((v - (x1 - x0)) ** 2).mean()
    with torch.no_grad():
        anchor_ref = torch.tanh(ref.anchor_actor.deterministic(encoder0({"state": b["obs"]["state"][:4]})))
    loss = loss + 3.0 * ((torch.tanh(ref.actor.deterministic(z[:4])) - anchor_ref) ** 2).sum(-1).mean()
    step(actor_opt, loss, ref.actor_parameters(), cfg.grad_clip)
    step(alpha_opt, -ref.log_alpha * (logp.mean().detach() - 3.0), [ref.log_alpha], 0)

    assert info["actor_loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    ours, theirs = agent.state_dict(), ref.state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=name)
    assert agent.updates == 1 and abs(agent.log_alpha.item() - math.log(0.2)) > 1e-3  # every part moved


def test_an_actor_step_changes_neither_critic_nor_encoder():
    """With the identity encoder the recipes use: the critic and encoder after a full update equal those after a
    critic-only update from the same state and RNG; the actor's parameters do move."""
    pcfg = PolicyConfig(velocity="gated", flow_steps=3, chunk=2, hidden_dim=32, num_layers=2, encoder="identity")
    fcfg = FinetuneConfig(init_alpha=0.2, num_q=2, q_hidden_dim=16, q_layers=1, lr_actor=1e-2)
    policy = Policy(SPEC, pcfg)
    full = SACFlow(policy, build_critic(policy.encoder.out_dim, SPEC, pcfg, fcfg), fcfg)
    critic_only = copy.deepcopy(full)
    b = batch()
    torch.manual_seed(1)
    full.update(b)
    torch.manual_seed(1)
    critic_only.update(b, critic_only=True)
    for name, p in critic_only.critic.state_dict().items():
        torch.testing.assert_close(full.critic.state_dict()[name], p, rtol=0, atol=0)
    for name, p in critic_only.encoder.state_dict().items():
        torch.testing.assert_close(full.encoder.state_dict()[name], p, rtol=0, atol=0)
    moved = [(p - q).abs().max().item() for p, q in zip(full.actor.parameters(), critic_only.actor.parameters())]
    assert max(moved) > 1e-4


def test_actor_delay_and_warmup_counts():
    """actor_delay=3 over 9 updates, the first 3 a critic warm-up: 9 critic steps, actor and alpha steps at
    updates 6 and 9 only."""
    agent = make_agent(actor_delay=3, learn_alpha=True)
    b = batch()
    for i in range(9):
        info = agent.update(b, critic_only=i < 3)
        assert ("actor_loss" in info) == (i + 1 in (6, 9)), i
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert agent.updates == 9 and steps(agent.critic_opt) == 9
    assert steps(agent.actor_opt) == 2 and steps(agent.alpha_opt) == 2


def test_critic_loads_the_per_head_layout_of_older_checkpoints():
    """Checkpoints before the batched ensemble stored one nn.Sequential per head: they load into the same function."""
    from flowmanip.models.critic import QEnsemble
    from flowmanip.models.layers import mlp

    torch.manual_seed(0)
    heads = nn.ModuleList([mlp(9, 16, 1, 2, layer_norm=True) for _ in range(3)])
    old_state = {f"heads.{k}": v for k, v in heads.state_dict().items()}
    critic = QEnsemble(5, 4, num_q=3, hidden_dim=16, num_layers=2)
    critic.load_state_dict(old_state)
    z, a = torch.randn(7, 5), torch.randn(7, 4)
    expected = torch.stack([h(torch.cat([z, a], -1)).squeeze(-1) for h in heads])
    torch.testing.assert_close(critic(z, a), expected)


@pytest.mark.parametrize("velocity", ["gated", "decoded"])
def test_full_updates_learn_a_contextual_bandit(velocity):
    """Learning, not a formula: only agent.update (critic step, targets, actor step through the
    K-step noisy rollout) sees the reward -|a - W s|^2 of one-step episodes, from uniform random
    actions. The critic has to learn Q and the actor has to climb the learned Q: the deterministic
    policy's squared error to the best action must fall well below where it starts and below the
    error of always playing the action range's centre."""
    torch.manual_seed(0)
    agent = make_agent(velocity, init_alpha=1e-4, normalize_q=False, q_hidden_dim=64, q_layers=2,
                       lr_actor=1e-3, lr_critic=3e-3, critic_warmup=0, ignore_terminations=False)
    W = torch.randn(4, 5) * 0.3

    def fresh(B=128):
        s = torch.randn(B, 5)
        a = torch.rand(B, 4) * 2 - 1
        return {"obs": {"state": s}, "next_obs": {"state": torch.randn(B, 5)}, "action": a,
                "reward": -(a - s @ W.T).pow(2).sum(-1), "discount": torch.full((B,), 0.9),
                "terminated": torch.ones(B, dtype=torch.bool)}

    probe = fresh(512)["obs"]
    best = (probe["state"] @ W.T).clamp(-1, 1)

    def error():
        with torch.no_grad():
            a = torch.tanh(agent.actor.deterministic(agent.encoder(probe)))  # the executed action
        return (a - best).pow(2).sum(-1).mean().item()

    before, centre = error(), best.pow(2).sum(-1).mean().item()
    for _ in range(600):
        agent.update(fresh())
    after = error()
    assert after < 0.1 * before and after < 0.2 * centre, (before, centre, after)
    held_out = fresh(512)  # terminated one-step episodes: Q must be the reward itself
    with torch.no_grad():
        q = agent.critic(agent.encoder(held_out["obs"]), held_out["action"]).mean(0)
    r = held_out["reward"]
    assert (q - r).pow(2).mean() < 0.05 * (r - r.mean()).pow(2).mean()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU generates C++ and needs a compiler")
def test_compiled_updates_match_eager_updates():
    """finetune.compile=on runs the losses through torch.compile (CUDA graphs on a GPU, which cannot run here;
    on the CPU, Inductor's C++ kernels). From the same weights, RNG and batches, three compiled updates (critic,
    Polyak, actor with BC and anchor, temperature) leave the same parameters as eager ones."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    eager = make_agent(anchor_weight=3.0, anchor_batch_size=4, bc_weight=0.5, learn_alpha=True, lr_actor=1e-2,
                       lr_critic=1e-2)
    with torch.no_grad():
        for p in eager.anchor_actor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled, start = copy.deepcopy(eager), copy.deepcopy(eager)
    compiled.compile_losses()
    b, demo = batch(), {"obs": {"state": torch.randn(6, 5)}, "action": torch.rand(6, 4) * 1.8 - 0.9}
    infos = []
    with unittest.mock.patch.object(inductor_config, "fallback_random", True):  # eager's random stream
        for agent in (eager, compiled):
            torch.manual_seed(3)
            infos.append([agent.update(b, demo, diagnose=i == 2) for i in range(3)])
    assert compiled.compiled and not eager.compiled
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    moved = sum(float((p - q).detach().abs().max()) for p, q in zip(eager.parameters(), start.parameters()))
    assert moved > 0.1  # the updates did change the weights
    assert infos[1][2]["grad_A1"] > 0  # the diagnostic update's per-flow-state gradients are there
    for a, c in zip(infos[0], infos[1]):
        assert a.keys() == c.keys()
        assert all(torch.allclose(torch.as_tensor(a[k]), torch.as_tensor(c[k]), atol=1e-4) for k in a), (a, c)
