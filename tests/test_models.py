"""Flow policy maths: likelihoods, Flow-G's contraction, shapes, fitting a tiny dataset."""

from __future__ import annotations

import math

import numpy as np
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


def log_prob_of_path(act, z, path, monkeypatch):
    """``FlowActor.sample()``'s log-likelihood of a chosen path ``[A_0, ..., A_K]`` (each ``[B, d]``).

    sample() draws its noise with ``torch.randn``; here that returns the noise which makes the rollout pass
    through ``path`` (``A_0 / init_std``, then ``(A_{k+1} - A_k - dt v_k) / sigma``), so the density comes
    from sample()'s own code and a term missing there is missing here."""
    dt = 1.0 / act.flow_steps
    with torch.no_grad():
        noise = [path[0] / act.init_std if act.init_std > 0 else torch.zeros_like(path[0])]
        sigma = act.log_sigma(z).exp()
        for k in range(act.flow_steps):
            t = torch.full((z.shape[0],), k * dt)
            noise.append((path[k + 1] - path[k] - dt * act.velocity(path[k], t, z)) / sigma)
    queue = iter(noise)

    def scripted_randn(*shape, **kwargs):
        x = next(queue)
        assert tuple(x.shape) == tuple(shape)
        return x.clone()

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch, "randn", scripted_randn)
        action, log_prob, _ = act.sample(z)
    assert next(queue, None) is None  # sample() drew exactly A_0's noise and one per flow step
    torch.testing.assert_close(action, torch.tanh(path[-1]), atol=1e-5, rtol=1e-4)  # it took the path asked for
    return log_prob


def marginal_density(act, z, a, grid, monkeypatch, rows=64):
    """p(a) for a 1-D action: exp(sample()'s path log-likelihood) integrated numerically over the one random
    state before the last (``A_0`` when K=1 and init_std > 0, ``A_1`` when K=2 and ``A_0 = 0``), ``grid`` its
    values. Returns ``[len(a)]``."""
    assert act.dim == 1 and (act.flow_steps, act.init_std > 0) in ((1, True), (2, False))
    u = torch.atanh(a)
    dens = []
    for start in range(0, len(grid), rows):  # a block of grid rows at a time keeps the batches small
        g = grid[start:start + rows]
        G, U = torch.meshgrid(g, u, indexing="ij")
        B = G.numel()
        if act.flow_steps == 1:
            path = [G.reshape(B, 1), U.reshape(B, 1)]
        else:
            path = [torch.zeros(B, 1), G.reshape(B, 1), U.reshape(B, 1)]
        dens.append(log_prob_of_path(act, z.expand(B, -1), path, monkeypatch).reshape(G.shape).double().exp())
    return torch.trapezoid(torch.cat(dens), grid.double(), dim=0)


def check_action_frequencies(act, z, monkeypatch, grid, n=200000, bins=40):
    """Sampled actions fall in each bin of [-1, 1] as often as the density says (from sample()'s log_prob)."""
    with torch.no_grad():
        action, _, _ = act.sample(z.expand(n, -1), generator=torch.Generator().manual_seed(1))
    edges = torch.linspace(-1, 1, bins + 1)
    freq = torch.histc(action.squeeze(-1), bins, -1, 1).double() / n
    fine = 20  # points per bin to integrate the density over it
    a = torch.linspace(-1, 1, bins * fine + 1)[1:-1]  # atanh needs the open interval
    dens = marginal_density(act, z, a, grid, monkeypatch)
    a, dens = torch.cat([edges[:1], a, edges[-1:]]).double(), torch.cat([dens.new_zeros(1), dens, dens.new_zeros(1)])
    prob = torch.stack([torch.trapezoid(dens[i * fine:(i + 1) * fine + 1], a[i * fine:(i + 1) * fine + 1])
                        for i in range(bins)])
    assert prob.sum().item() == pytest.approx(1.0, abs=0.01)
    z_scores = (freq - prob) / (prob / n).sqrt().clamp(min=1e-4)
    assert z_scores.abs().max().item() < 5, (freq, prob)


def test_monte_carlo_log_prob_matches_sample_frequencies(monkeypatch):
    """K=1, init_std > 0, a 1-D action: sample()'s path log-likelihood, integrated over A_0 numerically, is the
    density of the actions sample() draws (checked bin by bin against 200k samples)."""
    torch.manual_seed(0)
    act = actor(K=1, A=1, sigma=0.4, init_std=0.7)
    z = torch.randn(1, 6)
    check_action_frequencies(act, z, monkeypatch, torch.linspace(-0.7 * 7, 0.7 * 7, 281))


def test_path_density_integrates_to_one(monkeypatch):
    """K=1, d=1: exp(sample()'s log_prob) over (A_0, a = tanh(A_1)) integrates to 1, so no Gaussian term is missing."""
    torch.manual_seed(0)
    act = actor(K=1, A=1, sigma=0.5)
    z = torch.randn(1, 6)
    a = torch.linspace(-0.999999, 0.999999, 4001)
    total = torch.trapezoid(marginal_density(act, z, a, torch.linspace(-7, 7, 701), monkeypatch), a.double())
    assert total.item() == pytest.approx(1.0, abs=0.02)


def test_learned_sigma_k2_log_likelihood_matches_a_brute_force_density(monkeypatch):
    """K=2, A_0 = 0, state-dependent learned sigma, a 1-D action. The path log-likelihood of sample() equals the
    product of the two Gaussian steps and the tanh Jacobian written out with torch.distributions; integrated over
    the intermediate state A_1 it equals a brute-force marginal density p(a); and that density is the
    frequency of the actions sample() draws."""
    torch.manual_seed(0)
    act = actor(K=2, A=1, sigma=0.3, init_std=0.0, sigma_mode="learned", log_sigma_min=-4.0, log_sigma_max=1.0)
    with torch.no_grad():
        act.sigma_head.weight.normal_(0, 0.3)  # sigma depends on the state
    z = torch.randn(3, 6)
    sig = act.log_sigma(z).exp().detach().squeeze(-1)
    assert (sig - 0.3).abs().max() > 0.05 and (sig.max() - sig.min()) > 0.05, sig

    def brute_force(zi, a, grid):
        """p(a | z) = int N(A_1; dt v(0, 0), s^2) N(atanh a; A_1 + dt v(A_1, 1/2), s^2) dA_1 / (1 - a^2)."""
        with torch.no_grad():
            s = act.log_sigma(zi).exp()[0, 0]
            m1 = 0.5 * act.velocity(torch.zeros(1, 1), torch.zeros(1), zi)[0, 0]
            G = grid[:, None]
            m2 = G + 0.5 * act.velocity(G, torch.full((len(grid),), 0.5), zi.expand(len(grid), -1))
            u = torch.atanh(a)[None, :]
            dens = (Normal(m1, s).log_prob(G) + Normal(m2, s).log_prob(u)).exp() / (1 - a[None, :] ** 2)
        return torch.trapezoid(dens.double(), grid.double(), dim=0)

    # pointwise, on sampled paths
    with torch.no_grad():
        action, log_prob, states = act.sample(z.repeat(100, 1), keep_states=True)
        zz = z.repeat(100, 1)
        s = act.log_sigma(zz).exp()
        m1 = states[0] + 0.5 * act.velocity(states[0], torch.zeros(300), zz)
        m2 = states[1] + 0.5 * act.velocity(states[1], torch.full((300,), 0.5), zz)
        u = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
        expected = (Normal(m1, s).log_prob(states[1]) + Normal(m2, s).log_prob(u)
                    - torch.log(1 - action ** 2 + 1e-6)).sum(-1)
    assert torch.equal(states[0], torch.zeros_like(states[0]))
    torch.testing.assert_close(log_prob, expected, atol=2e-3, rtol=1e-4)

    # marginally, over A_1
    grid = torch.linspace(-4, 4, 801)
    a = torch.linspace(-0.99, 0.99, 199)
    for i in range(3):
        torch.testing.assert_close(marginal_density(act, z[i:i + 1], a, grid, monkeypatch), brute_force(z[i:i + 1], a, grid),
                                   rtol=1e-3, atol=1e-6)
    check_action_frequencies(act, z[:1], monkeypatch, grid)


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


def test_spatial_softmax_is_the_expected_pixel_position():
    """Each keypoint equals sum_p softmax(map / T)_p * (x_p, y_p), written out here with numpy over a
    pixel grid from -1 (left/top) to 1 (right/bottom); a sharp peak lands on its pixel's coordinates."""
    from flowmanip.models.encoders import SpatialSoftmax

    torch.manual_seed(0)
    head = SpatialSoftmax(channels=3, height=5, width=7, keypoints=4)
    with torch.no_grad():
        head.log_temperature.fill_(0.3)
    x = torch.randn(2, 3, 5, 7)
    out = head(x).detach().numpy().reshape(2, 4, 2)
    maps = head.to_maps(x).detach().numpy()  # [2, 4, 5, 7]
    t = np.exp(0.3)
    for b in range(2):
        for k in range(4):
            w = np.exp(maps[b, k] / t - (maps[b, k] / t).max())
            w /= w.sum()
            ex = sum(w[i, j] * (-1 + 2 * j / 6) for i in range(5) for j in range(7))
            ey = sum(w[i, j] * (-1 + 2 * i / 4) for i in range(5) for j in range(7))
            assert np.allclose(out[b, k], [ex, ey], atol=1e-5), (b, k, out[b, k], ex, ey)
    # a 1x1 conv that copies channel 0, and a peak at row 1, column 5: keypoint (x, y) = (2/3, -1/2)
    peak_head = SpatialSoftmax(channels=1, height=5, width=7, keypoints=1)
    with torch.no_grad():
        peak_head.to_maps.weight.fill_(1.0)
        peak_head.to_maps.bias.zero_()
    peak = torch.zeros(1, 1, 5, 7)
    peak[0, 0, 1, 5] = 50.0
    assert torch.allclose(peak_head(peak), torch.tensor([[2 / 3, -0.5]]), atol=1e-4)


def test_rgb_encoder_spatial_softmax_head_sizes_its_grid_and_scripts():
    """The keypoint head sizes its pixel grid from the image (non-square too) and scripts for export."""
    torch.manual_seed(0)
    enc = RGBEncoder(7, torch.zeros(7), torch.ones(7), image_channels=3, channels=8, out_dim=32,
                     head="spatial_softmax", image_hw=(24, 40)).eval()
    assert enc.cnn[-3].grid.shape == (3 * 5, 2)  # 24x40 -> 3x5 feature maps
    obs = {"rgb": torch.randint(0, 255, (2, 24, 40, 3), dtype=torch.uint8), "state": torch.randn(2, 7)}
    scripted = torch.jit.script(enc)
    assert torch.allclose(scripted(obs), enc(obs), atol=1e-6)
    with pytest.raises(ValueError, match="spatial_softmax"):
        RGBEncoder(7, torch.zeros(7), torch.ones(7), image_channels=3, head="max")


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
    from flowmanip.train.stages import policy_from_checkpoint

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


@pytest.mark.parametrize("kind", ["flow", "gaussian", "action_mse"])
def test_behaviour_cloning_losses_ignore_masked_dimensions(kind):
    """A chunk that runs past its episode's end is padded; with the per-dimension mask the padded dimensions
    get no loss (zero gradient on the network's outputs there: the velocity, or the Gaussian's mean and
    log-std; for action_mse the padded targets do not matter), an all-true mask is no mask, and the loss
    averages over the real dimensions."""
    from flowmanip.algos.flow_matching import action_dim_mask, bc_loss
    from flowmanip.models.gaussian import GaussianActor

    torch.manual_seed(0)
    H, A, B = 4, 2, 16
    cfg = act_cfg(K=2, H=H)
    act = GaussianActor(6, A, cfg) if kind == "gaussian" else FlowActor(6, A, cfg)
    z = torch.randn(B, 6)
    action = torch.rand(B, H * A) * 1.8 - 0.9
    steps = torch.arange(B) % H + 1  # real steps per chunk: 1..H
    mask = action_dim_mask(torch.arange(H)[None, :] < steps[:, None], A)
    assert mask.shape == (B, H * A) and mask.reshape(B, H, A)[:, :, 0].sum(1).tolist() == steps.tolist()
    assert mask.reshape(B, H, A).all(-1).eq(mask.reshape(B, H, A).any(-1)).all()  # step-major, all A dims alike

    class Spy(torch.nn.Module):  # keeps the gradient of the loss w.r.t. the wrapped network's output
        def __init__(self, inner):
            super().__init__()
            self.inner, self.out = inner, None

        def forward(self, *args):
            self.out = self.inner(*args)
            self.out.retain_grad()
            return self.out

    def loss(a, m, backward=False):
        torch.manual_seed(1)  # the same x_0, t (or rollout noise) for every call
        value = bc_loss(act, z, a, "action_mse" if kind == "action_mse" else "flow_matching", m)
        if backward:
            value.backward()
        return value.detach()

    torch.testing.assert_close(loss(action, torch.ones_like(mask)), loss(action, None))
    if kind == "action_mse":
        padded = torch.where(mask, action, -action)
        torch.testing.assert_close(loss(padded, mask), loss(action, mask))
        assert not torch.allclose(loss(padded, None), loss(action, None))
        return
    if kind == "flow":
        act.velocity = Spy(act.velocity)
        spy = act.velocity
    else:
        act.net = Spy(act.net)
        spy = act.net
    full = loss(action, None, backward=True)
    g_full = spy.out.grad.clone()
    masked = loss(action, mask, backward=True)
    g = spy.out.grad
    keep = mask if kind == "flow" else torch.cat([mask, mask], dim=-1)  # the Gaussian's output is [mean, log_std]
    assert torch.all(g[~keep] == 0) and torch.all(g[keep] != 0)
    assert torch.all(g_full != 0)
    # a mean over the real dimensions: each kept entry weighs numel / mask.sum() times more than without the mask
    torch.testing.assert_close(g[keep], g_full[keep] * mask.numel() / mask.sum())
    assert not torch.allclose(masked, full)
