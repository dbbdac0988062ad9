"""distill distill <config.yaml> [key=value ...]: trajectory matching from a store into a synthetic set.

    load config -> shards, trajectory store (refused if recorded for another model or data),
    the store's input transform -> synthetic set initialised from real samples (or noise)
    -> matching iterations, checkpointed every distill.checkpoint_every to <run_dir>/distill/ipc-<k>/
    -> synthetic.safetensors, a WebDataset shard, manifest.json and grid.png in the same folder

Run the same command again to resume from the last checkpoint. ``distill.ipc=10`` picks the size;
``resources.distill_workers=W`` (W >= 1) runs W data-parallel workers on Ray Train.
"""

from __future__ import annotations

import sys

from engine import cli, storage
from engine.config import to_yaml
from engine.distill.config import DistillConfig
from engine.distill.setup import prepare_inputs, run_local
from engine.distill.synthetic import SyntheticSet
from engine.experiment import ExperimentConfig, run_job
from engine.runtime.cluster import init_ray


def run_distill(config: ExperimentConfig, distill: DistillConfig | None = None, progress: bool = True) -> SyntheticSet:
    distill = distill or config.distill
    inputs = prepare_inputs(config, distill)
    if config.resources.distill_workers:
        from engine.runtime.distill import distill_on_ray

        init_ray(config.resources)
        result = distill_on_ray(inputs, config.resources)
    else:
        result = run_local(inputs, progress=progress)
    storage.write_text(storage.join(inputs.out_url, "config.yaml"), to_yaml(config), config.storage)
    steps = ", ".join(f"{a:.4g}" for a in result.alphas.tolist())
    what = f"{len(result)} pairs" if result.text is not None else f"{len(result)} images ({distill.ipc} per class)"
    matched, full = result.metadata["matched_parameters"], result.metadata["full_matching_parameters"]
    print(f"distilled {what} in {storage.redact(inputs.out_url)}, matching {matched:,} parameters "
          f"({result.metadata['record']}; full matching: {full:,}, {matched / full:.2f}x); "
          f"learned step sizes {steps}", flush=True)
    return result


def main(argv: list[str]) -> int:
    return run_job(argv, __doc__, run_distill)


if __name__ == "__main__":
    sys.exit(cli.main(["distill", *sys.argv[1:]]))
