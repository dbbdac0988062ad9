"""distill pipeline <config.yaml> [key=value ...]: select -> buffer -> distill at every size -> evaluate.

    for the config, then each of pipeline.variants (in <run_dir>/variants/<name>):
        the kept subset, when selection.method selects one (<run_dir>/select, shared by the variants)
        -> experts trained in parallel on Ray into <run_dir>/trajectories (skipped when complete, and when
           the method needs no trajectories and no coreset looks at an expert)
        -> for each size in pipeline.ipcs: the distill section (with pipeline.per_ipc applied) into
           <run_dir>/distill/<method>/ipc-<k>/ (resumed from its checkpoint when interrupted)
    -> the distilled sets of the config and of every variant against coresets of the same sizes, in one
       table: <run_dir>/results.json and results.md
A config with a ``labels`` section runs the label-space experiment instead (`distill labels`, jobs/labels.py).

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
from engine.select import NEEDS_EXPERT
from jobs.buffer import run_buffer
from jobs.distill import run_distill
from jobs.evaluate import run_evaluate
from jobs.labels import run_labels
from jobs.select import run_select


def distill_sizes(config: ExperimentConfig, name: str, evaluates_coresets: bool) -> None:
    """One configuration's steps: its kept subset, its experts (if it or the coresets need them), each size."""
    if config.selection.active:
        print(f"\n== select ({name}): {config.selection.method}, keep {config.selection.keep_ratio:g}", flush=True)
        run_select(config)
    needs_experts = METHODS[config.distill.method].needs_trajectories
    if needs_experts or (evaluates_coresets and NEEDS_EXPERT & set(config.evaluate.methods)):
        print(f"\n== buffer ({name}): expert trajectories", flush=True)
        run_buffer(config)
    for ipc in config.pipeline.ipcs:
        print(f"\n== distill ({name}, {config.distill.method}): {ipc} per class", flush=True)
        run_distill(config, config.distill_for(ipc))


def run_pipeline(config: ExperimentConfig) -> list[dict[str, Any]]:
    started = time.time()
    storage.write_text(storage.join(config.run_dir, "config.yaml"), to_yaml(config), config.storage)
    if config.labels is not None:
        rows = run_labels(config)
        print(f"pipeline finished in {(time.time() - started) / 60:.1f} min", flush=True)
        return rows
    distill_sizes(config, config.distill.method, evaluates_coresets=True)
    for name in config.pipeline.variants:
        distill_sizes(config.variant(name), name, evaluates_coresets=False)
    print("\n== evaluate", flush=True)
    rows = run_evaluate(config, config.pipeline.ipcs)
    print(f"pipeline finished in {(time.time() - started) / 60:.1f} min", flush=True)
    return rows


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_pipeline)


if __name__ == "__main__":
    sys.exit(cli.main(["pipeline", *sys.argv[1:]]))
