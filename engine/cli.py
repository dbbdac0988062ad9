"""The one command line: ``distill <job> [config.yaml] [key=value ...]``.

Each job is a module ``jobs.<name>`` with ``main(argv) -> int``; ``python -m jobs.<name>`` takes the
same arguments, which is what ``ray job submit -- python -m jobs.<name> ...`` runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from engine.errors import EngineError

# name -> (module, one-line summary). Listed explicitly so `distill --help` needs no imports.
JOBS: dict[str, tuple[str, str]] = {
    "shard": ("jobs.shard", "write WebDataset shards + manifest from image folders, captions, videos or digits"),
    "data": ("jobs.data", "inspect shards: `distill data info <url>` prints counts and writes a sample grid"),
    "select": ("jobs.select", "choose the training samples later stages use (BiLP: loss-based pruning)"),
    "buffer": ("jobs.buffer", "train N expert trajectories in parallel on Ray into a trajectory store"),
    "distill": ("jobs.distill", "distil a synthetic set with distill.method (mtt, vl, dm) at one size"),
    "pipeline": ("jobs.pipeline", "select -> buffer -> distill at every size -> evaluate, for the config and "
                 "its variants"),
    "sweep": ("jobs.sweep", "search distillation hyper-parameters with Ray Tune (ASHA); best config as YAML"),
    "evaluate": ("jobs.evaluate", "train fresh networks on distilled sets and coresets; results.json + a table"),
    "labels": ("jobs.labels", "students under hard, stored soft and projected (HeLlO) labels; RDED images"),
}

PRINT_CONFIG = "--print-config"
USAGE = ("usage: distill <job> [config.yaml] [--print-config] [key=value ...]   "
         "(distill <job> --help for a job's options)")


def help_text() -> str:
    width = max(len(name) for name in JOBS)
    lines = [USAGE, "", "jobs:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in JOBS.items()]
    return "\n".join(lines)


def run_job(name: str, argv: Sequence[str]) -> int:
    """Run one job; bad input (EngineError) becomes a one-line message and exit code 2."""
    module = importlib.import_module(JOBS[name][0])
    try:
        return int(module.main(list(argv)) or 0)
    except EngineError as err:
        print(f"distill {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {name}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def config_job(argv: Sequence[str], doc: str | None, run: Callable[[Any], object]) -> int:
    """The ``main`` of a job that takes ``[config.yaml] [--print-config] [key=value ...]``: validate the
    experiment config, then ``run`` it (or, with ``--print-config``, print it resolved and stop)."""
    from engine.config import load_config, split_config_args, to_yaml
    from engine.experiment import ExperimentConfig

    print_only = PRINT_CONFIG in argv
    path, overrides = split_config_args([a for a in argv if a != PRINT_CONFIG])
    if path in ("-h", "--help"):
        print(doc)
        return 0
    config = load_config(ExperimentConfig, path, overrides)
    if print_only:
        print(to_yaml(config), end="")
        return 0
    run(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    name, rest = args[0], args[1:]
    if name not in JOBS:
        print(f"distill: unknown job {name!r}\n\n{help_text()}", file=sys.stderr)
        return 2
    return run_job(name, rest)


if __name__ == "__main__":
    sys.exit(main())
