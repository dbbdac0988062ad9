"""``distill shard``: write WebDataset shards + manifest from image folders, captions, videos or digits.

    distill shard --format imagefolder --src data/cifar10/train --out s3://bucket/cifar10 --splits train=0.9,val=0.1
    distill shard --format captions-csv --src flickr8k/captions.txt --out shards/flickr8k --max-side 256
    distill shard --format digits --out shards/digits

Formats and options: docs/data.md, section "Writing shards".
"""

from __future__ import annotations

import argparse
import sys
import time

from engine import cli, storage
from engine.data.manifest import ShardManifest
from engine.data.writers import FORMATS, parse_splits, shard_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill shard", description=cli.JOBS["shard"][1], epilog="formats and options: docs/data.md"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="source layout")
    parser.add_argument("--src", help="source folder or file (not used by digits)")
    parser.add_argument("--out", required=True, help="output folder: local path or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-side", type=int, help="re-encode images whose long side is larger (pixels)")
    parser.add_argument("--splits", type=parse_splits, help="e.g. train=0.8,val=0.1,test=0.1 (default train=1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment and shard order")
    parser.add_argument("--class-list", help="imagefolder/video: lines 'id<TAB>name' or one id per line")
    parser.add_argument("--images-dir", help="caption formats: image folder (default images/ beside the file)")
    parser.add_argument("--limit", type=int, help="keep a seeded random subset of this many items")
    parser.add_argument("--test-src", help="a second source in the same format written whole as the test split "
                        "(e.g. CIFAR-10's official test folder); --splits then divide --src only")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    manifest = shard_dataset(
        args.format,
        args.src,
        args.out,
        shard_size=args.shard_size,
        max_side=args.max_side,
        splits=args.splits,
        seed=args.seed,
        class_list=args.class_list,
        progress=not args.no_progress,
        images_dir=args.images_dir,
        overwrite=args.overwrite,
        limit=args.limit,
        test_src=args.test_src,
    )
    print(summary(manifest, args.out, time.perf_counter() - started))
    return 0


def summary(manifest: ShardManifest, out_url: str, seconds: float) -> str:
    shards = _count(len(manifest.shards), "shard")
    lines = [f"wrote {manifest.num_samples:,} samples in {shards} to {storage.redact(out_url)} in {seconds:.1f} s"]
    for split, info in manifest.splits.items():
        captions = f", {info.num_captions:,} captions" if info.num_captions else ""
        shards = _count(len(manifest.shards_of(split)), "shard")
        lines.append(f"  {split}: {info.num_samples:,} samples in {shards}{captions}")
    if manifest.classes:
        lines.append(f"  classes: {len(manifest.classes)} ({_class_preview(manifest)})")
    skipped = sum(manifest.skipped.values())
    lines.append(f"  skipped: {skipped:,}" if skipped else "  skipped: none")
    for reason, count in manifest.skipped.items():
        examples = ", ".join(manifest.skipped_examples.get(reason, [])[:3])
        lines.append(f"    {reason}: {count:,} (e.g. {examples})")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _class_preview(manifest: ShardManifest, shown: int = 5) -> str:
    names = manifest.class_names
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


if __name__ == "__main__":
    sys.exit(cli.main(["shard", *sys.argv[1:]]))
