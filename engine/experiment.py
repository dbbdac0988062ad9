"""One experiment config for every job: data, experts, distillation, evaluation, pipeline, resources.

A YAML file such as ``configs/quickstart.yaml`` describes a whole experiment; each job reads the
sections it needs (``buffer``: data, preprocess, model, experts; ``distill``: + distill;
``evaluate``: + evaluate; ``pipeline``: all), so the same file drives every step and a sweep can
override any key. Defaults live only in these schemas.

Also here: the builders every job shares, so that the buffer, distill and evaluate jobs derive the
model spec, the data fingerprint and the preprocessed tensors in exactly the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from engine import storage
from engine.config import JobConfig, Section, load_config, split_config_args
from engine.data import reader
from engine.data.manifest import ShardManifest
from engine.data.preprocess import Preprocess, PreprocessConfig
from engine.data.reader import DataConfig, InMemoryData
from engine.data.text_features import CaptionFeatures, caption_features
from engine.data.writers import PrepareConfig, ensure_shards
from engine.distill.config import DistillConfig
from engine.errors import ConfigError, DataError
from engine.evaluate.classification import TrainConfig
from engine.models.registry import ARCHITECTURES, LoraSpec, ModelSpec
from engine.runtime.cluster import ResourcesConfig, init_ray
from engine.seeds import MAX_BASE_SEED, MAX_INDEX
from engine.select.coresets import METHODS as CORESET_METHODS
from engine.storage import PathOrURL
from engine.trajectories.train import ExpertConfig

CONTRASTIVE_ARCHS = ("clip", "clip_tiny", "clip_convnet")


class ModelConfig(Section):
    """A model from the registry. ``channels``, ``num_classes``, ``image_size`` and ``frames`` come from
    the data when the builder takes them and the config does not set them."""

    arch: str = Field("convnet", description=f"One of: {', '.join(ARCHITECTURES)}.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    lora: LoraSpec | None = None

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(ARCHITECTURES)}")
        return value


class ExpertsConfig(Section):
    num_experts: int = Field(10, ge=1, le=MAX_INDEX)
    record: str = Field("all", description="Parameters trained and recorded: all | heads | lora+heads | groups.")
    seed: int = Field(0, ge=0, lt=MAX_BASE_SEED,
                      description="Expert i is initialised and trained with a seed derived from (seed, i).")
    val_split: str | None = Field("val", description="Split evaluated after every epoch (None: no evaluation).")
    store: PathOrURL | None = Field(None, description="Trajectory store URL; default <run_dir>/trajectories.")
    lease_timeout_s: float = Field(600.0, gt=0, description="A writer silent this long is presumed dead.")
    train: ExpertConfig = Field(default_factory=ExpertConfig)


class EvaluateConfig(Section):
    """Fresh networks trained on each distilled set and on coresets of the same size."""

    methods: list[str] = Field(default_factory=lambda: ["distilled", *CORESET_METHODS],
                               description="distilled and coreset methods: random, herding, kcenter, forgetting.")
    sizes: list[int] | None = Field(None, description="Coreset sizes (default: pipeline.ipcs); distilled sets are "
                                    "evaluated at pipeline.ipcs.")
    full: bool = Field(False, description="Also train on the whole training split (the upper bound).")
    full_epochs: int = Field(30, ge=1, description="Epochs of the full-data run.")
    repeats: int = Field(3, ge=1, le=MAX_INDEX, description="Fresh networks per set; mean and std are reported.")
    split: str = Field("test", description="Split the reported metric is measured on.")
    use_learned_lr: bool = Field(True, description="Train on a distilled set with its learned step size.")
    best_snapshot_split: str | None = Field(
        "val", description="When distillation kept snapshots (distill.snapshot_every), also report the snapshot "
        "that scores best on this split (MTT reports the best of its evaluations; here the choice is made on a "
        "split that is not reported; off when it is the reported split). None: only the final set.")

    @property
    def selects_best_snapshot(self) -> bool:
        return self.best_snapshot_split is not None and self.best_snapshot_split != self.split
    model: ModelConfig | None = Field(None, description="Evaluation network (default: the experts' model).")
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int = Field(0, ge=0, lt=MAX_BASE_SEED, description="Evaluation networks, forgetting runs and coreset "
                      "draws take seeds from their own streams (engine.seeds): never an expert's.")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in ("distilled", *CORESET_METHODS)]
        if unknown or not value:
            raise ValueError(f"unknown methods {unknown}; choose from distilled, {', '.join(CORESET_METHODS)}")
        return value


class PipelineConfig(Section):
    ipcs: list[int] = Field(default_factory=lambda: [1], description="Distil and evaluate at these sizes.")
    per_ipc: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="distill keys that differ at one size, e.g. {10: {syn_steps: 30}}."
    )

    @field_validator("ipcs")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("must be a non-empty list of sizes >= 1")
        return value


SEARCH_SPACE_KINDS = ("choice", "uniform", "loguniform", "grid")


class SweepConfig(Section):
    """A Ray Tune search over any keys of this config (``distill sweep``)."""

    space: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="dotted key -> {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {grid: [...]}",
    )
    num_samples: int = Field(4, ge=1, description="Samples of the space (each grid point num_samples times).")
    metric: str = Field("val_accuracy", description="Reported every report_every iterations; val_rsum for pairs.")
    mode: Literal["max", "min"] = "max"
    report_every: int = Field(50, ge=1, description="Distillation iterations between quick evaluations.")
    eval_epochs: int = Field(100, ge=1, description="Epochs of the quick evaluation's network.")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop poor trials early.")
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    search: Literal["random", "optuna"] = Field("random", description="optuna needs the optuna package.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (default: as resources allow).")
    storage: PathOrURL | None = Field(None, description="Tune's experiment folder (default <run_dir>/sweep/tune).")
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _known_kinds(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_SPACE_KINDS:
                raise ValueError(f"{key}: give exactly one of {', '.join(SEARCH_SPACE_KINDS)}, got {spec}")
            kind, values = next(iter(spec.items()))
            if not values or (kind in ("uniform", "loguniform") and len(values) != 2):
                raise ValueError(f"{key}: {kind} needs {'[low, high]' if kind != 'choice' else 'values'}, got {values}")
            if kind == "loguniform" and min(values) <= 0:
                raise ValueError(f"{key}: loguniform bounds must be > 0, got {values}")
        return space


class PretrainConfig(Section):
    """An image tower the engine trains first on labelled images (e.g. CIFAR-10), for image-text models:
    a classification run whose trunk is saved to ``checkpoint`` and reused by every later run."""

    data: DataConfig
    prepare: PrepareConfig | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig, description="The classifier; its trunk is the tower.")
    train: ExpertConfig = Field(default_factory=lambda: ExpertConfig(epochs=6, lr=0.05, momentum=0.9,
                                                                     weight_decay=5e-4, batch_size=256))
    val_split: str | None = Field("val", description="Split whose accuracy is printed after every epoch.")
    checkpoint: PathOrURL | None = Field(None, description="Local file; default <run_dir>/pretrain/tower.safetensors.")
    seed: int = 0


class ExperimentConfig(JobConfig):
    data: DataConfig
    prepare: PrepareConfig | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig | None = Field(None, description="Image tower trained first (image-text models).")
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        contrastive = self.model.arch in CONTRASTIVE_ARCHS
        if contrastive != (self.experts.train.objective == "contrastive"):
            raise ValueError(
                f"experts.train.objective {self.experts.train.objective!r} does not fit model.arch "
                f"{self.model.arch!r} (contrastive needs one of {', '.join(CONTRASTIVE_ARCHS)})"
            )
        if self.tower_checkpoint and storage.is_remote(self.tower_checkpoint):
            raise ValueError(f"pretrain.checkpoint must be a local file (towers load from local paths), "
                             f"got {self.tower_checkpoint}; set it when run_dir is remote")
        if "distill" in self.model_fields_set:  # a config for experts only need not fit the defaults
            self._check_window("distill", self.distill)
        for ipc in self.pipeline.per_ipc:
            self._check_window(f"pipeline.per_ipc.{ipc}", self.distill_for(ipc))  # now, not mid-pipeline
        return self

    def _check_window(self, where: str, distill: DistillConfig) -> None:
        if distill.max_start_epoch + distill.expert_epochs > self.experts.train.epochs + 1:
            raise ValueError(
                f"{where}: max_start_epoch ({distill.max_start_epoch}) + expert_epochs ({distill.expert_epochs}) "
                f"needs experts of {distill.max_start_epoch + distill.expert_epochs - 1} epochs; "
                f"experts.train.epochs is {self.experts.train.epochs}"
            )

    @property
    def tower_checkpoint(self) -> str | None:
        """Where the pretrained image tower is (or will be) saved, if the config pre-trains one."""
        if self.pretrain is None:
            return None
        return self.pretrain.checkpoint or storage.join(self.run_dir, "pretrain", "tower.safetensors")

    @property
    def contrastive(self) -> bool:
        return self.experts.train.objective == "contrastive"

    @property
    def store_url(self) -> str:
        return self.experts.store or storage.join(self.run_dir, "trajectories")

    def distill_dir(self, ipc: int) -> str:
        return storage.join(self.run_dir, "distill", f"ipc-{ipc}")

    def distill_for(self, ipc: int) -> DistillConfig:
        """The distill section at size ``ipc`` with ``pipeline.per_ipc`` applied."""
        extra = self.pipeline.per_ipc.get(ipc, {})
        try:
            return DistillConfig.model_validate({**self.distill.model_dump(), **extra, "ipc": ipc})
        except ValidationError as err:  # raised while the experiment config is validated: names the key
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"pipeline.per_ipc.{ipc}{'.' + key if key else ''}: {first['msg']}") from None


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
    """What the experts were trained on: the shards' content, the split and how images were decoded."""
    p = config.preprocess
    transform = ("norm" if p.normalize else "raw") + (f"+zca{p.zca_eps:g}" if p.zca else "")
    frames = f":{config.data.frames}f" if manifest.modality == "video" else ""
    return (f"{manifest.fingerprint()}:{config.data.split}:{config.data.image_size}px{frames}:"
            f"{config.data.channels}ch:{config.data.resize}:{transform}")


def prepare_data(config: ExperimentConfig) -> ShardManifest:
    """The shards' manifest, writing the shards first from the ``prepare`` section if there are none."""
    return ensure_shards(config.data.shards, config.prepare, config.storage)


def load_split(config: ExperimentConfig, split: str) -> InMemoryData:
    """A whole split as tensors (pixels in [0, 1]); decoded on the Ray cluster when one is in use."""
    data_config = config.data.model_copy(update={"split": split})
    if config.resources.use_ray:
        init_ray(config.resources)  # before Ray Data can auto-connect to some other cluster on this machine
        return reader.materialize(data_config, config.storage)
    return reader.load_in_memory(data_config, config.storage)


def load_preprocess(config: ExperimentConfig) -> Preprocess:
    return Preprocess.load(config.store_url, config.storage)


def caption_features_of(config: ExperimentConfig, manifest: ShardManifest, spec: ModelSpec, split_data: InMemoryData,
                        split: str) -> CaptionFeatures:
    """Features of every caption of a split from the model's frozen text tower, computed once per data
    set and tower and cached in ``<run_dir>/cache``."""
    from engine.models.clip import TextTower

    if not any(split_data.captions):
        raise DataError(f"{config.data.shards}: split {split!r} has no captions; image-text models need pairs")
    text_model = str(spec.kwargs["text_model"])
    cache = storage.join(config.run_dir, "cache")
    return caption_features(lambda: TextTower.from_pretrained(text_model), text_model, split_data.captions, cache,
                            manifest.fingerprint(), split, config.storage)


def run_job(argv: list[str], doc: str | None, run: Callable[[ExperimentConfig], object]) -> int:
    """The ``main`` of a job that takes ``[config.yaml] [key=value ...]``: validate, then ``run``."""
    path, overrides = split_config_args(argv)
    if path in ("-h", "--help"):
        print(doc)
        return 0
    run(load_config(ExperimentConfig, path, overrides))
    return 0
