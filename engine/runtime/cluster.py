"""Joining a Ray cluster, or starting a local one."""

from __future__ import annotations

import os

from pydantic import Field

from engine.config import Section


class ResourcesConfig(Section):
    """What each unit of work asks Ray for, and the local cluster's size when none is running."""

    use_ray: bool = Field(True, description="False: run the work one item after another in this process.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per expert / trial / worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; fractions share a GPU.")
    distill_workers: int = Field(
        0, ge=0, description="0: distil in this process; W >= 1: W data-parallel workers on Ray Train."
    )
    max_concurrent: int | None = Field(None, ge=1, description="At most this many at once (default: as resources allow).")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local cluster started when RAY_ADDRESS is unset and none runs."
    )


def init_ray(resources: ResourcesConfig) -> None:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # "local": a new cluster even if an earlier `ray start` left its address in /tmp/ray
        ray.init(address="local", num_cpus=resources.num_cpus, include_dashboard=False)
