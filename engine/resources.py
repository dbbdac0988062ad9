"""The ``resources`` section: what each unit of work asks for, and where work runs."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from engine.config import Section


class ResourcesConfig(Section):
    """What each unit of work asks Ray for, and the local cluster's size when none is running."""

    use_ray: bool | None = Field(
        None, description="None (auto): Ray for the stages that run work side by side (experts, sweeps, "
        "data-parallel distillation) and whenever RAY_ADDRESS names a cluster; one process otherwise. "
        "True: always Ray. False: everything in this process, one item after another.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per expert / trial / worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; fractions share a GPU.")
    distill_workers: int = Field(
        0, ge=0, description="0: distil in this process; W >= 1: W data-parallel workers on Ray Train."
    )
    expert_workers: int = Field(1, ge=1, description="Data-parallel workers per expert (Ray Train when > 1).")
    expert_trainer: Literal["auto", "trial", "train"] = Field(
        "auto", description="trial: each expert's Tune trial trains it; train: a TorchTrainer per expert; "
        "auto: train for several workers or data streamed every epoch, trial otherwise.")
    max_concurrent: int | None = Field(None, ge=1, description="At most this many at once (default: as resources allow).")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local cluster started when RAY_ADDRESS is unset and none runs."
    )

    @model_validator(mode="after")
    def _workers_need_ray(self) -> ResourcesConfig:
        if self.use_ray is False and self.distill_workers:
            raise ValueError(f"resources.distill_workers {self.distill_workers} runs data-parallel workers on Ray "
                             "Train; it cannot be combined with resources.use_ray false")
        if self.use_ray is False and self.expert_workers > 1:
            raise ValueError(f"resources.expert_workers {self.expert_workers} runs data-parallel experts on Ray "
                             "Train; it cannot be combined with resources.use_ray false")
        return self


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
