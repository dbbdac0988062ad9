"""distill evaluate <config.yaml> [key=value ...]: distilled sets against coresets of the same size.

    load config -> the training split and evaluate.split (test by default), in the store's input
    transform -> for each size in pipeline.ipcs: the distilled set (and, when distillation kept
    snapshots, the snapshot best on evaluate.best_snapshot_split) and each coreset method, trained on
    by evaluate.repeats fresh networks -> <run_dir>/results.json, results.md and evaluate/config.yaml

results.json is {"header": {split, evaluation seeds, training recipe, data, package versions, commit},
"rows": [{method, size, metric, mean, std, runs, seeds, lr, epochs, ...}]}: enough to reproduce every
number. A results.json scored on another split is kept as results-<split>.json, never overwritten.
The reported split is used for no choice of any kind: tune on evaluate.split=val.
"""

from __future__ import annotations

import sys
from typing import Any

from engine import cli
from engine.experiment import ExperimentConfig
from engine.runtime import make_runtime
from engine.stages import evaluate


def run_evaluate(config: ExperimentConfig, sizes: list[int] | None = None) -> list[dict[str, Any]]:
    return evaluate.run(config, make_runtime(config.resources), sizes)


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_evaluate)


if __name__ == "__main__":
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
