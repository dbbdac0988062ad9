"""A kept subset of the training split: the sample keys data selection (BiLP) keeps, and the source
wrapper through which every later stage reads only those samples.

The subset file (JSON, written atomically) names samples by key (``train-00000042``), never by a
position in one particular order, so it holds whatever the order or the shard layout:

    {"header": how it was chosen (selector, keep ratio, scores file, data fingerprint...),
     "fingerprint": sha256 of the sorted keys (enters the data fingerprint of every store trained on it),
     "layout": the fingerprint of the shards it was chosen on, "shard_counts": kept samples per shard,
     "class_counts": kept samples per class, "keys": [...sorted]}

Readers decode only the kept samples (``keep=`` of a source: the others are dropped before decoding), and
``KeptSamples`` gives such a source the kept counts per shard, so a stream's check that an epoch read as
many samples as listed still holds. On shards written again with another layout (same keys), the
per-shard counts are recounted from the keys alone (``Subset.counts_on``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine import storage
from engine.data.stream import ShardSource
from engine.errors import DataError
from engine.storage import StorageConfig


def keys_fingerprint(keys: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode() + b"\n")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Subset:
    keys: frozenset[str]
    layout: str  # fingerprint of the shards the subset was chosen on
    shard_counts: dict[str, int]  # kept samples per shard of that layout
    class_counts: list[int]
    header: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return keys_fingerprint(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, url: str, storage_config: StorageConfig | None = None) -> None:
        storage.write_json(url, {"header": self.header, "fingerprint": self.fingerprint, "layout": self.layout,
                                 "shard_counts": self.shard_counts, "class_counts": self.class_counts,
                                 "keys": sorted(self.keys)}, storage_config)

    @classmethod
    def load(cls, url: str, storage_config: StorageConfig | None = None) -> Subset:
        if not storage.exists(url, storage_config):
            raise DataError(f"{storage.redact(url)}: no kept subset here; run `distill select` first")
        raw = storage.read_json(url, storage_config)
        try:
            subset = cls(frozenset(raw["keys"]), raw["layout"], dict(raw["shard_counts"]), list(raw["class_counts"]),
                         dict(raw["header"]))
        except (KeyError, TypeError) as err:
            raise DataError(f"{storage.redact(url)}: not a kept-subset file (missing {err})") from None
        if subset.fingerprint != raw.get("fingerprint"):
            raise DataError(f"{storage.redact(url)}: its keys do not match its fingerprint (edited or truncated?)")
        if empty := [c for c, count in enumerate(subset.class_counts) if count < 1]:
            raise DataError(f"{storage.redact(url)}: the kept subset leaves class {empty[0]} with zero samples; "
                            "choose it again with a larger selection.keep_ratio")
        return subset

    def counts_on(self, layout: str, names: Sequence[str], key_source: Callable[[], ShardSource]) -> dict[str, int]:
        """Kept samples per shard ``names`` of the shards whose fingerprint is ``layout``: the recorded counts
        on the layout the subset was chosen on, else counted from the keys (``key_source()``: a source of the
        ``key`` and ``shard`` columns, no pixels)."""
        if layout == self.layout:
            return {name: self.shard_counts.get(name, 0) for name in names}
        key_source = key_source()
        counts = dict.fromkeys(names, 0)
        for chunk in key_source.decoded(names):
            for key, shard in zip(chunk["key"], chunk["shard"], strict=True):
                counts[str(shard)] += str(key) in self.keys
        if (found := sum(counts.values())) != len(self.keys):
            raise DataError(f"the kept subset names {len(self.keys) - found:,} samples that are not in these shards "
                            f"(of {len(self.keys):,}); it was chosen on other data: run `distill select` again")
        return counts


class KeptSamples:
    """A ``ShardSource`` of a kept subset: ``source`` decodes only the kept samples (made with ``keep``), and
    ``counts`` are the kept samples per shard (``Subset.counts_on``), so a stream's check that an epoch read
    as many samples as listed still holds. A chunk with a sample outside the subset is an error."""

    def __init__(self, source: ShardSource, keys: frozenset[str], counts: dict[str, int]):
        self.source, self.keys, self.counts = source, keys, counts

    def shard_names(self) -> list[str]:
        return self.source.shard_names()

    def shard_counts(self) -> dict[str, int]:
        return self.counts

    def decoded(self, names: Sequence[str]) -> Iterator[dict[str, Any]]:
        for chunk in self.source.decoded(names):
            outside = [str(k) for k in chunk.get("key", ()) if str(k) not in self.keys]
            if outside:
                raise DataError(f"sample {outside[0]} is not in the kept subset but was read (a source made "
                                "without keep=)")
            if len(next(iter(chunk.values()))):
                yield chunk
