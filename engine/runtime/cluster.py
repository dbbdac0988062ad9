"""Joining a Ray cluster, or starting a local one: the one place the engine calls ``ray.init``."""

from __future__ import annotations

import os

from engine.resources import ResourcesConfig


def init_ray(resources: ResourcesConfig | None = None, quiet: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not quiet)
    else:
        _workers_run_this_interpreter()
        # "local": a new cluster even if an earlier `ray start` left its address in /tmp/ray
        num_cpus = resources.num_cpus if resources is not None else None
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
                 logging_level="WARNING" if quiet else "INFO")
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False


def _workers_run_this_interpreter() -> None:
    """A local cluster's workers run this process's interpreter and venv. Otherwise, for a driver started
    by `uv run`, Ray makes every worker a `uv run` of the working directory: a fresh venv built (and its
    bytecode compiled) for the cluster, then a `uv run` per worker start, 7-30 s per job for nothing on one
    machine. (On a remote cluster that is what carries the lock file to the nodes, so it stays on there.)
    An explicit RAY_ENABLE_UV_RUN_RUNTIME_ENV is left as it is."""
    if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" in os.environ:
        return
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # for Ray imported later, and child processes
    from ray._private import ray_constants  # read at each ray.init, whenever ray was imported

    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
