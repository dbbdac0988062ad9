"""DSA draws are replayable and differentiable; ZCA whitens and inverts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.data.augment import DSA, FAMILIES, ZCA, make_generator
from engine.errors import ConfigError


def images(batch: int = 8, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=make_generator(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_is_deterministic_given_the_draw_and_differentiable(family):
    dsa = DSA(family)
    x = images().requires_grad_(True)
    draw = dsa.sample(x.shape, make_generator(3))
    assert draw.family == family
    first, second = dsa.apply(x, draw), dsa.apply(x, draw)
    assert torch.equal(first, second)
    assert not torch.equal(first, x), f"{family} changed nothing"

    weights = torch.randn(first.shape, generator=make_generator(1))
    (grad,) = torch.autograd.grad((first * weights).sum(), x)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_a_draw_is_replayed_from_an_integer_seed():
    dsa = DSA()
    x = images()
    a, b = dsa.sample(x.shape, 42), dsa.sample(x.shape, make_generator(42))
    assert a.family == b.family
    assert all(torch.equal(a.values[k], b.values[k]) for k in a.values)
    assert torch.equal(dsa(x, 42), dsa.apply(x, a))
    assert {dsa.sample(x.shape, seed).family for seed in range(200)} == set(FAMILIES)


def test_one_family_per_call_with_per_sample_parameters():
    draw = DSA("rotate").sample((6, 3, 8, 8), 0)
    assert draw.values["angle"].shape == (6,)
    assert len(set(draw.values["angle"].tolist())) == 6
    assert draw.values["angle"].abs().max() <= 15 / 180 * torch.pi


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clip_gets_one_draw_applied_alike_to_every_frame(family):
    dsa = DSA(family)
    frame = images(batch=3)
    clips = frame.unsqueeze(1).repeat(1, 4, 1, 1, 1)  # (B, T, C, H, W): 4 identical frames per clip
    draw = dsa.sample(clips.shape, make_generator(7))
    assert all(len(v) == 3 for v in draw.values.values())  # one set of parameters per clip
    out = dsa.apply(clips, draw)
    assert out.shape == clips.shape
    for t in range(4):  # every frame augmented exactly as the clip's image alone would be
        torch.testing.assert_close(out[:, t], dsa.apply(frame, draw))


def test_crop_matches_dsa_pad_and_gather():
    """DSA's rand_crop: pad by one zero pixel, read x_pad[i + shift + 1] clamped to the pad."""
    dsa, x = DSA("crop"), images(batch=16, side=9)
    draw = dsa.sample(x.shape, 5)
    b, _, h, w = x.shape
    grid_b, grid_h, grid_w = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    rows = torch.clamp(grid_h + draw.values["shift_h"].view(-1, 1, 1) + 1, 0, h + 1)
    cols = torch.clamp(grid_w + draw.values["shift_w"].view(-1, 1, 1) + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    reference = padded[grid_b, rows, cols].permute(0, 3, 1, 2)
    torch.testing.assert_close(dsa.apply(x, draw), reference, rtol=0, atol=1e-6)


def test_cutout_matches_dsa_clamped_window():
    dsa, x = DSA("cutout"), images(batch=16, side=10)
    draw = dsa.sample(x.shape, 9)
    b, _, h, w = x.shape
    size = int(h * 0.5 + 0.5)
    grid_b, grid_h, grid_w = torch.meshgrid(
        torch.arange(b), torch.arange(size), torch.arange(size), indexing="ij"
    )
    rows = torch.clamp(grid_h + draw.values["center_h"].view(-1, 1, 1) - size // 2, 0, h - 1)
    cols = torch.clamp(grid_w + draw.values["center_w"].view(-1, 1, 1) - size // 2, 0, w - 1)
    mask = torch.ones(b, h, w)
    mask[grid_b, rows, cols] = 0
    torch.testing.assert_close(dsa.apply(x, draw), x * mask[:, None], rtol=0, atol=0)


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="blur"):
        DSA("color_blur")


def correlated_images(n: int = 4000, seed: int = 0) -> torch.Tensor:
    gen = make_generator(seed)
    mixing = torch.randn(48, 48, generator=gen, dtype=torch.float64) * 3
    return (torch.randn(n, 48, generator=gen, dtype=torch.float64) @ mixing + 0.5).reshape(n, 3, 4, 4)


def test_zca_whitens_and_inverts():
    x = correlated_images()
    zca = ZCA.fit(x, eps=1e-4)
    white = zca.transform(x)
    flat = white.reshape(len(x), -1)
    covariance = flat.T @ flat / (len(x) - 1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(48, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(covariance, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(zca.inverse(white), x, rtol=0, atol=1e-8)

    as_float = x[:16].float()
    torch.testing.assert_close(zca.inverse(zca.transform(as_float)), as_float, rtol=1e-4, atol=1e-4)


def test_zca_matches_kornia_formula_and_round_trips_through_safetensors(tmp_path):
    x = correlated_images(n=300, seed=1)
    zca = ZCA.fit(x.float(), eps=0.1)
    flat = x.reshape(len(x), -1)
    centred = flat - flat.mean(0)
    u, s, _ = torch.linalg.svd(centred.T @ centred / (len(x) - 1))
    kornia_whiten = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    torch.testing.assert_close(zca.whiten, kornia_whiten, rtol=1e-6, atol=1e-6)

    url = str(tmp_path / "zca.safetensors")
    zca.save(url)
    loaded = ZCA.load(url)
    assert loaded.eps == 0.1
    assert torch.equal(loaded.transform(x.float()), zca.transform(x.float()))
