"""distill buffer <config.yaml> [key=value ...]: train N expert trajectories in parallel on Ray.

    load config -> write the shards if missing -> read train (and validation) data through Ray Data
    -> open the trajectory store (refusing one recorded for another model, data or recipe)
    -> one Ray Tune trial per expert not yet complete, each resuming from its last saved epoch
    -> results.json + a table of the experts' final metrics in <run_dir>/buffer/

Running the same command again resumes; two jobs on one store share the work through leases.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from pydantic import Field, model_validator

from engine import cli, storage
from engine.config import JobConfig, Section, load_config, split_config_args, to_yaml
from engine.data import reader
from engine.data.manifest import ShardManifest
from engine.data.reader import DataConfig
from engine.data.text_features import caption_features
from engine.data.writers import PrepareConfig, ensure_shards
from engine.errors import ConfigError, DataError
from engine.models.registry import ARCHITECTURES, LoraSpec, ModelSpec
from engine.runtime.cluster import ResourcesConfig, init_ray
from engine.runtime.experts import train_experts_locally, train_experts_on_ray
from engine.trajectories.experts import EvalData, ExpertPlan, open_store
from engine.trajectories.train import ExpertConfig, ExpertData

CONTRASTIVE_ARCHS = ("clip", "clip_tiny", "clip_convnet")
POLL_SECONDS = 5.0


class ModelConfig(Section):
    """A model from the registry. ``channels``, ``num_classes`` and ``image_size`` come from the data
    when the builder takes them and the config does not set them."""

    arch: str = Field("convnet", description=f"One of: {', '.join(ARCHITECTURES)}.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    lora: LoraSpec | None = None


class ExpertsConfig(Section):
    num_experts: int = Field(10, ge=1)
    record: str = Field("all", description="Parameters trained and recorded: all | heads | lora+heads | groups.")
    seed: int = Field(0, description="Expert i is initialised and trained with a seed derived from (seed, i).")
    val_split: str | None = Field("val", description="Split evaluated after every epoch (None: no evaluation).")
    store: str | None = Field(None, description="Trajectory store URL; default <run_dir>/trajectories.")
    lease_timeout_s: float = Field(600.0, gt=0, description="A writer silent this long is presumed dead.")
    train: ExpertConfig = Field(default_factory=ExpertConfig)


class BufferConfig(JobConfig):
    data: DataConfig
    prepare: PrepareConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _objective_fits_model(self) -> BufferConfig:
        contrastive = self.model.arch in CONTRASTIVE_ARCHS
        if contrastive != (self.experts.train.objective == "contrastive"):
            raise ValueError(
                f"experts.train.objective {self.experts.train.objective!r} does not fit model.arch "
                f"{self.model.arch!r} (contrastive needs one of {', '.join(CONTRASTIVE_ARCHS)})"
            )
        return self

    @property
    def store_url(self) -> str:
        return self.experts.store or storage.join(self.run_dir, "trajectories")


def model_spec(config: BufferConfig, manifest: ShardManifest) -> ModelSpec:
    """The model's spec with the data's shape filled in; a conflicting explicit value is an error."""
    import inspect

    takes = inspect.signature(ARCHITECTURES[config.model.arch]).parameters
    from_data = {"channels": config.data.channels, "num_classes": len(manifest.classes),
                 "image_size": config.data.image_size, "frames": config.data.frames}
    kwargs = dict(config.model.kwargs)
    for key, value in from_data.items():
        if key not in takes or (key == "num_classes" and not manifest.classes):
            continue
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"model.kwargs.{key} is {kwargs[key]} but the data gives {value}")
        kwargs[key] = value
    return ModelSpec.create(config.model.arch, lora=config.model.lora, **kwargs)


def load_split(config: BufferConfig, split: str) -> reader.InMemoryData:
    data_config = config.data.model_copy(update={"split": split})
    if config.resources.use_ray:
        return reader.materialize(data_config, config.storage)
    return reader.load_in_memory(data_config, config.storage)


def text_tower_name(spec: ModelSpec) -> str:
    return str(spec.kwargs.get("text_model"))


def build_plan(config: BufferConfig, manifest: ShardManifest, spec: ModelSpec) -> ExpertPlan:
    train = load_split(config, config.data.split)
    val = load_split(config, config.experts.val_split) if config.experts.val_split else None
    fingerprint = f"{manifest.fingerprint()}:{config.data.split}:{config.data.image_size}px:{config.data.channels}ch"
    if config.experts.train.objective == "classification":
        data = ExpertData(train.images, train.labels)
        eval_data = EvalData(val.images, val.labels) if val else None
    else:
        data, eval_data = _pair_data(config, manifest, spec, train, val)
    return ExpertPlan(
        store_url=config.store_url, spec=spec, record=config.experts.record, train=config.experts.train,
        fingerprint=fingerprint, data=data, eval_data=eval_data, seed=config.experts.seed,
        lease_timeout_s=config.experts.lease_timeout_s, storage_config=config.storage,
    )


def _pair_data(config: BufferConfig, manifest: ShardManifest, spec: ModelSpec, train, val):
    """Image-text experts train on every (image, caption) pair, with cached caption features."""
    from engine.models.clip import TextTower

    tower = TextTower.from_pretrained(spec.kwargs["text_model"])
    cache = storage.join(config.run_dir, "cache")

    def features(split_data, split):
        if not any(split_data.captions):
            raise DataError(f"{config.data.shards}: split {split!r} has no captions; contrastive experts need pairs")
        return caption_features(tower, text_tower_name(spec), split_data.captions, cache, manifest.fingerprint(),
                                split, config.storage)

    train_features = features(train, config.data.split)
    data = ExpertData(train.images[train_features.image_index], train_features.features)
    if val is None:
        return data, None
    val_features = features(val, config.experts.val_split)
    return data, EvalData(val.images, val_features.features, val_features.image_index)


def _print_progress(expert: int, epoch: int, state) -> None:
    shown = ", ".join(f"{k} {v:.3f}" for k, v in state.metrics.items())
    print(f"expert {expert} epoch {epoch}: {shown}", flush=True)


def run_buffer(config: BufferConfig) -> dict[str, Any]:
    """Train every expert that is not complete; returns the results written to <run_dir>/buffer/."""
    if config.resources.use_ray:
        init_ray(config.resources)
    manifest = ensure_shards(config.data.shards, config.prepare, config.storage)
    spec = model_spec(config, manifest)
    plan = build_plan(config, manifest, spec)
    store = open_store(plan)
    num = config.experts.num_experts
    started = time.time()
    already = [i for i in store.experts() if i < num]
    while remaining := [i for i in range(num) if i not in store.experts()]:
        claimable = store.pending(num)
        if not claimable:  # every remaining expert is being trained by another job
            print(f"waiting for experts {remaining} held by other jobs", flush=True)
            time.sleep(POLL_SECONDS)
            continue
        if config.resources.use_ray:
            train_experts_on_ray(plan, claimable, config.resources)
        else:
            train_experts_locally(plan, claimable, _print_progress)
    results = _results(config, store, num, already, time.time() - started)
    _write_outputs(config, results)
    return results


def _results(config: BufferConfig, store, num: int, already: list[int], seconds: float) -> dict[str, Any]:
    experts = []
    for i in range(num):
        status = store.status(i)
        experts.append({"expert": i, "epochs": status.epochs, "seed": status.seed, "sha256": status.sha256,
                        "resumed_complete": i in already, "started_at_epoch": status.summary.get("started_at_epoch"),
                        "final": status.metrics[-1]})
    return {"store": store.url, "num_experts": num, "epochs": store.num_epochs, "seconds": round(seconds, 2),
            "experts": experts}


def results_table(results: dict[str, Any]) -> str:
    metric_names = sorted({k for e in results["experts"] for k in e["final"]})
    header = "| expert | " + " | ".join(metric_names) + " | note |"
    lines = [header, "|" + "---|" * (len(metric_names) + 2)]
    for e in results["experts"]:
        values = " | ".join(f"{e['final'].get(k, float('nan')):.3f}" for k in metric_names)
        lines.append(f"| {e['expert']} | {values} | {_note(e)} |")
    return "\n".join(lines)


def _note(expert: dict[str, Any]) -> str:
    if expert["resumed_complete"]:
        return "already complete"
    started = expert["started_at_epoch"]
    return f"resumed after epoch {started}" if started else ""


def _write_outputs(config: BufferConfig, results: dict[str, Any]) -> None:
    out = storage.join(config.run_dir, "buffer")
    storage.write_json(storage.join(out, "results.json"), results, config.storage)
    table = results_table(results)
    storage.write_text(storage.join(out, "results.md"), table + "\n", config.storage)
    storage.write_text(storage.join(out, "config.yaml"), to_yaml(config), config.storage)
    print(f"\n{results['num_experts']} experts x {results['epochs']} epochs in {results['store']} "
          f"({results['seconds']:.1f} s)\n{table}")


def main(argv: list[str]) -> int:
    path, overrides = split_config_args(argv)
    if path in ("-h", "--help"):
        print(__doc__)
        return 0
    config = load_config(BufferConfig, path, overrides)
    run_buffer(config)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(["buffer", *sys.argv[1:]]))
