"""Raw data sources for the shard writer: each lists its samples and classes without reading any media.

A source is a list of light ``SourceItem`` records (a path, a label, captions), so even ImageNet-size
folders list in memory cheaply; the writer reads one item's bytes at a time. Items a source can
already tell are unusable (an unknown class, a caption without an image) are counted in a
``SkipLog`` here; media that fails to decode is counted later by the writer.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.manifest import ClassInfo, Modality
from engine.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from engine.errors import DataError, StorageError

MAX_SKIP_EXAMPLES = 10


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One future sample: where its media is and what it is labelled. Holds no media bytes,
    except ``data`` for tiny in-memory sources (digits)."""

    name: str  # shown in skip examples; the "id" of image-text samples
    path: str | None = None  # a str, not a Path: listing a million files with pathlib is slow
    data: bytes | None = None
    label: int | None = None
    captions: tuple[str, ...] = ()
    split: str | None = None  # only for sources that carry their own splits (Karpathy)

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()

    @property
    def extension(self) -> str:
        return _extension(self.path or "")


@dataclass
class SkipLog:
    """Source items left out, by reason, with the first few examples of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append(example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items())) or "none"


@dataclass
class Source:
    """Everything the writer needs to know about a data set before reading its media."""

    modality: Modality
    items: list[SourceItem]
    classes: list[ClassInfo] = field(default_factory=list)
    has_own_splits: bool = False


# --- helpers shared by several formats -------------------------------------------------------------


def require_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path}: no such {what}")
    return path


def read_class_list(path: str | Path) -> list[ClassInfo]:
    """``id<TAB>name`` lines (ImageNet wnids in ILSVRC order) or one id per line; index = line order."""
    text = require_path(path, "class list file").read_text(encoding="utf-8")
    classes: list[ClassInfo] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        class_id, _, name = line.strip().partition("\t")
        class_id, name = class_id.strip(), name.strip() or class_id.strip()
        if class_id in seen:
            raise DataError(f"{path}: class {class_id!r} is listed twice")
        seen.add(class_id)
        classes.append(ClassInfo(index=len(classes), id=class_id, name=name))
    if not classes:
        raise DataError(f"{path}: the class list is empty")
    return classes


def classes_from_ids(ids: Iterable[str]) -> list[ClassInfo]:
    return [ClassInfo(index=i, id=class_id, name=class_id) for i, class_id in enumerate(sorted(set(ids)))]


def class_lookup(classes: list[ClassInfo]) -> dict[str, int]:
    """Class id or name -> index; ids win over names when both match."""
    lookup = {c.name: c.index for c in classes}
    lookup.update({c.id: c.index for c in classes})
    return lookup


def _visible_files(folder: Path, root: Path) -> list[tuple[str, str]]:
    """(path, name relative to ``root``) of the files under ``folder``, recursively and sorted,
    without hidden files such as .DS_Store."""
    found = []
    prefix = len(str(root)) + 1
    for directory, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                path = os.path.join(directory, name)
                found.append((path, path[prefix:].replace(os.sep, "/")))
    return found


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _read_csv_rows(path: Path, header: list[str]) -> Iterable[list[str]]:
    """Rows of a CSV file whose first row must be ``header`` (compared without case and spaces)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or [cell.strip().lower() for cell in first] != header:
            found = ",".join(first) if first else "an empty file"
            raise DataError(f"{path}: expected the CSV header {','.join(header)!r}, found {found!r}")
        yield from reader


def _default_images_dir(beside: Path) -> Path:
    for name in ("images", "Images"):
        if (beside.parent / name).is_dir():
            return beside.parent / name
    raise StorageError(f"{beside.parent}: no images/ or Images/ folder beside {beside.name}; pass --images-dir")


def _images_dir(src: Path, images_dir: str | None) -> Path:
    if images_dir is None:
        return _default_images_dir(src)
    return require_path(images_dir, "images directory")


def _clean_captions(raw: Iterable[Any], image: str, skips: SkipLog) -> tuple[str, ...]:
    captions = []
    for caption in raw:
        text = str(caption).strip() if caption is not None else ""
        if text:
            captions.append(text)
        else:
            skips.add("empty caption", image)
    return tuple(captions)


def _captioned_items(
    captions_by_image: dict[str, list[Any]], images_dir: Path, skips: SkipLog, splits: dict[str, str] | None = None
) -> list[SourceItem]:
    items = []
    for image, raw_captions in captions_by_image.items():
        captions = _clean_captions(raw_captions, image, skips)
        if not captions:
            skips.add("missing caption", image)
            continue
        split = splits[image] if splits else None
        items.append(SourceItem(name=image, path=str(images_dir / image), captions=captions, split=split))
    return items


# --- imagefolder ------------------------------------------------------------------------------------


def _class_folder_items(
    root: Path, class_dirs: list[Path], classes: list[ClassInfo], extensions: frozenset[str], wrong_kind: str,
    skips: SkipLog,
) -> list[SourceItem]:
    """The files of ``<root>/<class>/<file>`` labelled by their folder; other classes and file kinds are skipped."""
    lookup = class_lookup(classes)
    items = []
    for class_dir in class_dirs:
        for path, name in _visible_files(class_dir, root):
            if class_dir.name not in lookup:
                skips.add("class not in class list", name)
            elif _extension(name) not in extensions:
                skips.add(wrong_kind, name)
            else:
                items.append(SourceItem(name=name, path=path, label=lookup[class_dir.name]))
    return items


def imagefolder_source(src: str, class_list: str | None, skips: SkipLog) -> Source:
    """``<src>/<class>/<image>``, or the flat ``<src>[/images]/<class>_<name>.<ext>`` layout."""
    root = require_path(src, "source folder")
    if not root.is_dir():
        raise StorageError(f"{root}: not a directory (imagefolder needs <src>/<class>/<image>)")
    listed = read_class_list(class_list) if class_list else None
    flat_dir = _flat_images_dir(root)
    if flat_dir is not None:
        return _flat_image_source(root, flat_dir, listed, skips)
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise DataError(f"{root}: no class folders or images (expected <src>/<class>/<image>)")
    classes = listed or classes_from_ids(d.name for d in class_dirs)
    items = _class_folder_items(root, class_dirs, classes, IMAGE_EXTENSIONS, "not an image file", skips)
    if not items and not skips.total:
        raise DataError(f"{root}: the class folders hold no files")
    return Source(modality="image", items=items, classes=classes)


def _flat_images_dir(root: Path) -> Path | None:
    """The folder of a flat layout (images directly in ``root`` or in its only subfolder ``images/``)."""
    subfolders = _subfolders(root)
    if not subfolders and any(_extension(p.name) in IMAGE_EXTENSIONS for p in root.iterdir()):
        return root
    if [d.name for d in subfolders] == ["images"] and not _subfolders(root / "images"):
        return root / "images"
    return None


def _flat_image_source(root: Path, folder: Path, listed: list[ClassInfo] | None, skips: SkipLog) -> Source:
    """Class id = file name up to the first '_' (``n01440764_tench.JPEG`` -> ``n01440764``)."""
    images = []
    for path, name in _visible_files(folder, root):
        if _extension(name) not in IMAGE_EXTENSIONS:
            # Files beside the images (classes.txt, a README) are not data; files among them are.
            if folder != root:
                skips.add("not an image file", name)
        elif "_" not in os.path.basename(name):
            skips.add("no class prefix in file name", name)
        else:
            images.append((path, name))
    classes = listed or classes_from_ids(_flat_class_id(name) for _, name in images)
    lookup = class_lookup(classes)
    items = []
    for path, name in images:
        if _flat_class_id(name) in lookup:
            items.append(SourceItem(name=name, path=path, label=lookup[_flat_class_id(name)]))
        else:
            skips.add("class not in class list", name)
    if not images and not skips.total:
        raise DataError(f"{root}: no images found")
    return Source(modality="image", items=items, classes=classes)


def _flat_class_id(name: str) -> str:
    return os.path.basename(name).split("_", 1)[0]


# --- image-text formats -----------------------------------------------------------------------------


def captions_csv_source(src: str, images_dir: str | None, skips: SkipLog) -> Source:
    """Flickr8k/Flickr30k ``image,caption`` CSV; one sample per image with all its captions."""
    csv_path = require_path(src, "captions CSV file")
    folder = _images_dir(csv_path, images_dir)
    captions_by_image: dict[str, list[str]] = defaultdict(list)
    for line, row in enumerate(_read_csv_rows(csv_path, ["image", "caption"]), start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{csv_path}: line {line}: expected 2 fields (image,caption), found {len(row)}")
        if not row[0].strip():
            skips.add("caption without an image name", f"line {line}")
            continue
        captions_by_image[row[0].strip()].append(row[1])
    return Source(modality="image-text", items=_captioned_items(captions_by_image, folder, skips))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def _field(record: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}: {where} has no {key!r} field")
    return record[key]


def coco_captions_source(src: str, images_dir: str | None, skips: SkipLog) -> Source:
    """COCO ``captions_*.json``: ``images`` [{id, file_name}] and ``annotations`` [{image_id, caption}]."""
    json_path = require_path(src, "COCO captions JSON file")
    folder = _images_dir(json_path, images_dir)
    data = _load_json(json_path)
    file_names = {
        _field(image, "id", json_path, f"images[{i}]"): _field(image, "file_name", json_path, f"images[{i}]")
        for i, image in enumerate(_field(data, "images", json_path, "the top level"))
    }
    captions_by_image: dict[str, list[Any]] = {name: [] for name in file_names.values()}
    for i, annotation in enumerate(_field(data, "annotations", json_path, "the top level")):
        image_id = _field(annotation, "image_id", json_path, f"annotations[{i}]")
        caption = _field(annotation, "caption", json_path, f"annotations[{i}]")
        if image_id in file_names:
            captions_by_image[file_names[image_id]].append(caption)
        else:
            skips.add("caption of an unknown image", f"image_id {image_id}")
    return Source(modality="image-text", items=_captioned_items(captions_by_image, folder, skips))


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # file's split -> ours


def karpathy_source(src: str, images_dir: str | None, skips: SkipLog) -> Source:
    """Karpathy split file (``dataset_flickr30k.json``...): its own train/val/test; restval joins train."""
    json_path = require_path(src, "Karpathy split JSON file")
    folder = _images_dir(json_path, images_dir)
    captions_by_image: dict[str, list[Any]] = {}
    split_of: dict[str, str] = {}
    for i, image in enumerate(_field(_load_json(json_path), "images", json_path, "the top level")):
        where = f"images[{i}]"
        name = _field(image, "filename", json_path, where)
        if image.get("filepath"):
            name = f"{image['filepath']}/{name}"
        split = _field(image, "split", json_path, where)
        if split not in KARPATHY_SPLITS:
            raise DataError(f"{json_path}: {where} has split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        sentences = _field(image, "sentences", json_path, where)
        captions_by_image[name] = [_field(s, "raw", json_path, f"{where}.sentences") for s in sentences]
        split_of[name] = KARPATHY_SPLITS[split]
    items = _captioned_items(captions_by_image, folder, skips, split_of)
    return Source(modality="image-text", items=items, has_own_splits=True)


# --- video ------------------------------------------------------------------------------------------


def video_source(src: str, class_list: str | None, skips: SkipLog) -> Source:
    """``<src>/<class>/<clip>`` or a ``path,label`` CSV (paths relative to the CSV; label = name or index)."""
    path = require_path(src, "video folder or CSV file")
    listed = read_class_list(class_list) if class_list else None
    if path.is_dir():
        return _video_folder_source(path, listed, skips)
    return _video_csv_source(path, listed, skips)


def _video_folder_source(root: Path, listed: list[ClassInfo] | None, skips: SkipLog) -> Source:
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected <src>/<class>/<clip> or a path,label CSV)")
    classes = listed or classes_from_ids(d.name for d in class_dirs)
    items = _class_folder_items(root, class_dirs, classes, VIDEO_EXTENSIONS, "not a video file", skips)
    return Source(modality="video", items=items, classes=classes)


def _video_csv_source(csv_path: Path, listed: list[ClassInfo] | None, skips: SkipLog) -> Source:
    rows = [row for row in _read_csv_rows(csv_path, ["path", "label"]) if row]
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise DataError(f"{csv_path}: line {line}: expected 2 fields (path,label), found {len(row)}")
    labels = [label.strip() for _, label in rows]
    classes = listed or _classes_from_labels(labels)
    lookup = class_lookup(classes)
    items = []
    for (clip, _), label in zip(rows, labels, strict=True):
        index = lookup.get(label)
        if index is None and label.isdigit() and int(label) < len(classes):
            index = int(label)
        if index is None:
            skips.add("class not in class list", f"{clip} ({label})")
        elif _extension(clip) not in VIDEO_EXTENSIONS:
            skips.add("not a video file", clip)
        else:
            items.append(SourceItem(name=clip, path=str(csv_path.parent / clip), label=index))
    return Source(modality="video", items=items, classes=classes)


def _classes_from_labels(labels: list[str]) -> list[ClassInfo]:
    """Class names sorted, or classes 0..max when every label is an index."""
    if labels and all(label.isdigit() for label in labels):
        return [ClassInfo(index=i, id=str(i), name=str(i)) for i in range(max(int(x) for x in labels) + 1)]
    return classes_from_ids(labels)


# --- digits -----------------------------------------------------------------------------------------


def digits_source() -> Source:
    """scikit-learn's 1,797 handwritten digits as 8x8 grayscale PNGs (0..16 scaled to 0..255)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    items = []
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        items.append(SourceItem(name=f"digits-{i:04d}", data=png.getvalue(), label=int(label)))
    classes = [ClassInfo(index=d, id=str(d), name=str(d)) for d in range(10)]
    return Source(modality="image", items=items, classes=classes)


# --- moving digits: the embedded video data set ------------------------------------------------------

MOVING_CANVAS, MOVING_FRAMES, MOVING_SPEED = 32, 8, 2  # a 32x32 canvas, 8 frames, 2 px per frame
MOVING_DIGIT = 16  # scikit-learn's 8x8 digits, drawn at 16x16
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def moving_digits_source(by_direction: bool = False, clips_per_digit: int = 2, seed: int = 0) -> Source:
    """Clips of scikit-learn's digits moving across a black canvas, like Moving MNIST: each of the 1,797 digits
    drawn at 16x16 twice (``clips_per_digit``), each time sliding 2 px a frame for 8 frames in one of four
    directions from a random start that keeps it whole on the 32x32 canvas. The class is the digit (10
    classes), or with ``by_direction`` the digit and its direction (40 classes: "3 up"), so that only motion
    tells some classes apart. Written as lossless PNG-in-AVI clips; seeded, the same clips every time."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = list(DIRECTIONS)
    items = []
    for i, (image, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        sprite = np.asarray(Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8)).resize(
            (MOVING_DIGIT, MOVING_DIGIT), Image.Resampling.BILINEAR))
        for j in range(clips_per_digit):
            direction = names[int(rng.integers(len(names)))]
            frames = moving_frames(sprite, DIRECTIONS[direction], rng)
            label = int(digit) * len(names) + names.index(direction) if by_direction else int(digit)
            items.append(SourceItem(name=f"moving-digits-{i:04d}-{j}", data=encode_clip(frames), label=label,
                                    path=f"moving-digits-{i:04d}-{j}.avi"))
    if by_direction:
        classes = [ClassInfo(index=d * len(names) + k, id=f"{d}-{name}", name=f"{d} {name}")
                   for d in range(10) for k, name in enumerate(names)]
    else:
        classes = [ClassInfo(index=d, id=str(d), name=str(d)) for d in range(10)]
    return Source(modality="video", items=items, classes=classes)


def moving_frames(sprite, step: tuple[int, int], rng) -> list:
    """(T, canvas, canvas) uint8 frames of ``sprite`` moving ``MOVING_SPEED`` px a frame along ``step``."""
    import numpy as np

    room = MOVING_CANVAS - MOVING_DIGIT  # free positions along each axis
    travel = MOVING_SPEED * (MOVING_FRAMES - 1)
    start = []
    for axis_step in step:
        if axis_step > 0:
            start.append(int(rng.integers(0, room - travel + 1)))
        elif axis_step < 0:
            start.append(int(rng.integers(travel, room + 1)))
        else:
            start.append(int(rng.integers(0, room + 1)))
    frames = []
    for t in range(MOVING_FRAMES):
        row, col = (start[a] + step[a] * MOVING_SPEED * t for a in range(2))
        canvas = np.zeros((MOVING_CANVAS, MOVING_CANVAS), dtype=np.uint8)
        canvas[row:row + MOVING_DIGIT, col:col + MOVING_DIGIT] = sprite
        frames.append(canvas)
    return frames


def encode_clip(frames: list, rate: int = 8) -> bytes:
    """Grayscale frames -> a lossless AVI (PNG frames) that the PyAV decoder reads back exactly."""
    from engine.extras import require

    av = require("av", "video", "writing moving digits")
    out = io.BytesIO()
    with av.open(out, mode="w", format="avi") as container:
        stream = container.add_stream("png", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "gray"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    return out.getvalue()
