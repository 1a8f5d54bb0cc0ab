"""Flow policy maths: likelihoods, Flow-G's contraction, shapes, fitting a tiny dataset."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowmanip.config import PolicyConfig
from flowmanip.models.encoders import RGBEncoder
from flowmanip.models.flow_policy import FlowActor
from flowmanip.models.policy import Policy
from flowmanip.models.velocity import GatedVelocity


def act_cfg(velocity="mlp", K=4, H=1, sigma=0.3, **kw):
    return PolicyConfig(velocity=velocity, flow_steps=K, chunk=H, hidden_dim=32, num_layers=2, decoder_dim=32,
                        decoder_heads=4, sigma=sigma, **kw)


def actor(velocity="mlp", K=4, H=1, A=2, z_dim=6, sigma=0.3, **kw):
    return FlowActor(z_dim, A, act_cfg(velocity, K, H, sigma, **kw))


@pytest.mark.parametrize("init_std", [1.0, 0.0])
def test_fixed_sigma_entropy_is_the_ceiling_the_config_checks(init_std):
    """Without the tanh term, -E log pi of a fixed-sigma rollout is flow_entropy_ceiling per dim, whatever the weights."""
    from flowmanip.config import flow_entropy_ceiling
    from flowmanip.models.flow_policy import tanh_log_det

    torch.manual_seed(0)
    act = actor(velocity="gated", K=4, A=4, sigma=0.3, init_std=init_std)
    with torch.no_grad():
        action, log_prob, _ = act.sample(torch.randn(8192, 6))
        pre_tanh = torch.atanh(action.clamp(-1 + 1e-7, 1 - 1e-7).double())
        entropy = -(log_prob.double() + tanh_log_det(pre_tanh)).mean().item() / act.dim
        with_tanh = -log_prob.mean().item() / act.dim
    ceiling = flow_entropy_ceiling(act_cfg(sigma=0.3, init_std=init_std))
    assert abs(entropy - ceiling) < 0.03, (entropy, ceiling)
    assert with_tanh < ceiling - 0.05  # the squashing only lowers it


@pytest.mark.parametrize("init_std", [1.0, 0.5, 0.0])
def test_k1_log_prob_matches_an_independent_formula(init_std):
    torch.manual_seed(0)
    act = actor(K=1, A=3, sigma=0.4, init_std=init_std)
    z = torch.randn(5, 6)
    gen = torch.Generator().manual_seed(1)
    action, log_prob, _ = act.sample(z, generator=gen)
    gen = torch.Generator().manual_seed(1)  # replay the same noise by hand
    a0 = torch.randn(5, 3, generator=gen) * init_std
    eps = torch.randn(5, 3, generator=gen)
    mean = a0 + act.velocity(a0, torch.zeros(5), z)
    a1 = mean + 0.4 * eps
    # with init_std = 0, A_0 = 0 is not random: only the noisy step contributes
    start = Normal(0.0, init_std).log_prob(a0).sum(-1) if init_std > 0 else 0.0
    expected = (start + Normal(mean, 0.4).log_prob(a1).sum(-1)
                - torch.log(1 - torch.tanh(a1) ** 2 + 1e-6).sum(-1))
    torch.testing.assert_close(action, torch.tanh(a1))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_path_density_integrates_to_one():
    """K=1, d=1: exp(log pi) over (A_0, a = tanh(A_1)) integrates to 1, so no Gaussian term is missing."""
    torch.manual_seed(0)
    act = actor(K=1, A=1, sigma=0.5)
    z = torch.randn(1, 6)
    a0 = torch.linspace(-7, 7, 701)
    a = torch.linspace(-0.999999, 0.999999, 4001)
    A0, Act = torch.meshgrid(a0, a, indexing="ij")
    u = torch.atanh(Act)
    mean = A0 + act.velocity(A0.reshape(-1, 1), torch.zeros(A0.numel()), z.expand(A0.numel(), 6)).reshape(A0.shape)
    # same terms as FlowActor.sample, evaluated on a grid instead of on samples
    from flowmanip.models.flow_policy import gaussian_log_prob, tanh_log_det

    lp = (gaussian_log_prob(A0[..., None], torch.zeros(1), torch.zeros(1))
          + gaussian_log_prob(u[..., None], mean[..., None], torch.full((1,), math.log(0.5)))
          - tanh_log_det(u[..., None]))
    total = torch.trapezoid(torch.trapezoid(lp.exp(), a, dim=1), a0)
    assert total.item() == pytest.approx(1.0, abs=0.02)


def test_monte_carlo_log_prob_matches_sample_frequencies():
    """With a zero velocity, A_K = A_0 + sum of K noises ~ N(0, 1 + K sigma^2); the K-step chain's path density
    must give that marginal when the intermediate states are integrated out by Monte Carlo."""
    torch.manual_seed(0)
    K, sigma = 3, 0.5
    act = actor(K=K, A=1, sigma=sigma)
    for p in act.velocity.parameters():
        torch.nn.init.zeros_(p)
    n = 200000
    action, _, _ = act.sample(torch.zeros(n, 6))
    u = torch.atanh(action.clamp(-0.999999, 0.999999)).squeeze(-1)
    var = 1 + K * sigma ** 2
    assert u.var().item() == pytest.approx(var, rel=0.02)
    assert u.mean().item() == pytest.approx(0.0, abs=0.01)


FIELDS = [("mlp", "single"), ("gated", "single"), ("decoded", "single"), ("decoded", "chunk")]


@pytest.mark.parametrize("velocity,tokens", FIELDS)
@pytest.mark.parametrize("H", [1, 4])
def test_shapes_with_chunks(velocity, tokens, H):
    act = actor(velocity, K=3, H=H, A=4, decoder_tokens=tokens)
    z = torch.randn(7, 6)
    action, log_prob, states = act.sample(z, keep_states=True)
    assert action.shape == (7, 4 * H) and log_prob.shape == (7,) and len(states) == 3
    assert act.deterministic(z).shape == (7, 4 * H)
    assert act.flow_matching_loss(z, torch.rand(7, 4 * H) * 2 - 1).shape == ()
    assert torch.all(action.abs() <= 1)


def test_flow_g_gate_starts_near_one_and_contracts_each_step():
    torch.manual_seed(0)
    K, d = 4, 3
    field = GatedVelocity(5, d, 1, hidden_dim=16, num_layers=2)
    torch.nn.init.zeros_(field.candidate[-1].weight)  # h independent of A_k, so the Jacobian is the gate's leak alone
    z, a = torch.randn(1, 5), torch.randn(1, d)
    g = torch.sigmoid(torch.tensor(5.0)).item()
    x = torch.cat([z, a, field.time(torch.zeros(1))], dim=-1)
    torch.testing.assert_close(torch.sigmoid(field.gate(x)), torch.full((1, d), g))
    dt = 1.0 / K
    step = lambda a_: a_ + dt * field(a_, torch.zeros(1), z)  # noqa: E731
    J = torch.autograd.functional.jacobian(step, a).reshape(d, d)
    torch.testing.assert_close(J, (1 - dt * g) * torch.eye(d), atol=1e-6, rtol=0)


@pytest.mark.parametrize("velocity,tokens", FIELDS)
def test_deterministic_rollout_reproduces_a_fitted_tiny_dataset(velocity, tokens):
    torch.manual_seed(0)
    act = actor(velocity, K=4, H=2, A=2, z_dim=4, decoder_tokens=tokens)
    z = torch.eye(4)
    target = torch.tensor([[0.5, -0.5, 0.2, 0.1], [-0.6, 0.3, 0.0, 0.7], [0.1, 0.8, -0.3, -0.2],
                           [0.4, 0.4, -0.7, 0.5]])
    opt = torch.optim.Adam(act.parameters(), lr=3e-3)
    for _ in range(1500):
        loss = act.flow_matching_loss(z.repeat(16, 1), target.repeat(16, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (torch.tanh(act.deterministic(z)) - target).abs().max().item()
    assert err < 0.1, err


def test_learned_sigma_is_clamped_and_policy_maps_to_env_units():
    cfg = PolicyConfig(velocity="gated", flow_steps=2, chunk=3, hidden_dim=16, num_layers=1, sigma_mode="learned",
                       log_sigma_min=-3.0, log_sigma_max=-1.0, encoder_dim=16)
    spec = {"obs_dim": 5, "obs_mean": [0.0] * 5, "obs_std": [1.0] * 5, "action_dim": 2,
            "action_low": [-0.2, 0.0], "action_high": [0.2, 1.0], "env_low": [-1.0, 0.0], "env_high": [1.0, 0.5],
            "rgb_shape": None}
    policy = Policy(spec, cfg)
    with torch.no_grad():
        policy.actor.sigma_head.bias.fill_(3.0)
    z = policy.encoder({"state": torch.randn(4, 5)})
    assert policy.actor.log_sigma(z).max().item() == pytest.approx(-1.0)
    out = policy.act({"state": torch.randn(4, 5)}, deterministic=False)
    assert out.shape == (4, 3, 2)
    assert out[..., 0].abs().max() <= 0.2 + 1e-6 and out[..., 1].max() <= 0.5 and out[..., 1].min() >= 0.0


def test_rgb_encoder_shapes():
    enc = RGBEncoder(7, torch.zeros(7), torch.ones(7), image_channels=6, channels=8, out_dim=32)
    obs = {"rgb": torch.randint(0, 255, (3, 32, 32, 6), dtype=torch.uint8), "state": torch.randn(3, 7)}
    assert enc(obs).shape == (3, 32)


def test_gaussian_baseline_log_prob_and_behaviour_cloning():
    """The SAC baseline's log-prob equals torch's tanh-transformed Normal; its BC loss fits a fixed chunk."""
    from torch.distributions import TransformedDistribution
    from torch.distributions.transforms import TanhTransform

    from flowmanip.models.gaussian import GaussianActor

    torch.manual_seed(0)
    cfg = PolicyConfig(chunk=2, hidden_dim=32, num_layers=2)
    act = GaussianActor(6, 3, cfg)
    z = torch.randn(7, 6)
    action, log_prob, _ = act.sample(z)
    mean, log_std = act._stats(z)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    expected = dist.log_prob(action.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    assert torch.allclose(log_prob, expected, atol=2e-3), (log_prob, expected)

    target = torch.tanh(torch.randn(1, 6)).expand(7, 6)
    opt = torch.optim.Adam(act.parameters(), lr=3e-3)
    for _ in range(300):
        loss = act.flow_matching_loss(z, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (torch.tanh(act.deterministic(z)) - target).abs().max() < 0.05


@pytest.mark.parametrize("tokens, missing", [
    ("chunk", ["decoder_tokens", "decoder_memory_tokens"]),  # before decoder_tokens existed
    ("single", ["decoder_memory_tokens"]),  # before decoder_memory_tokens existed
])
def test_flow_t_checkpoints_from_older_versions_load_with_their_shapes(tmp_path, tokens, missing):
    """Older checkpoints lack keys whose new defaults would change Flow-T's weight shapes."""
    from flowmanip.config import Recipe, to_dict
    from flowmanip.errors import FlowmanipError
    from flowmanip.train.checkpoint import convert_checkpoint, load_checkpoint
    from flowmanip.train.pretrain import policy_from_checkpoint

    recipe = Recipe()
    recipe.policy.velocity, recipe.policy.chunk, recipe.policy.decoder_dim = "decoded", 3, 16
    recipe.policy.decoder_tokens, recipe.policy.decoder_memory_tokens = tokens, 1
    spec = {"obs_dim": 5, "obs_mean": [0.0] * 5, "obs_std": [1.0] * 5, "action_dim": 2,
            "action_low": [-1.0] * 2, "action_high": [1.0] * 2, "env_low": [-1.0] * 2, "env_high": [1.0] * 2,
            "rgb_shape": None}
    old = Policy(spec, recipe.policy)
    config = to_dict(recipe)
    for key in missing:  # what an older flowmanip wrote
        del config["policy"][key]
    torch.save({"config": config, "spec": spec, "meta": {}, "weights": {"policy": old.state_dict()}},
               tmp_path / "policy.pt")
    with pytest.raises(FlowmanipError, match="convert-checkpoint"):  # a pickle: refused, never opened
        load_checkpoint(str(tmp_path))
    ckpt = load_checkpoint(convert_checkpoint(str(tmp_path), str(tmp_path / "converted")))
    assert (ckpt["recipe"].policy.decoder_tokens, ckpt["recipe"].policy.decoder_memory_tokens) == (tokens, 1)
    loaded = policy_from_checkpoint(ckpt)
    obs = {"state": torch.randn(4, 5)}
    torch.testing.assert_close(loaded.act(obs, deterministic=True), old.eval().act(obs, deterministic=True))
