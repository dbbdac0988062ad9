"""Hyper-parameter sweeps on Ray Tune: one trial per sample of the search space.

The trial itself comes from the sweep stage (a distillation with some config keys replaced, reporting a
quick validation score every ``sweep.report_every`` iterations), so ASHA can stop poor trials early.
An interrupted sweep is resumed from Tune's experiment folder (``Tuner.restore``), and a restarted
trial resumes from its own distillation checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine import storage
from engine.resources import ResourcesConfig
from engine.search import SweepConfig, check_searcher
from engine.storage import StorageConfig

EXPERIMENT_NAME = "sweep"
Trial = Callable[[dict[str, Any], str, Callable[[dict[str, float]], None]], None]


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    makers = {"choice": tune.choice, "grid": tune.grid_search,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: makers[kind](values) for key, spec in sweep.space.items() for kind, values in spec.items()}


def _trainable(params: dict[str, Any], trial: Trial) -> None:
    """Tune trainable: the stage's trial with this sample's values, reporting through Tune."""
    from ray import tune

    context = tune.get_context()
    torch.set_num_threads(max(1, int(context.get_trial_resources().required_resources.get("CPU", 1))))
    trial(params, context.get_trial_id(), tune.report)


def _tune_storage(url: str, storage_config: StorageConfig | None) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Tune's experiment folder, local or s3://."""
    if not storage.is_remote(url):
        return url, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(url, storage_config)
    return path, PyFileSystem(FSSpecHandler(fs))


def run_sweep(trial: Trial, sweep: SweepConfig, iterations: int, resources: ResourcesConfig, storage_url: str,
              storage_config: StorageConfig | None = None, verbose: int = 1):
    """Run (or resume) the sweep; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    reports = -(-iterations // sweep.report_every)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=sweep.grace_period,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(_trainable, trial=trial),
                                    {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker})
    storage_path, filesystem = _tune_storage(storage_url, storage_config)
    if tune.Tuner.can_restore(storage.join(storage_path, EXPERIMENT_NAME), storage_filesystem=filesystem):
        print(f"resuming the sweep in {storage.redact(storage_path)}/{EXPERIMENT_NAME}", flush=True)
        tuner = tune.Tuner.restore(storage.join(storage_path, EXPERIMENT_NAME), trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        search_alg=_searcher(sweep), num_samples=sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent or 0),
            run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=storage_path,
                                      storage_filesystem=filesystem, verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()


def _searcher(sweep: SweepConfig):
    if sweep.search == "random":
        return None  # Tune's default: random samples (and every grid point)
    from ray.tune.search.optuna import OptunaSearch

    check_searcher(sweep)
    return OptunaSearch(seed=sweep.seed)
