"""distill buffer <config.yaml> [key=value ...]: train N expert trajectories in parallel on Ray.

    load config -> pre-train the image tower if the config has one and it is not cached
    -> write the shards if missing -> read train (and validation) data
    -> open the trajectory store (refusing one recorded for another model, data or recipe)
    -> one Ray Tune trial per expert not yet complete, each resuming from its last saved epoch
       (resources.use_ray false: one after another in this process)
    -> results.json + a table of the experts' final metrics in <run_dir>/buffer/

Running the same command again resumes; two jobs on one store share the work through leases.
"""

from __future__ import annotations

import sys
from typing import Any

from engine import cli
from engine.experiment import ExperimentConfig
from engine.runtime import make_runtime
from engine.stages import buffer


def run_buffer(config: ExperimentConfig) -> dict[str, Any]:
    return buffer.run(config, make_runtime(config.resources, side_by_side=config.experts.num_experts > 1))


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_buffer)


if __name__ == "__main__":
    sys.exit(cli.main(["buffer", *sys.argv[1:]]))
