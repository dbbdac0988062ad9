"""The soft-label store (FKD / SRe2L / RDED): a teacher's logits for every augmented view of every
synthetic image in every student epoch, stored once and replayed by every student.

    <folder>/labels.json                 {"fingerprint": {"images", "teacher", "views"}, "epochs",
                                          "batch_size", "num_classes", "files": {name: bytes}}
    <folder>/epoch-0000.safetensors      the epoch's views (engine.labels.views.EpochViews) and
                                         "logits" (N, classes) float16, row i the view in slot i

Each epoch file is written atomically; a run that is interrupted keeps its finished epochs and writes
the rest. ``bytes`` is the sum of the files' sizes (what a user stores and ships), and ``logit_bytes``
the part that is labels. A store made for other images, another teacher or other views is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.errors import DataError
from engine.labels.views import EpochViews
from engine.storage import StorageConfig

INDEX = "labels.json"


def tensor_fingerprint(tensors: dict[str, Tensor] | list[Tensor]) -> str:
    """sha256 of tensors' bytes (in name order for a dict), 16 hex digits."""
    digest = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, dict) else list(enumerate(tensors))
    for name, tensor in items:
        digest.update(str(name).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


@dataclass
class SoftLabelStore:
    url: str
    fingerprint: dict[str, str]
    epochs: int
    batch_size: int
    num_classes: int
    files: dict[str, int]  # finished epoch files -> bytes
    storage_config: StorageConfig | None = None

    @classmethod
    def open(cls, url: str, fingerprint: dict[str, str], epochs: int, batch_size: int, num_classes: int,
             storage_config: StorageConfig | None = None) -> SoftLabelStore:
        """The store at ``url`` for these images, teacher and views (empty when new); a store that holds
        labels of anything else is an error."""
        index = storage.join(url, INDEX)
        if not storage.exists(index, storage_config):
            return cls(url, fingerprint, epochs, batch_size, num_classes, {}, storage_config)
        raw = storage.read_json(index, storage_config)
        for key, value in fingerprint.items():
            if raw.get("fingerprint", {}).get(key) != value:
                raise DataError(f"{storage.redact(index)}: a soft-label store of other {key} "
                                f"({raw.get('fingerprint', {}).get(key)} vs {value}); remove it or use another folder")
        if (raw["epochs"], raw["batch_size"], raw["num_classes"]) != (epochs, batch_size, num_classes):
            raise DataError(f"{storage.redact(index)}: stored for {raw['epochs']} epochs of batch {raw['batch_size']} "
                            f"and {raw['num_classes']} classes, not {epochs}, {batch_size}, {num_classes}")
        return cls(url, fingerprint, epochs, batch_size, num_classes, dict(raw["files"]), storage_config)

    @property
    def complete(self) -> bool:
        return all(epoch_name(e) in self.files for e in range(self.epochs))

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def logit_bytes(self, num_images: int) -> int:
        return self.epochs * num_images * self.num_classes * 2  # float16

    def fill(self, draw: Callable[[int], EpochViews], label: Callable[[EpochViews, int], Tensor],
             log: Callable[[str], None] = print) -> None:
        """Write every missing epoch: ``draw(epoch)`` its views, ``label(views, b)`` the teacher's logits of
        batch ``b``'s views."""
        for epoch in range(self.epochs):
            if epoch_name(epoch) in self.files:
                continue
            views = draw(epoch)
            logits = torch.cat([label(views, b).detach().cpu() for b, _ in views.batches()])
            data = save_safetensors({**views.tensors(), "logits": logits.to(torch.float16).contiguous()},
                                    metadata={"epoch": str(epoch)})
            storage.write_bytes(storage.join(self.url, epoch_name(epoch)), data, self.storage_config)
            self.files[epoch_name(epoch)] = len(data)
            self._write_index()
        if self.epochs:
            log(f"soft-label store {storage.redact(self.url)}: {self.epochs} epochs, {self.bytes:,} bytes")

    def _write_index(self) -> None:
        storage.write_json(storage.join(self.url, INDEX), {
            "fingerprint": self.fingerprint, "epochs": self.epochs, "batch_size": self.batch_size,
            "num_classes": self.num_classes, "files": self.files}, self.storage_config)

    def read(self, epoch: int) -> tuple[EpochViews, Tensor]:
        """The views of ``epoch`` and their logits (float32)."""
        name = epoch_name(epoch)
        if name not in self.files:
            raise DataError(f"{storage.redact(self.url)}: epoch {epoch} of the soft-label store is missing")
        url = storage.join(self.url, name)
        try:
            tensors = load_safetensors(storage.read_bytes(url, self.storage_config))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise DataError(f"{storage.redact(url)}: not a soft-label epoch file ({err})") from None
        return EpochViews.from_tensors(tensors, self.batch_size), tensors["logits"].float()

    def describe(self, num_images: int) -> dict[str, Any]:
        return {"bytes": self.bytes, "logit_bytes": self.logit_bytes(num_images), "epochs": self.epochs,
                "files": len(self.files)}


class ReplayedViews:
    """A student's views and soft labels read back from a store, epoch by epoch (``engine.labels.student``)."""

    def __init__(self, store: SoftLabelStore):
        self.store = store
        self._logits = torch.empty(0)

    def views(self, epoch: int) -> EpochViews:
        views, self._logits = self.store.read(epoch)
        return views

    def soft(self, epoch: int, views: EpochViews, b: int, x: Tensor) -> Tensor:
        return self._logits[views.slots(b)]
