"""distill sweep <config.yaml> [key=value ...]: search distillation hyper-parameters with Ray Tune.

    load config -> check sweep.space against the config -> experts (buffer; skipped when complete)
    -> one Tune trial per sample of the space, each a distillation in <run_dir>/sweep/trials/<id>/
       reporting a quick validation score every sweep.report_every iterations (ASHA stops poor ones)
    -> <run_dir>/sweep/results.json and results.md (every trial, stopped early or not)
       and <run_dir>/sweep/best.yaml: the whole config with the best values, ready to run

Running the same command again resumes an interrupted sweep. Example space (in the config):

    sweep:
      space:
        distill.lr_img: {loguniform: [10, 1000]}
        distill.syn_steps: {choice: [10, 20, 40]}
        distill.init: {grid: [real, noise]}
"""

from __future__ import annotations

import sys
from typing import Any

from engine import cli
from engine.experiment import ExperimentConfig
from engine.runtime import LocalRuntime, RayRuntime
from engine.stages import sweep
from engine.stages.sweep import check_space
from jobs.buffer import run_buffer


def run(config: ExperimentConfig) -> list[dict[str, Any]]:
    check_space(config)
    run_buffer(config)
    return sweep.run(config, RayRuntime(config.resources), LocalRuntime())


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run)


if __name__ == "__main__":
    sys.exit(cli.main(["sweep", *sys.argv[1:]]))
