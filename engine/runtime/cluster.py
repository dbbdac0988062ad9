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
        # "local": a new cluster even if an earlier `ray start` left its address in /tmp/ray
        num_cpus = resources.num_cpus if resources is not None else None
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
                 logging_level="WARNING" if quiet else "INFO")
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
