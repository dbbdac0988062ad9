"""The synthetic set being distilled, and how it is written out.

Images live in model-input space (after ``Preprocess``: normalised, maybe ZCA-whitened), exactly
what the experts were trained on. Outputs under ``<out>/``:

    synthetic.safetensors   images, labels (hard int64 or soft logits), text vectors, step sizes;
                            metadata: a JSON manifest (method, config, store, ipc, step sizes)
    snapshots/              the set every ``distill.snapshot_every`` iterations (same format), if asked for
    manifest.json           the same manifest, readable without safetensors
    shards/                 a WebDataset shard of the images as PNG pixels (+ .cls / .json) and its manifest
                            (images only)
    grid.png                the images as pixels, one row per class; clips: one row of frames per clip
    gifs/<class>.gif        clips: each class's clips side by side, animated
    pairs.html              image-text pairs: each image beside the real caption nearest its text vector
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from engine import storage
from engine.checkpoint import safetensors_metadata
from engine.data.grid import grid_image, save_grid
from engine.data.manifest import ClassInfo, ShardManifest, SplitInfo
from engine.data.preprocess import Preprocess
from engine.data.writers import Sample, write_shard
from engine.errors import DataError
from engine.storage import StorageConfig

FILE_NAME = "synthetic.safetensors"
CHECKPOINT_NAME = "checkpoint.safetensors"
SNAPSHOTS = "snapshots"


def snapshot_url(folder_url: str, iteration: int) -> str:
    return storage.join(folder_url, SNAPSHOTS, f"iteration-{iteration:06d}.safetensors")


def list_snapshots(folder_url: str, storage_config: StorageConfig | None = None) -> dict[int, str]:
    """Iteration -> URL of the snapshots a run kept (``distill.snapshot_every``), in iteration order."""
    folder = storage.join(folder_url, SNAPSHOTS)
    if not storage.exists(folder, storage_config):
        return {}
    urls = storage.list_files(folder, storage_config, suffix=".safetensors")
    found = {int(u.rsplit("iteration-", 1)[1].split(".")[0]): u for u in urls if "/iteration-" in u}
    return dict(sorted(found.items()))


@dataclass
class SyntheticSet:
    """The learnable tensors of a distillation run. ``labels`` int64 (M,) are fixed; float (M, K) are
    learnable soft-label logits. ``text`` (M, D): learnable text vectors of image-text pairs."""

    images: Tensor  # (M, C, H, W) model-input space
    alphas: Tensor  # (G,) learnable student step sizes, one per parameter group; (0,) for methods without
    labels: Tensor | None = None
    text: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def soft_labels(self) -> bool:
        return self.labels is not None and self.labels.is_floating_point()

    def learnable(self) -> dict[str, Tensor]:
        """Name -> tensor of everything the outer optimiser updates (step sizes included)."""
        out = {"images": self.images}
        if self.soft_labels:
            out["labels"] = self.labels
        if self.text is not None:
            out["text"] = self.text
        return out | ({"alphas": self.alphas} if self.alphas.numel() else {})

    def tensors(self) -> dict[str, Tensor]:
        out = {"images": self.images, "alphas": self.alphas}
        if self.labels is not None:
            out["labels"] = self.labels
        if self.text is not None:
            out["text"] = self.text
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def to_bytes(self) -> bytes:
        return save_safetensors(self.tensors(), metadata={"synthetic": json.dumps(self.metadata, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "synthetic set") -> SyntheticSet:
        tensors = load_safetensors(data)
        if "images" not in tensors or "alphas" not in tensors:
            raise DataError(f"{source}: not a synthetic set (no images/alphas)")
        metadata = json.loads(safetensors_metadata(data).get("synthetic", "{}"))
        return cls(tensors["images"], tensors["alphas"], tensors.get("labels"), tensors.get("text"), metadata)

    @classmethod
    def load(cls, folder_url: str, storage_config: StorageConfig | None = None) -> SyntheticSet:
        url = storage.join(folder_url, FILE_NAME)
        if not storage.exists(url, storage_config):
            raise DataError(f"{storage.redact(url)}: no distilled set here; run `distill distill` first")
        return cls.from_bytes(storage.read_bytes(url, storage_config), storage.redact(url))

    def hard_labels(self) -> Tensor:
        """(M,) class index of each image (argmax of soft labels)."""
        if self.labels is None:
            raise DataError("this synthetic set has no labels")
        return self.labels.argmax(1) if self.soft_labels else self.labels


def save_outputs(
    synthetic: SyntheticSet, out_url: str, preprocess: Preprocess, class_names: list[str],
    storage_config: StorageConfig | None = None, captions: list[str] | None = None,
) -> None:
    """Write ``synthetic.safetensors``, ``manifest.json``, a shard of pixel images and ``grid.png``."""
    pixels = preprocess.inverse(synthetic.images.detach().cpu()).clamp(0, 1)
    storage.write_bytes(storage.join(out_url, FILE_NAME), synthetic.to_bytes(), storage_config)
    storage.write_json(storage.join(out_url, "manifest.json"), synthetic.metadata, storage_config)
    labels = synthetic.hard_labels().tolist() if synthetic.labels is not None else None
    tags = [class_names[i] for i in labels] if labels is not None and class_names else None
    if pixels.ndim == 5:  # clips (M, T, C, H, W): one row of frames per clip, and an animation per class
        frames = pixels.shape[1]
        save_grid(pixels.flatten(0, 1), storage.join(out_url, "grid.png"), nrow=frames,
                  labels=[t for t in tags for _ in range(frames)] if tags else None, storage_config=storage_config)
        for c, name in enumerate(class_names if labels is not None else []):
            clips = pixels[[i for i, label in enumerate(labels) if label == c]]
            if len(clips):
                storage.write_bytes(storage.join(out_url, "gifs", f"{c:04d}-{_file_safe(name)}.gif"), clips_gif(clips),
                                    storage_config)
        return
    _write_pixel_shard(pixels, labels, class_names, storage.join(out_url, "shards"), storage_config, captions)
    ipc = max(1, len(synthetic) // max(1, len(class_names))) if labels is not None else 10
    save_grid(pixels, storage.join(out_url, "grid.png"), nrow=ipc if labels is not None else 10, labels=tags,
              storage_config=storage_config)
    if captions is not None:
        storage.write_text(storage.join(out_url, "pairs.html"), pairs_sheet(pixels, captions), storage_config)


def clips_gif(clips: Tensor, frame_ms: int = 125) -> bytes:
    """An animated GIF of clips (N, T, C, H, W) in [0, 1] side by side, looping over their frames."""
    frames = [grid_image(clips[:, t], nrow=len(clips)) for t in range(clips.shape[1])]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return out.getvalue()


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]


def pairs_sheet(pixels: Tensor, captions: list[str]) -> str:
    """An HTML page of the synthetic pairs: each image beside the real caption nearest its text vector."""
    rows = "\n".join(
        f'<tr><td>{i}</td><td><img src="data:image/png;base64,{base64.b64encode(_png(image)).decode()}" '
        f'width="96" style="image-rendering: pixelated"></td><td>{html.escape(caption)}</td></tr>'
        for i, (image, caption) in enumerate(zip(pixels, captions, strict=True))
    )
    return ("<!doctype html><meta charset=utf-8><title>distilled pairs</title>"
            "<p>Synthetic image-text pairs; each text vector is shown as its nearest real caption.</p>"
            f"<table><tr><th>#</th><th>image</th><th>nearest caption</th></tr>\n{rows}\n</table>\n")


def _write_pixel_shard(pixels: Tensor, labels: list[int] | None, class_names: list[str], url: str,
                       storage_config: StorageConfig | None, captions: list[str] | None) -> None:
    samples = []
    for i, image in enumerate(pixels):
        key = f"train-{i:08d}"
        members = {f"{key}.png": _png(image)}
        if labels is not None:
            members[f"{key}.cls"] = str(labels[i]).encode()
        if captions is not None:
            members[f"{key}.json"] = json.dumps({"id": key, "captions": [captions[i]]}).encode()
        samples.append(Sample(members=sorted(members.items()), label=None if labels is None else labels[i],
                              num_captions=1 if captions is not None else 0))
    shard = write_shard(url, "train-000000.tar", "train", iter(samples), storage_config)
    counts = [labels.count(c) for c in range(len(class_names))] if labels is not None else []
    manifest = ShardManifest(
        source_format="distilled", modality="image" if captions is None else "image-text",
        classes=[ClassInfo(index=i, id=n, name=n) for i, n in enumerate(class_names)],
        splits={"train": SplitInfo(num_samples=len(samples), class_counts=counts,
                                   num_captions=len(samples) if captions is not None else 0)},
        shards=[shard],
    )
    manifest.save(url, storage_config)


def _png(image: Tensor) -> bytes:
    array = (image.numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(out, format="PNG")
    return out.getvalue()
