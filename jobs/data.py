"""``distill data info <url>``: what a shard folder holds, read back through Ray Data.

    distill data info /tmp/cifar10-shards
    distill data info s3://bucket/flickr8k --split train --tokenizer hf:/path/to/minilm --verify
    python -m jobs.data info /tmp/digits --run-dir runs/digits

Prints the manifest summary, then counts read back from the shards themselves with Ray Data (per
class, per shard, captions per image), the tensor shape one sample decodes to, and the items the
writer skipped; writes a PNG grid of samples to ``<run-dir>/data-info/grid.png`` (or ``--grid``).
``--verify`` also checks every shard's size and sha256 against the manifest. Any disagreement with
the manifest is an error (exit code 2) after everything has been printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from engine import config as config_lib
from engine import storage
from engine.data.grid import save_grid
from engine.data.manifest import ShardManifest
from engine.data.memory import InMemoryData, load_in_memory
from engine.data.shards import DataConfig, resolve_shards, verify_shards
from engine.errors import DataError
from engine.resources import ResourcesConfig
from engine.runtime.cluster import init_ray
from engine.runtime.data import SampleCounts, count_samples
from engine.storage import StorageConfig

GRID_IMAGES = 64
GRID_VIDEOS = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill data", description="Inspect WebDataset shard folders.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print what a shard folder holds and write a sample grid")
    info.add_argument("url", help="shard folder: a local path or s3://bucket/prefix")
    info.add_argument("--split", default="train", help="split to read (default: train)")
    info.add_argument("--grid", help="where to write the PNG grid (default: <run-dir>/data-info/grid.png)")
    info.add_argument("--run-dir", default="runs", help="run folder for outputs (default: runs)")
    info.add_argument("--verify", action="store_true", help="check every shard's size and sha256")
    info.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster, if one is started")
    info.add_argument("--image-size", type=int, help="decode size for the grid and the sample shape")
    info.add_argument("--frames", type=int, help="video: frames sampled per clip")
    info.add_argument("--tokenizer", help="open_clip:<model> or hf:<folder>: also show one caption's tokens")
    info.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return info(args)


def info(args: argparse.Namespace) -> int:
    storage_config = StorageConfig(s3_endpoint_url=args.s3_endpoint_url)
    data_config = _data_config(args)
    shard_set = resolve_shards(data_config.shards, data_config.split, storage_config)
    manifest = shard_set.manifest
    _print_block(manifest_lines(data_config.shards, manifest))
    with _ray_session(args.num_cpus):
        started = time.perf_counter()
        counts = count_samples(data_config.shards, data_config.split, storage_config)
        seconds = time.perf_counter() - started
    problems = counts.mismatches(manifest, data_config.split)
    _print_block(count_lines(counts, manifest, data_config.split, seconds, problems))
    limit = GRID_VIDEOS if manifest.modality == "video" else GRID_IMAGES
    samples = load_in_memory(data_config, storage_config, limit=limit)
    _print_block(sample_lines(samples, data_config))
    grid_url = args.grid or storage.join(args.run_dir, "data-info", "grid.png")
    _save_samples_grid(samples, grid_url, storage_config)
    print(f"grid         {grid_url}  ({len(samples)} samples)")
    if args.verify:
        failures = verify_shards(data_config.shards, storage_config)
        print(f"verify       {len(manifest.shards)} shards: " + ("size and sha256 match" if not failures else "FAILED"))
        problems += failures
    if problems:
        raise DataError(f"{storage.redact(data_config.shards)} does not match its manifest: {'; '.join(problems)}")
    return 0


def _data_config(args: argparse.Namespace) -> DataConfig:
    raw = {"shards": args.url, "split": args.split}
    optional = {"image_size": args.image_size, "frames": args.frames, "tokenizer": args.tokenizer}
    raw |= {key: value for key, value in optional.items() if value is not None}
    return config_lib.validate(DataConfig, raw, "command line")


@contextmanager
def _ray_session(num_cpus: int | None) -> Iterator[None]:
    """Use the running Ray session (or the cluster in RAY_ADDRESS), or start a local one for this command
    and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(ResourcesConfig(num_cpus=num_cpus), quiet=True)
    try:
        yield
    finally:
        ray.shutdown()


# --- what is printed ----------------------------------------------------------------------------------


def manifest_lines(url: str, manifest: ShardManifest) -> list[str]:
    lines = [
        f"shards       {storage.redact(url)}",
        f"manifest     {manifest.source_format} -> {manifest.modality}, {manifest.num_samples:,} samples, "
        f"{_count(len(manifest.shards), 'shard')}, fingerprint {manifest.fingerprint()}",
    ]
    if manifest.source:
        lines.append(f"source       {manifest.source}" + (f"  (written {manifest.created})" if manifest.created else ""))
    for name, split in manifest.splits.items():
        shards = [s for s in manifest.shards if s.split == name]
        size = sum(s.bytes for s in shards) / 2**20
        captions = f", {split.num_captions:,} captions" if split.num_captions else ""
        lines.append(f"split        {name}: {split.num_samples:,} samples{captions} in {_count(len(shards), 'shard')} ({size:.1f} MiB)")
    lines += skipped_lines(manifest)
    return lines


def skipped_lines(manifest: ShardManifest) -> list[str]:
    if not manifest.skipped:
        return ["skipped      nothing (writer)"]
    lines = [f"skipped      {sum(manifest.skipped.values()):,} source items (writer):"]
    for reason, count in manifest.skipped.items():
        examples = manifest.skipped_examples.get(reason, [])[:3]
        shown = f"  e.g. {', '.join(examples)}" if examples else ""
        lines.append(f"    {count:>8,}  {reason}{shown}")
    return lines


def count_lines(
    counts: SampleCounts, manifest: ShardManifest, split: str, seconds: float, problems: list[str]
) -> list[str]:
    verdict = "matches the manifest" if not problems else "DOES NOT MATCH the manifest"
    read = len(counts.shard_counts)
    lines = [
        f"read back    {split}: {counts.num_samples:,} samples from {_count(read, 'shard')} with Ray Data "
        f"in {seconds:.1f} s: {verdict}"
    ]
    if counts.empty_shards:
        lines.append(f"empty shards {len(counts.empty_shards)} skipped: {', '.join(counts.empty_shards)}")
    if manifest.classes or any(counts.class_counts):
        sizes = sorted(set(counts.class_counts))
        summary = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,} to {sizes[-1]:,}"
        lines.append(f"classes      {len(counts.class_counts)} with {summary} samples each")
        lines += _class_table(counts.class_counts, manifest)
    if counts.unlabelled and manifest.classes:
        lines.append(f"unlabelled   {counts.unlabelled:,} samples")
    if counts.captions_per_sample:
        lines.append(f"captions     per image {_min_mean_max(counts.captions_per_sample)}")
    lines += [f"    problem: {p}" for p in problems]
    return lines


def _class_table(class_counts: list[int], manifest: ShardManifest) -> list[str]:
    names = {c.index: (c.id, c.name) for c in manifest.classes}
    lines = []
    for index, count in enumerate(class_counts):
        class_id, name = names.get(index, ("?", "(not in the manifest)"))
        label = name if name == class_id else f"{class_id} {name}"
        lines.append(f"    {index:>5}  {label[:40]:<40} {count:>9,}")
    return lines


def _min_mean_max(histogram: dict[int, int]) -> str:
    total = sum(histogram.values())
    mean = sum(n * count for n, count in histogram.items()) / total
    return f"min {min(histogram)} / mean {mean:.2f} / max {max(histogram)}"


def sample_lines(samples: InMemoryData, config: DataConfig) -> list[str]:
    shape = tuple(samples.images.shape[1:])
    axes = "(T, C, H, W)" if samples.modality == "video" else "(C, H, W)"
    dtype = str(samples.images.dtype).removeprefix("torch.")
    lines = [f"sample       {samples.keys[0]} decodes to {axes} = {shape} {dtype} ({config.resize}, {config.channels} ch)"]
    if samples.captions and samples.captions[0]:
        lines.append(f"caption      {samples.captions[0][0]!r}")
    if samples.tokens is not None:
        ids = samples.tokens[0, 0].tolist()
        lines.append(f"tokens       {config.tokenizer}: {ids[:12]}... ({len(ids)} per caption)")
    return lines


def _save_samples_grid(samples: InMemoryData, url: str, storage_config: StorageConfig) -> None:
    names = samples.class_names
    labels = [names[i] if 0 <= i < len(names) else "" for i in samples.labels.tolist()]
    if samples.modality == "video":  # one row of frames per clip
        frames = samples.images.shape[1]
        save_grid(samples.images.flatten(0, 1), url, nrow=frames, storage_config=storage_config)
    else:
        save_grid(samples.images, url, nrow=8, labels=labels if names else None, storage_config=storage_config)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _print_block(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from engine.cli import run_job

    sys.exit(run_job("data", sys.argv[1:]))
