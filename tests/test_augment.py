"""Random-shift augmentation against an independent computation (edge padding, then a crop), and the
state noise of behaviour cloning against its stated statistics."""

import pytest
import torch
import torch.nn.functional as F

from flowmanip.config import FinetuneConfig, load_recipe
from flowmanip.data.augment import augment_obs, jitter_state, random_shift, shift_images
from flowmanip.errors import FlowmanipError
from flowmanip.train.replay import ReplayBuffer
from flowmanip.train.sampler import BatchSampler


def reference_shift(images, dy, dx, pad):
    """Pad every side by ``pad`` with the edge values, then crop the window moved by (dy, dx)."""
    h, w = images.shape[1:3]
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    crops = [padded[i, :, pad - int(dy[i]):pad - int(dy[i]) + h, pad - int(dx[i]):pad - int(dx[i]) + w]
             for i in range(images.shape[0])]
    return torch.stack(crops).permute(0, 2, 3, 1).to(images.dtype)


def test_shift_matches_pad_and_crop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 9, 7, 3), generator=g, dtype=torch.uint8)
    dy = torch.tensor([0, 1, -1, 4, -4, 2])
    dx = torch.tensor([0, -3, 2, 4, -4, 0])
    out = shift_images(images, dy, dx)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, reference_shift(images, dy, dx, pad=4))
    assert torch.equal(out[0], images[0])  # no shift, no change
    assert torch.equal(out[1, 1:, :4], images[1, :-1, 3:])  # down 1, left 3: the moved part is the image itself


def test_random_shift_stays_in_range_and_varies():
    images = torch.arange(64 * 64, dtype=torch.int64).reshape(1, 64, 64, 1).repeat(32, 1, 1, 1)
    out = random_shift(images, 4, torch.Generator().manual_seed(1))
    centre_moves = out[:, 32, 32, 0] - images[:, 32, 32, 0]  # = -(64 dy + dx) for |shift| <= 4
    dy = -torch.round(centre_moves / 64.0)
    dx = -(centre_moves + 64 * dy)
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4
    assert len(set(centre_moves.tolist())) > 5  # images move independently
    assert random_shift(images, 0) is images


def test_augment_obs_leaves_state_and_input_alone():
    obs = {"rgb": torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8), "state": torch.randn(4, 5)}
    torch.manual_seed(0)
    out = augment_obs(obs, 2)
    assert out["state"] is obs["state"] and out["rgb"] is not obs["rgb"]
    assert augment_obs({"state": obs["state"]}, 2)["state"] is obs["state"]


def test_state_noise_has_the_stated_scale_per_dim():
    """The noise added to dim i has mean 0 and std noise * std[i]; images and the input stay as they are."""
    std = torch.tensor([1e-3, 0.5, 2.0, 10.0])
    obs = {"state": torch.randn(20000, 4) * 3 + 1, "rgb": torch.zeros(20000, 2, 2, 3, dtype=torch.uint8)}
    before = obs["state"].clone()
    torch.manual_seed(0)
    out = jitter_state(obs, 0.2, std)
    delta = out["state"] - obs["state"]
    assert torch.equal(obs["state"], before) and out["rgb"] is obs["rgb"]
    assert torch.allclose(delta.std(0), 0.2 * std, rtol=0.03)
    assert (delta.mean(0).abs() < 0.03 * 0.2 * std).all()
    assert jitter_state(obs, 0.0, std) is obs


@pytest.mark.parametrize("override", ["data.random_shift=-1", "pretrain.obs_noise=-0.1"])
def test_negative_augmentation_is_a_clear_error(override):
    with pytest.raises(FlowmanipError, match=override.split("=")[0].replace(".", r"\.")):
        load_recipe("recipes/pickcube_rgb.yaml", [override])


def test_fine_tune_batches_shift_obs_and_next_obs_images():
    """The sampler hands the update shifted images (obs and next_obs each), the state as stored."""
    image = torch.arange(8 * 8 * 3, dtype=torch.uint8).reshape(1, 8, 8, 3)
    obs = {"rgb": image.repeat(64, 1, 1, 1), "state": torch.randn(64, 5)}
    buffer = ReplayBuffer(64, obs, 2, "cpu")
    buffer.add(obs, torch.zeros(64, 2), torch.zeros(64), torch.ones(64), torch.zeros(64, dtype=torch.bool), obs)
    cfg = FinetuneConfig(batch_size=32, demo_fraction=0.0)
    candidates = [shift_images(image, torch.tensor([dy]), torch.tensor([dx]))[0]
                  for dy in range(-2, 3) for dx in range(-2, 3)]
    torch.manual_seed(0)
    b = BatchSampler(buffer, None, None, cfg, "cpu", random_shift=2).batch()
    for key in ("obs", "next_obs"):
        assert all(any(torch.equal(img, c) for c in candidates) for img in b[key]["rgb"])  # a shift of <= 2 pixels
        assert sum(not torch.equal(img, image[0]) for img in b[key]["rgb"]) > 10  # most moved
    assert not torch.equal(b["obs"]["rgb"], b["next_obs"]["rgb"])  # drawn independently
    assert all((row == obs["state"]).all(1).any() for row in b["obs"]["state"])  # stored rows, unshifted
    plain = BatchSampler(buffer, None, None, cfg, "cpu").batch()
    assert all(torch.equal(img, image[0]) for img in plain["obs"]["rgb"])
