"""Experts in parallel on Ray: one Ray Tune trial per expert, each a single worker or a Ray Train run.

Why Tune rather than bare tasks: each expert is a long, independent run, which is what Tune trials
are for. ``tune.with_resources`` gives each one its CPUs and (fractional) GPUs, Tune schedules them
as the autoscaler adds nodes, retries a trial whose node died, and shows a live status table.
Tune's own bookkeeping is not used for resuming: the trajectory store decides what is done, so a
resubmitted job only starts trials for experts that are not complete, and each trial resumes its
expert from the last saved epoch.

Two shapes of trial (``resources.expert_trainer``):

- ``trial``: the trial trains the expert itself. Cheapest (no extra actors); used when the training
  split is cached in the object store (decoded once, read by every trial) and an expert is one worker.
- ``train``: the trial runs a ``TorchTrainer`` of ``resources.expert_workers`` workers, data-parallel
  (each worker a share of every epoch, gradients averaged with all-reduce; rank 0 writes the store).
  Used for experts of several workers and for streamed (uncached) data, whose decoding Ray Data then
  schedules beside the workers. ``auto`` picks between the two.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence

from torch import Tensor

from engine.resources import ResourcesConfig
from engine.trajectories.experts import ExpertPlan, TrainingData, open_store, train_claimed, train_one
from engine.trajectories.train import TrainState

REPORT_EVERY_S = 10.0  # how often a trial shows its expert's progress in Tune's table


def _set_threads() -> None:
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1))))


def _expert_trial(config: dict, plan: ExpertPlan) -> None:
    """Tune trainable: one expert trained in the trial, reporting each epoch's metrics."""
    from ray import tune

    _set_threads()
    expert_id = int(config["expert_id"])
    last_report = time.monotonic()

    def report(epoch: int, state: TrainState) -> None:
        # tune.report blocks the trial until Tune's driver loop has taken the result (a round trip of
        # ~0.1 s on a busy machine): every REPORT_EVERY_S, not every epoch. The store has every epoch.
        nonlocal last_report
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            tune.report({"expert": expert_id, "epoch": epoch, **state.metrics})
            last_report = time.monotonic()

    status = train_one(plan, expert_id, on_epoch=report)
    if status is None:
        tune.report({"expert": expert_id, "skipped": 1})
    else:
        tune.report({"expert": expert_id, "epoch": status.epochs, "complete": 1, **status.metrics[-1]})


def _mean_over_workers(tensors: list[Tensor]) -> list[Tensor]:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensors


def _expert_worker(loop_config: dict) -> None:
    """One Ray Train worker of a data-parallel expert; the trial holds the lease as ``owner``."""
    import ray.train

    context = ray.train.get_context()
    plan, expert_id = loop_config["plan"], loop_config["expert_id"]
    store = open_store(plan, owner=loop_config["owner"])
    world = context.get_world_size()
    train_claimed(plan, expert_id, store, rank=context.get_world_rank(), workers=world,
                  reduce=_mean_over_workers if world > 1 else None)


def _expert_trainer_trial(config: dict, plan: ExpertPlan, resources: ResourcesConfig) -> None:
    """Tune trainable: claim one expert, then train it with a TorchTrainer of ``expert_workers`` workers."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    expert_id = int(config["expert_id"])
    store = open_store(plan)
    if expert_id in store.experts():
        tune.report({"expert": expert_id, "complete": 1})
        return
    if not store.claim(expert_id):
        tune.report({"expert": expert_id, "skipped": 1})
        return
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        _expert_worker,
        train_loop_config={"plan": plan, "expert_id": expert_id, "owner": store.owner},
        scaling_config=ScalingConfig(num_workers=resources.expert_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"expert-{expert_id}", storage_path=tempfile.mkdtemp(prefix="distill-expert-")),
    )
    trainer.fit()
    tune.report({"expert": expert_id, "complete": 1, **store.status(expert_id).metrics[-1]})


def uses_ray_train(plan: ExpertPlan, resources: ResourcesConfig) -> bool:
    """``resources.expert_trainer``, with ``auto`` resolved: Ray Train for experts of several workers and
    for data streamed from shards every epoch; a plain trial for one worker on cached data."""
    if resources.expert_trainer != "auto":
        return resources.expert_trainer == "train"
    streamed = isinstance(plan.data, TrainingData) and not getattr(plan.data.source, "cached", True)
    return resources.expert_workers > 1 or streamed


def train_experts_on_ray(plan: ExpertPlan, expert_ids: Sequence[int], resources: ResourcesConfig,
                         verbose: int = 1) -> None:
    """Run one Tune trial per expert id with the configured resources; returns when all have ended."""
    from ray import tune

    if isinstance(plan.data, TrainingData) and getattr(plan.data.source, "cached", False):
        plan.data.source.fill_cache()  # decoded once, before any trial holds the CPUs
    if uses_ray_train(plan, resources):
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs and GPUs (a trial must ask
        # for something: a token amount of memory).
        trainable = tune.with_resources(
            tune.with_parameters(_expert_trainer_trial, plan=plan, resources=resources), {"cpu": 0, "memory": 1024})
    else:
        trainable = tune.with_resources(
            tune.with_parameters(_expert_trial, plan=plan),
            {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker},
        )
    tuner = tune.Tuner(
        trainable,
        param_space={"expert_id": tune.grid_search(list(expert_ids))},
        # A trial's actor process imports torch, Ray Tune and the engine (7-9 s on 2 cores): reused, the
        # next expert starts in the process the last one ended in, so each CPU pays that once per job.
        tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or 0, reuse_actors=True),
        run_config=tune.RunConfig(
            name="experts",
            storage_path=tempfile.mkdtemp(prefix="distill-tune-"),  # bookkeeping only; the store is the truth
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=verbose,
        ),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        raise failed[0].error
