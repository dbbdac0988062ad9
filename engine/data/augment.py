"""Differentiable augmentation with replayable draws (DSA) and ZCA whitening.

DSA (Zhao & Bilen 2021), as used by MTT: every call picks ONE family at random from the strategy
string (``color_crop_cutout_flip_scale_rotate``) and applies it with parameters drawn per sample
(DSA's ``batchmode`` off, its default). Every operation is differentiable with respect to the
images, so gradients reach synthetic pixels.

Clips (B, T, C, H, W) get one draw per clip, applied alike to each of its frames, so an augmented
clip is still a clip (the same crop, flip or rotation throughout).

The draw is split from its application so that trajectory matching can replay it::

    draw = dsa.sample(x.shape, generator)   # family + per-sample parameters, CPU tensors
    y = dsa.apply(x, draw)                  # deterministic given the draw
    y_again = dsa.apply(x, draw)            # identical: the backward pass recomputes this

``sample`` takes a ``torch.Generator`` or an integer seed, so a draw is reproducible from an int
alone, on any device (draws are made on the CPU and moved to the images' device). DSA's Siamese
setting (the same augmentation for a real and a synthetic batch) is ``apply`` of one draw to both
batches; the parameters are per sample, so a smaller batch takes the leading samples' values
(``draw.first(n)``).

ZCA whitening follows kornia's ``ZCAWhitening`` (what MTT uses): statistics in float64 on the
flattened images, unbiased covariance, ``W = U diag(1/sqrt(S + eps)) U^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.errors import ConfigError, DataError
from engine.storage import StorageConfig

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def strategy_problem(strategy: str) -> str | None:
    """What is wrong with a strategy string (an unknown family), or None."""
    unknown = [f for f in strategy.split("_") if f not in FAMILIES]
    if not strategy or unknown:
        return f"DSA strategy {strategy!r}: unknown family {unknown}; choose from {FAMILIES}"
    return None


def _valid_strategy(strategy: str) -> str:
    if problem := strategy_problem(strategy):
        raise ValueError(problem)  # inside a config schema: a validation error naming the key
    return strategy


# A config field holding a DSA strategy, checked when the config is loaded.
DSAStrategy = Annotated[str, AfterValidator(_valid_strategy)]


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the one path from an integer to a random draw."""
    return torch.Generator().manual_seed(seed)


def as_generator(generator: torch.Generator | int) -> torch.Generator:
    return generator if isinstance(generator, torch.Generator) else make_generator(generator)


@dataclass(frozen=True)
class DSADraw:
    """One random draw: the chosen family and its per-sample parameters (CPU tensors of length B)."""

    family: str
    values: dict[str, Tensor]

    def first(self, n: int) -> DSADraw:
        """The draw of the first ``n`` samples: DSA's Siamese setting for two batches of different sizes (a
        real and a synthetic batch) is one draw for the larger, its leading samples' values for the other."""
        return DSADraw(self.family, {k: v[:n] for k, v in self.values.items()})

    def repeated(self, copies: int) -> DSADraw:
        """The draw for ``copies`` copies of its batch stacked one after another (each sample keeps its values)."""
        return DSADraw(self.family, {k: v.repeat(copies) for k, v in self.values.items()})


class DSA:
    """Differentiable Siamese augmentation. Ratios are DSA's ``ParamDiffAug`` defaults.

    ``scale=0.2`` means scale factors in [1/1.2, 1.2] (DSA's ``ratio_scale=1.2``); ``rotate`` is in
    degrees; ``crop`` is the largest shift as a fraction of the side (zero fill); ``cutout`` is the
    side of the zeroed square as a fraction of the image side.
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        scale: float = 0.2,
        rotate: float = 15.0,
        crop: float = 0.125,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        flip: float = 0.5,
    ) -> None:
        if problem := strategy_problem(strategy):
            raise ConfigError(problem)
        self.strategy = strategy
        self.families = tuple(strategy.split("_"))
        self.scale, self.rotate, self.crop, self.cutout = scale, rotate, crop, cutout
        self.brightness, self.saturation, self.contrast, self.flip = brightness, saturation, contrast, flip

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r})"

    def sample(self, batch_shape: tuple[int, ...] | torch.Size, generator: torch.Generator | int) -> DSADraw:
        """Choose one family, then draw its parameters for every sample of a (B, C, H, W) batch of images
        or a (B, T, C, H, W) batch of clips (one draw per clip)."""
        gen = as_generator(generator)
        batch, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        family = self.families[int(torch.randint(len(self.families), (1,), generator=gen))]
        sampler = getattr(self, f"_sample_{family}")
        return DSADraw(family, sampler(batch, height, width, gen))

    def apply(self, x: Tensor, draw: DSADraw) -> Tensor:
        """Apply a draw to images (B, C, H, W) or clips (B, T, C, H, W), every frame of a clip with its
        clip's parameters; deterministic and differentiable w.r.t. ``x``."""
        if len(x) != len(next(iter(draw.values.values()))):
            raise ValueError(
                f"a draw for {len(next(iter(draw.values.values())))} samples applied to {len(x)}"
            )
        values = {k: v.to(x.device) for k, v in draw.values.items()}
        if x.ndim == 5:  # clips: frames as images, each with its clip's values
            frames = x.shape[1]
            values = {k: v.repeat_interleave(frames) for k, v in values.items()}
            return getattr(self, f"_apply_{draw.family}")(x.flatten(0, 1), values).view(x.shape)
        return getattr(self, f"_apply_{draw.family}")(x, values)

    def __call__(self, x: Tensor, generator: torch.Generator | int) -> Tensor:
        return self.apply(x, self.sample(x.shape, generator))

    # --- draws: one function per family, per-sample values -------------------------------------

    def _sample_color(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {k: torch.rand(b, generator=gen) for k in ("brightness", "saturation", "contrast")}

    def _sample_crop(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        max_h, max_w = int(h * self.crop + 0.5), int(w * self.crop + 0.5)
        return {
            "shift_h": torch.randint(-max_h, max_h + 1, (b,), generator=gen),
            "shift_w": torch.randint(-max_w, max_w + 1, (b,), generator=gen),
        }

    def _sample_cutout(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        size_h, size_w = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
        return {
            "center_h": torch.randint(0, h + (1 - size_h % 2), (b,), generator=gen),
            "center_w": torch.randint(0, w + (1 - size_w % 2), (b,), generator=gen),
        }

    def _sample_flip(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        return {"flip": torch.rand(b, generator=gen) < self.flip}

    def _sample_scale(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        ratio = 1.0 + self.scale
        low, high = 1.0 / ratio, ratio
        return {
            "scale_w": torch.rand(b, generator=gen) * (high - low) + low,
            "scale_h": torch.rand(b, generator=gen) * (high - low) + low,
        }

    def _sample_rotate(self, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, Tensor]:
        max_angle = self.rotate / 180.0 * math.pi
        return {"angle": (torch.rand(b, generator=gen) - 0.5) * 2 * max_angle}

    # --- applications: deterministic given the values ------------------------------------------

    def _apply_color(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        per_sample = (-1, 1, 1, 1)
        x = x + (v["brightness"].to(x.dtype).view(per_sample) - 0.5) * self.brightness
        channel_mean = x.mean(dim=1, keepdim=True)
        x = (x - channel_mean) * (
            v["saturation"].to(x.dtype).view(per_sample) * self.saturation
        ) + channel_mean
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - image_mean) * (v["contrast"].to(x.dtype).view(per_sample) + self.contrast) + image_mean

    def _apply_crop(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        # Output pixel (i, j) reads input (i + shift_h, j + shift_w); outside is zero (DSA's pad-and-crop).
        h, w = x.shape[-2:]
        theta = _affine(
            x, scale_w=1.0, scale_h=1.0, shift_w=2.0 * v["shift_w"] / w, shift_h=2.0 * v["shift_h"] / h
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _apply_cutout(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        h, w = x.shape[-2:]
        size_h, size_w = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
        rows = _in_window(torch.arange(h, device=x.device), v["center_h"] - size_h // 2, size_h)  # (B, H)
        cols = _in_window(torch.arange(w, device=x.device), v["center_w"] - size_w // 2, size_w)  # (B, W)
        mask = 1.0 - (rows[:, :, None] & cols[:, None, :]).to(x.dtype)  # (B, H, W)
        return x * mask[:, None]

    def _apply_flip(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    def _apply_scale(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        theta = _affine(x, scale_w=v["scale_w"], scale_h=v["scale_h"], shift_w=0.0, shift_h=0.0)
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)

    def _apply_rotate(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        cos, sin = torch.cos(v["angle"]).to(x.dtype), torch.sin(v["angle"]).to(x.dtype)
        zero = torch.zeros_like(cos)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )  # (B, 2, 3)
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)


def _affine(x: Tensor, *, scale_w, scale_h, shift_w, shift_h) -> Tensor:
    """Per-sample affine matrices (B, 2, 3) without rotation; arguments are scalars or (B,) tensors."""
    b = len(x)

    def column(value) -> Tensor:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand(b)

    zero = column(0.0)
    row_w = torch.stack([column(scale_w), zero, column(shift_w)], 1)
    row_h = torch.stack([zero, column(scale_h), column(shift_h)], 1)
    return torch.stack([row_w, row_h], 1)


def _in_window(positions: Tensor, start: Tensor, size: int) -> Tensor:
    """(B, L) bool: whether each position lies in [start, start + size) of its sample."""
    return (positions[None, :] >= start[:, None]) & (positions[None, :] < start[:, None] + size)


@dataclass(frozen=True)
class ZCA:
    """ZCA whitening fitted on a set of images; matrices kept in float64, applied in the input's dtype."""

    mean: Tensor  # (D,) with D = C*H*W
    whiten: Tensor  # (D, D) = U diag(1/sqrt(S + eps)) U^T
    unwhiten: Tensor  # (D, D) = U diag(sqrt(S + eps)) U^T
    eps: float

    @classmethod
    def fit(cls, images: Tensor, eps: float = 0.1) -> ZCA:
        flat = images.reshape(len(images), -1).to(torch.float64)
        if len(flat) < 2:
            raise DataError(f"ZCA needs at least 2 images to fit, got {len(flat)}")
        mean = flat.mean(dim=0)
        centred = flat - mean
        return cls.from_moments(mean, centred.T @ centred / (len(flat) - 1), eps)

    @classmethod
    def from_moments(cls, mean: Tensor, covariance: Tensor, eps: float = 0.1) -> ZCA:
        """From the mean (D,) and unbiased covariance (D, D) of the flattened images (float64)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=0.0) + eps
        whiten = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T
        unwhiten = eigenvectors @ torch.diag(eigenvalues.sqrt()) @ eigenvectors.T
        return cls(mean=mean, whiten=whiten, unwhiten=unwhiten, eps=eps)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten images (B, C, H, W); differentiable."""
        flat = x.reshape(len(x), -1)
        return ((flat - self.mean.to(flat)) @ self.whiten.to(flat)).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Undo the whitening, e.g. to show synthetic images."""
        flat = x.reshape(len(x), -1)
        return (flat @ self.unwhiten.to(flat) + self.mean.to(flat)).reshape(x.shape)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "mean": self.mean.contiguous(),
            "whiten": self.whiten.contiguous(),
            "unwhiten": self.unwhiten.contiguous(),
            "eps": torch.tensor([self.eps], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ZCA:
        return cls(tensors["mean"], tensors["whiten"], tensors["unwhiten"], float(tensors["eps"][0]))

    def save(self, url: str, storage_config: StorageConfig | None = None) -> None:
        storage.write_bytes(url, save_safetensors(self.tensors()), storage_config)

    @classmethod
    def load(cls, url: str, storage_config: StorageConfig | None = None) -> ZCA:
        tensors = load_safetensors(storage.read_bytes(url, storage_config))
        missing = {"mean", "whiten", "unwhiten", "eps"} - set(tensors)
        if missing:
            raise DataError(f"{storage.redact(url)}: not a ZCA file (missing {sorted(missing)})")
        return cls.from_tensors(tensors)
