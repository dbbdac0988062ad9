"""What every stage derives from the experiment config in exactly the same way: the shards, the model
spec with the data's shape, the fingerprint of what experts were trained on, the splits in the store's
input transform, caption features, and where each size's distilled set lives."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine import storage
from engine.data.manifest import ShardManifest
from engine.data.memory import InMemoryData
from engine.data.preprocess import FILE_NAME as PREPROCESS_FILE
from engine.data.preprocess import Preprocess
from engine.data.shards import DataConfig
from engine.data.stream import EpochOrder, EpochStream, ShardSource, StreamedImages, images_of
from engine.data.text_features import CaptionFeatures, CaptionTable, caption_features
from engine.data.writers import ensure_shards
from engine.distill.base import TrainData
from engine.distill.synthetic import CHECKPOINT_NAME, FILE_NAME
from engine.errors import ConfigError, DataError
from engine.experiment import ExperimentConfig, ModelConfig
from engine.models.clip import text_settings
from engine.models.params import set_flat
from engine.models.registry import ARCHITECTURES, ModelSpec
from engine.select.subset import KeptSamples, Subset
from engine.stages import Runtime
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore


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


def data_fingerprint(config: ExperimentConfig, manifest: ShardManifest, *, whole_split: bool = False) -> str:
    """What the experts were trained on: the shards' content, the split, how samples were decoded (frames of
    clips; captions kept and tokenizer for image-text data) and the kept subset, if data selection keeps one
    (``whole_split``: the split before selection)."""
    p, d = config.preprocess, config.data
    transform = ("norm" if p.normalize else "raw") + (f"+zca{p.zca_eps:g}" if p.zca else "")
    frames = f":{d.frames}f" if manifest.modality == "video" else ""
    captions = f":{d.max_captions}cap:{d.tokenizer or 'no-tokenizer'}" if manifest.modality == "image-text" else ""
    kept = f":kept-{kept_subset(config, manifest).fingerprint}" if config.selection.active and not whole_split else ""
    return (f"{manifest.fingerprint()}:{d.split}:{d.image_size}px{frames}:"
            f"{d.channels}ch:{d.resize}:{transform}{captions}{kept}")


def selection_folder(config: ExperimentConfig, manifest: ShardManifest) -> str:
    """Where a selector's scores and kept subsets live: one folder per way of scoring (selector, runs, epochs,
    the epoch scored, seed, model, recipe and the whole split's data), shared by every keep ratio."""
    sel = config.selection
    how = {"method": sel.method, "seed": sel.seed, "data": data_fingerprint(config, manifest, whole_split=True)}
    name = sel.method
    if sel.method == "loss":
        how |= {"runs": sel.scoring_runs, "epochs": sel.scoring_epochs, "epoch": sel.score_epoch,
                "model": model_spec(config, manifest).model_dump(mode="json"),
                "train": config.experts.train.model_dump(mode="json")}
        name = f"loss-{sel.scoring_runs}x{sel.scoring_epochs}-epoch{sel.score_epoch}"
    digest = hashlib.sha256(json.dumps(how, sort_keys=True).encode()).hexdigest()[:8]
    return storage.join(config.selection_dir, f"{name}-{digest}")


def subset_url(config: ExperimentConfig, manifest: ShardManifest) -> str:
    return storage.join(selection_folder(config, manifest), f"kept-{config.selection.keep_ratio:g}.json")


def kept_subset(config: ExperimentConfig, manifest: ShardManifest) -> Subset:
    """The kept subset the config's selection names (``distill select`` writes it)."""
    return Subset.load(subset_url(config, manifest), config.storage)


def split_source(config: ExperimentConfig, manifest: ShardManifest, split: str, runtime: Runtime,
                 columns: Sequence[str]) -> ShardSource:
    """A split's decoded shards for streams; the training split only with the samples data selection keeps."""
    data = config.data.model_copy(update={"split": split})
    if split != config.data.split or not config.selection.active:
        return runtime.source(data, config.storage, columns)
    subset = kept_subset(config, manifest)
    source = runtime.source(data, config.storage, columns, keep=subset.keys)
    counts = subset.counts_on(manifest.fingerprint(), source.shard_names(),
                              lambda: runtime.source(data, config.storage, ("key", "shard")))
    return KeptSamples(source, subset.keys, counts)


def fitted_preprocess(config: ExperimentConfig, manifest: ShardManifest, runtime: Runtime) -> Preprocess:
    """The input transform saved beside the trajectories, or, the first time, fitted in one streamed pass
    over the training samples the config reads (the kept subset, when data selection keeps one: pruned
    samples inform nothing, not even the normalisation) and saved there."""
    if storage.exists(storage.join(config.store_url, PREPROCESS_FILE), config.storage):
        return load_preprocess(config)
    media = "video" if manifest.modality == "video" else "image"
    source = split_source(config, manifest, config.data.split, runtime, (media,))
    preprocess = Preprocess.fit_stream((images_of(b) for b in EpochStream(source, EpochOrder(0), 512)),
                                       config.preprocess)
    preprocess.save(config.store_url, config.storage)
    return preprocess


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


def split_captions(config: ExperimentConfig, manifest: ShardManifest, split: str,
                   runtime: Runtime) -> tuple[list[str], list[list[str]]]:
    """(sample keys, captions of each) of a split in its order, streamed: no image is decoded."""
    source = split_source(config, manifest, split, runtime, ("key", "captions"))
    keys: list[str] = []
    captions: list[list[str]] = []
    for batch in EpochStream(source, EpochOrder(0), 4096):
        keys += [str(k) for k in batch["key"]]
        captions += [list(c) for c in batch["captions"]]
    return keys, captions


def caption_table(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, split: str,
                  runtime: Runtime) -> CaptionTable:
    """Caption features of a split by sample key, for streams that expand images into (image, caption) rows."""
    keys, captions = split_captions(config, manifest, split, runtime)
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
    data = config.data
    media = "video" if manifest.modality == "video" else "image"
    source = split_source(config, manifest, split, runtime, (media, "label", "key"))
    index = list(EpochStream(split_source(config, manifest, split, runtime, ("key", "label")), EpochOrder(0), 4096))
    shape = (data.channels, data.image_size, data.image_size)
    images = StreamedImages(source, preprocess.apply, (data.frames, *shape) if media == "video" else shape)
    return StreamedSplit(images, torch.cat([b["label"] for b in index]), [str(k) for b in index for k in b["key"]])


def train_data(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, runtime: Runtime,
               preprocess: Preprocess) -> TrainData:
    """The training split for a method's initialisation: streamed images in the store's input transform,
    labels, and for image-text data the features of every caption (held: they are small)."""
    split = streamed_split(config, manifest, config.data.split, runtime, preprocess)
    data = TrainData(split.images, split.labels, manifest.class_names, keys=split.keys,
                     shuffle_buffer=config.data.shuffle_buffer)
    if manifest.modality == "image-text":
        keys, captions = split_captions(config, manifest, config.data.split, runtime)
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


def expert_snapshot(config: ExperimentConfig, manifest: ShardManifest, expert: int, epoch: int | None,
                    device: torch.device) -> nn.Module:
    """Expert ``expert`` of the config's trajectory store at ``epoch`` (None: its last), in eval mode: its
    recorded parameters from the store, its frozen ones rebuilt from experts.seed as the experts built them."""
    url = storage.redact(config.store_url)
    store = TrajectoryStore.open(config.store_url, config.storage)
    if expert not in store.experts():
        raise DataError(f"{url}: no complete expert {expert} (it holds {store.experts()}); run `distill buffer`")
    epoch = store.num_epochs if epoch is None else epoch
    if not 0 <= epoch <= store.num_epochs:
        raise DataError(f"{url}: expert {expert} has no snapshot of epoch {epoch} (epochs 0 .. {store.num_epochs})")
    model, names = build_shared_frozen(model_spec(config, manifest), config.experts.record,
                                       frozen_seed=config.experts.seed, seed=config.experts.seed)
    params = store.load_epochs(expert, [epoch])[epoch]
    set_flat(model, names, torch.cat([params[n].flatten() for n in names]))
    return model.to(device).eval()
