"""Caption features of a frozen text tower, computed once per data set and cached in the run folder.

Vision-language experts and distillation never run the text encoder inside a training loop: they
use these vectors (one per caption) and train only the projection head on top of them. The cache
file is keyed by the tower and the data fingerprint, so a different tower or changed shards get
their own file; a stale cache can never be picked up.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.storage import StorageConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionFeatures:
    """``features`` (num_captions, D), and ``image_index`` (num_captions,): the sample each caption describes."""

    features: Tensor
    image_index: Tensor


def cache_key(tower_name: str, data_fingerprint: str, split: str, num_captions: int) -> str:
    text = f"{tower_name}|{data_fingerprint}|{split}|{num_captions}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten_captions(captions: list[list[str]]) -> tuple[list[str], Tensor]:
    """Per-sample caption lists -> one flat list and the sample index of each caption."""
    flat = [c for per_image in captions for c in per_image]
    index = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image], dtype=torch.long)
    return flat, index


def caption_features(
    tower, tower_name: str, captions: list[list[str]], cache_dir: str, data_fingerprint: str, split: str,
    storage_config: StorageConfig | None = None,
) -> CaptionFeatures:
    """Features of every caption from ``tower.embed_captions``, read from ``cache_dir`` when cached.

    ``tower`` may be a callable that loads the tower: it is then loaded only on a cache miss.
    """
    flat, image_index = flatten_captions(captions)
    key = cache_key(tower_name, data_fingerprint, split, len(flat))
    url = storage.join(cache_dir, f"text-features-{split}-{key}.safetensors")
    if storage.exists(url, storage_config):
        tensors = load_safetensors(storage.read_bytes(url, storage_config))
        return CaptionFeatures(tensors["features"], tensors["image_index"])
    logger.info("computing text features of %d %s captions with %s", len(flat), split, tower_name)
    if not hasattr(tower, "embed_captions"):
        tower = tower()
    with torch.no_grad():
        features = tower.embed_captions(flat).contiguous()
    storage.write_bytes(url, save_safetensors({"features": features, "image_index": image_index}), storage_config)
    return CaptionFeatures(features, image_index)


@dataclass(frozen=True)
class CaptionTable:
    """Caption features by sample key, for streams: the rows of ``features`` that belong to each sample."""

    features: Tensor  # (num_captions, D)
    rows: dict[str, tuple[int, int]]  # sample key -> (first row, number of captions)

    @classmethod
    def of(cls, keys: Sequence[str], captions: CaptionFeatures) -> CaptionTable:
        """``captions.image_index`` indexes ``keys`` (the split's samples, in the order captions were listed)."""
        counts = torch.bincount(captions.image_index, minlength=len(keys)).tolist()
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
        return cls(captions.features, {key: (start, count) for key, start, count in zip(keys, starts, counts,
                                                                                        strict=True)})

    def expand(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """An image sample -> one (image, caption feature) row per caption: what contrastive experts train on."""
        start, count = self.rows[str(row["key"])]
        media = "video" if "video" in row else "image"
        return [{media: row[media], "text": self.features[start + j].numpy()} for j in range(count)]
