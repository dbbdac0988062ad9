"""N digits experts: one after another in one process vs ``distill buffer`` on Ray with 2 workers.

    uv run python benchmarks/buffer.py                   # 8 experts x 15 epochs (the quickstart's experts)
    uv run python benchmarks/buffer.py --experts 4 --epochs 5
    uv run python benchmarks/buffer.py --repeats 3       # (a), (b), (a), (b)...: medians

(a) plain PyTorch: the same expert training (``engine.trajectories.train_expert``: model, SGD, DSA)
    for every expert in turn in this process, data already in memory, nothing written;
(b) the buffer job through Ray Tune on a local cluster of 2 CPUs (one expert per CPU): reading the
    shards through Ray Data, writing every epoch to the trajectory store, resumable.
Both read the same shards, written before any timing. Ray's start-up (``ray.init``) is timed separately.
The overhead per expert is the extra worker time (b) spends: (job time x workers - sequential time) /
experts. The speed of this 2-core machine drifts by up to 30 % over minutes, so ``--repeats`` alternates
(a) and (b) and compares medians.
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (a) then (b); medians are compared")
    return parser.parse_args()


def experiment(run_dir: str, shards: str, experts: int, epochs: int, use_ray: bool) -> ExperimentConfig:
    overrides = [f"run_dir={run_dir}", f"data.shards={shards}", f"experts.num_experts={experts}",
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
    plain, startup, job = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        shards = f"{folder}/shards"  # written by the first (a) before its timing starts, read by every run
        for round_ in range(args.repeats):
            plain.append(sequential(experiment(f"{folder}/plain-{round_}", shards, args.experts, args.epochs,
                                               use_ray=False)))
            started, seconds = on_ray(experiment(f"{folder}/ray-{round_}", shards, args.experts, args.epochs,
                                                 use_ray=True))
            startup.append(started)
            job.append(seconds)
            print(f"round {round_ + 1}: (a) {plain[-1]:.1f} s, (b) {job[-1]:.1f} s", flush=True)
    plain_s, startup_s, job_s = (statistics.median(times) for times in (plain, startup, job))
    overhead = (job_s * WORKERS - plain_s) / args.experts
    median = f" (median of {args.repeats})" if args.repeats > 1 else ""
    print(f"\n{args.experts} digits experts x {args.epochs} epochs (quickstart model: ConvNet width 64, depth 2, 16 px)")
    print("| run | wall time s | per expert s |")
    print("|---|---|---|")
    print(f"| (a) one process, one after another{median} | {plain_s:.1f} | {plain_s / args.experts:.2f} |")
    print(f"| (b) distill buffer on Ray, {WORKERS} workers{median} | {job_s:.1f} | {job_s / args.experts:.2f} |")
    print(f"| ray.init (once per job, not in (b)) | {startup_s:.1f} | |")
    print(f"\nspeedup (a)/(b): {plain_s / job_s:.2f}x with {WORKERS} workers; "
          f"Ray overhead per expert: {overhead:.2f} worker-seconds (data through Ray Data, store writes, Tune)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
