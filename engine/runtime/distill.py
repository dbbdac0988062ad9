"""Data-parallel distillation on Ray Train: W workers, one synthetic set, gradients all-reduced.

Every worker builds the same synthetic set (same seed), computes the gradients of its own share of each
iteration (worker r takes expert segments r, r + W, …), and losses and gradients are summed with
``torch.distributed.all_reduce`` before every worker applies the same update, so the copies never
diverge. That is exactly the single-process algorithm over W times the work (tested). Rank 0 writes
checkpoints and the outputs; a rerun resumes from the last checkpoint like the single-process run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from torch import Tensor

from engine.resources import ResourcesConfig


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensors


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    threads = loop_config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    rank = context.get_world_rank()
    loop_config["worker"](ray.train.torch.get_device(), rank, context.get_world_size(), _all_reduce_sum, rank == 0)


def distill_on_ray(worker: Callable[..., None], resources: ResourcesConfig) -> None:
    """Run ``worker`` on ``resources.distill_workers`` Ray Train workers; returns when rank 0 has written."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"worker": worker, "threads": max(1, int(resources.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=resources.distill_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name="distill", storage_path=tempfile.mkdtemp(prefix="distill-train-")),
    )
    trainer.fit()
