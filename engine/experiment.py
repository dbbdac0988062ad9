"""One experiment config for every job: data, experts, distillation, evaluation, pipeline, resources.

A YAML file such as ``configs/quickstart.yaml`` describes a whole experiment; each job reads the
sections it needs (``buffer``: data, preprocess, model, experts; ``distill``: + distill;
``evaluate``: + evaluate; ``pipeline``: all), so the same file drives every step and a sweep can
override any key. Defaults live only in these schemas; everything that can be checked before data
is read is checked here, at load time. The stages (``engine.stages``) are the only code that reads it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from engine import storage
from engine.config import JobConfig, Section, with_overrides
from engine.data.preprocess import PreprocessConfig
from engine.data.shards import DataConfig
from engine.data.writers import PrepareConfig
from engine.distill import DISTILL_CONFIG, METHODS, DistillConfig
from engine.distill.matching import TrajectoryMatchingConfig
from engine.errors import ConfigError
from engine.evaluate.train import TrainConfig
from engine.labels import LABEL_SOURCES
from engine.labels.config import LabelsConfig
from engine.models.registry import ARCHITECTURES, LoraSpec, check_arguments, check_selection, declared_groups
from engine.resources import ResourcesConfig
from engine.search import SweepConfig
from engine.seeds import MAX_BASE_SEED, MAX_INDEX
from engine.select import CORESETS
from engine.select.bilp import SelectionConfig
from engine.storage import PathOrURL
from engine.trajectories.train import ExpertConfig

DISTILLED = "distilled"  # evaluate.methods: the distilled sets of the configured method


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

    @model_validator(mode="after")
    def _arguments(self) -> ModelConfig:
        check_arguments(self.arch, self.kwargs)  # a typo fails now, not after a tower is pre-trained
        return self


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

    methods: list[str] = Field(default_factory=lambda: [DISTILLED, *CORESETS],
                               description=f"{DISTILLED} and coreset methods: {', '.join(CORESETS)}.")
    sizes: list[int] | None = Field(None, description="Coreset sizes (default: pipeline.ipcs); distilled sets are "
                                    "evaluated at pipeline.ipcs.")
    full: bool = Field(False, description="Also train on the whole training split (the upper bound).")
    full_epochs: int = Field(30, ge=1, description="Epochs of the full-data run.")
    repeats: int = Field(3, ge=1, le=MAX_INDEX, description="Fresh networks per set; mean and std are reported.")
    split: str = Field("test", description="Split the reported metric is measured on.")
    test_shards: PathOrURL | None = Field(
        None, description="Measure on evaluate.split of this shard folder instead of data.shards (held-out "
        "transfer: data the experiment never saw, without distilling again); results in "
        "<run_dir>/heldout/<folder name>/. Its classes must be the training data's.")
    use_learned_lr: bool = Field(True, description="Train on a distilled set with its learned step size.")
    best_snapshot_split: str | None = Field(
        "val", description="When distillation kept snapshots (distill.snapshot_every), also report the snapshot "
        "that scores best on this split (MTT reports the best of its evaluations; here the choice is made on a "
        "split that is not reported; off when it is the reported split). None: only the final set.")
    labels: str = Field("stored", description=f"Label source of the fresh networks: {', '.join(LABEL_SOURCES)}.")
    model: ModelConfig | None = Field(None, description="Evaluation network (default: the experts' model).")
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int = Field(0, ge=0, lt=MAX_BASE_SEED, description="Evaluation networks, forgetting runs and coreset "
                      "draws take seeds from their own streams (engine.seeds): never an expert's.")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in (DISTILLED, *CORESETS)]
        if unknown or not value:
            raise ValueError(f"unknown methods {unknown}; choose from {DISTILLED}, {', '.join(CORESETS)}")
        return value

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: str) -> str:
        if value not in LABEL_SOURCES:
            raise ValueError(f"unknown label source {value!r}; choose from {', '.join(LABEL_SOURCES)}")
        return value

    @property
    def selects_best_snapshot(self) -> bool:
        return self.best_snapshot_split is not None and self.best_snapshot_split != self.split


class PipelineConfig(Section):
    ipcs: list[int] = Field(default_factory=lambda: [1], description="Distil and evaluate at these sizes.")
    per_ipc: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="distill keys that differ at one size, e.g. {10: {syn_steps: 30}}."
    )

    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Further configurations distilled at the same sizes and evaluated in "
        "the same table as distilled:<name>: name -> dotted keys that differ from this config, e.g. "
        "{dm+bilp: {distill: {method: dm}, selection.method: loss}}. Each runs in <run_dir>/variants/<name> and "
        "shares this config's shards and selections.")

    @field_validator("ipcs")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("must be a non-empty list of sizes >= 1")
        return value

    @field_validator("variants")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in value if not name or "/" in name or name.startswith(".")]
        if bad:
            raise ValueError(f"variant names must be folder names, got {bad}")
        return value


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
    distill: DistillConfig = Field(description="distill.method picks the method (mtt, vl, ...) and its keys.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    labels: LabelsConfig | None = Field(None, description="Label-space lightening (HeLlO): students of small sets "
                                        "with hard, stored soft and projected labels (`distill labels`).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw: Any) -> Any:
        """Configs written before ``distill.method`` existed: the method that fits the experts' objective."""
        if not isinstance(raw, dict):
            return raw
        distill = raw.get("distill") or {}
        if isinstance(distill, dict) and "method" not in distill:
            objective = ((raw.get("experts") or {}).get("train") or {}).get("objective", "classification")
            method = next(name for name, m in METHODS.items() if m.objective == objective)
            raw = {**raw, "distill": {**distill, "method": method}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        method = METHODS[self.distill.method]
        if method.objective != self.experts.train.objective:
            raise ValueError(f"distill.method {self.distill.method!r} distils for {method.objective} experts; "
                             f"experts.train.objective is {self.experts.train.objective!r}")
        groups = declared_groups(self.model.arch)
        if groups is not None:
            try:
                check_selection(self.experts.record, groups, self.model.lora is not None)
            except ValueError as err:
                raise ValueError(f"experts.record {err}") from None
        if self.tower_checkpoint and storage.is_remote(self.tower_checkpoint):
            raise ValueError(f"pretrain.checkpoint must be a local file (towers load from local paths), "
                             f"got {self.tower_checkpoint}; set it when run_dir is remote")
        if self.distill != type(self.distill)():  # a config for experts only need not fit the defaults
            self._check_window("distill", self.distill)
        for ipc in self.pipeline.per_ipc:
            self._check_window(f"pipeline.per_ipc.{ipc}", self.distill_for(ipc))  # now, not mid-pipeline
        for name in self.pipeline.variants:
            self.variant(name)  # each variant is a valid config, checked now
        if self.labels is not None:
            self._check_labels(self.labels)
        return self

    def _check_labels(self, labels: LabelsConfig) -> None:
        if labels.teacher_expert >= self.experts.num_experts:
            raise ValueError(f"labels.teacher_expert {labels.teacher_expert}: the store has experts 0 .. "
                             f"{self.experts.num_experts - 1}")
        epochs = [*(labels.projector.teacher_epochs or []), *([labels.teacher_epoch] if labels.teacher_epoch else [])]
        if any(e > self.experts.train.epochs for e in epochs):
            raise ValueError(f"labels: teacher epochs {epochs} go past experts.train.epochs ({self.experts.train.epochs})")
        if "hello" in labels.kinds:
            encoder = self.label_encoder()
            if encoder.experts.train.objective != "contrastive" or not encoder.model.arch.startswith("clip"):
                raise ValueError("labels.encoder must make a dual encoder trained contrastively (model.arch clip..., "
                                 "experts.train.objective contrastive)")

    def label_encoder(self) -> ExperimentConfig:
        """The config whose expert 0 is HeLlO's dual encoder: ``labels.encoder`` applied to this one, in
        <run_dir>/labels/encoder."""
        assert self.labels is not None
        defaults = {"run_dir": storage.join(self.run_dir, "labels", "encoder"), "labels": None,
                    "pipeline.variants": {}, "selection": {"method": "none"}, "experts.store": None}
        try:
            return with_overrides(self, {**defaults, **self.labels.encoder})
        except ConfigError as err:
            raise ValueError(f"labels.encoder: {str(err).split(': ', 1)[-1]}") from None

    def variant(self, name: str) -> ExperimentConfig:
        """The config of ``pipeline.variants[name]``: this one with the variant's keys, in its own folder."""
        defaults = {"run_dir": storage.join(self.run_dir, "variants", name), "selection.dir": self.selection_dir,
                    "pipeline.variants": {}}
        try:
            return with_overrides(self, {**defaults, **self.pipeline.variants[name]})
        except ConfigError as err:
            raise ValueError(f"pipeline.variants.{name}: {str(err).split(': ', 1)[-1]}") from None

    @property
    def selection_dir(self) -> str:
        return self.selection.dir or storage.join(self.run_dir, "select")

    def _check_window(self, where: str, distill: DistillConfig) -> None:
        if isinstance(distill, TrajectoryMatchingConfig) and distill.expert_epochs_needed > self.experts.train.epochs:
            raise ValueError(
                f"{where}: max_start_epoch ({distill.max_start_epoch}) + expert_epochs ({distill.expert_epochs}) "
                f"needs experts of {distill.expert_epochs_needed} epochs; "
                f"experts.train.epochs is {self.experts.train.epochs}"
            )

    @property
    def tower_checkpoint(self) -> str | None:
        """Where the pretrained image tower is (or will be) saved, if the config pre-trains one."""
        if self.pretrain is None:
            return None
        return self.pretrain.checkpoint or storage.join(self.run_dir, "pretrain", "tower.safetensors")

    @property
    def store_url(self) -> str:
        return self.experts.store or storage.join(self.run_dir, "trajectories")

    def distill_for(self, ipc: int) -> DistillConfig:
        """The distill section at size ``ipc`` with ``pipeline.per_ipc`` applied."""
        extra = self.pipeline.per_ipc.get(ipc, {})
        try:
            return DISTILL_CONFIG.validate_python({**self.distill.model_dump(), **extra, "ipc": ipc})
        except ValidationError as err:  # raised while the experiment config is validated: names the key
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"][1:] if p != self.distill.method)
            raise ValueError(f"pipeline.per_ipc.{ipc}{'.' + key if key else ''}: {first['msg']}") from None
