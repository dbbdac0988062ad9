"""The ``sweep`` section: a Ray Tune search over any keys of an experiment config (``distill sweep``)."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator

from engine.config import Section
from engine.errors import ConfigError
from engine.storage import PathOrURL

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


def check_searcher(sweep: SweepConfig) -> None:
    if sweep.search != "optuna":
        return
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search optuna needs the optuna package (uv add optuna)")
    if any("grid" in spec for spec in sweep.space.values()):
        raise ConfigError("sweep.search optuna cannot search a grid: use choice instead")
