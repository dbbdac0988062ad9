"""distill pipeline <config.yaml> [key=value ...]: buffer -> distill at every size -> evaluate.

    experts trained in parallel on Ray into <run_dir>/trajectories (skipped when complete, and when the
    method needs no trajectories)
    -> for each size in pipeline.ipcs: the distill section (with pipeline.per_ipc applied)
       into <run_dir>/distill/<method>/ipc-<k>/ (resumed from its checkpoint when interrupted)
    -> the distilled sets against coresets of the same sizes: <run_dir>/results.json and results.md

Every step resumes, so running the same command again after an interruption redoes no finished work.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from engine import cli, storage
from engine.config import to_yaml
from engine.distill import METHODS
from engine.experiment import ExperimentConfig
from jobs.buffer import run_buffer
from jobs.distill import run_distill
from jobs.evaluate import run_evaluate


def run_pipeline(config: ExperimentConfig) -> list[dict[str, Any]]:
    started = time.time()
    storage.write_text(storage.join(config.run_dir, "config.yaml"), to_yaml(config), config.storage)
    if METHODS[config.distill.method].needs_trajectories:
        print("== buffer: expert trajectories", flush=True)
        run_buffer(config)
    for ipc in config.pipeline.ipcs:
        print(f"\n== distill ({config.distill.method}): {ipc} per class", flush=True)
        run_distill(config, config.distill_for(ipc))
    print("\n== evaluate", flush=True)
    rows = run_evaluate(config, config.pipeline.ipcs)
    print(f"pipeline finished in {(time.time() - started) / 60:.1f} min", flush=True)
    return rows


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_pipeline)


if __name__ == "__main__":
    sys.exit(cli.main(["pipeline", *sys.argv[1:]]))
