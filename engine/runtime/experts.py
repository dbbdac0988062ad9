"""Experts in parallel on Ray Tune: one trial per expert.

Why Tune rather than bare tasks: each expert is a long, independent run, which is what Tune trials
are for. ``tune.with_resources`` gives each one its CPUs and (fractional) GPUs, Tune schedules them
as the autoscaler adds nodes, retries a trial whose node died, and shows a live status table.
Tune's own bookkeeping is not used for resuming: the trajectory store decides what is done, so a
resubmitted job only starts trials for experts that are not complete, and each trial resumes its
expert from the last saved epoch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

from engine.resources import ResourcesConfig
from engine.trajectories.experts import ExpertPlan, train_one
from engine.trajectories.train import TrainState


def _expert_trial(config: dict, plan: ExpertPlan) -> None:
    """Tune trainable: one expert, reporting each epoch's metrics."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1))))
    expert_id = int(config["expert_id"])

    def report(epoch: int, state: TrainState) -> None:
        tune.report({"expert": expert_id, "epoch": epoch, **state.metrics})

    status = train_one(plan, expert_id, on_epoch=report)
    if status is None:
        tune.report({"expert": expert_id, "skipped": 1})


def train_experts_on_ray(plan: ExpertPlan, expert_ids: Sequence[int], resources: ResourcesConfig,
                         verbose: int = 1) -> None:
    """Run one Tune trial per expert id with the configured resources; returns when all have ended."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_expert_trial, plan=plan),
        {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"expert_id": tune.grid_search(list(expert_ids))},
        tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or 0),
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
