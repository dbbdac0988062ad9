"""The input transform every model of one experiment sees: per-channel normalisation, then optional ZCA.

Experts, distillation, coresets and evaluation must feed models the same transform of the pixels,
so it is fitted once on the training split (by the buffer job), saved in the trajectory store
beside the trajectories, and loaded from there by everything downstream. Synthetic images live in
the transformed space (as in MTT, which distils ZCA-whitened CIFAR); ``inverse`` brings them back
to [0, 1] pixels for grids and shards.

    x_model = ZCA((x - mean_c) / std_c)        images (N, C, H, W) or clips (N, T, C, H, W)
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Preprocess:
    mean: Tensor  # (C,) float32; zeros when not normalising
    std: Tensor  # (C,) float32; ones when not normalising
    zca: ZCA | None = None

    @classmethod
    def fit(cls, images: Tensor, config: PreprocessConfig) -> Preprocess:
        """Fit on training images (N, C, H, W) or clips (N, T, C, H, W) in [0, 1]."""
        if images.ndim == 5 and config.zca:
            raise ConfigError("preprocess.zca whitens images; it is not defined for clips (set preprocess.zca false)")
        channels = images.shape[-3]
        per_channel = images.transpose(0, -3).reshape(channels, -1).double()  # (C, everything else)
        if config.normalize:
            mean, std = per_channel.mean(1).float(), per_channel.std(1).float().clamp(min=1e-6)
        else:
            mean, std = torch.zeros(channels), torch.ones(channels)
        plain = cls(mean, std)
        zca = ZCA.fit(plain.apply(images), eps=config.zca_eps) if config.zca else None
        return cls(mean, std, zca)

    def apply(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] -> model inputs; differentiable."""
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
