"""Shard folders (see ``engine.data.manifest`` for the contract): which shards a split has, and the
samples inside a tar.

Readers trust only the shards the manifest lists for the split: other files in the folder (a README,
a hidden ``.x.tmp`` of a write in progress) are never read. A listed shard that is missing is an
error; a listed shard that is empty (0 bytes, or a tar without members) is skipped with a warning.
``DataConfig`` says which shards to read and what tensors to make of them; ``engine.data.memory``
decodes them in this process, ``engine.runtime.data`` streams them through Ray Data.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Literal

from pydantic import Field, field_validator

from engine import storage
from engine.config import Section
from engine.data import decode
from engine.data.manifest import ShardManifest, sha256_of
from engine.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from engine.data.tokenize import parse_spec
from engine.errors import DataError, StorageError
from engine.storage import PathOrURL, StorageConfig

logger = logging.getLogger(__name__)

EMPTY_CHECK_MAX_BYTES = 64 * 1024  # only a shard this small can be all padding; larger ones always hold members


class DataConfig(Section):
    """Which shards to read and what tensors to make of them. Job configs embed this as ``data``."""

    shards: PathOrURL = Field(description="Shard folder with manifest.json: a local path or s3://bucket/prefix.")
    split: str = Field("train", description="Split to read, as named in the manifest.")
    image_size: int = Field(32, gt=0, le=4096, description="Output height = width, in pixels.")
    channels: Literal[1, 3] = Field(3, description="1: grayscale (L); 3: RGB. Every input mode is converted.")
    resize: decode.ResizePolicy = Field(
        "crop", description="crop: short side to image_size, centre crop | squash | pad: letterbox on black."
    )
    frames: int = Field(8, ge=1, le=1024, description="Video: frames sampled uniformly over each clip.")
    tokenizer: str | None = Field(
        None, description="open_clip:<model> or hf:<local folder>; None keeps captions as strings only."
    )
    context_length: int = Field(77, ge=2, le=4096, description="Tokens per caption (truncated or padded).")
    max_captions: int = Field(
        5, ge=1, le=100, description="Captions kept per image: the first ones; fewer are cycled in `tokens`."
    )
    shuffle_buffer: int = Field(
        10_000, ge=1, description="Training streams: rows shuffled together after a seeded shard order "
        "(memory: this many decoded samples).")
    cache: Literal["auto", "memory", "none"] = Field(
        "auto", description="Keep the decoded training split after its first pass (memory: in this process; "
        "on Ray: in the object store, once per cluster) instead of decoding every epoch. auto: when the "
        "decoded split is at most cache_max_gb.")
    cache_max_gb: float = Field(2.0, ge=0, description="auto cache: the largest decoded split kept.")

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str | None) -> str | None:
        if value is not None:
            parse_spec(value)
        return value

    def sample_bytes(self, modality: str) -> int:
        """Bytes of one decoded sample's pixels (uint8)."""
        frames = self.frames if modality == "video" else 1
        return self.channels * self.image_size * self.image_size * frames

    def caches(self, num_samples: int, modality: str) -> bool:
        """Whether the decoded split is kept after its first pass."""
        if self.cache != "auto":
            return self.cache == "memory"
        return num_samples * self.sample_bytes(modality) <= self.cache_max_gb * 2**30


# --- which shards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split that will be read, resolved from the manifest and checked."""

    shards_url: str
    split: str
    manifest: ShardManifest
    urls: list[str]  # non-empty shards, in manifest order
    empty: list[str] = field(default_factory=list)  # names of listed shards that are empty (skipped)

    @property
    def modality(self) -> str:
        return self.manifest.modality


def resolve_shards(shards_url: str, split: str = "train", storage_config: StorageConfig | None = None) -> ShardSet:
    """Load the manifest, list the split's shards from it and check each one is there and non-empty."""
    require_folder(shards_url, storage_config)
    manifest = ShardManifest.load(shards_url, storage_config)
    listed = manifest.shards_of(split)
    sizes = _file_sizes(shards_url, storage_config)
    urls, empty = [], []
    for shard in listed:
        if shard.name not in sizes:
            raise DataError(f"{storage.redact(shards_url)}: shard {shard.name} is listed in the manifest but missing")
        url = storage.join(shards_url, shard.name)
        if _is_empty_tar(url, sizes[shard.name], storage_config):
            empty.append(shard.name)
        else:
            urls.append(url)
    if empty:
        logger.warning("%s: skipped %d empty shard(s): %s", storage.redact(shards_url), len(empty), ", ".join(empty))
    if not urls:
        raise DataError(f"{storage.redact(shards_url)}: split {split!r} has no non-empty shards")
    return ShardSet(shards_url, split, manifest, urls, empty)


def require_folder(url: str, storage_config: StorageConfig | None = None) -> None:
    """A StorageError in one line when ``url`` (or its bucket) does not exist."""
    if storage.exists(url, storage_config):
        return
    if storage.is_remote(url):
        scheme, rest = url.split("://", 1)
        bucket = rest.split("/", 1)[0]
        if not storage.exists(f"{scheme}://{bucket}", storage_config):
            raise StorageError(f"{storage.redact(url)}: bucket {bucket!r} does not exist")
    raise StorageError(f"{storage.redact(url)}: no such directory")


def _file_sizes(folder_url: str, storage_config: StorageConfig | None) -> dict[str, int]:
    """File name -> size for the files directly in ``folder_url`` (one listing, also on S3)."""
    fs, path = storage.filesystem(folder_url, storage_config)
    fs.invalidate_cache(path)  # s3fs caches listings; shards may have been written by another process
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError as err:
        raise StorageError(f"{storage.redact(folder_url)}: no such directory or bucket") from err
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e["type"] == "file"}


def _is_empty_tar(url: str, size: int, storage_config: StorageConfig | None) -> bool:
    """0 bytes, or a small tar whose first header block is all zeros (the end-of-archive marker)."""
    if size == 0:
        return True
    if size > EMPTY_CHECK_MAX_BYTES:
        return False
    fs, path = storage.filesystem(url, storage_config)
    head = fs.cat_file(path, start=0, end=tarfile.BLOCKSIZE)
    return not head.strip(b"\0")

# --- members and samples ------------------------------------------------------------------------------


def member_kind(extension: str) -> str:
    """A member's extension -> the name it is read under: image, video, or itself (cls, json...)."""
    ext = extension.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return ext


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) as WebDataset splits it: the key runs to the first '.' of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_tar_samples(fileobj: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {kind: bytes}) for each sample of a tar stream, checking the WebDataset layout.

    A sample's members must be adjacent and each kind may appear once; otherwise DataError naming
    ``shard``. Members are keyed by ``member_kind`` (image, video, cls, json...).
    """
    done: set[str] = set()
    key, members = None, {}
    for name, data in _tar_members(fileobj, shard):
        parts = split_member_name(name)
        if parts is None:
            continue
        member_key, kind = parts[0], member_kind(parts[1])
        if member_key != key:
            if key is not None:
                yield key, members
                done.add(key)
            if member_key in done:
                raise DataError(f"shard {shard}: members of sample {member_key!r} are not adjacent in the tar")
            key, members = member_key, {}
        if kind in members:
            raise DataError(f"shard {shard}: sample {member_key!r} has two .{kind} members ({name})")
        members[kind] = data
    if key is not None:
        yield key, members


def _tar_members(fileobj: IO[bytes], shard: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"shard {shard}: not a readable tar file ({err})") from err


@dataclass(frozen=True)
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes | None]


def iter_shards(shard_set: ShardSet, storage_config: StorageConfig | None,
                check_counts: bool = True) -> Iterator[RawSample]:
    """The samples of every shard in order; a shard holding other than the manifest's count is an error
    (``check_counts``; off to count what is there, as `distill data info` does)."""
    expected = {s.name: s.num_samples for s in shard_set.manifest.shards_of(shard_set.split)}
    for url in shard_set.urls:
        name = url.rsplit("/", 1)[-1]
        fs, path = storage.filesystem(url, storage_config)
        count = 0
        try:
            with fs.open(path, "rb") as f:
                for key, members in iter_tar_samples(f, name):
                    count += 1
                    yield RawSample(key=key, shard=name, members=members)
        except FileNotFoundError as err:
            raise DataError(f"shard {name}: gone from {storage.redact(shard_set.shards_url)} while it was being "
                            "read (listed in the manifest)") from err
        if check_counts and count != expected[name]:
            raise DataError(f"shard {name}: {count} samples read, the manifest says {expected[name]} (truncated?)")


def verify_shards(shards_url: str, storage_config: StorageConfig | None = None) -> list[str]:
    """Check every shard in the manifest against its recorded size and sha256; returns the problems."""
    manifest = ShardManifest.load(shards_url, storage_config)
    sizes = _file_sizes(shards_url, storage_config)
    problems = []
    for shard in manifest.shards:
        url = storage.join(shards_url, shard.name)
        if shard.name not in sizes:
            problems.append(f"{shard.name}: missing")
        elif sizes[shard.name] != shard.bytes:
            problems.append(f"{shard.name}: {sizes[shard.name]} bytes, manifest says {shard.bytes}")
        elif sha256_of(url, storage_config) != shard.sha256:
            problems.append(f"{shard.name}: sha256 differs from the manifest")
    return problems
