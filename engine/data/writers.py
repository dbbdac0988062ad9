"""The shard writer: raw images, captions, videos or digits -> WebDataset shards + manifest.

Follows the contract in ``engine.data.manifest``. The pipeline, one item at a time so memory stays
small whatever the data size:

    list the source (paths and labels only)  ->  assign splits (seeded, stratified by class)
    -> per split: read, validate and (if needed) re-encode one item -> append it to the open shard
    -> every ``shard_size`` samples the shard is complete and appears atomically
    -> the manifest is written last, so a folder with a manifest is always complete.

Shards are byte-for-byte reproducible: same source and options give the same tar bytes and sha256.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field
from tqdm import tqdm

from engine import storage
from engine.config import Section
from engine.data import archives, sources
from engine.data.manifest import MANIFEST_NAME, ShardInfo, ShardManifest, SplitInfo
from engine.data.sources import SkipLog, Source, SourceItem
from engine.errors import ConfigError, DataError, StorageError
from engine.extras import require
from engine.progress import LogLines, progress
from engine.storage import PathOrURL, StorageConfig

FORMATS: tuple[str, ...] = ("imagefolder", "captions-csv", "coco-captions", "karpathy-json", "video", "digits",
                             "moving-digits", "moving-digits-motion")
GENERATED_FORMATS = {"digits": "sklearn.datasets.load_digits",
                     "moving-digits": "scikit-learn's digits moving on a 32x32 canvas (class: the digit)",
                     "moving-digits-motion": "scikit-learn's digits moving on a 32x32 canvas (class: digit x direction)"}
CAPTION_FORMATS = ("captions-csv", "coco-captions", "karpathy-json")
CLASS_LIST_FORMATS = ("imagefolder", "video")
DEFAULT_SPLITS = {"train": 1.0}
JPEG_QUALITY = 95
KEPT_IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}  # MPO: camera JPEGs with extra frames
EXIF_ORIENTATION = 0x0112
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # no '-' or '.': they delimit shard names and sample keys


def shard_dataset(
    fmt: str,
    src: str | None,
    out_url: str,
    *,
    shard_size: int = 1000,
    max_side: int | None = None,
    splits: dict[str, float] | None = None,
    seed: int = 0,
    class_list: str | None = None,
    storage_config: StorageConfig | None = None,
    progress: bool = True,
    images_dir: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
    test_src: str | None = None,
) -> ShardManifest:
    """Write ``src`` (in format ``fmt``) as shards + ``manifest.json`` under ``out_url``; returns the manifest.

    ``images_dir``: image folder of the caption formats (default ``images/`` or ``Images/`` beside
    the caption file). ``overwrite``: replace the shards of an earlier run at ``out_url``.
    ``limit``: keep a seeded random subset of that many source items (tests, benchmarks).
    ``test_src``: a second source in the same format (the official test folder, e.g. CIFAR-10's) written
    whole as the ``test`` split; its classes must be the source's. ``splits`` then divides ``src`` only.
    ``src`` and ``test_src`` of the folder formats may be archives of the folder (.tar.gz, .tgz, .tar, .zip;
    local or a URL), unpacked into a temporary folder while the shards are written.
    """
    _check_options(fmt, src, shard_size, max_side, class_list, images_dir, limit)
    for given in (src, test_src):
        if archives.is_archive(given) and fmt not in CLASS_LIST_FORMATS:
            raise ConfigError(f"{storage.redact(str(given))}: archives are read for the folder formats "
                              f"({', '.join(CLASS_LIST_FORMATS)}), not {fmt}; unpack it first")
    fractions = _checked_fractions(fmt, splits)
    previous = _previous_manifest(out_url, overwrite, storage_config)
    skips = SkipLog()
    with archives.unpacked(src, storage_config) as src_folder, \
            archives.unpacked(test_src, storage_config) as test_folder:
        source = load_source(fmt, src_folder, class_list=class_list, images_dir=images_dir, skips=skips)
        items = _random_subset(source.items, limit, seed)
        items_by_split = _own_splits(items, seed) if source.has_own_splits else assign_splits(items, fractions, seed)
        if test_src is not None:
            items_by_split["test"] = _test_items(fmt, src, test_src, test_folder, source, items_by_split,
                                                 class_list, images_dir, skips, seed)
        if previous is not None:
            _remove_shards(out_url, previous, storage_config)

        with _progress_bar(len(items), progress) as bar:
            encoder = _media_encoder(source.modality, max_side)
            shards, split_infos = [], {}
            for split, split_items in items_by_split.items():
                info = SplitInfo(class_counts=[0] * len(source.classes))
                samples = _counted(_samples(split, split_items, encoder, skips, bar), info)
                shards += _write_shards(out_url, split, samples, shard_size, storage_config)
                split_infos[split] = info
    if not shards:
        raise DataError(f"no usable samples in {src or fmt}: {skips.total} skipped ({skips.summary()})")
    manifest = ShardManifest(
        source_format=fmt,
        modality=source.modality,
        source=_source_description(fmt, src),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        classes=source.classes,
        splits=split_infos,
        shards=shards,
        skipped=dict(sorted(skips.counts.items())),
        skipped_examples=dict(sorted(skips.examples.items())),
        options=_options(shard_size, max_side, fractions, seed, class_list, images_dir, limit)
        | ({"test_src": _source_description(fmt, test_src)} if test_src is not None else {}),
    )
    manifest.save(out_url, storage_config)
    return manifest


# --- options -----------------------------------------------------------------------------------------


def _check_options(
    fmt: str,
    src: str | None,
    shard_size: int,
    max_side: int | None,
    class_list: str | None,
    images_dir: str | None,
    limit: int | None,
) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt in GENERATED_FORMATS and src is not None:
        raise ConfigError(f"--format {fmt} takes no --src (it is made from scikit-learn's load_digits)")
    if fmt not in GENERATED_FORMATS and not src:
        raise ConfigError(f"--format {fmt} needs --src")
    if class_list is not None and fmt not in CLASS_LIST_FORMATS:
        raise ConfigError(f"--class-list applies to {' and '.join(CLASS_LIST_FORMATS)}, not to {fmt}")
    if images_dir is not None and fmt not in CAPTION_FORMATS:
        raise ConfigError(f"--images-dir applies to {', '.join(CAPTION_FORMATS)}, not to {fmt}")
    if max_side is not None and fmt == "video":
        raise ConfigError("--max-side applies to images; video bytes are kept exactly as encoded")
    for name, value in (("shard size", shard_size), ("max side", max_side), ("limit", limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> {"train": 0.8, "val": 0.1, "test": 0.1}, validated."""
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if not sep or fraction is None or name.strip() in fractions:
            raise ConfigError(f"--splits {text!r}: expected name=fraction pairs such as train=0.8,val=0.1,test=0.1")
        fractions[name.strip()] = fraction
    return check_splits(fractions)


def check_splits(fractions: dict[str, float]) -> dict[str, float]:
    """Split names are letters, digits and '_'; fractions are in (0, 1] and sum to 1."""
    described = ",".join(f"{name}={value}" for name, value in fractions.items())
    if not fractions:
        raise ConfigError("splits: at least one split is needed, such as train=1.0")
    for name, value in fractions.items():
        if not SPLIT_NAME.match(name):
            raise ConfigError(f"splits {described!r}: split name {name!r} may hold only letters, digits and '_'")
        if not 0 < value <= 1:
            raise ConfigError(f"splits {described!r}: fraction of {name!r} must be in (0, 1], got {value}")
    total = sum(fractions.values())
    if abs(total - 1) > 1e-6:
        raise ConfigError(f"splits {described!r}: fractions sum to {total:g}, expected 1")
    return dict(fractions)


def _checked_fractions(fmt: str, splits: dict[str, float] | None) -> dict[str, float]:
    if fmt == "karpathy-json":
        if splits is not None:
            raise ConfigError("karpathy-json keeps the train/val/test splits of its file; drop --splits")
        return {}
    return check_splits(DEFAULT_SPLITS if splits is None else splits)


def _options(
    shard_size: int,
    max_side: int | None,
    fractions: dict[str, float],
    seed: int,
    class_list: str | None,
    images_dir: str | None,
    limit: int | None,
) -> dict[str, object]:
    options: dict[str, object] = {"shard_size": shard_size, "max_side": max_side, "seed": seed}
    options["splits"] = fractions or "from source"
    optional = {"class_list": class_list, "images_dir": images_dir, "limit": limit}
    options.update({key: value for key, value in optional.items() if value is not None})
    return options


def _source_description(fmt: str, src: str | None) -> str:
    if fmt in GENERATED_FORMATS:
        return GENERATED_FORMATS[fmt]
    return storage.redact(str(src)) if storage.is_remote(str(src)) else os.path.abspath(str(src))


# --- sources and splits ------------------------------------------------------------------------------


def load_source(fmt: str, src: str | None, *, class_list: str | None, images_dir: str | None, skips: SkipLog) -> Source:
    """List the samples of ``src`` without reading any media."""
    match fmt:
        case "imagefolder":
            return sources.imagefolder_source(str(src), class_list, skips)
        case "captions-csv":
            return sources.captions_csv_source(str(src), images_dir, skips)
        case "coco-captions":
            return sources.coco_captions_source(str(src), images_dir, skips)
        case "karpathy-json":
            return sources.karpathy_source(str(src), images_dir, skips)
        case "video":
            return sources.video_source(str(src), class_list, skips)
        case "digits":
            return sources.digits_source()
        case "moving-digits" | "moving-digits-motion":
            return sources.moving_digits_source(by_direction=fmt == "moving-digits-motion")
    raise ConfigError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def _test_items(fmt: str, src: str | None, test_src: str, test_folder: str | None, source: Source,
                items_by_split: dict[str, list[SourceItem]], class_list: str | None, images_dir: str | None,
                skips: SkipLog, seed: int) -> list[SourceItem]:
    """The items of ``test_src`` (read from ``test_folder``: itself, or the archive unpacked), all of them, for
    the ``test`` split; refused if it would clash."""
    if fmt in GENERATED_FORMATS or source.has_own_splits:
        raise ConfigError(f"a separate test source does not apply to {fmt} (it has no test folder of its own)")
    if "test" in items_by_split:
        raise ConfigError(f"splits name a 'test' split and a test source ({test_src}) is given: drop one")
    test = load_source(fmt, test_folder, class_list=class_list, images_dir=images_dir, skips=skips)
    if [c.id for c in test.classes] != [c.id for c in source.classes]:
        ours, theirs = [c.id for c in source.classes], [c.id for c in test.classes]
        raise DataError(f"test source {test_src}: classes {theirs[:5]}{'...' if len(theirs) > 5 else ''} differ from "
                        f"those of {src}: {ours[:5]}{'...' if len(ours) > 5 else ''}")
    return _shuffled(test.items, np.random.default_rng(seed))


def _random_subset(items: list[SourceItem], limit: int | None, seed: int) -> list[SourceItem]:
    """A seeded random subset of ``limit`` items, in source order (so it spans all classes)."""
    if limit is None or limit >= len(items):
        return items
    chosen = np.random.default_rng(seed).permutation(len(items))[:limit]
    return [items[i] for i in sorted(chosen)]


def assign_splits(items: list[SourceItem], fractions: dict[str, float], seed: int) -> dict[str, list[SourceItem]]:
    """Deterministic split of ``items``, stratified by class; each split comes back shuffled.

    Items are shuffled within each class and laid out class after class; positions are dealt to
    splits in a fixed sequence that keeps every prefix within one item of its fractions, so every
    class, and the whole set, gets its fraction of each split to within an item or two.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int | None, list[SourceItem]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    laid_out = []
    for label in sorted(by_class, key=lambda x: -1 if x is None else x):
        members = by_class[label]
        laid_out += [members[i] for i in rng.permutation(len(members))]
    out: dict[str, list[SourceItem]] = {name: [] for name in fractions}
    for item, split in zip(laid_out, _split_sequence(len(laid_out), fractions), strict=True):
        out[split].append(item)
    return {name: _shuffled(split_items, rng) for name, split_items in out.items()}


def _split_sequence(n: int, fractions: dict[str, float]) -> list[str]:
    """Deal n positions: each goes to the split furthest behind its share so far."""
    names, shares = list(fractions), list(fractions.values())
    dealt = [0] * len(names)
    sequence = []
    for position in range(1, n + 1):
        chosen = max(range(len(names)), key=lambda i: position * shares[i] - dealt[i])
        dealt[chosen] += 1
        sequence.append(names[chosen])
    return sequence


def _own_splits(items: list[SourceItem], seed: int) -> dict[str, list[SourceItem]]:
    """Splits the source names itself (Karpathy), each shuffled like assigned ones."""
    rng = np.random.default_rng(seed)
    by_split: dict[str, list[SourceItem]] = {}
    for item in items:
        by_split.setdefault(str(item.split), []).append(item)
    ordered = sorted(by_split, key=lambda split: (split != "train", split != "val", split))
    return {split: _shuffled(by_split[split], rng) for split in ordered}


def _shuffled(items: list[SourceItem], rng: np.random.Generator) -> list[SourceItem]:
    """Shuffled so that every shard mixes classes (streaming readers shuffle only within a window)."""
    return [items[i] for i in rng.permutation(len(items))]


# --- media: validate, keep or re-encode ------------------------------------------------------------


class UnusableMedia(Exception):
    """A source item whose media cannot be used; ``reason`` goes into the manifest's skip counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _MediaEncoder:
    """Validates and encodes the media of one modality; ``missing`` is the skip reason of absent files."""

    encode: Callable[[bytes, str], tuple[bytes, str]]  # (raw bytes, source extension) -> (bytes, member ext)
    missing: str


def _media_encoder(modality: str, max_side: int | None) -> _MediaEncoder:
    if modality == "video":
        return _MediaEncoder(prepare_video, "missing video")
    return _MediaEncoder(lambda raw, _ext: prepare_image(raw, max_side), "missing image")


def prepare_image(raw: bytes, max_side: int | None = None) -> tuple[bytes, str]:
    """Decode fully to validate; keep JPEG/PNG bytes that fit ``max_side``, else re-encode.

    Returns (bytes, "jpg" | "png"). Any mode is valid (L, CMYK, RGBA, P, 16-bit); readers
    normalise modes, so kept bytes keep theirs. A photo with an EXIF rotation is re-encoded
    upright: readers decode pixels as stored and never look at EXIF.
    """
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.DecompressionBombError as err:
        raise UnusableMedia("image too large") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # what PIL raises for corrupt/truncated data
        raise UnusableMedia("unreadable image") from err
    with image:
        fits = max_side is None or max(image.size) <= max_side
        if image.format in KEPT_IMAGE_FORMATS and fits and not _is_rotated(image):
            return raw, KEPT_IMAGE_FORMATS[image.format]
        return reencode_image(image, max_side)


def _is_rotated(image: Image.Image) -> bool:
    return "exif" in image.info and image.getexif().get(EXIF_ORIENTATION, 1) != 1


def reencode_image(image: Image.Image, max_side: int | None) -> tuple[bytes, str]:
    """Upright (EXIF orientation applied, as the tag is lost), resized with LANCZOS to fit ``max_side``;
    PNG for alpha, palette and 16-bit images, JPEG (quality 95) otherwise."""
    mode, fmt = _encoded_mode(image)
    icc_profile = image.info.get("icc_profile") if mode == image.mode else None
    image = ImageOps.exif_transpose(image).convert(mode)
    if max_side is not None and max(image.size) > max_side:
        image = image.resize(_fitted_size(image.size, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    image.save(out, format=fmt, **options)
    return out.getvalue(), fmt.lower().replace("jpeg", "jpg")


def _encoded_mode(image: Image.Image) -> tuple[str, str]:
    """(mode, format) to re-encode ``image`` in without losing alpha or bit depth."""
    mode = image.mode
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if mode in ("L", "LA", "La", "1"):
        return ("LA", "PNG") if has_alpha else ("L", "PNG" if mode == "1" else "JPEG")
    if mode.startswith("I") or mode == "F":
        return "I;16", "PNG"
    if has_alpha:
        return "RGBA", "PNG"
    return "RGB", "PNG" if mode == "P" else "JPEG"


def _fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def prepare_video(raw: bytes, ext: str) -> tuple[bytes, str]:
    """Check the clip opens with PyAV and its first video frame decodes; the bytes stay as they are."""
    av = require("av", "video", "sharding video")

    try:
        with av.open(io.BytesIO(raw)) as container:
            if not container.streams.video or next(container.decode(video=0), None) is None:
                raise UnusableMedia("unreadable video")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise UnusableMedia("unreadable video") from err
    return raw, ext


# --- samples and shards ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample as it goes into a shard: members sorted by name, so they stay adjacent and ordered."""

    members: list[tuple[str, bytes]]
    label: int | None
    num_captions: int


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def _samples(
    split: str, items: list[SourceItem], encoder: _MediaEncoder, skips: SkipLog, bar: tqdm
) -> Iterator[Sample]:
    """Read, validate and encode items one at a time; unusable ones are counted in ``skips``."""
    index = 0
    for item in items:
        bar.update(1)
        try:
            media, ext = encoder.encode(item.read_bytes(), item.extension)
        except FileNotFoundError:
            skips.add(encoder.missing, item.name)
            continue
        except PermissionError as err:
            raise StorageError(f"{item.path}: permission denied") from err
        except UnusableMedia as err:
            skips.add(err.reason, item.name)
            continue
        yield _sample(sample_key(split, index), item, media, ext)
        index += 1


def _sample(key: str, item: SourceItem, media: bytes, ext: str) -> Sample:
    members = {f"{key}.{ext}": media}
    if item.label is not None:
        members[f"{key}.cls"] = str(item.label).encode()
    if item.captions:
        record = {"id": item.name, "captions": list(item.captions)}
        members[f"{key}.json"] = json.dumps(record, ensure_ascii=False).encode()
    return Sample(members=sorted(members.items()), label=item.label, num_captions=len(item.captions))


def _counted(samples: Iterator[Sample], info: SplitInfo) -> Iterator[Sample]:
    """Pass samples through, counting them (per class and captions) into ``info``."""
    for sample in samples:
        info.num_samples += 1
        info.num_captions += sample.num_captions
        if sample.label is not None:
            info.class_counts[sample.label] += 1
        yield sample


def _write_shards(
    out_url: str, split: str, samples: Iterator[Sample], shard_size: int, storage_config: StorageConfig | None
) -> list[ShardInfo]:
    """Consume ``samples`` into shards of at most ``shard_size``; a shard is opened only once it has a sample."""
    shards: list[ShardInfo] = []
    while (first := next(samples, None)) is not None:
        batch = itertools.chain([first], itertools.islice(samples, shard_size - 1))
        shards.append(write_shard(out_url, shard_name(split, len(shards)), split, batch, storage_config))
    return shards


def write_shard(
    out_url: str, name: str, split: str, samples: Iterator[Sample], storage_config: StorageConfig | None = None
) -> ShardInfo:
    """Write one tar atomically (local or object store); returns its size, sha256 and sample count."""
    count = 0
    with storage.atomic_open(storage.join(out_url, name), storage_config) as f:
        hashed = _HashingWriter(f)
        with tarfile.open(fileobj=hashed, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[arg-type]
            for sample in samples:
                for member_name, data in sample.members:
                    tar.addfile(_tar_header(member_name, len(data)), io.BytesIO(data))
                count += 1
    return ShardInfo(name=name, split=split, num_samples=count, bytes=hashed.size, sha256=hashed.sha256.hexdigest())


def _tar_header(name: str, size: int) -> tarfile.TarInfo:
    """A header with nothing from the environment (time, owner), so identical input gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingWriter:
    """A write-only file that forwards bytes to ``target`` and keeps their sha256 and count."""

    def __init__(self, target: IO[bytes]):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.target.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


# --- output folder -----------------------------------------------------------------------------------


def _previous_manifest(out_url: str, overwrite: bool, storage_config: StorageConfig | None) -> ShardManifest | None:
    """The manifest of an earlier run at ``out_url``; refused unless ``overwrite``."""
    if not storage.exists(storage.join(out_url, MANIFEST_NAME), storage_config):
        return None
    if not overwrite:
        raise DataError(
            f"{storage.redact(out_url)}: already holds shards ({MANIFEST_NAME}); pass --overwrite to replace them"
        )
    return ShardManifest.load(out_url, storage_config)


def _remove_shards(out_url: str, previous: ShardManifest, storage_config: StorageConfig | None) -> None:
    """Remove the manifest first, so no reader ever sees a manifest whose shards are gone."""
    storage.remove(storage.join(out_url, MANIFEST_NAME), storage_config)
    for shard in previous.shards:
        storage.remove(storage.join(out_url, shard.name), storage_config)


def _progress_bar(total: int, enabled: bool) -> tqdm | LogLines:
    return progress(desc="shard", total=total, unit="item", enabled=enabled)


# --- preparing the shards a job reads ---------------------------------------------------------------


class PrepareConfig(Section):
    """How to write a job's ``data.shards`` when they do not exist yet; later runs reuse them."""

    format: Literal[FORMATS] = Field(description="Source format, as in `distill shard --format`.")  # type: ignore[valid-type]
    src: PathOrURL | None = Field(None, description="Source path (not for digits).")
    test_src: PathOrURL | None = Field(
        None, description="A separate source written whole as the test split (e.g. CIFAR-10's official test "
        "folder); splits then divide src only.")
    images_dir: PathOrURL | None = None
    class_list: PathOrURL | None = None
    shard_size: int = Field(1000, ge=1)
    max_side: int | None = Field(None, ge=1)
    splits: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="Keep a seeded random subset of this many source items.")


def ensure_shards(
    shards_url: str, prepare: PrepareConfig | None, storage_config: StorageConfig | None = None
) -> ShardManifest:
    """The manifest at ``shards_url``, writing the shards first from ``prepare`` if there are none."""
    if storage.exists(storage.join(shards_url, MANIFEST_NAME), storage_config):
        return ShardManifest.load(shards_url, storage_config)
    if prepare is None:
        raise DataError(
            f"{storage.redact(shards_url)}: no shards here; write them with `distill shard` "
            "or give the config a `prepare` section"
        )
    return shard_dataset(
        prepare.format, prepare.src, shards_url, shard_size=prepare.shard_size, max_side=prepare.max_side,
        splits=prepare.splits, seed=prepare.seed, class_list=prepare.class_list, images_dir=prepare.images_dir,
        storage_config=storage_config, limit=prepare.limit, test_src=prepare.test_src,
    )
