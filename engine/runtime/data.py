"""Shard folders streamed through Ray Data: the reader for data of any size, local or ``s3://``.

``read_shards`` is a streaming ``ray.data.Dataset``: one ``map_batches`` task per shard reads its tar and
decodes it with the reader ``engine.data.memory`` runs without Ray (the same ``SampleDecoder``, the same
layout checks), so both give identical arrays and errors.
Consume it inside ``shard_errors()`` to get Ray's task errors as one-line ``DataError``s naming the
shard. ``materialize`` decodes a split on the cluster into ``InMemoryData``; ``count_samples``
counts a split without decoding any image.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from engine import errors, storage
from engine.data.manifest import ShardManifest
from engine.data.memory import (
    InMemoryData,
    ShardReader,
    check_columns,
    columns_for,
    in_memory_data,
)
from engine.data.shards import DataConfig, ShardSet, resolve_shards
from engine.errors import DataError
from engine.storage import StorageConfig

if TYPE_CHECKING:
    import ray.data

# A split whose decoded pixels are at most this is decoded by the calling process itself: a Ray task
# would first start a worker process (Python, numpy, PIL, the engine: 2-4 s on a small machine), while one
# process decodes this much in about a second (some 5,000 32-px images/s, benchmarks/ingest.py).
LOCAL_BELOW_BYTES = 32 * 2**20


def decoded_bytes(shard_set: ShardSet, config: DataConfig, urls: Sequence[str] | None = None) -> int:
    """Pixels of the split (or of the shards ``urls``) once decoded, from the manifest's counts."""
    names = {url.rsplit("/", 1)[-1] for url in (shard_set.urls if urls is None else urls)}
    samples = sum(s.num_samples for s in shard_set.manifest.shards_of(shard_set.split) if s.name in names)
    return samples * config.sample_bytes(shard_set.modality)


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
    preserve_order: bool = False,
    keep: frozenset[str] | None = None,
    check_counts: bool = True,
) -> ray.data.Dataset:
    """``read_shards`` for shards already resolved (or a subset of them: ``replace(shard_set, urls=...)``).
    ``preserve_order``: samples come out shard after shard in the order of ``shard_set.urls``, each in tar
    order, though shards are read and decoded in parallel. ``keep``: only samples with these keys.
    ``check_counts``: a shard holding other than the manifest's count is an error (off: read what is there)."""
    import ray.data

    columns = check_columns(columns or columns_for(shard_set.modality, config.tokenizer), shard_set.modality,
                            config.tokenizer)
    # One task per shard reads its tar and decodes it with the in-process reader (the same SampleDecoder,
    # so both paths give identical arrays): numpy chunks straight from the tar, where read_webdataset would
    # first make a row of Arrow binaries per sample (measured: 1.2x the samples/s, benchmarks/ingest.py).
    urls = ray.data.from_items([{"url": url} for url in shard_set.urls], override_num_blocks=len(shard_set.urls))
    decode = functools.partial(_decode_shards, config, storage_config, tuple(columns), shard_set, keep, check_counts)
    dataset = urls.map_batches(decode, batch_size=1, batch_format="numpy")
    dataset.context.execution_options.preserve_order = preserve_order
    # Ray Data's per-operator reservation holds back part of the CPUs for operators that are not there
    # (this dataset has one): on 2 CPUs it left one decode task running most of the time. Off: 1.25x the
    # samples/s (benchmarks/ingest.py). Turn it back on before adding operators of your own (actors, say).
    dataset.context.op_resource_reservation_enabled = False
    return dataset


@contextlib.contextmanager
def shard_errors() -> Iterator[None]:
    """Turn the errors Ray raises while a ``read_shards`` dataset is consumed into one-line EngineErrors.

    A task's DataError (a corrupt image, members of a sample not adjacent, a truncated shard...) comes back
    wrapped in Ray's exceptions; it is raised again as the DataError naming the shard. Anything else is
    re-raised as it is.
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
TAR_ERROR = re.compile(r"^tarfile\.\w+: (.+)$", re.MULTILINE)


def engine_error_from(text: str) -> errors.EngineError | None:
    """The EngineError that the text of a Ray task error describes, or None if it is something else."""
    if match := ENGINE_ERROR_LINE.search(text):
        error_class = getattr(errors, match.group(1), None)
        if isinstance(error_class, type) and issubclass(error_class, errors.EngineError):
            return error_class(match.group(2))
    if bad := TAR_ERROR.search(text):
        return DataError(f"a shard is not a readable tar file ({bad.group(1)}); `distill data info --verify` finds it")
    return None


def materialize(config: DataConfig, storage_config: StorageConfig | None = None, *,
                local_below_bytes: int = LOCAL_BELOW_BYTES) -> InMemoryData:
    """``load_in_memory`` with the decoding spread over the Ray cluster (``read_shards``); a split of at
    most ``local_below_bytes`` decoded is read by this process (with ``load_in_memory``'s reader).

    Rows come back in key order, which is the order ``load_in_memory`` reads them in, so both give
    the same tensors and a seeded run does not depend on which reader fed it.
    """
    shard_set = resolve_shards(config.shards, config.split, storage_config)
    columns = columns_for(shard_set.modality, config.tokenizer)
    if decoded_bytes(shard_set, config) <= local_below_bytes:
        reader = ShardReader(config, storage_config, columns, shard_set)
        return in_memory_data(list(reader.decoded(reader.shard_names())), columns, shard_set)
    dataset = read_shard_set(shard_set, config, storage_config, columns=columns)
    with shard_errors():
        batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        raise DataError(f"{storage.redact(config.shards)}: split {config.split!r} has no samples")
    keys = np.concatenate([b["key"] for b in batches])
    order = np.argsort(keys.astype(str), kind="stable")
    merged = {c: np.concatenate([b[c] for b in batches])[order] for c in columns}
    return in_memory_data([merged], columns, shard_set)


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
    dataset = read_shard_set(shard_set, DataConfig(shards=shards_url, split=split), storage_config, columns=columns,
                             check_counts=False)
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


class RayShardSource:
    """Decoded shards through Ray (``engine.data.stream.ShardSource``).

    - With the cache (``data.cache``), one Ray task per shard decodes it once and the result stays in the
      object store: every expert trial on the cluster reads it from there, none decodes it again, and no
      process holds more than a shard. A split of at most ``local_below_bytes`` decoded is decoded by
      this process, shard after shard, each put in the object store.
    - Without it, a driver's pass (the input-transform fit, coreset embeddings...) has Ray Data read and
      decode the shards in parallel across the cluster, streamed in the asked order.
    - Without it, inside a worker that holds CPUs (an expert's Ray Train worker or trial), the worker
      decodes its shards itself on as many threads as it holds CPUs. A Ray Data executor there would start
      read and decode tasks that either ask for CPUs of their own — which never come once every CPU is
      held by an expert — or, asking for none, run in extra worker processes outside the expert's resources
      (more processes, more memory, CPUs oversubscribed). Decoding in the worker keeps an expert to its own
      process and its own CPUs.
    """

    def __init__(self, config: DataConfig, storage_config: StorageConfig | None = None,
                 columns: Sequence[str] | None = None, keep: frozenset[str] | None = None, *,
                 local_below_bytes: int = LOCAL_BELOW_BYTES):
        self.config, self.storage_config, self.keep = config, storage_config, keep
        self.local_below_bytes = local_below_bytes
        self.shard_set = resolve_shards(config.shards, config.split, storage_config)
        self.columns = tuple(columns or columns_for(self.shard_set.modality, config.tokenizer))
        self.urls = {url.rsplit("/", 1)[-1]: url for url in self.shard_set.urls}
        self.cached = config.caches(sum(self.shard_counts().values()), self.shard_set.modality)
        self._refs: dict = {}

    def shard_names(self) -> list[str]:
        return list(self.urls)

    def shard_counts(self) -> dict[str, int]:
        counts = {s.name: s.num_samples for s in self.shard_set.manifest.shards_of(self.shard_set.split)}
        return {name: counts[name] for name in self.urls}

    def fill_cache(self) -> None:
        """Decode every shard not yet cached (in parallel, one task each) and wait for them; only object
        references are kept here. Called before expert trials start, so none waits on a decode task."""
        import ray

        missing = [name for name in self.urls if name not in self._refs]
        here = decoded_bytes(self.shard_set, self.config, [self.urls[n] for n in missing]) <= self.local_below_bytes
        decode = ray.remote(_decode_shard)
        for name in missing:
            args = (self.config, self.storage_config, self.columns, self.shard_set, self.urls[name], self.keep)
            self._refs[name] = ray.put(_decode_shard(*args)) if here else decode.remote(*args)
        with shard_errors():
            ray.get(list(self._refs.values()))

    def decoded(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        if self.cached:
            self.fill_cache()
            for name in names:
                with shard_errors():
                    yield from ray.get(self._refs[name])
            return
        if cpus := held_cpus():
            reader = ShardReader(self.config, self.storage_config, self.columns, self.shard_set, threads=int(cpus),
                                 keep=self.keep)
            yield from reader.decoded(names)
            return
        shard_set = replace(self.shard_set, urls=[self.urls[name] for name in names])
        dataset = read_shard_set(shard_set, self.config, self.storage_config, columns=self.columns,
                                 preserve_order=True, keep=self.keep)
        with shard_errors():
            yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


def held_cpus() -> float:
    """CPUs this process holds: an actor's or task's (an expert's Train worker, a trial), 0 in a driver."""
    import ray

    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # Ray's way of saying "only in a worker": this is a driver
        return 0.0
    return float(assigned.get("CPU", 0.0))


def _decode_shards(config: DataConfig, storage_config: StorageConfig | None, columns: Sequence[str],
                   shard_set: ShardSet, keep: frozenset[str] | None, check_counts: bool,
                   batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data's map function: a batch of shard URLs -> their samples decoded, chunk after chunk."""
    for url in batch["url"]:
        reader = ShardReader(config, storage_config, columns, replace(shard_set, urls=[str(url)]), keep=keep,
                             check_counts=check_counts)
        yield from reader.decoded(reader.shard_names())


def _decode_shard(config: DataConfig, storage_config: StorageConfig | None, columns: Sequence[str],
                  shard_set: ShardSet, url: str, keep: frozenset[str] | None) -> list[dict[str, np.ndarray]]:
    """One shard's samples decoded (a Ray task of the cache): chunks of columns, in tar order."""
    reader = ShardReader(config, storage_config, columns, replace(shard_set, urls=[url]), keep=keep)
    return list(reader.decoded(reader.shard_names()))
