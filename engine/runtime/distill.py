"""Data-parallel distillation on Ray Train: W workers, one synthetic set, gradients all-reduced.

Every worker builds the same synthetic set (same seed), computes the matching gradients of its own
expert segments (worker r takes segments r, r + W, … of each iteration), and the gradients and
losses are summed with ``torch.distributed.all_reduce`` before every worker applies the same
update, so the copies never diverge. That is exactly the single-process algorithm averaging over
W x segments_per_iteration segments (tested). Rank 0 writes checkpoints and the outputs; a rerun
resumes from the last checkpoint like the single-process run.
"""

from __future__ import annotations

import tempfile
from typing import Any

from torch import Tensor

from engine.distill.setup import DistillInputs, build_distiller, finish
from engine.distill.synthetic import SyntheticSet
from engine.runtime.cluster import ResourcesConfig


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensors


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    inputs: DistillInputs = loop_config["inputs"]
    context = ray.train.get_context()
    threads = loop_config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    distiller = build_distiller(inputs, ray.train.torch.get_device(), rank=context.get_world_rank(),
                                world_size=context.get_world_size(), reduce=_all_reduce_sum)
    distiller.run(progress=context.get_world_rank() == 0)
    if context.get_world_rank() == 0:
        finish(inputs, distiller)


def distill_on_ray(inputs: DistillInputs, resources: ResourcesConfig) -> SyntheticSet:
    """Run ``resources.distill_workers`` workers; returns the distilled set rank 0 wrote."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"inputs": inputs, "threads": max(1, int(resources.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=resources.distill_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name="distill", storage_path=tempfile.mkdtemp(prefix="distill-train-")),
    )
    trainer.fit()
    return SyntheticSet.load(inputs.out_url, inputs.storage_config)
