"""distill evaluate <config.yaml> [key=value ...]: distilled sets against coresets of the same size.

    load config -> the training split and evaluate.split (test by default), in the store's input
    transform -> for each size in pipeline.ipcs: the distilled set (and, when distillation kept
    snapshots, the snapshot best on evaluate.best_snapshot_split) and each coreset method, trained on
    by evaluate.repeats fresh networks -> <run_dir>/results.json and <run_dir>/results.md (a table)

results.json is {"header": {split, evaluation seeds, training recipe, data, package versions, commit},
"rows": [{method, size, metric, mean, std, runs, seeds, lr, epochs, ...}]}: enough to reproduce every
number. A results.json scored on another split is kept as results-<split>.json, never overwritten.
The reported split is used for no choice of any kind: tune on evaluate.split=val.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import torch

from engine import cli, storage
from engine.evaluate.baselines import classification_rows, results_table
from engine.evaluate.pairs import pair_rows
from engine.experiment import ExperimentConfig, data_fingerprint, prepare_data, run_job
from engine.provenance import package_versions, source_commit
from engine.runtime.cluster import init_ray
from engine.seeds import evaluation_seeds

RESULTS = "results.json"


def run_evaluate(config: ExperimentConfig, sizes: list[int] | None = None) -> list[dict[str, Any]]:
    sizes = sizes or config.pipeline.ipcs
    if config.resources.use_ray:
        init_ray(config.resources)  # the splits are decoded on the cluster
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = results_header(config)
    print(f"evaluating at sizes {sizes} on the {config.evaluate.split} split "
          f"({config.evaluate.repeats} networks per set, seeds {header['evaluation_seeds']})", flush=True)
    if config.contrastive:
        rows = list(pair_rows(config, sizes, config.evaluate.sizes or sizes, device))
    else:
        rows = list(classification_rows(config, sorted(set(sizes) | set(config.evaluate.sizes or [])), device))
    write_results(config, header, rows)
    return rows


def results_header(config: ExperimentConfig) -> dict[str, Any]:
    """How every row was measured; rows add their own lr, epochs and seeds."""
    ev = config.evaluate
    return {
        "split": ev.split,
        "data": data_fingerprint(config, prepare_data(config)),
        "evaluation_seeds": evaluation_seeds(ev.seed, ev.repeats),
        "repeats": ev.repeats,
        "train": ev.train.model_dump(mode="json"),
        "full_epochs": ev.full_epochs,
        "use_learned_lr": ev.use_learned_lr,
        "best_snapshot_split": ev.best_snapshot_split if ev.selects_best_snapshot else None,
        "model": (ev.model or config.model).model_dump(mode="json"),
        "store": storage.redact(config.store_url),
        "versions": package_versions(),
        "commit": source_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_results(config: ExperimentConfig, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    url = storage.join(config.run_dir, RESULTS)
    keep_other_split(config, header["split"])
    table = results_table(rows)
    storage.write_json(url, {"header": header, "rows": rows}, config.storage)
    storage.write_text(storage.join(config.run_dir, "results.md"), table, config.storage)
    print(f"\n{table}\nresults: {storage.redact(url)}", flush=True)


def keep_other_split(config: ExperimentConfig, split: str) -> None:
    """A results.json scored on another split is renamed to results-<its split>.json (and .md), with a note."""
    url = storage.join(config.run_dir, RESULTS)
    if not storage.exists(url, config.storage):
        return
    previous = storage.read_json(url, config.storage)
    old_split = previous.get("header", {}).get("split") if isinstance(previous, dict) else None
    if old_split is None or old_split == split:  # unknown (an old list of rows) or the same split: replaced
        return
    for name in (RESULTS, "results.md"):
        old = storage.join(config.run_dir, name)
        if storage.exists(old, config.storage):
            kept = storage.join(config.run_dir, name.replace("results", f"results-{old_split}"))
            storage.write_bytes(kept, storage.read_bytes(old, config.storage), config.storage)
    print(f"{storage.redact(url)} held scores on the {old_split!r} split; kept as results-{old_split}.json "
          f"before writing the {split!r} results", flush=True)


def main(argv: list[str]) -> int:
    return run_job(argv, __doc__, run_evaluate)


if __name__ == "__main__":
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
