"""Real samples of one class at a time, for methods that compare synthetic with real data every
iteration (distribution matching): DM's ``get_images(c, n)``, drawn from tensors or from the stream.

``StreamClassBatches`` never holds the split: it reads the training stream (seeded shard order and
windowed shuffle, ``engine.data.stream``) epoch after epoch and routes each row into the queue of its
class; ``batch(c)`` takes the next ``n`` rows of class ``c``, reading on until there are that many.
Each queue holds at most ``2 n`` rows (rows of a full queue are passed over, as a random sample would
skip them), so memory is bounded by classes × 2n decoded samples, whatever the split's size (a worker that
owns a share of the classes holds only theirs); the rows read per iteration are about the rows used. A
class's rows come in the stream's order whichever other classes a worker owns, so splitting classes across
workers draws the same batches as one process, unless a queue overflowed (a class far more frequent than
another within a stretch of the stream). ``TensorClassBatches`` is the same draw on small data held
as tensors (tests, toys): a seeded permutation of the class's members.

Both skip the samples whose keys are in ``skip`` (a set the caller may grow while distilling: the
causal-effect pruning of BiLP drops samples as it goes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from engine.data.stream import EpochOrder, EpochStream, Row, StreamedImages, epoch_generator
from engine.errors import DataError


class ClassBatches(Protocol):
    def batch(self, c: int) -> tuple[Tensor, list[str]]:
        """(n, ...) real samples of class ``c`` in model-input space on the device, and their keys."""
        ...


def batch_size_of(c: int, counts: Sequence[int], batch_size: int, skipped: int = 0) -> int:
    """``batch_size``, or all of a class that has fewer samples (DM's get_images takes the whole class)."""
    available = counts[c] - skipped
    if available < 1:
        raise DataError(f"class {c} has no training samples left to compare with")
    return min(batch_size, available)


@dataclass
class TensorClassBatches:
    """Class batches of a split held as tensors: a fresh seeded permutation of the class for every batch."""

    images: Tensor  # (N, ...) model-input space
    labels: Tensor  # (N,)
    batch_size: int
    seed: int
    keys: list[str] | None = None  # default: the position as a string
    skip: set[str] = field(default_factory=set)
    _draws: dict[int, int] = field(default_factory=dict)  # batches drawn per class: a class's draws are its own

    def batch(self, c: int) -> tuple[Tensor, list[str]]:
        members = (self.labels == c).nonzero().flatten().cpu()
        keys = self.keys or [str(i) for i in range(len(self.labels))]
        if self.skip:
            members = members[torch.tensor([keys[i] not in self.skip for i in members.tolist()], dtype=torch.bool)]
        if len(members) == 0:
            raise DataError(f"class {c} has no training samples left to compare with")
        self._draws[c] = self._draws.get(c, 0) + 1
        order = torch.randperm(len(members), generator=epoch_generator(self.seed, c, self._draws[c]))
        chosen = members[order[: self.batch_size]]
        return self.images[chosen.to(self.images.device)], [keys[i] for i in chosen.tolist()]


class StreamClassBatches:
    """Class batches read from the training stream (module docstring). ``classes``: the classes this worker
    asks for (rows of others are passed over). ``counts``: samples per class in the split."""

    def __init__(self, images: StreamedImages, counts: Sequence[int], classes: Sequence[int], batch_size: int,
                 seed: int, shuffle_buffer: int = 10_000, skip: set[str] | None = None):
        self.images, self.counts, self.batch_size = images, list(counts), batch_size
        self.media = "video" if len(images.sample_shape) == 4 else "image"
        self.order = EpochOrder(seed, shuffle_buffer)
        self.skip = skip if skip is not None else set()
        self.queues: dict[int, deque[Row]] = {c: deque() for c in classes}
        self.skipped: dict[int, set[str]] = {c: set() for c in classes}  # keys of ``skip`` met, by class
        self.rows = self._forever()
        self.rows_read = 0

    def _forever(self) -> Iterator[Row]:
        stream = EpochStream(self.images.source, self.order, 1)
        epoch = 0
        while True:
            yield from self.order.shuffle(stream.rows(epoch), epoch)
            epoch += 1

    def batch(self, c: int) -> tuple[Tensor, list[str]]:
        if c not in self.queues:
            raise ValueError(f"class {c} is not one of this sampler's classes")
        pruned = {str(r["key"]) for r in self.queues[c]} & self.skip  # pruned since they were queued
        if pruned:  # rebuilt, not deque.remove: rows hold arrays, which have no truth value to compare by
            self.queues[c] = deque(r for r in self.queues[c] if str(r["key"]) not in pruned)
            self.skipped[c] |= pruned
        queue = self.queues[c]
        # Within one epoch every skipped sample of the class is met, so the wanted size stops shrinking and
        # the queue (which keeps up to 2n rows of the class) reaches it.
        while len(queue) < (n := batch_size_of(c, self.counts, self.batch_size, len(self.skipped[c]))):
            self._route(next(self.rows))
        rows = [queue.popleft() for _ in range(n)]
        pixels = torch.stack([torch.as_tensor(r[self.media]) for r in rows])
        return self.images.transform(pixels.to(self.images.device)), [str(r["key"]) for r in rows]

    def _route(self, row: Row) -> None:
        self.rows_read += 1
        label, key = int(row["label"]), str(row["key"])
        if label not in self.queues:
            return
        if key in self.skip:
            self.skipped[label].add(key)
        elif len(self.queues[label]) < 2 * self.batch_size:
            self.queues[label].append(row)
