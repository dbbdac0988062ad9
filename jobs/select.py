"""distill select <config.yaml> [key=value ...]: choose the training samples every later stage uses (BiLP).

    load config -> write the shards if missing
    -> selection.method loss: selection.scoring_runs short runs with the experts' model and recipe
       (side by side on Ray, resumable), every sample's loss at selection.score_at -> scores.json
       selection.method random: a seeded random score per sample
    -> within each class the selection.keep_ratio lowest-scoring samples
    -> <selection.dir or run_dir/select>/<selector>-<settings>/kept-<ratio>.json (sample keys)

buffer, distill and evaluate then read only the kept samples; the pipeline runs this step first. Running
it again reuses the subset, and other keep ratios reuse the scores.
"""

from __future__ import annotations

import sys

from engine import cli
from engine.experiment import ExperimentConfig
from engine.runtime import make_runtime
from engine.select.subset import Subset
from engine.stages import select


def run_select(config: ExperimentConfig) -> Subset | None:
    side_by_side = config.selection.method == "loss" and config.selection.scoring_runs > 1
    subset = select.run(config, make_runtime(config.resources, side_by_side=side_by_side))
    if subset is None:
        print("selection.method is none: every stage reads the whole training split", flush=True)
    return subset


def main(argv: list[str]) -> int:
    return cli.config_job(argv, __doc__, run_select)


if __name__ == "__main__":
    sys.exit(cli.main(["select", *sys.argv[1:]]))
