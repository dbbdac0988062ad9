"""Stages: an experiment config in, artifacts in the run folder out. The only code that reads
``ExperimentConfig``; it runs no Ray itself but asks a ``Runtime`` (``engine.runtime``: local or Ray)
to decode splits, train experts side by side, run data-parallel distillation and sweeps.

    context    what every stage derives the same way (shards, model spec, fingerprints, splits, captions)
    pretrain   the image tower of image-text configs        buffer    expert trajectories
    distill    a synthetic set per size                     evaluate  distilled sets vs coresets
    sweep      distillation hyper-parameters on Ray Tune
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from engine.data.memory import InMemoryData
from engine.data.shards import DataConfig
from engine.data.stream import ShardSource
from engine.search import SweepConfig
from engine.storage import StorageConfig
from engine.trajectories.experts import ExpertPlan


class Runtime(Protocol):
    """Where a stage's work runs (``engine.runtime.LocalRuntime`` or ``RayRuntime``)."""

    def load_split(self, data: DataConfig, storage_config: StorageConfig | None = None) -> InMemoryData:
        """A whole split in memory: for the small ones (validation, test, synthetic-set initialisation)."""
        ...

    def source(self, data: DataConfig, storage_config: StorageConfig | None = None,
               columns: Sequence[str] | None = None, keep: frozenset[str] | None = None) -> ShardSource:
        """A split's decoded shards for streams (``engine.data.stream``): the training split, never held whole;
        ``keep``: only the samples with these keys (a kept subset) are decoded."""
        ...

    def train_experts(self, plan: ExpertPlan, expert_ids: Sequence[int],
                      progress: Callable[[int, int, Any], None]) -> None: ...

    def distill(self, worker: Callable[..., None]) -> None: ...

    def sweep(self, trial: Callable[..., None], sweep: SweepConfig, iterations: int, storage_url: str,
              storage_config: StorageConfig | None = None) -> Any: ...
