"""distill evaluate <config.yaml> [key=value ...]: distilled sets against coresets of the same size.

    load config -> the training split and evaluate.split (test by default), in the store's input
    transform -> for each size in pipeline.ipcs: the distilled set and each coreset method, trained
    on by evaluate.repeats fresh networks -> <run_dir>/results.json (rows {method, size, metric,
    mean, std, runs}) and <run_dir>/results.md (a table)

The reported split is used for no choice of any kind: tune on evaluate.split=val.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from engine import cli, storage
from engine.evaluate.baselines import classification_rows, results_table
from engine.evaluate.pairs import pair_rows
from engine.experiment import ExperimentConfig, run_job
from engine.runtime.cluster import init_ray


def run_evaluate(config: ExperimentConfig, sizes: list[int] | None = None) -> list[dict[str, Any]]:
    sizes = sizes or config.pipeline.ipcs
    if config.resources.use_ray:
        init_ray(config.resources)  # the splits are decoded on the cluster
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"evaluating at sizes {sizes} on the {config.evaluate.split} split "
          f"({config.evaluate.repeats} networks per set)", flush=True)
    if config.contrastive:
        rows = list(pair_rows(config, sizes, config.evaluate.sizes or sizes, device))
    else:
        rows = list(classification_rows(config, sorted(set(sizes) | set(config.evaluate.sizes or [])), device))
    write_results(config, rows)
    return rows


def write_results(config: ExperimentConfig, rows: list[dict[str, Any]]) -> None:
    table = results_table(rows)
    storage.write_json(storage.join(config.run_dir, "results.json"), rows, config.storage)
    storage.write_text(storage.join(config.run_dir, "results.md"), table, config.storage)
    print(f"\n{table}\nresults: {storage.redact(storage.join(config.run_dir, 'results.json'))}", flush=True)


def main(argv: list[str]) -> int:
    return run_job(argv, __doc__, run_evaluate)


if __name__ == "__main__":
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
