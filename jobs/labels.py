"""distill labels <config.yaml> [key=value ...]: label-space lightening (HeLlO) against stored soft labels.

    the teacher's experts (<run_dir>/trajectories; skipped when complete)
    -> the dual encoder's experts (labels.encoder, in <run_dir>/labels/encoder) when labels.kinds has hello
    -> the distilled set at labels.ipc when labels.images has distilled
    -> students of every image source under hard, stored soft and projected labels (engine/stages/labels.py):
       <run_dir>/labels/results.json and results.md

Every step resumes: a second run redoes no finished work.
"""

from __future__ import annotations

import sys
from typing import Any

from engine import cli
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig
from engine.runtime import make_runtime
from engine.stages import labels
from jobs.buffer import run_buffer
from jobs.distill import run_distill


def run_labels(config: ExperimentConfig) -> list[dict[str, Any]]:
    if config.labels is None:
        raise ConfigError("the config has no labels section (see configs/cifar10-hello.yaml)")
    print("\n== buffer: the teacher's trajectories", flush=True)
    run_buffer(config)
    if "hello" in config.labels.kinds:
        print("\n== buffer: the projector's dual encoder (labels.encoder)", flush=True)
        run_buffer(config.label_encoder())
    if "distilled" in config.labels.images:
        print(f"\n== distill ({config.distill.method}): {config.labels.ipc} per class", flush=True)
        run_distill(config, config.distill_for(config.labels.ipc))
    print("\n== labels", flush=True)
    return labels.run(config, make_runtime(config.resources, side_by_side=False))


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_labels)


if __name__ == "__main__":
    sys.exit(cli.main(["labels", *sys.argv[1:]]))
