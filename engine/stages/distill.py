"""The distill stage: one distillation run of the configured method, at one size, into
``<run_dir>/distill/<method>/ipc-<k>/``.

    shards, trajectory store (refused if recorded for another model or data), the store's input
    transform -> the training split (TrainData) -> method.init -> the outer loop, checkpointed (resumes)
    -> synthetic.safetensors, manifest.json, a WebDataset shard and grid.png (pairs.html for pairs)

``DistillWorker`` carries everything a run reads as plain tensors, so the runtime can run it in this
process or ship it to every data-parallel Ray Train worker, where it builds the method on that
worker's device the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from engine import storage
from engine.config import to_yaml
from engine.data.preprocess import Preprocess
from engine.distill import METHODS, DistillConfig
from engine.distill.base import MethodSetup, TrainData
from engine.distill.loop import Distiller, Reduce
from engine.distill.synthetic import SyntheticSet, save_outputs
from engine.experiment import ExperimentConfig
from engine.models.params import full_matching_size, select_parameters
from engine.models.registry import ModelSpec, build_model
from engine.optim import build_seeded
from engine.plots import loss_png
from engine.stages import Runtime
from engine.stages.context import (
    data_fingerprint,
    distill_dir,
    fitted_preprocess,
    model_spec,
    prepare_data,
    train_data,
)
from engine.storage import StorageConfig
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore

OnIteration = Callable[[int, float, SyntheticSet], None]


@dataclass
class DistillWorker:
    """One distillation run, resolved and checked; called as ``worker(device, rank, world_size, reduce,
    progress)`` in this process or on each Ray Train worker. Rank 0 writes the outputs."""

    distill: DistillConfig
    spec: ModelSpec
    record: str
    frozen_seed: int  # the experts' base seed: the student's frozen parameters must be theirs
    store_url: str
    storage_config: StorageConfig
    out_url: str
    preprocess: Preprocess
    data: TrainData
    fingerprint: str
    temperature: float = 0.07  # the experts' InfoNCE temperature
    on_iteration: OnIteration | None = field(default=None, repr=False)

    def build(self, device: torch.device, rank: int = 0, world_size: int = 1,
              reduce: Reduce | None = None) -> Distiller:
        method_class = METHODS[self.distill.method]
        model, names = build_shared_frozen(self.spec, self.record, frozen_seed=self.frozen_seed, seed=self.frozen_seed)
        store = TrajectoryStore.open(self.store_url, self.storage_config) if method_class.needs_trajectories else None
        step_size = getattr(self.distill, "lr_teacher", None) or (float(store.manifest.hparams["lr"]) if store else 0.0)
        setup = MethodSetup(model.to(device), names, device, store, step_size, self.temperature,
                            fresh_model=lambda seed: build_seeded(lambda: build_model(self.spec), seed))
        method = method_class(self.distill, setup)
        data = replace(self.data, images=self.data.images.to(device), labels=self.data.labels.to(device),
                       **{name: None if t is None else t.to(device) for name, t in (
                           ("caption_features", self.data.caption_features), ("caption_image", self.data.caption_image))})
        synthetic = method.init(data, torch.Generator().manual_seed(self.distill.seed))
        synthetic.metadata = {**self.describe_run(store), **synthetic.metadata, "record": self.record,
                              "full_matching_parameters": full_matching_size(model)}
        return Distiller(self.distill, synthetic, method, self.out_url, self.storage_config, rank=rank,
                         world_size=world_size, reduce=reduce, on_iteration=self.on_iteration)

    def describe_run(self, store: TrajectoryStore | None) -> dict[str, Any]:
        return {
            "method": self.distill.method, "ipc": self.distill.ipc, "model": self.spec.model_dump(mode="json"),
            "source_store": storage.redact(store.url) if store else None, "data_fingerprint": self.fingerprint,
            "classes": self.data.class_names, "distill": self.distill.model_dump(mode="json"),
        }

    def __call__(self, device: torch.device, rank: int = 0, world_size: int = 1, reduce: Reduce | None = None,
                 progress: bool = True) -> None:
        distiller = self.build(device, rank, world_size, reduce)
        distiller.run(progress=progress)
        if rank == 0:
            self.finish(distiller)

    def finish(self, distiller: Distiller) -> SyntheticSet:
        """Write the distilled set (safetensors, shard, manifest, grid) and its loss curve to ``out_url``."""
        result = distiller.result()
        extra, shown = distiller.method.describe(result, self.data)
        result.metadata |= extra | {"iterations": distiller.iteration, "skipped_iterations": distiller.skipped,
                                    "seconds": round(distiller.seconds, 2), "loss_history": distiller.history}
        save_outputs(result, self.out_url, self.preprocess, self.data.class_names, self.storage_config, shown)
        curve = storage.join(self.out_url, "loss.png")
        title = f"{self.distill.method}, {self.distill.ipc} per class" if self.data.class_names else self.distill.method
        storage.write_bytes(curve, loss_png(distiller.losses, distiller.history, title), self.storage_config)
        print(f"distilled set: {storage.redact(self.out_url)} (grid.png, loss.png)", flush=True)
        return result


def prepare(config: ExperimentConfig, distill: DistillConfig, runtime: Runtime,
            on_iteration: OnIteration | None = None) -> DistillWorker:
    """Read and check everything the run needs (the store must fit the model and the data)."""
    manifest = prepare_data(config)
    spec = model_spec(config, manifest)
    fingerprint = data_fingerprint(config, manifest)
    if METHODS[distill.method].needs_trajectories:
        model = build_model(spec)
        params = dict(model.named_parameters())
        names = select_parameters(model, config.experts.record)
        TrajectoryStore.open(config.store_url, config.storage).check_compatible(
            spec, {n: params[n] for n in names}, fingerprint=fingerprint)
    preprocess = fitted_preprocess(config, manifest, runtime)  # the experts' (or, without experts, fitted now)
    return DistillWorker(
        distill=distill, spec=spec, record=config.experts.record, frozen_seed=config.experts.seed,
        store_url=config.store_url, storage_config=config.storage, out_url=distill_dir(config, distill.ipc),
        preprocess=preprocess, data=train_data(config, manifest, spec, runtime, preprocess),
        fingerprint=fingerprint, temperature=config.experts.train.temperature, on_iteration=on_iteration,
    )


def run(config: ExperimentConfig, distill: DistillConfig, runtime: Runtime) -> SyntheticSet:
    """Distil (or resume) one size with the configured method; returns the set it wrote."""
    worker = prepare(config, distill, runtime)
    runtime.distill(worker)
    storage.write_text(storage.join(worker.out_url, "config.yaml"), to_yaml(config), config.storage)
    result = SyntheticSet.load(worker.out_url, config.storage)
    print(summary(result, distill, worker.out_url), flush=True)
    return result


def summary(result: SyntheticSet, distill: DistillConfig, out_url: str) -> str:
    kind = "clips" if result.images.ndim == 5 else "images"
    what = f"{len(result)} pairs" if result.text is not None else f"{len(result)} {kind} ({distill.ipc} per class)"
    line = f"distilled {what} with {distill.method} in {storage.redact(out_url)}"
    matched, full = result.metadata.get("matched_parameters"), result.metadata["full_matching_parameters"]
    if matched is not None:
        line += (f", matching {matched:,} parameters ({result.metadata['record']}; full matching: {full:,}, "
                 f"{matched / full:.2f}x)")
    if result.metadata.get("step_sizes"):
        line += "; learned step sizes " + ", ".join(f"{a:.4g}" for a in result.metadata["step_sizes"])
    if causal := result.metadata.get("causal"):
        line += (f"; causal pruning kept {causal['kept']:,} of {causal['samples']:,} real samples "
                 f"(+{causal['seconds']:.1f} s)")
    if "seconds" in result.metadata:
        line += f"; {result.metadata['iterations']} iterations in {result.metadata['seconds']:.1f} s"
    return line
