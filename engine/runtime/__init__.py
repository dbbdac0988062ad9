"""The thin Ray layer behind one small interface (``engine.stages.Runtime``): where data is decoded,
experts trained, distillation and sweeps run. ``LocalRuntime`` does it all in this process (no Ray at
all); ``RayRuntime`` on a Ray cluster (Ray Data, Ray Tune trials, Ray Train workers). Stages take a
runtime and never import Ray themselves; jobs choose one with ``make_runtime``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from engine.data.memory import InMemoryData, load_in_memory, local_source
from engine.data.shards import DataConfig
from engine.data.stream import ShardSource
from engine.errors import ConfigError
from engine.resources import ResourcesConfig, default_device
from engine.search import SweepConfig
from engine.storage import StorageConfig
from engine.trajectories.experts import ExpertPlan, train_one

Progress = Callable[[int, int, Any], None]  # (expert id, epoch, TrainState)
DistillWorker = Callable[..., None]  # (device, rank, world_size, reduce, progress) -> None; rank 0 writes outputs
Trial = Callable[[dict[str, Any], str, Callable[[dict[str, float]], None]], None]  # (values, trial id, report)


class LocalRuntime:
    """Everything in this process, one item after another: laptops, debugging, single-process stages."""

    def load_split(self, data: DataConfig, storage_config: StorageConfig | None = None) -> InMemoryData:
        return load_in_memory(data, storage_config)

    def source(self, data: DataConfig, storage_config: StorageConfig | None = None,
               columns: Sequence[str] | None = None, keep: frozenset[str] | None = None) -> ShardSource:
        return local_source(data, storage_config, columns, keep)

    def train_experts(self, plan: ExpertPlan, expert_ids: Sequence[int], progress: Progress) -> None:
        for expert_id in expert_ids:
            train_one(plan, expert_id, on_epoch=lambda epoch, state, e=expert_id: progress(e, epoch, state))

    def distill(self, worker: DistillWorker) -> None:
        worker(default_device(), 0, 1, None, True)

    def sweep(self, trial: Trial, sweep: SweepConfig, iterations: int, storage_url: str,
              storage_config: StorageConfig | None = None) -> Any:
        raise ConfigError("sweeps run trials side by side on Ray Tune: set resources.use_ray true (or leave it unset)")


class RayRuntime:
    """On the Ray cluster in RAY_ADDRESS, or a local one started on first use."""

    def __init__(self, resources: ResourcesConfig):
        self.resources = resources

    def load_split(self, data: DataConfig, storage_config: StorageConfig | None = None) -> InMemoryData:
        from engine.runtime.cluster import init_ray
        from engine.runtime.data import materialize

        init_ray(self.resources)
        return materialize(data, storage_config)

    def source(self, data: DataConfig, storage_config: StorageConfig | None = None,
               columns: Sequence[str] | None = None, keep: frozenset[str] | None = None) -> ShardSource:
        from engine.runtime.cluster import init_ray
        from engine.runtime.data import RayShardSource

        init_ray(self.resources)
        source = RayShardSource(data, storage_config, columns, keep)
        if source.cached:
            source.fill_cache()  # now, while the CPUs are free: workers started later only read it
        return source

    def train_experts(self, plan: ExpertPlan, expert_ids: Sequence[int], progress: Progress) -> None:
        from engine.runtime.cluster import init_ray
        from engine.runtime.experts import train_experts_on_ray

        init_ray(self.resources)
        train_experts_on_ray(plan, expert_ids, self.resources)

    def distill(self, worker: DistillWorker) -> None:
        if not self.resources.distill_workers:
            LocalRuntime().distill(worker)
            return
        from engine.runtime.cluster import init_ray
        from engine.runtime.distill import distill_on_ray

        init_ray(self.resources)
        distill_on_ray(worker, self.resources)

    def sweep(self, trial: Trial, sweep: SweepConfig, iterations: int, storage_url: str,
              storage_config: StorageConfig | None = None) -> Any:
        from engine.runtime.cluster import init_ray
        from engine.runtime.sweep import run_sweep

        init_ray(self.resources)
        return run_sweep(trial, sweep, iterations, self.resources, storage_url, storage_config)


def make_runtime(resources: ResourcesConfig, side_by_side: bool = False) -> LocalRuntime | RayRuntime:
    """The runtime a stage runs on: ``resources.use_ray`` if set; otherwise Ray when the stage runs work
    side by side (``side_by_side``) or a cluster is named in RAY_ADDRESS, this process when not."""
    use_ray = resources.use_ray
    if use_ray is None:
        use_ray = side_by_side or bool(os.environ.get("RAY_ADDRESS"))
    return RayRuntime(resources) if use_ray else LocalRuntime()
