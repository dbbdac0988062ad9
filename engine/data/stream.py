"""The training split as a stream of batches, epoch after epoch, never held whole.

An epoch's order is defined here, once, so that every reader — shards decoded in this process, shards
decoded once and kept (the cache), or Ray Data decoding in parallel — gives exactly the same batches for
the same seed:

    1. the split's shards in a permutation seeded by (seed, epoch);
    2. the samples of each shard in tar order (each can ``expand`` into several rows: an image-text
       sample into one row per caption);
    3. every window of ``shuffle_buffer`` consecutive rows permuted by a generator seeded by
       (seed, epoch, window): a bounded-memory shuffle (the shard writer already mixes classes across
       shards, so a window of a few thousand samples is well mixed);
    4. cut into batches of ``batch_size`` rows (the last may be short).

Memory is one shard's decoded samples plus the shuffle window, whatever the split's size. An epoch that
reads a different number of samples than the manifest lists is an error, never a silently short epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from engine.errors import DataError

Row = dict[str, Any]  # one sample's columns
Expand = Callable[[Row], list[Row]]


def epoch_generator(seed: int, epoch: int, *more: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, ...), independent of every other draw."""
    state = np.random.SeedSequence([seed, epoch, *more]).generate_state(1, np.uint32)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class EpochOrder:
    seed: int
    shuffle_buffer: int = 10_000

    def shards(self, names: Sequence[str], epoch: int) -> list[str]:
        permutation = torch.randperm(len(names), generator=epoch_generator(self.seed, epoch))
        return [names[i] for i in permutation.tolist()]

    def shuffle(self, rows: Iterator[Row], epoch: int) -> Iterator[Row]:
        window: list[Row] = []
        windows = 0
        for row in rows:
            window.append(row)
            if len(window) == self.shuffle_buffer:
                yield from self._permuted(window, epoch, windows)
                window, windows = [], windows + 1
        yield from self._permuted(window, epoch, windows)

    def _permuted(self, window: list[Row], epoch: int, index: int) -> Iterator[Row]:
        order = torch.randperm(len(window), generator=epoch_generator(self.seed, epoch, index + 1))
        return (window[i] for i in order.tolist())


def rows_of(columns: dict[str, Any]) -> Iterator[Row]:
    """A decoded chunk (columns of equal length) -> one dict per sample."""
    length = len(next(iter(columns.values())))
    for i in range(length):
        yield {name: values[i] for name, values in columns.items()}


def batched(rows: Iterator[Row], batch_size: int) -> Iterator[dict[str, Any]]:
    """Rows -> batches: numeric columns stacked into tensors, others (keys, captions) as lists."""
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def collate(rows: list[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        first = values[0]
        if isinstance(first, np.ndarray):
            out[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (int, float, np.integer, np.floating)):
            out[name] = torch.from_numpy(np.asarray(values))
        else:  # keys, captions
            out[name] = values
    return out


class ShardSource(Protocol):
    """Where decoded shards come from: this process, a cache, or Ray Data."""

    def shard_names(self) -> list[str]: ...

    def shard_counts(self) -> dict[str, int]: ...

    def decoded(self, names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Decoded chunks (columns) of the shards ``names``, shard after shard, each in tar order."""
        ...


@dataclass
class EpochStream:
    """Batches of the split for one epoch at a time, in the order ``EpochOrder`` defines."""

    source: ShardSource
    order: EpochOrder
    batch_size: int
    expand: Expand | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return sum(self.source.shard_counts().values())

    def rows(self, epoch: int) -> Iterator[Row]:
        """The epoch's rows before shuffling: shards in the epoch's order, samples in tar order."""
        names = self.order.shards(self.source.shard_names(), epoch)
        samples = 0
        for chunk in self.source.decoded(names):
            for row in rows_of(chunk):
                samples += 1
                yield from (self.expand(row) if self.expand else (row,))
        if samples != self.num_samples:
            raise DataError(f"epoch {epoch} read {samples:,} samples, the manifest lists {self.num_samples:,} "
                            "(a shard missing or truncated mid-stream?)")

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        return batched(self.order.shuffle(self.rows(epoch), epoch), self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One unshuffled pass (for statistics and features): shards in manifest order."""
        names = self.source.shard_names()
        for chunk in self.source.decoded(names):
            yield from batched(rows_of(chunk), self.batch_size)


def images_of(batch: dict[str, Any]) -> Tensor:
    """The media column of a batch: images (B, C, H, W) or clips (B, T, C, H, W), uint8."""
    return batch["video"] if "video" in batch else batch["image"]


class Batches(Protocol):
    """What a training loop consumes: per epoch, (inputs in model-input space, targets) on the device."""

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class TensorBatches:
    """Small data held as tensors (model-input space): a permutation seeded by (seed, epoch) per epoch."""

    images: Tensor
    targets: Tensor
    batch_size: int
    seed: int

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.images), generator=epoch_generator(self.seed, epoch))
        for index in order.split(self.batch_size):
            yield self.images[index.to(self.images.device)], self.targets[index.to(self.targets.device)]


@dataclass
class StreamBatches:
    """A stream of decoded samples made ready for a model: pixels to the device, the input transform
    applied there, targets from the ``target`` column (labels, or caption features of expanded rows).
    With ``workers`` > 1, worker ``rank`` takes rows rank, rank + W, … of every epoch (each worker the
    same number: the last N mod W rows of an epoch are left out)."""

    stream: EpochStream
    transform: Callable[[Tensor], Tensor]  # uint8 pixels on the device -> model inputs (Preprocess.apply)
    target: str
    device: torch.device
    rank: int = 0
    workers: int = 1

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        rows = self.stream.order.shuffle(self.stream.rows(epoch), epoch)
        if self.workers > 1:
            rows = _share(rows, self.rank, self.workers)
        for batch in batched(rows, self.stream.batch_size):
            x = self.transform(images_of(batch).to(self.device, non_blocking=True))
            yield x, batch[self.target].to(self.device)


def _share(rows: Iterator[Row], rank: int, workers: int) -> Iterator[Row]:
    """Rows rank, rank + W, … of complete rounds of W rows."""
    round_rows: list[Row] = []
    for row in rows:
        round_rows.append(row)
        if len(round_rows) == workers:
            yield round_rows[rank]
            round_rows = []


@dataclass
class StreamedImages:
    """A split's images in model-input space, indexed like a tensor without ever being held:
    ``images[positions]`` fetches those samples (positions in the canonical order: shard after shard, tar
    order) in one streamed pass; ``batches()`` gives every image, batch after batch, in that order."""

    source: ShardSource
    transform: Callable[[Tensor], Tensor]  # uint8 pixels on the device -> model inputs
    sample_shape: tuple[int, ...]  # (C, H, W) or (T, C, H, W)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256

    def __len__(self) -> int:
        return sum(self.source.shard_counts().values())

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    def to(self, device: torch.device) -> StreamedImages:
        return StreamedImages(self.source, self.transform, self.sample_shape, device, self.batch_size)

    def pixels(self) -> Iterator[Tensor]:
        """Every sample's uint8 pixels, batch after batch, in canonical order."""
        for batch in EpochStream(self.source, EpochOrder(0), self.batch_size):
            yield images_of(batch)

    def batches(self) -> Iterator[Tensor]:
        for pixels in self.pixels():
            yield self.transform(pixels.to(self.device))

    def __getitem__(self, positions: Tensor) -> Tensor:
        wanted: dict[int, list[int]] = {}
        for slot, position in enumerate(torch.as_tensor(positions).reshape(-1).tolist()):
            wanted.setdefault(int(position), []).append(slot)
        found: dict[int, Tensor] = {}
        start = 0
        for pixels in self.pixels():
            for position in range(start, start + len(pixels)):
                if position in wanted:
                    for slot in wanted[position]:
                        found[slot] = pixels[position - start]
            start += len(pixels)
            if len(found) == sum(len(slots) for slots in wanted.values()):
                break
        missing = sorted(set(range(sum(len(s) for s in wanted.values()))) - set(found))
        if missing:
            raise DataError(f"positions {[p for p in wanted if wanted[p][0] in missing][:5]} are past the split's "
                            f"{start:,} samples")
        return self.transform(torch.stack([found[slot] for slot in range(len(found))]).to(self.device))
