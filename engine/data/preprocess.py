"""The input transform every model of one experiment sees: per-channel normalisation, then optional ZCA.

Experts, distillation, coresets and evaluation must feed models the same transform of the pixels,
so it is fitted once on the training split (by the buffer job), saved in the trajectory store
beside the trajectories, and loaded from there by everything downstream. Synthetic images live in
the transformed space (as in MTT, which distils ZCA-whitened CIFAR); ``inverse`` brings them back
to [0, 1] pixels for grids and shards.

    x_model = ZCA((x - mean_c) / std_c)        images (N, C, H, W) or clips (N, T, C, H, W)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from pydantic import Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.config import Section
from engine.data.augment import ZCA
from engine.errors import ConfigError, DataError
from engine.storage import StorageConfig

FILE_NAME = "preprocess.safetensors"


class PreprocessConfig(Section):
    normalize: bool = Field(True, description="Subtract the training split's per-channel mean, divide by its std.")
    zca: bool = Field(False, description="ZCA-whiten after normalising (MTT's CIFAR recipe).")
    zca_eps: float = Field(0.1, gt=0, description="Added to the covariance eigenvalues.")


UNIT = 1.0 / 255.0


def to_unit(pixels: Tensor) -> Tensor:
    """uint8 pixels (as decoded, as streamed) -> float32 in [0, 1]; float pixels are returned as they are."""
    return pixels.float() * UNIT if pixels.dtype == torch.uint8 else pixels


class PixelStatistics:
    """One pass over a stream of batches of images (N, C, H, W) or clips (N, T, C, H, W), uint8 or in [0, 1]:
    per-channel sums for the mean and std and, for ZCA, the sums of whole flattened images and of their
    outer products, all in float64. Memory is O(C) (O(D²) with the covariance, D = C·H·W), whatever the
    number of images; ``merge`` adds another worker's statistics."""

    def __init__(self, covariance: bool = False):
        self.covariance = covariance
        self.images = 0
        self.pixels = 0  # values per channel seen
        self.channel_sum: Tensor | None = None  # (C,)
        self.channel_squares: Tensor | None = None  # (C,)
        self.image_sum: Tensor | None = None  # (D,)
        self.image_products: Tensor | None = None  # (D, D)

    def add(self, batch: Tensor) -> PixelStatistics:
        x = to_unit(batch).double()
        channels = x.shape[-3]
        per_channel = x.transpose(0, -3).reshape(channels, -1)  # (C, everything else)
        if self.channel_sum is None:
            self.channel_sum, self.channel_squares = torch.zeros(channels, dtype=torch.float64), \
                torch.zeros(channels, dtype=torch.float64)
        self.channel_sum += per_channel.sum(1)
        self.channel_squares += (per_channel * per_channel).sum(1)
        self.pixels += per_channel.shape[1]
        self.images += len(x)
        if self.covariance:
            flat = x.reshape(len(x), -1)
            if self.image_sum is None:
                self.image_sum = torch.zeros(flat.shape[1], dtype=torch.float64)
                self.image_products = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            self.image_sum += flat.sum(0)
            self.image_products += flat.T @ flat
        return self

    def merge(self, other: PixelStatistics) -> PixelStatistics:
        if other.channel_sum is None:
            return self
        if self.channel_sum is None:
            return other
        self.images, self.pixels = self.images + other.images, self.pixels + other.pixels
        self.channel_sum += other.channel_sum
        self.channel_squares += other.channel_squares
        if self.covariance:
            self.image_sum += other.image_sum
            self.image_products += other.image_products
        return self

    def channel_moments(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased std) per channel, float64."""
        if self.channel_sum is None or self.pixels < 2:
            raise DataError(f"normalisation needs at least 2 pixel values per channel, got {self.pixels}")
        mean = self.channel_sum / self.pixels
        variance = (self.channel_squares - self.pixels * mean * mean) / (self.pixels - 1)
        return mean, variance.clamp(min=0).sqrt()

    def image_moments(self) -> tuple[Tensor, Tensor]:
        """(mean (D,), unbiased covariance (D, D)) of the flattened images, float64."""
        if self.image_sum is None or self.images < 2:
            raise DataError(f"ZCA needs at least 2 images to fit, got {self.images}")
        mean = self.image_sum / self.images
        covariance = (self.image_products - self.images * torch.outer(mean, mean)) / (self.images - 1)
        return mean, covariance


@dataclass(frozen=True)
class Preprocess:
    mean: Tensor  # (C,) float32; zeros when not normalising
    std: Tensor  # (C,) float32; ones when not normalising
    zca: ZCA | None = None

    @classmethod
    def fit(cls, images: Tensor, config: PreprocessConfig, batch: int = 1024) -> Preprocess:
        """Fit on training images (N, C, H, W) or clips (N, T, C, H, W), uint8 or in [0, 1]."""
        return cls.fit_stream(images.split(batch), config)

    @classmethod
    def fit_stream(cls, batches: Iterable[Tensor], config: PreprocessConfig) -> Preprocess:
        """Fit in one pass over a stream of batches (the training split, never held whole): per-channel
        mean and std, and the ZCA matrices of the normalised images from the raw images' moments."""
        statistics = PixelStatistics(covariance=config.zca)
        for batch in batches:
            if batch.ndim == 5 and config.zca:
                raise ConfigError("preprocess.zca whitens images; it is not defined for clips (set preprocess.zca false)")
            statistics.add(batch)
        return cls.from_statistics(statistics, config)

    @classmethod
    def from_statistics(cls, statistics: PixelStatistics, config: PreprocessConfig) -> Preprocess:
        channel_mean, channel_std = statistics.channel_moments()
        if config.normalize:
            mean, std = channel_mean.float(), channel_std.float().clamp(min=1e-6)
        else:
            mean, std = torch.zeros(len(channel_mean)), torch.ones(len(channel_mean))
        if not config.zca:
            return cls(mean, std)
        # The normalised image x' = (x - m) / s per element: mean' = (mean - m) / s, cov' = S⁻¹ cov S⁻¹.
        image_mean, covariance = statistics.image_moments()
        per_element = len(image_mean) // len(mean)
        m = mean.double().repeat_interleave(per_element)
        s = std.double().repeat_interleave(per_element)
        zca = ZCA.from_moments((image_mean - m) / s, covariance / torch.outer(s, s), eps=config.zca_eps)
        return cls(mean, std, zca)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Preprocess:
        """A copy with every tensor on ``device`` in ``dtype``, so applying it per batch copies nothing."""
        zca = None
        if self.zca is not None:
            zca = ZCA(self.zca.mean.to(device, dtype), self.zca.whiten.to(device, dtype),
                      self.zca.unwhiten.to(device, dtype), self.zca.eps)
        return Preprocess(self.mean.to(device, dtype), self.std.to(device, dtype), zca)

    def apply(self, x: Tensor) -> Tensor:
        """Pixels (uint8, or float in [0, 1]) -> model inputs; differentiable."""
        x = to_unit(x)
        out = (x - self.mean.to(x).view(-1, 1, 1)) / self.std.to(x).view(-1, 1, 1)  # broadcast over (…, C, H, W)
        return self.zca.transform(out) if self.zca is not None else out

    def inverse(self, x: Tensor) -> Tensor:
        """Model inputs -> pixels (not clipped: a synthetic image may leave [0, 1])."""
        out = self.zca.inverse(x) if self.zca is not None else x
        return out * self.std.to(x).view(-1, 1, 1) + self.mean.to(x).view(-1, 1, 1)

    def to_bytes(self) -> bytes:
        tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.zca is not None:
            tensors |= {f"zca/{k}": v for k, v in self.zca.tensors().items()}
        return save_safetensors(tensors)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "preprocess") -> Preprocess:
        tensors = load_safetensors(data)
        if "mean" not in tensors or "std" not in tensors:
            raise DataError(f"{source}: not a preprocessing file (no mean/std)")
        zca = {k.removeprefix("zca/"): v for k, v in tensors.items() if k.startswith("zca/")}
        return cls(tensors["mean"], tensors["std"], ZCA.from_tensors(zca) if zca else None)

    def save(self, folder_url: str, storage_config: StorageConfig | None = None) -> None:
        storage.write_bytes(storage.join(folder_url, FILE_NAME), self.to_bytes(), storage_config)

    @classmethod
    def load(cls, folder_url: str, storage_config: StorageConfig | None = None) -> Preprocess:
        url = storage.join(folder_url, FILE_NAME)
        if not storage.exists(url, storage_config):
            raise DataError(f"{storage.redact(url)}: missing; the buffer job writes it with the store")
        return cls.from_bytes(storage.read_bytes(url, storage_config), storage.redact(url))
