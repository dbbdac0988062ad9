"""distill distill <config.yaml> [key=value ...]: distil a synthetic set with the configured method.

    load config -> shards, trajectory store (refused if recorded for another model or data),
    the store's input transform -> synthetic set initialised by the method (real samples or noise)
    -> outer iterations, checkpointed every distill.checkpoint_every to <run_dir>/distill/<method>/ipc-<k>/
    -> synthetic.safetensors, a WebDataset shard, manifest.json and grid.png in the same folder

Run the same command again to resume from the last checkpoint. ``distill.ipc=10`` picks the size;
``distill.method`` the method (mtt, vl); ``resources.distill_workers=W`` (W >= 1) runs W data-parallel
workers on Ray Train.
"""

from __future__ import annotations

import sys

from engine import cli
from engine.distill import DistillConfig
from engine.distill.synthetic import SyntheticSet
from engine.experiment import ExperimentConfig
from engine.runtime import make_runtime
from engine.stages import distill


def run_distill(config: ExperimentConfig, distill_config: DistillConfig | None = None) -> SyntheticSet:
    runtime = make_runtime(config.resources, side_by_side=config.resources.distill_workers > 0)
    return distill.run(config, distill_config or config.distill, runtime)


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_distill)


if __name__ == "__main__":
    sys.exit(cli.main(["distill", *sys.argv[1:]]))
