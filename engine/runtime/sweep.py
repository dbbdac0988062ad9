"""Hyper-parameter sweeps of distillation on Ray Tune.

One trial = one distillation run with some keys of the experiment config replaced, in its own run
folder ``<run_dir>/sweep/trials/<trial id>``; every ``sweep.report_every`` iterations it trains a
fresh network on the current synthetic set and reports its validation score, so ASHA can stop poor
trials early. All trials read the same expert store. An interrupted sweep is resumed from Tune's
experiment folder (``Tuner.restore``), and a restarted trial resumes from its own distillation
checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch

from engine import storage
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig, SweepConfig

EXPERIMENT_NAME = "sweep"


def with_overrides(config: ExperimentConfig, values: dict[str, Any], **fixed: Any) -> ExperimentConfig:
    """``config`` with dotted keys replaced (and validated); secrets are kept as they are."""
    raw = config.model_dump()
    for key, value in {**values, **fixed}.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            node = node[part]
        node[last] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValueError as err:
        raise ConfigError(f"sweep values {values}: {str(err).splitlines()[0:3]}") from None


def check_space(config: ExperimentConfig) -> None:
    """Every key of the space names a config key that accepts the space's first value."""
    check_searcher(config.sweep)
    if not config.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one key to search over")
    for key, spec in config.sweep.space.items():
        kind, values = next(iter(spec.items()))
        sample = values[0]
        try:
            with_overrides(config, {key: sample})
        except ConfigError as err:
            raise ConfigError(f"sweep.space.{key}: {kind} value {sample!r} does not fit the config ({err})") from None


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    makers = {"choice": tune.choice, "grid": tune.grid_search,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: makers[kind](values) for key, spec in sweep.space.items() for kind, values in spec.items()}


def trial_dir(config: ExperimentConfig, trial_id: str) -> str:
    return storage.join(config.run_dir, "sweep", "trials", trial_id)


def _trial(params: dict[str, Any], base: ExperimentConfig) -> None:
    """Tune trainable: distil with ``params`` applied, reporting a quick validation score."""
    from ray import tune

    from engine.distill.setup import prepare_inputs, run_local
    from engine.evaluate.baselines import quick_score

    context = tune.get_context()
    torch.set_num_threads(max(1, int(context.get_trial_resources().required_resources.get("CPU", 1))))
    config = with_overrides(base, params, run_dir=trial_dir(base, context.get_trial_id()),
                            **{"experts.store": base.store_url, "evaluate.split": base.experts.val_split or "val"})
    inputs = prepare_inputs(config, config.distill)
    scorer = quick_score(config)
    every, last = config.sweep.report_every, config.distill.iterations

    def report(iteration: int, loss: float, synthetic) -> None:
        if iteration % every == 0 or iteration == last:
            tune.report({config.sweep.metric: scorer(synthetic), "iteration": iteration, "matching_loss": loss})

    run_local(inputs, progress=False, on_iteration=report)


def _tune_storage(config: ExperimentConfig) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Tune's experiment folder, local or s3://."""
    url = config.sweep.storage or storage.join(config.run_dir, "sweep", "tune")
    if not storage.is_remote(url):
        return url, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(url, config.storage)
    return path, PyFileSystem(FSSpecHandler(fs))


def run_sweep(config: ExperimentConfig, verbose: int = 1):
    """Run (or resume) the sweep; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep, resources = config.sweep, config.resources
    reports = -(-config.distill.iterations // sweep.report_every)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=sweep.grace_period,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(_trial, base=copy.deepcopy(config)),
                                    {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker})
    storage_path, filesystem = _tune_storage(config)
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


def check_searcher(sweep: SweepConfig) -> None:
    if sweep.search != "optuna":
        return
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search optuna needs the optuna package (uv add optuna)")
    if any("grid" in spec for spec in sweep.space.values()):
        raise ConfigError("sweep.search optuna cannot search a grid: use choice instead")


def _searcher(sweep: SweepConfig):
    if sweep.search == "random":
        return None  # Tune's default: random samples (and every grid point)
    from ray.tune.search.optuna import OptunaSearch

    check_searcher(sweep)
    return OptunaSearch(seed=sweep.seed)
