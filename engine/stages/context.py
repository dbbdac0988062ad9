"""What every stage derives from the experiment config in exactly the same way: the shards, the model
spec with the data's shape, the fingerprint of what experts were trained on, the splits in the store's
input transform, caption features, and where each size's distilled set lives."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from engine import storage
from engine.data.manifest import ShardManifest
from engine.data.memory import InMemoryData
from engine.data.preprocess import Preprocess
from engine.data.shards import DataConfig
from engine.data.stream import EpochOrder, EpochStream, StreamedImages
from engine.data.text_features import CaptionFeatures, CaptionTable, caption_features
from engine.data.writers import ensure_shards
from engine.distill.base import TrainData
from engine.distill.synthetic import CHECKPOINT_NAME, FILE_NAME
from engine.errors import ConfigError, DataError
from engine.experiment import ExperimentConfig, ModelConfig
from engine.models.clip import text_settings
from engine.models.registry import ARCHITECTURES, ModelSpec
from engine.stages import Runtime


def prepare_data(config: ExperimentConfig) -> ShardManifest:
    """The shards' manifest, writing the shards first from the ``prepare`` section if there are none."""
    return ensure_shards(config.data.shards, config.prepare, config.storage)


def model_spec(config: ExperimentConfig, manifest: ShardManifest, model: ModelConfig | None = None) -> ModelSpec:
    """The model's spec with the data's shape (and the pre-trained tower) filled in."""
    return model_spec_for(model or config.model, config.data, manifest, config.tower_checkpoint)


def model_spec_for(model: ModelConfig, data: DataConfig, manifest: ShardManifest,
                   tower_checkpoint: str | None = None) -> ModelSpec:
    """``channels``, ``num_classes``, ``image_size``, ``frames`` from the data where the builder takes them;
    a conflicting explicit value is an error."""
    takes = inspect.signature(ARCHITECTURES[model.arch]).parameters
    from_data = {"channels": data.channels, "num_classes": len(manifest.classes),
                 "image_size": data.image_size, "frames": data.frames}
    kwargs = dict(model.kwargs)
    if tower_checkpoint and "image_checkpoint" in takes:
        kwargs.setdefault("image_checkpoint", tower_checkpoint)  # the engine's pre-trained tower
    for key, value in from_data.items():
        if key not in takes or (key == "num_classes" and not manifest.classes):
            continue
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"model.kwargs.{key} is {kwargs[key]} but the data gives {value}")
        kwargs[key] = value
    return ModelSpec.create(model.arch, lora=model.lora, **kwargs)


def data_fingerprint(config: ExperimentConfig, manifest: ShardManifest) -> str:
    """What the experts were trained on: the shards' content, the split and how samples were decoded
    (frames of clips; captions kept and tokenizer for image-text data)."""
    p, d = config.preprocess, config.data
    transform = ("norm" if p.normalize else "raw") + (f"+zca{p.zca_eps:g}" if p.zca else "")
    frames = f":{d.frames}f" if manifest.modality == "video" else ""
    captions = f":{d.max_captions}cap:{d.tokenizer or 'no-tokenizer'}" if manifest.modality == "image-text" else ""
    return (f"{manifest.fingerprint()}:{d.split}:{d.image_size}px{frames}:"
            f"{d.channels}ch:{d.resize}:{transform}{captions}")


def load_split(config: ExperimentConfig, split: str, runtime: Runtime) -> InMemoryData:
    """A whole split as tensors (pixels in [0, 1]), decoded where the runtime decodes."""
    return runtime.load_split(config.data.model_copy(update={"split": split}), config.storage)


def load_preprocess(config: ExperimentConfig) -> Preprocess:
    """The input transform the buffer stage fitted and saved beside the trajectories."""
    return Preprocess.load(config.store_url, config.storage)


def caption_features_of(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec,
                        captions: list[list[str]], split: str) -> CaptionFeatures:
    """Features of every caption of a split (``captions``: per sample, in the split's order) from the frozen
    text tower the spec describes (model, normalize, max length), computed once per data set and tower
    settings and cached in ``<run_dir>/cache``."""
    if not any(captions):
        raise DataError(f"{config.data.shards}: split {split!r} has no captions; image-text models need pairs")
    settings = text_settings(spec.kwargs)
    cache = storage.join(config.run_dir, "cache")
    fingerprint = data_fingerprint(config, manifest)
    return caption_features(settings.load, settings.key(), captions, cache, fingerprint, split, config.storage)


def split_captions(config: ExperimentConfig, split: str, runtime: Runtime) -> tuple[list[str], list[list[str]]]:
    """(sample keys, captions of each) of a split in its order, streamed: no image is decoded."""
    source = runtime.source(config.data.model_copy(update={"split": split}), config.storage, ("key", "captions"))
    keys: list[str] = []
    captions: list[list[str]] = []
    for batch in EpochStream(source, EpochOrder(0), 4096):
        keys += [str(k) for k in batch["key"]]
        captions += [list(c) for c in batch["captions"]]
    return keys, captions


def caption_table(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, split: str,
                  runtime: Runtime) -> CaptionTable:
    """Caption features of a split by sample key, for streams that expand images into (image, caption) rows."""
    keys, captions = split_captions(config, split, runtime)
    return CaptionTable.of(keys, caption_features_of(config, manifest, spec, captions, split))


@dataclass
class StreamedSplit:
    """A split read as a stream: its images (model-input space, fetched by position or batch after batch),
    and what is small enough to hold: labels and keys in its canonical order."""

    images: StreamedImages
    labels: Tensor
    keys: list[str]


def streamed_split(config: ExperimentConfig, manifest: ShardManifest, split: str, runtime: Runtime,
                   preprocess: Preprocess) -> StreamedSplit:
    data = config.data.model_copy(update={"split": split})
    media = "video" if manifest.modality == "video" else "image"
    source = runtime.source(data, config.storage, (media, "label", "key"))
    index = list(EpochStream(runtime.source(data, config.storage, ("key", "label")), EpochOrder(0), 4096))
    shape = (data.channels, data.image_size, data.image_size)
    images = StreamedImages(source, preprocess.apply, (data.frames, *shape) if media == "video" else shape)
    return StreamedSplit(images, torch.cat([b["label"] for b in index]), [str(k) for b in index for k in b["key"]])


def train_data(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, runtime: Runtime) -> TrainData:
    """The training split for a method's initialisation: streamed images in the store's input transform,
    labels, and for image-text data the features of every caption (held: they are small)."""
    split = streamed_split(config, manifest, config.data.split, runtime, load_preprocess(config))
    data = TrainData(split.images, split.labels, manifest.class_names)
    if manifest.modality == "image-text":
        keys, captions = split_captions(config, config.data.split, runtime)
        pairs = caption_features_of(config, manifest, spec, captions, config.data.split)
        data.caption_features, data.caption_image = pairs.features, pairs.image_index
        data.captions = [c for per_image in captions for c in per_image]
    return data


def distill_dir(config: ExperimentConfig, ipc: int, method: str | None = None) -> str:
    """Where the distilled set of ``method`` (default: the configured one) at size ``ipc`` lives:
    ``<run_dir>/distill/<method>/ipc-<k>``, or an earlier engine's ``<run_dir>/distill/ipc-<k>`` when only
    that holds a set or a checkpoint."""
    current = storage.join(config.run_dir, "distill", method or config.distill.method, f"ipc-{ipc}")
    legacy = storage.join(config.run_dir, "distill", f"ipc-{ipc}")
    if not _holds_a_run(current, config) and _holds_a_run(legacy, config):
        return legacy
    return current


def _holds_a_run(folder: str, config: ExperimentConfig) -> bool:
    return any(storage.exists(storage.join(folder, name), config.storage) for name in (FILE_NAME, CHECKPOINT_NAME))
