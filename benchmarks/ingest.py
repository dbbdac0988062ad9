"""Decode + resize throughput of CIFAR-10 shards: the engine's Ray Data reader vs a plain webdataset loop.

    uv run python benchmarks/ingest.py                       # /tmp/cifar10-shards, 2 CPUs, 32 px
    uv run python benchmarks/ingest.py --limit-shards 2 --image-size 64

Both sides produce the same thing: float32 (C, H, W) tensors in [0, 1] plus int64 labels, iterated to
the end. The Ray side is ``read_shards`` (columns image + label) through ``iter_torch_batches`` on a
local cluster of ``--num-cpus`` CPUs; the first pass pays for starting Ray's worker processes, and the
median of ``--repeats`` warm passes is compared with the median of as many loop passes. The baseline is one process running
``webdataset.WebDataset(urls).decode("pil")`` followed by the engine's own resize and conversion.
When the shards are absent they are written first from ../shared/data/cifar10/train.tar.gz.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from engine import storage
from engine.data import decode
from engine.data.shards import DataConfig, ShardSet, resolve_shards
from engine.resources import ResourcesConfig
from engine.runtime.cluster import init_ray
from engine.runtime.data import read_shard_set, shard_errors

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"
BATCH_SIZE = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="/tmp/cifar10-shards", help="shard folder (written if absent)")
    parser.add_argument("--limit-shards", type=int, help="read only the first N shards of the split")
    parser.add_argument("--image-size", type=int, default=32, help="output side in pixels (default 32)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side; the median is compared")
    return parser.parse_args(argv)


def ensure_shards(url: str) -> None:
    """Write CIFAR-10 shards at ``url`` from the shared archive when there is no manifest yet."""
    if storage.exists(storage.join(url, "manifest.json")):
        return
    from engine.data.writers import shard_dataset

    with tempfile.TemporaryDirectory(prefix="cifar10-") as tmp:
        print(f"writing shards to {url} from {CIFAR_ARCHIVE} ...", flush=True)
        with tarfile.open(CIFAR_ARCHIVE) as archive:
            archive.extractall(tmp, filter="data")
        shard_dataset("imagefolder", str(Path(tmp) / "train"), url, shard_size=5000, progress=False)


def first_shards(config: DataConfig, limit_shards: int | None) -> ShardSet:
    shard_set = resolve_shards(config.shards, config.split)
    return replace(shard_set, urls=shard_set.urls[:limit_shards]) if limit_shards else shard_set


def time_it(run: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    count = run()
    return count, time.perf_counter() - started


def median_of(repeats: int, run: Callable[[], int]) -> tuple[int, float]:
    """(samples, the median of ``repeats`` timed passes): one pass of a few seconds is noisy on 2 CPUs."""
    passes = sorted((time_it(run) for _ in range(repeats)), key=lambda counted: counted[1])
    return passes[len(passes) // 2]


def ray_pass(shard_set: ShardSet, config: DataConfig) -> int:
    dataset = read_shard_set(shard_set, config, columns=("image", "label"))
    count = 0
    with shard_errors():
        for batch in dataset.iter_torch_batches(batch_size=BATCH_SIZE):
            count += len(batch["label"])
    return count


def webdataset_pass(urls: list[str], size: int) -> int:
    import webdataset

    images, labels, count = [], [], 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False).decode("pil"):
        image = next(sample[k] for k in ("jpg", "png", "jpeg") if k in sample)
        images.append(torch.from_numpy(decode.to_array(decode.resize_image(image, size, "crop"))))
        labels.append(int(sample["cls"]))
        if len(images) == BATCH_SIZE:
            count += _collate(images, labels)
            images, labels = [], []
    return count + (_collate(images, labels) if images else 0)


def _collate(images: list[torch.Tensor], labels: list[int]) -> int:
    batch = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
    return len(batch[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_shards(args.shards)
    import ray

    config = DataConfig(shards=args.shards, image_size=args.image_size)
    shard_set = first_shards(config, args.limit_shards)
    init_ray(ResourcesConfig(num_cpus=args.num_cpus), quiet=True)  # the engine's local cluster, as jobs start it
    try:
        cold = time_it(lambda: ray_pass(shard_set, config))
        warm = median_of(args.repeats, lambda: ray_pass(shard_set, config))
    finally:
        ray.shutdown()
    loop = median_of(args.repeats, lambda: webdataset_pass(shard_set.urls, args.image_size))
    report(args, len(shard_set.urls), cold, warm, loop)
    return 0


def report(args: argparse.Namespace, num_shards: int, cold, warm, loop) -> None:
    rows = [
        (f"engine Ray Data, {args.num_cpus} CPUs (first pass)", *cold),
        (f"engine Ray Data, {args.num_cpus} CPUs (median of {args.repeats})", *warm),
        (f"webdataset loop, 1 process (median of {args.repeats})", *loop),
    ]
    print(f"\nCIFAR-10 shards {args.shards}: {num_shards} shards, decode + resize to {args.image_size} px")
    print(f"{'':44} {'samples':>9} {'seconds':>8} {'samples/s':>10}")
    for name, count, seconds in rows:
        print(f"{name:44} {count:>9,} {seconds:>8.2f} {count / seconds:>10,.0f}")
    ratio = (warm[0] / warm[1]) / (loop[0] / loop[1])
    print(f"ratio Ray Data / webdataset loop: {ratio:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
