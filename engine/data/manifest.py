"""The manifest that describes a folder of WebDataset shards.

Layout of a shard folder (local or s3://)::

    manifest.json              this file's content, written last
    train-000000.tar           shards, named <split>-<number>.tar
    val-000000.tar ...

Inside a shard every sample has a key ``<split>-<index:08d>`` and adjacent members:

    <key>.jpg | <key>.png      image bytes exactly as encoded (images and image-text data)
    <key>.mp4 | .avi | .webm   video bytes exactly as encoded (video data)
    <key>.cls                  class index as ASCII digits (classification and video data)
    <key>.json                 {"id": source name, "captions": [...]} (captions for image-text data)

No member is ever a pickle. A reader trusts only the shards listed here, so stray files in the
folder are ignored, and it can verify each shard against its size and sha256.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import storage
from engine.errors import DataError
from engine.storage import StorageConfig

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Modality = Literal["image", "image-text", "video"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassInfo(_Model):
    index: int
    id: str = Field(description="Folder name or wnid, as in the source data.")
    name: str = Field(description="Human-readable class name.")


class ShardInfo(_Model):
    name: str
    split: str
    num_samples: int
    bytes: int
    sha256: str


class SplitInfo(_Model):
    num_samples: int = 0
    class_counts: list[int] = Field(default_factory=list, description="Samples per class index.")
    num_captions: int = 0


class ShardManifest(_Model):
    format_version: int = FORMAT_VERSION
    source_format: str
    modality: Modality
    source: str = ""
    created: str = ""
    classes: list[ClassInfo] = Field(default_factory=list)
    splits: dict[str, SplitInfo] = Field(default_factory=dict)
    shards: list[ShardInfo] = Field(default_factory=list)
    skipped: dict[str, int] = Field(default_factory=dict, description="Reason -> number of source items skipped.")
    skipped_examples: dict[str, list[str]] = Field(default_factory=dict)
    options: dict[str, object] = Field(default_factory=dict, description="Writer options (shard size, max side...).")

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def shards_of(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise DataError(f"no split {split!r} in the shards; splits present: {', '.join(sorted(self.splits))}")
        return [s for s in self.shards if s.split == split]

    def fingerprint(self) -> str:
        """Identifies the data content: changes whenever any shard's bytes change."""
        digest = hashlib.sha256()
        for shard in sorted(self.shards, key=lambda s: s.name):
            digest.update(f"{shard.name}:{shard.sha256}\n".encode())
        return digest.hexdigest()[:16]

    def save(self, shard_url: str, storage_config: StorageConfig | None = None) -> None:
        storage.write_text(storage.join(shard_url, MANIFEST_NAME), self.model_dump_json(indent=2) + "\n", storage_config)

    @classmethod
    def load(cls, shard_url: str, storage_config: StorageConfig | None = None) -> ShardManifest:
        url = storage.join(shard_url, MANIFEST_NAME)
        if not storage.exists(url, storage_config):
            raise DataError(f"{storage.redact(shard_url)}: no {MANIFEST_NAME}; write shards with `distill shard` first")
        raw = storage.read_json(url, storage_config)
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{storage.redact(url)}: invalid manifest at {key}: {first['msg']}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise DataError(f"{storage.redact(url)}: manifest format {manifest.format_version}, expected {FORMAT_VERSION}")
        return manifest


def sha256_of(url: str, storage_config: StorageConfig | None = None, chunk: int = 1 << 20) -> str:
    fs, path = storage.filesystem(url, storage_config)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
