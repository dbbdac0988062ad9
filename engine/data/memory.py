"""Decoding samples into fixed-size arrays, and whole (small) splits in memory without Ray.

``SampleDecoder`` turns raw samples into the columns below; ``ShardReader`` runs it shard after shard,
here (``load_in_memory``, an expert decoding its own stream) and in the Ray Data reader's tasks
(``engine.runtime.data``), so every path gives identical arrays. Output columns / ``InMemoryData`` fields:

    image         uint8 (C, H, W)                         image and image-text data
    video         uint8 (T, C, H, W)                      video data
    label         int64, the class index; -1 when the sample has none
    key           str, the sample key (``train-00000042``)
    shard         str, the shard's file name (only when asked for)
    captions      list[str], the sample's first ``max_captions`` captions     image-text data
    num_captions  int64, how many captions the sample has (before trimming)   image-text data
    tokens        int64 (max_captions, context_length); rows past the sample's own captions
                  cycle through them again (a, b -> a, b, a, b, a)   image-text data with a tokenizer
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import storage
from engine.data import decode
from engine.data.shards import DataConfig, RawSample, ShardSet, iter_shards, resolve_shards
from engine.data.tokenize import Tokenizer, load_tokenizer
from engine.errors import DataError
from engine.storage import StorageConfig

if TYPE_CHECKING:
    import torch

IN_MEMORY_CHUNK = 256  # samples decoded (and captions tokenized) together, with or without Ray
CAPTION_COLUMNS = ("captions", "num_captions", "tokens")


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

    It holds no state but the tokenizer, loaded on first use in the process that decodes. ``keep``: decode only the samples
    with these keys (a kept subset, ``engine.select.subset``); the others are dropped undecoded.
    """

    def __init__(self, config: DataConfig, columns: Sequence[str], keep: frozenset[str] | None = None):
        self.config = config
        self.columns = tuple(columns)
        self.keep = keep
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # each Ray worker loads its own tokenizer

    def decode(self, samples: Sequence[RawSample]) -> dict[str, np.ndarray]:
        if self.keep is not None:
            samples = [s for s in samples if s.key in self.keep]
        rows = [self._row(s) for s in samples]
        out = {c: _stack(c, [r[c] for r in rows], self._shape(c)) for c in self.columns if c != "tokens"}
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

    def _shape(self, column: str) -> tuple[int, ...]:
        """One sample's array shape in ``column`` (what an empty chunk's array is made of)."""
        cfg = self.config
        frame = (cfg.channels, cfg.image_size, cfg.image_size)
        return {"image": frame, "video": (cfg.frames, *frame)}.get(column, ())

    def _tokens(self, fitted: list[list[str]]) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, self.config.context_length)
        ids = self._tokenizer([text for captions in fitted for text in captions])
        return ids.reshape(len(fitted), self.config.max_captions, self.config.context_length)


def _required(sample: RawSample, kind: str) -> bytes:
    data = sample.members.get(kind)
    if data is None:
        raise DataError(f"{decode.where(sample.shard, sample.key)}: no {kind} member")
    return data


def _stack(column: str, values: list[Any], shape: tuple[int, ...] = ()) -> np.ndarray:
    if column in ("image", "video"):
        return np.stack(values) if values else np.empty((0, *shape), dtype=np.uint8)  # uint8
    if column in ("label", "num_captions"):
        return np.asarray(values, dtype=np.int64)
    out = np.empty(len(values), dtype=object)  # str, or list[str] for captions (kept as Python lists)
    for i, value in enumerate(values):
        out[i] = value
    return out


@dataclass
class InMemoryData:
    """A whole (small) split as tensors."""

    images: torch.Tensor  # (N, C, H, W) uint8; (N, T, C, H, W) for video (Preprocess.apply takes them as they are)
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
    samples = itertools.islice(iter_shards(shard_set, storage_config), limit)
    batches = [decoder.decode(chunk) for chunk in _chunks(samples, IN_MEMORY_CHUNK)]
    if not batches:
        raise DataError(f"{storage.redact(config.shards)}: split {config.split!r} has no samples")
    return in_memory_data(batches, columns, shard_set)


def _chunks(items: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def in_memory_data(batches: list[dict[str, np.ndarray]], columns: Sequence[str], shard_set: ShardSet) -> InMemoryData:
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


class ShardReader:
    """Decoded shards from this process, one at a time, without Ray (``engine.data.stream.ShardSource``).

    ``threads`` > 1 decodes chunks of 256 samples on that many threads (image decoders release the GIL)
    while the tar is read in order; at most 2 × threads chunks are decoded ahead, so memory stays a few
    chunks and the order is the tar's."""

    def __init__(self, config: DataConfig, storage_config: StorageConfig | None = None,
                 columns: Sequence[str] | None = None, shard_set: ShardSet | None = None, threads: int = 1,
                 keep: frozenset[str] | None = None, check_counts: bool = True):
        self.config, self.storage_config, self.check_counts = config, storage_config, check_counts
        self.shard_set = shard_set or resolve_shards(config.shards, config.split, storage_config)
        self.decoder = SampleDecoder(config, columns or columns_for(self.shard_set.modality, config.tokenizer), keep)
        self.urls = {url.rsplit("/", 1)[-1]: url for url in self.shard_set.urls}
        self.threads = max(1, threads)

    def shard_names(self) -> list[str]:
        return list(self.urls)

    def shard_counts(self) -> dict[str, int]:
        counts = {s.name: s.num_samples for s in self.shard_set.manifest.shards_of(self.shard_set.split)}
        return {name: counts[name] for name in self.urls}

    def decoded(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        raw = (chunk for name in names for chunk in _chunks(
            iter_shards(replace(self.shard_set, urls=[self.urls[name]]), self.storage_config, self.check_counts),
            IN_MEMORY_CHUNK))
        if self.threads == 1:
            yield from map(self.decoder.decode, raw)
            return
        with ThreadPoolExecutor(self.threads) as pool:
            ahead: deque[Future] = deque()
            for chunk in raw:
                ahead.append(pool.submit(self.decoder.decode, chunk))
                if len(ahead) >= 2 * self.threads:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


class CachedShards:
    """A source's shards decoded once, on first use, and kept in this process (``data.cache: memory``)."""

    def __init__(self, source: ShardReader):
        self.source = source
        self._decoded: dict[str, list[dict[str, np.ndarray]]] = {}

    def shard_names(self) -> list[str]:
        return self.source.shard_names()

    def shard_counts(self) -> dict[str, int]:
        return self.source.shard_counts()

    def decoded(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        for name in names:
            if name not in self._decoded:
                self._decoded[name] = list(self.source.decoded([name]))
            yield from self._decoded[name]


def local_source(config: DataConfig, storage_config: StorageConfig | None = None,
                 columns: Sequence[str] | None = None, keep: frozenset[str] | None = None) -> ShardReader | CachedShards:
    """The split's shards read in this process, kept after the first pass when ``data.cache`` says so;
    ``keep``: only the samples with these keys are decoded."""
    reader = ShardReader(config, storage_config, columns, keep=keep)
    return CachedShards(reader) if config.caches(sum(reader.shard_counts().values()), reader.shard_set.modality) \
        else reader
