"""Readers of shard folders (see ``engine.data.manifest`` for the contract).

Two paths over the same decode functions (``engine.data.decode``), so they give identical arrays:

- ``read_shards``: a streaming ``ray.data.Dataset`` (``read_webdataset`` + ``map_batches``) for data
  of any size, local or ``s3://``. Consume it inside ``shard_errors()`` to get Ray's task errors as
  one-line ``DataError``s naming the shard.
- ``load_in_memory``: no Ray; reads the shards one after another into tensors. For small sets that
  must live on one device (distillation) and for tests.

Both trust only the shards the manifest lists for the split: other files in the folder (a README, a
hidden ``.x.tmp`` of a write in progress) are never read. A listed shard that is missing is an
error; a listed shard that is empty (0 bytes, or a tar without members) is skipped with a warning.

Output columns (``read_shards``) / fields (``InMemoryData``):

    image         float32 (C, H, W) in [0, 1]            image and image-text data
    video         float32 (T, C, H, W) in [0, 1]         video data
    label         int64, the class index; -1 when the sample has none
    key           str, the sample key (``train-00000042``)
    shard         str, the shard's file name (only when asked for)
    captions      list[str], the sample's first ``max_captions`` captions     image-text data
    num_captions  int64, how many captions the sample has (before trimming)   image-text data
    tokens        int64 (max_captions, context_length); rows past the sample's own captions
                  cycle through them again (a, b -> a, b, a, b, a)   image-text data with a tokenizer
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from engine import errors, storage
from engine.config import Section
from engine.data import decode
from engine.data.manifest import ShardManifest, sha256_of
from engine.data.tokenize import Tokenizer, load_tokenizer, parse_spec
from engine.errors import DataError, StorageError
from engine.storage import PathOrURL, StorageConfig

if TYPE_CHECKING:
    import ray.data
    import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})
VIDEO_EXTENSIONS = frozenset({"mp4", "avi", "webm", "mkv", "mov", "m4v"})
EMPTY_CHECK_MAX_BYTES = 64 * 1024  # only a shard this small can be all padding; larger ones always hold members
TARGET_BATCH_BYTES = 64 * 1024 * 1024  # decoded bytes per map_batches batch
MAX_BATCH_SIZE = 512
IN_MEMORY_CHUNK = 256  # samples decoded (and captions tokenized) together by load_in_memory
CAPTION_COLUMNS = ("captions", "num_captions", "tokens")


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

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str | None) -> str | None:
        if value is not None:
            parse_spec(value)
        return value


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


def canonical_member_name(name: str) -> str:
    """``train-00000001.png`` -> ``train-00000001.image``: one column whatever each image's format.

    Used as ``read_webdataset(filerename=...)``: shards may mix JPEG and PNG samples.
    """
    parts = split_member_name(name)
    return name if parts is None else f"{parts[0]}.{member_kind(parts[1])}"


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


# --- decoding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes | None]


def columns_for(modality: str, tokenizer: str | None) -> tuple[str, ...]:
    """The default output columns for data of ``modality``."""
    media = "video" if modality == "video" else "image"
    text = ("captions", "num_captions") + (("tokens",) if tokenizer else ()) if modality == "image-text" else ()
    return (media, "label", "key", *text)


def check_columns(columns: Sequence[str], modality: str, tokenizer: str | None) -> tuple[str, ...]:
    media = "video" if modality == "video" else "image"
    allowed = {media, "label", "key", "shard"} | (set(CAPTION_COLUMNS) if modality == "image-text" else set())
    if not tokenizer:
        allowed.discard("tokens")
    unknown = [c for c in columns if c not in allowed]
    if unknown or not columns:
        raise ValueError(f"columns {list(columns)}: for {modality} data choose from {sorted(allowed)}")
    return tuple(columns)


class SampleDecoder:
    """Raw samples -> a batch of fixed-size numpy columns. Used by both readers.

    As a ``map_batches`` function it takes Ray's numpy batches of raw members; it holds no state but
    the tokenizer, loaded on first use in the process that decodes.
    """

    def __init__(self, config: DataConfig, columns: Sequence[str]):
        self.config = config
        self.columns = tuple(columns)
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # each Ray worker loads its own tokenizer

    @property
    def member_kinds(self) -> list[str]:
        """The members the columns need: others are dropped while reading."""
        needed = {"image": "image", "video": "video", "label": "cls"}
        kinds = {needed[c] for c in self.columns if c in needed}
        if any(c in CAPTION_COLUMNS for c in self.columns):
            kinds.add("json")
        return sorted(kinds)

    @property
    def batch_size(self) -> int:
        side = self.config.image_size
        frames = self.config.frames if "video" in self.columns else 1
        sample_bytes = 4 * self.config.channels * side * side * frames
        return int(np.clip(TARGET_BATCH_BYTES // sample_bytes, 1, MAX_BATCH_SIZE))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decode(list(_raw_samples(batch)))

    def decode(self, samples: Sequence[RawSample]) -> dict[str, np.ndarray]:
        rows = [self._row(s) for s in samples]
        out = {c: _stack(c, [r[c] for r in rows]) for c in self.columns if c != "tokens"}
        if "tokens" in self.columns:
            out["tokens"] = self._tokens([r["fitted"] for r in rows])
        return out

    def _row(self, s: RawSample) -> dict[str, Any]:
        cfg, cols, where = self.config, self.columns, {"shard": s.shard, "key": s.key}
        row: dict[str, Any] = {"key": s.key, "shard": s.shard}
        if "label" in cols:
            row["label"] = decode.parse_label(s.members.get("cls"), **where)
        if "image" in cols:
            data = _required(s, "image")
            row["image"] = decode.decode_image(data, cfg.image_size, channels=cfg.channels, resize=cfg.resize, **where)
        if "video" in cols:
            data = _required(s, "video")
            row["video"] = decode.decode_video(
                data, cfg.image_size, cfg.frames, channels=cfg.channels, resize=cfg.resize, **where
            )
        if any(c in CAPTION_COLUMNS for c in cols):
            captions = decode.parse_captions(s.members.get("json"), **where)
            row["captions"] = captions[: cfg.max_captions]
            row["num_captions"] = len(captions)
            if "tokens" in cols:
                row["fitted"] = decode.fit_captions(captions, cfg.max_captions, **where)
        return row

    def _tokens(self, fitted: list[list[str]]) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, self.config.context_length)
        ids = self._tokenizer([text for captions in fitted for text in captions])
        return ids.reshape(len(fitted), self.config.max_captions, self.config.context_length)


def _raw_samples(batch: dict[str, np.ndarray]) -> Iterator[RawSample]:
    """Ray's batch of raw members (``__key__``, ``__url__``, one column per member kind) -> samples."""
    kinds = [k for k in batch if not k.startswith("__")]
    for i, (key, url) in enumerate(zip(batch["__key__"], batch["__url__"], strict=True)):
        members = {k: _bytes_or_none(batch[k][i]) for k in kinds}
        yield RawSample(key=str(key), shard=str(url).rsplit("/", 1)[-1], members=members)


def _bytes_or_none(value: Any) -> bytes | None:
    return value if isinstance(value, bytes) else None  # missing members come through as None or NaN


def _required(sample: RawSample, kind: str) -> bytes:
    data = sample.members.get(kind)
    if data is None:
        raise DataError(f"{decode.where(sample.shard, sample.key)}: no {kind} member")
    return data


def _stack(column: str, values: list[Any]) -> np.ndarray:
    if column in ("image", "video"):
        return np.stack(values).astype(np.float32, copy=False)
    if column in ("label", "num_captions"):
        return np.asarray(values, dtype=np.int64)
    out = np.empty(len(values), dtype=object)  # str, or list[str] for captions (kept as Python lists)
    for i, value in enumerate(values):
        out[i] = value
    return out


# --- the Ray Data reader ------------------------------------------------------------------------------


def read_shards(
    config: DataConfig, storage_config: StorageConfig | None = None, *, columns: Sequence[str] | None = None
) -> ray.data.Dataset:
    """A streaming Ray dataset of the split's samples, decoded into the columns in the module docstring.

    ``columns``: which columns to make (default: those of the data's modality, ``columns_for``).
    Asking only for label/key/shard/num_captions skips image decoding, and image bytes are not
    even kept in memory. Consume the dataset inside ``shard_errors()``.
    """
    shard_set = resolve_shards(config.shards, config.split, storage_config)
    return read_shard_set(shard_set, config, storage_config, columns=columns)


def read_shard_set(
    shard_set: ShardSet,
    config: DataConfig,
    storage_config: StorageConfig | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> ray.data.Dataset:
    """``read_shards`` for shards already resolved (or a subset of them: ``replace(shard_set, urls=...)``)."""
    import ray.data

    modality = shard_set.modality
    columns = check_columns(columns or columns_for(modality, config.tokenizer), modality, config.tokenizer)
    decoder = SampleDecoder(config, columns)
    fs, _ = storage.filesystem(shard_set.shards_url, storage_config)
    remote = storage.is_remote(shard_set.shards_url)
    raw = ray.data.read_webdataset(
        [storage.filesystem(url, storage_config)[1] for url in shard_set.urls],
        filesystem=fs if remote else None,
        decoder=None,  # keep bytes: decoding happens in map_batches. (False would still decode images.)
        file_extensions=["tar"],
        filerename=canonical_member_name,
        suffixes=decoder.member_kinds,
        override_num_blocks=len(shard_set.urls),
    )
    return raw.map_batches(decoder, batch_format="numpy", batch_size=decoder.batch_size, zero_copy_batch=True)


@contextlib.contextmanager
def shard_errors() -> Iterator[None]:
    """Turn the errors Ray raises while a ``read_shards`` dataset is consumed into one-line EngineErrors.

    A task's DataError (corrupt image...) comes back wrapped in Ray's exceptions, and
    ``read_webdataset``'s own checks (members not adjacent, duplicate members) as ValueErrors; both
    become a DataError naming the shard. Anything else is re-raised as it is.
    """
    import ray.exceptions

    try:
        yield
    except ray.exceptions.RayError as err:
        translated = engine_error_from(f"{err}\n{getattr(err, 'cause', '')}")
        if translated is None:
            raise
        raise translated from None


ENGINE_ERROR_LINE = re.compile(r"^engine\.errors\.(\w+): (.+)$", re.MULTILINE)
TAR_PATH = re.compile(r"tar is ([^\s)]+)")
NOT_ADJACENT = re.compile(r"for key '([^']*)' are not contiguous")
DUPLICATE = re.compile(r"(\S+)\.(\w+): duplicate file name in tar file")
TAR_ERROR = re.compile(r"^tarfile\.\w+: (.+)$", re.MULTILINE)


def engine_error_from(text: str) -> errors.EngineError | None:
    """The EngineError that the text of a Ray task error describes, or None if it is something else."""
    if match := ENGINE_ERROR_LINE.search(text):
        error_class = getattr(errors, match.group(1), None)
        if isinstance(error_class, type) and issubclass(error_class, errors.EngineError):
            return error_class(match.group(2))
    if tar := TAR_PATH.search(text):  # read_webdataset's layout checks name the tar this way
        shard = tar.group(1).rstrip(".,").rsplit("/", 1)[-1]
        if key := NOT_ADJACENT.search(text):
            return DataError(f"shard {shard}: members of sample {key.group(1)!r} are not adjacent in the tar")
        if dup := DUPLICATE.search(text):
            return DataError(f"shard {shard}: sample {dup.group(1)!r} has two .{dup.group(2)} members")
        return DataError(f"shard {shard}: {text.strip().splitlines()[-1]}")
    if bad := TAR_ERROR.search(text):
        return DataError(f"a shard is not a readable tar file ({bad.group(1)}); `distill data info --verify` finds it")
    return None


# --- the in-memory reader -----------------------------------------------------------------------------


@dataclass
class InMemoryData:
    """A whole (small) split as tensors."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]; (N, T, C, H, W) for video
    labels: torch.Tensor  # (N,) int64, -1 = no label
    keys: list[str]
    captions: list[list[str]]  # per sample, at most max_captions; [] for data without captions
    class_names: list[str]
    modality: str
    tokens: torch.Tensor | None = None  # (N, max_captions, context_length) int64 with a tokenizer
    num_captions: torch.Tensor | None = None  # (N,) int64 for image-text data
    empty_shards: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def load_in_memory(
    config: DataConfig, storage_config: StorageConfig | None = None, limit: int | None = None
) -> InMemoryData:
    """Read the split sequentially (no Ray) into tensors; at most ``limit`` samples, in shard order."""
    shard_set = resolve_shards(config.shards, config.split, storage_config)
    columns = columns_for(shard_set.modality, config.tokenizer)
    decoder = SampleDecoder(config, columns)
    samples = itertools.islice(_iter_shards(shard_set, storage_config), limit)
    batches = [decoder.decode(chunk) for chunk in _chunks(samples, IN_MEMORY_CHUNK)]
    if not batches:
        raise DataError(f"{storage.redact(config.shards)}: split {config.split!r} has no samples")
    return _in_memory(batches, columns, shard_set)


def materialize(config: DataConfig, storage_config: StorageConfig | None = None) -> InMemoryData:
    """``load_in_memory`` with the decoding spread over the Ray cluster (``read_shards``).

    Rows come back in key order, which is the order ``load_in_memory`` reads them in, so both give
    the same tensors and a seeded run does not depend on which reader fed it.
    """
    shard_set = resolve_shards(config.shards, config.split, storage_config)
    columns = columns_for(shard_set.modality, config.tokenizer)
    dataset = read_shard_set(shard_set, config, storage_config, columns=columns)
    with shard_errors():
        batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        raise DataError(f"{storage.redact(config.shards)}: split {config.split!r} has no samples")
    keys = np.concatenate([b["key"] for b in batches])
    order = np.argsort(keys.astype(str), kind="stable")
    merged = {c: np.concatenate([b[c] for b in batches])[order] for c in columns}
    return _in_memory([merged], columns, shard_set)


def _chunks(items: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _iter_shards(shard_set: ShardSet, storage_config: StorageConfig | None) -> Iterator[RawSample]:
    """The samples of every shard in order; a shard holding other than the manifest's count is an error."""
    expected = {s.name: s.num_samples for s in shard_set.manifest.shards_of(shard_set.split)}
    for url in shard_set.urls:
        name = url.rsplit("/", 1)[-1]
        fs, path = storage.filesystem(url, storage_config)
        count = 0
        with fs.open(path, "rb") as f:
            for key, members in iter_tar_samples(f, name):
                count += 1
                yield RawSample(key=key, shard=name, members=members)
        if count != expected[name]:
            raise DataError(f"shard {name}: {count} samples read, the manifest says {expected[name]} (truncated?)")


def _in_memory(batches: list[dict[str, np.ndarray]], columns: Sequence[str], shard_set: ShardSet) -> InMemoryData:
    import torch  # imported here so that Ray's decode workers never load it

    merged = {c: np.concatenate([b[c] for b in batches]) for c in columns}
    media = merged["video"] if "video" in merged else merged["image"]
    text = "captions" in merged
    return InMemoryData(
        images=torch.from_numpy(media),
        labels=torch.from_numpy(merged["label"]),
        keys=[str(k) for k in merged["key"]],
        captions=[list(c) for c in merged["captions"]] if text else [[] for _ in merged["key"]],
        class_names=shard_set.manifest.class_names,
        modality=shard_set.modality,
        tokens=torch.from_numpy(merged["tokens"]) if "tokens" in merged else None,
        num_captions=torch.from_numpy(merged["num_captions"]) if text else None,
        empty_shards=list(shard_set.empty),
    )


# --- counting and verifying ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleCounts:
    """What is actually in a split's shards, read back through Ray Data."""

    num_samples: int
    class_counts: list[int]  # index -> samples; as long as the manifest's class list (or the largest label)
    unlabelled: int  # samples without a .cls member
    shard_counts: dict[str, int]  # shard name -> samples
    captions_per_sample: dict[int, int]  # number of captions -> samples (image-text data)
    empty_shards: list[str]

    def mismatches(self, manifest: ShardManifest, split: str) -> list[str]:
        """How these counts differ from what the manifest says (empty list: they agree)."""
        info = manifest.splits[split]
        problems = []
        if self.num_samples != info.num_samples:
            problems.append(f"{self.num_samples} samples read, manifest says {info.num_samples}")
        if info.class_counts and self.class_counts != info.class_counts:
            problems.append(f"class counts {self.class_counts} read, manifest says {info.class_counts}")
        for shard in manifest.shards_of(split):
            found = self.shard_counts.get(shard.name, 0)
            if found != shard.num_samples:
                problems.append(f"shard {shard.name}: {found} samples read, manifest says {shard.num_samples}")
        return problems


def count_samples(
    shards_url: str, split: str = "train", storage_config: StorageConfig | None = None
) -> SampleCounts:
    """Count samples per class, per shard and captions per sample with Ray Data; no image is decoded."""
    shard_set = resolve_shards(shards_url, split, storage_config)
    text = shard_set.modality == "image-text"
    columns = ("label", "shard", "num_captions") if text else ("label", "shard")
    dataset = read_shard_set(shard_set, DataConfig(shards=shards_url, split=split), storage_config, columns=columns)
    labels, shards, captions = Counter(), Counter(), Counter()
    with shard_errors():
        for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
            labels.update(batch["label"].tolist())
            shards.update(str(s) for s in batch["shard"])
            if text:
                captions.update(batch["num_captions"].tolist())
    num_classes = max([len(shard_set.manifest.classes), *(label + 1 for label in labels)])
    return SampleCounts(
        num_samples=sum(shards.values()),
        class_counts=[labels.get(i, 0) for i in range(num_classes)],
        unlabelled=labels.get(-1, 0),
        shard_counts=dict(sorted(shards.items())),
        captions_per_sample=dict(sorted(captions.items())),
        empty_shards=list(shard_set.empty),
    )


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
