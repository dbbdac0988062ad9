"""N digits experts: one after another in one process vs ``distill buffer`` on Ray with 2 workers.

    uv run python benchmarks/buffer.py                   # 8 experts x 15 epochs (the quickstart's experts)
    uv run python benchmarks/buffer.py --experts 4 --epochs 5

(a) plain PyTorch: the same expert training (``engine.trajectories.train_expert``: model, SGD, DSA)
    for every expert in turn in this process, data already in memory, nothing written;
(b) the buffer job through Ray Tune on a local cluster of 2 CPUs (one expert per CPU): reading the
    shards through Ray Data, writing every epoch to the trajectory store, resumable.
Ray's start-up (``ray.init``) is timed separately. The overhead per expert is the extra worker time
(b) spends: (job time x workers - sequential time) / experts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from engine.config import load_config
from engine.data.preprocess import Preprocess
from engine.experiment import ExperimentConfig
from engine.models.params import select_parameters
from engine.models.registry import build_model
from engine.optim import build_seeded
from engine.runtime import LocalRuntime
from engine.stages.context import load_split, model_spec, prepare_data
from engine.trajectories.train import ExpertData, train_expert

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    return parser.parse_args()


def experiment(run_dir: str, experts: int, epochs: int, use_ray: bool) -> ExperimentConfig:
    overrides = [f"run_dir={run_dir}", f"data.shards={run_dir}/shards", f"experts.num_experts={experts}",
                 f"experts.train.epochs={epochs}", f"resources.use_ray={str(use_ray).lower()}",
                 f"resources.num_cpus={WORKERS}", "resources.cpus_per_worker=1"]
    return load_config(ExperimentConfig, str(REPO_ROOT / "configs" / "quickstart.yaml"), overrides)


def sequential(config: ExperimentConfig) -> float:
    """(a): every expert in turn, in this process; returns seconds of training."""
    manifest = prepare_data(config)
    spec = model_spec(config, manifest)
    train = load_split(config, config.data.split, LocalRuntime())
    data = ExpertData(Preprocess.fit(train.images, config.preprocess).apply(train.images), train.labels)
    torch.set_num_threads(1)  # one core per expert, as each Ray worker gets
    began = time.perf_counter()
    for expert in range(config.experts.num_experts):
        model = build_seeded(lambda: build_model(spec), expert)
        train_expert(model, data, config.experts.train, recorded=select_parameters(model, "all"), seed=expert)
    return time.perf_counter() - began


def on_ray(config: ExperimentConfig) -> tuple[float, float]:
    """(b): the buffer job; returns (ray.init seconds, job seconds)."""
    import ray

    from engine.runtime.cluster import init_ray
    from jobs.buffer import run_buffer

    began = time.perf_counter()
    init_ray(config.resources)
    started = time.perf_counter() - began
    began = time.perf_counter()
    run_buffer(config)
    seconds = time.perf_counter() - began
    ray.shutdown()
    return started, seconds


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        plain = sequential(experiment(f"{folder}/plain", args.experts, args.epochs, use_ray=False))
        startup, job = on_ray(experiment(f"{folder}/ray", args.experts, args.epochs, use_ray=True))
    overhead = (job * WORKERS - plain) / args.experts
    print(f"\n{args.experts} digits experts x {args.epochs} epochs (quickstart model: ConvNet width 64, depth 2, 16 px)")
    print("| run | wall time s | per expert s |")
    print("|---|---|---|")
    print(f"| (a) one process, one after another | {plain:.1f} | {plain / args.experts:.2f} |")
    print(f"| (b) distill buffer on Ray, {WORKERS} workers | {job:.1f} | {job / args.experts:.2f} |")
    print(f"| ray.init (once per job, not in (b)) | {startup:.1f} | |")
    print(f"\nspeedup (a)/(b): {plain / job:.2f}x with {WORKERS} workers; "
          f"Ray overhead per expert: {overhead:.2f} worker-seconds (data through Ray Data, store writes, Tune)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
