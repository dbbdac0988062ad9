"""From an experiment config to a ready ``Distiller``, and from its result to the files in run_dir.

``prepare_inputs`` does the I/O once (shards, store, preprocessing) and returns plain tensors that
can be shipped to Ray Train workers; ``build_distiller`` turns them into a method, a synthetic set
and a loop on a device, the same way in one process or in every data-parallel worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine import storage
from engine.data.preprocess import Preprocess
from engine.data.text_features import CaptionFeatures
from engine.distill.config import DistillConfig
from engine.distill.loop import Distiller, ExpertSegments, Reduce
from engine.distill.mtt import MTT, datm_init, init_synthetic, soft_labels_from_expert
from engine.distill.synthetic import SyntheticSet, save_outputs
from engine.distill.vl import VisionLanguage, init_pairs, nearest_captions
from engine.experiment import (
    ExperimentConfig,
    caption_features_of,
    data_fingerprint,
    load_preprocess,
    load_split,
    model_spec,
    prepare_data,
)
from engine.models.params import full_matching_size, select_parameters
from engine.models.registry import ModelSpec, build_model
from engine.storage import StorageConfig
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore


@dataclass
class DistillInputs:
    """Everything a distillation run reads, resolved and checked."""

    distill: DistillConfig
    spec: ModelSpec
    record: str
    frozen_seed: int  # the experts' base seed: the student's frozen parameters must be theirs
    store_url: str
    storage_config: StorageConfig
    out_url: str
    preprocess: Preprocess
    images: Tensor  # training split, model-input space
    labels: Tensor  # class indices (-1 for image-text data)
    class_names: list[str]
    fingerprint: str
    pairs: CaptionFeatures | None = None  # image-text data: every training caption's feature and image
    captions: list[str] = field(default_factory=list)  # the training captions, flat (nearest-caption display)
    temperature: float = 0.07  # the experts' InfoNCE temperature

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare_inputs(config: ExperimentConfig, distill: DistillConfig) -> DistillInputs:
    manifest = prepare_data(config)
    spec = model_spec(config, manifest)
    store = TrajectoryStore.open(config.store_url, config.storage)
    model = build_model(spec)
    names = select_parameters(model, config.experts.record)
    params = dict(model.named_parameters())
    store.check_compatible(spec, {n: params[n] for n in names}, fingerprint=data_fingerprint(config, manifest))
    preprocess = load_preprocess(config)
    train = load_split(config, config.data.split)
    pairs = caption_features_of(config, manifest, spec, train, config.data.split) if config.contrastive else None
    return DistillInputs(
        distill=distill, spec=spec, record=config.experts.record, frozen_seed=config.experts.seed,
        store_url=config.store_url,
        storage_config=config.storage, out_url=config.distill_dir(distill.ipc), preprocess=preprocess,
        images=preprocess.apply(train.images), labels=train.labels, class_names=manifest.class_names,
        fingerprint=data_fingerprint(config, manifest), pairs=pairs,
        captions=[c for per_image in train.captions for c in per_image] if pairs is not None else [],
        temperature=config.experts.train.temperature,
    )


def build_distiller(inputs: DistillInputs, device: torch.device, *, rank: int = 0, world_size: int = 1,
                    reduce: Reduce | None = None, on_iteration=None) -> Distiller:
    config = inputs.distill
    store = TrajectoryStore.open(inputs.store_url, inputs.storage_config)
    model, names = build_shared_frozen(inputs.spec, inputs.record, frozen_seed=inputs.frozen_seed,
                                       seed=inputs.frozen_seed)
    model.to(device)
    segments = ExpertSegments(store, device)
    step_size = config.lr_teacher or float(store.manifest.hparams["lr"])
    generator = torch.Generator().manual_seed(config.seed)
    images = inputs.images.to(device)
    if inputs.pairs is not None:
        method = VisionLanguage(model, names, config, inputs.temperature)
        synthetic = init_pairs(images, inputs.pairs.features.to(device), inputs.pairs.image_index, config.ipc,
                               config, step_size, generator)
    else:
        method = MTT(model, names, config)
        labels = inputs.labels.to(device)
        if config.labels == "soft":
            finals = [segments.flat(e, store.num_epochs) for e in segments.experts]
            synthetic = datm_init(images, labels, inputs.num_classes, config, step_size, generator, method.student,
                                  finals)
        else:
            synthetic = init_synthetic(images, labels, inputs.num_classes, config, step_size, generator)
        if config.labels == "soft_first_expert":
            expert = segments.flat(segments.experts[0], min(config.max_start_epoch, store.num_epochs))
            synthetic.labels = soft_labels_from_expert(synthetic, method.student, expert)
    synthetic.metadata = {**describe_run(inputs, store), **synthetic.metadata,
                          "matched_parameters": method.student.num_parameters, "record": inputs.record,
                          "full_matching_parameters": full_matching_size(model)}
    return Distiller(config, synthetic, method, segments, inputs.out_url, inputs.storage_config, rank=rank,
                     world_size=world_size, reduce=reduce, on_iteration=on_iteration)


def describe_run(inputs: DistillInputs, store: TrajectoryStore) -> dict[str, Any]:
    return {
        "method": "mtt" if inputs.pairs is None else "vl", "ipc": inputs.distill.ipc, "model": inputs.spec.model_dump(mode="json"),
        "source_store": storage.redact(store.url), "num_experts": len(store.experts()),
        "data_fingerprint": inputs.fingerprint, "classes": inputs.class_names,
        "distill": inputs.distill.model_dump(mode="json"),
    }


def finish(inputs: DistillInputs, distiller: Distiller) -> SyntheticSet:
    """Write the distilled set (safetensors, shard, manifest, grid) to ``inputs.out_url``."""
    result = distiller.result()
    result.metadata |= {
        "iterations": distiller.iteration,
        "skipped_iterations": distiller.skipped,
        "step_sizes": result.alphas.tolist(),
        "loss_history": distiller.history,
    }
    shown = None
    if result.text is not None:  # synthetic text vectors shown as their nearest real captions
        nearest = nearest_captions(result.text, inputs.pairs.features, inputs.captions)
        result.metadata["nearest_captions"] = [{"caption": c, "similarity": round(s, 4)} for c, s in nearest]
        shown = [c for c, _ in nearest]
    save_outputs(result, inputs.out_url, inputs.preprocess, inputs.class_names, inputs.storage_config, shown)
    return result


def run_local(inputs: DistillInputs, device: torch.device | None = None, progress: bool = True,
              on_iteration=None) -> SyntheticSet:
    """The single-process algorithm (W = 1), in this process."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distiller = build_distiller(inputs, device, on_iteration=on_iteration)
    distiller.run(progress=progress)
    return finish(inputs, distiller)
