"""The shard writer and `distill shard` on real files: generated images, captions and videos, digits,
the shared real data (Flickr8k, ImageNet samples, Kinetics clips) and S3 on a loopback endpoint."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data
from PIL import Image

from engine import cli
from engine.data.manifest import ShardManifest, sha256_of
from engine.data.sources import SourceItem
from engine.data.writers import FORMATS, assign_splits, parse_splits, shard_dataset
from engine.errors import ConfigError, DataError, StorageError


def _shard(fmt, src, out, **kwargs):
    return shard_dataset(fmt, None if src is None else str(src), str(out), progress=False, **kwargs)


def _members(tar_path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _samples(out: Path, manifest: ShardManifest, split: str = "train") -> list[dict[str, bytes]]:
    """All samples of a split, in shard order, checking the tar layout of the contract on the way:
    keys <split>-<index:08d> consecutive from 0, each sample's members adjacent and sorted,
    deterministic headers."""
    samples: list[dict[str, bytes]] = []
    keys: list[str] = []
    for shard in manifest.shards_of(split):
        with tarfile.open(out / shard.name) as tar:
            for member in tar.getmembers():
                assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
                assert member.uname == member.gname == ""
        names = [name for name, _ in _members(out / shard.name)]
        shard_keys = list(dict.fromkeys(name.split(".", 1)[0] for name in names))
        assert len(shard_keys) == shard.num_samples
        for key in shard_keys:
            positions = [i for i, name in enumerate(names) if name.startswith(key + ".")]
            assert positions == list(range(positions[0], positions[0] + len(positions))), "members not adjacent"
            assert [names[i] for i in positions] == sorted(names[i] for i in positions)
        for name, data in _members(out / shard.name):
            key, ext = name.split(".", 1)
            if not keys or keys[-1] != key:
                keys.append(key)
                samples.append({})
            samples[-1][ext] = data
    assert keys == [f"{split}-{i:08d}" for i in range(len(keys))]
    assert len(samples) == manifest.splits[split].num_samples
    return samples


def _check_shard_files(out: Path, manifest: ShardManifest) -> None:
    for shard in manifest.shards:
        path = out / shard.name
        assert path.stat().st_size == shard.bytes
        assert sha256_of(str(path)) == shard.sha256


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels in ``mode``, alpha included when the mode has one."""
    rgba = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba if "A" in mode else rgba[..., :3]).convert(mode)


# --- digits ------------------------------------------------------------------------------------------


def test_digits_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest = _shard("digits", None, tmp_path, shard_size=500)

    assert manifest.modality == "image"
    assert manifest.num_samples == 1797
    assert [c.name for c in manifest.classes] == [str(d) for d in range(10)]
    assert manifest.splits["train"].class_counts == np.bincount(digits.target).tolist()
    assert [s.num_samples for s in manifest.shards] == [500, 500, 500, 297]
    assert ShardManifest.load(str(tmp_path)) == manifest
    _check_shard_files(tmp_path, manifest)

    expected = Counter(
        (int(label), np.rint(image * 255 / 16).astype(np.uint8).tobytes())
        for image, label in zip(digits.images, digits.target, strict=True)
    )
    found = Counter()
    for sample in _samples(tmp_path, manifest):
        assert set(sample) == {"cls", "png"}
        image = _decode(sample["png"])
        assert (image.mode, image.size) == ("L", (8, 8))
        found[(int(sample["cls"]), np.asarray(image).tobytes())] += 1
    assert found == expected
    labels_in_first_shard = {int(s["cls"]) for s in _samples(tmp_path, manifest)[:500]}
    assert len(labels_in_first_shard) == 10, "samples are shuffled so every shard mixes classes"


def test_rerun_gives_identical_shards(tmp_path):
    options = {"shard_size": 150, "splits": {"train": 0.7, "val": 0.3}, "seed": 3, "limit": 400}
    first = _shard("digits", None, tmp_path / "a", **options)
    second = _shard("digits", None, tmp_path / "b", **options)
    assert [(s.name, s.sha256, s.bytes) for s in first.shards] == [(s.name, s.sha256, s.bytes) for s in second.shards]
    for shard in first.shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    assert first.fingerprint() == second.fingerprint()
    other_seed = _shard("digits", None, tmp_path / "c", **{**options, "seed": 4})
    assert other_seed.fingerprint() != first.fingerprint()


# --- splits ------------------------------------------------------------------------------------------


def test_splits_are_stratified_and_deterministic():
    sizes = {0: 100, 1: 57, 2: 13, 3: 1000}
    items = [SourceItem(name=f"{label}/{i}", label=label) for label, n in sizes.items() for i in range(n)]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = assign_splits(items, fractions, seed=7)

    assert sorted(i.name for split in splits.values() for i in split) == sorted(i.name for i in items)
    for name, fraction in fractions.items():
        assert abs(len(splits[name]) - fraction * len(items)) <= 1
        counts = Counter(item.label for item in splits[name])
        for label, n in sizes.items():
            assert abs(counts[label] - fraction * n) <= 2, (name, label, counts[label])
    assert Counter(i.label for i in splits["val"])[3] == 100
    assert assign_splits(items, fractions, seed=7) == splits
    assert assign_splits(items, fractions, seed=8)["val"] != splits["val"]


def test_splits_in_manifest(tmp_path):
    manifest = _shard("digits", None, tmp_path, splits=parse_splits("train=0.8,val=0.1,test=0.1"))
    assert list(manifest.splits) == ["train", "val", "test"]
    assert [manifest.splits[s].num_samples for s in ("train", "val", "test")] == [1437, 180, 180]
    assert all(17 <= n <= 19 for n in manifest.splits["val"].class_counts)
    assert {s.split for s in manifest.shards} == {"train", "val", "test"}
    assert manifest.options["splits"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    _samples(tmp_path, manifest, "val")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train=0.8,val=0.3", "fractions sum to 1.1, expected 1"),
        ("train:0.8", "expected name=fraction pairs"),
        ("train=abc", "expected name=fraction pairs"),
        ("train=0.5,train=0.5", "expected name=fraction pairs"),
        ("train=1.0,val=0", "fraction of 'val' must be in (0, 1]"),
        ("tr-ain=1.0", "may hold only letters, digits and '_'"),
    ],
)
def test_bad_splits(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_splits(text)


# --- imagefolder -------------------------------------------------------------------------------------


def _mixed_image_folder(root: Path) -> dict[str, Path]:
    """Two classes with every kind of image the writer must keep, one truncated JPEG and one text file."""
    files = {
        "cat/rgb.jpg": _save(_noise("RGB", (40, 30)), root / "cat/rgb.jpg", quality=90),
        "cat/gray.png": _save(_noise("L", (20, 20)), root / "cat/gray.png"),
        "cat/cmyk.jpg": _save(_noise("CMYK", (24, 16)), root / "cat/cmyk.jpg"),
        "cat/rgba.png": _save(_noise("RGBA", (16, 24)), root / "cat/rgba.png"),
        "cat/palette.gif": _save(_noise("RGB", (20, 10)).convert("P"), root / "cat/palette.gif"),
        "dog/a.jpeg": _save(_noise("RGB", (32, 32), 1), root / "dog/a.jpeg"),
        "dog/b.JPG": _save(_noise("RGB", (32, 32), 2), root / "dog/b.JPG"),
        "dog/deep.png": _save(Image.fromarray(np.full((6, 5), 40000, np.uint16)), root / "dog/deep.png"),
    }
    truncated = _save(_noise("RGB", (64, 64), 3), root / "dog/truncated.jpg")
    truncated.write_bytes(truncated.read_bytes()[:600])
    (root / "dog/notes.txt").write_text("not an image")
    (root / "dog/.DS_Store").write_bytes(b"\0")
    return files


def test_imagefolder_keeps_every_mode_and_skips_truncated(tmp_path):
    files = _mixed_image_folder(tmp_path / "src")
    manifest = _shard("imagefolder", tmp_path / "src", tmp_path / "out", shard_size=3)

    assert [(c.index, c.id, c.name) for c in manifest.classes] == [(0, "cat", "cat"), (1, "dog", "dog")]
    assert manifest.splits["train"].class_counts == [5, 3]
    assert manifest.skipped == {"not an image file": 1, "unreadable image": 1}
    assert manifest.skipped_examples == {"not an image file": ["dog/notes.txt"], "unreadable image": ["dog/truncated.jpg"]}
    assert [s.num_samples for s in manifest.shards] == [3, 3, 2]
    _check_shard_files(tmp_path / "out", manifest)

    samples = _samples(tmp_path / "out", manifest)
    by_bytes = {next(v for k, v in s.items() if k != "cls"): s for s in samples}
    for name, path in files.items():
        raw = path.read_bytes()
        if name.endswith(".gif"):
            continue
        sample = by_bytes[raw]  # JPEG and PNG bytes are kept exactly
        assert int(sample["cls"]) == (0 if name.startswith("cat") else 1)
        assert ("jpg" in sample) == (Image.open(path).format == "JPEG")
    modes = sorted(_decode(next(v for k, v in s.items() if k != "cls")).mode for s in samples)
    assert modes == sorted(["RGB", "L", "CMYK", "RGBA", "RGB", "RGB", "RGB", "I;16"])  # the GIF became RGB PNG
    (gif_sample,) = [s for s in samples if s.get("png") and s["png"] not in {p.read_bytes() for p in files.values()}]
    assert np.array_equal(np.asarray(_decode(gif_sample["png"])), np.asarray(Image.open(files["cat/palette.gif"]).convert("RGB")))


def test_max_side_reencodes_only_what_is_too_large(tmp_path):
    src = tmp_path / "src"
    small = _save(_noise("RGB", (20, 10)), src / "a/small.jpg")
    _save(_noise("RGB", (300, 200)), src / "a/large.jpg")
    _save(_noise("RGBA", (100, 300)), src / "b/large_alpha.png")
    _save(_noise("L", (128, 64)), src / "b/large_gray.png")
    manifest = _shard("imagefolder", src, tmp_path / "out", max_side=64)

    assert manifest.options["max_side"] == 64
    found = {}
    for sample in _samples(tmp_path / "out", manifest):
        (ext,) = set(sample) - {"cls"}
        image = _decode(sample[ext])
        found[(image.size, image.mode)] = ext
        if image.size == (20, 10):
            assert sample[ext] == small.read_bytes()
    assert found == {
        ((20, 10), "RGB"): "jpg",
        ((64, 43), "RGB"): "jpg",
        ((21, 64), "RGBA"): "png",
        ((64, 32), "L"): "jpg",
    }


def test_exif_rotated_photo_is_stored_upright(tmp_path):
    photo = _noise("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    _save(photo, tmp_path / "src/a/rotated.jpg", exif=exif)
    plain = _save(photo, tmp_path / "src/a/plain.jpg")
    manifest = _shard("imagefolder", tmp_path / "src", tmp_path / "out")
    sizes = {}
    for sample in _samples(tmp_path / "out", manifest):
        sizes[sample["jpg"] == plain.read_bytes()] = _decode(sample["jpg"]).size
    assert sizes == {True: (40, 20), False: (20, 40)}


def test_imagefolder_with_class_list(tmp_path):
    _save(_noise("RGB", (8, 8)), tmp_path / "src/n02/x.jpg")
    _save(_noise("RGB", (8, 8)), tmp_path / "src/n01/y.jpg")
    _save(_noise("RGB", (8, 8)), tmp_path / "src/stray/z.jpg")
    (tmp_path / "classes.txt").write_text("n03\tthird\nn01\tfirst\nn02\tsecond\n")
    manifest = _shard("imagefolder", tmp_path / "src", tmp_path / "out", class_list=str(tmp_path / "classes.txt"))
    assert [(c.id, c.name) for c in manifest.classes] == [("n03", "third"), ("n01", "first"), ("n02", "second")]
    assert manifest.splits["train"].class_counts == [0, 1, 1]
    assert manifest.skipped == {"class not in class list": 1}

    (tmp_path / "ids.txt").write_text("n01\nn02\n")
    by_id = _shard("imagefolder", tmp_path / "src", tmp_path / "out2", class_list=str(tmp_path / "ids.txt"))
    assert [(c.id, c.name) for c in by_id.classes] == [("n01", "n01"), ("n02", "n02")]


def test_a_separate_test_source_becomes_the_test_split(tmp_path):
    for split, count in (("train", 10), ("test", 3)):
        for cls in ("cat", "dog"):
            for i in range(count):
                _save(_noise("RGB", (8, 8), seed=i), tmp_path / f"{split}/{cls}/{i}.png")
    manifest = _shard("imagefolder", tmp_path / "train", tmp_path / "out", splits={"train": 0.8, "val": 0.2},
                      test_src=str(tmp_path / "test"))
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 16, "val": 4, "test": 6}
    assert manifest.splits["test"].class_counts == [3, 3]
    assert manifest.options["test_src"] == str(tmp_path / "test")

    _save(_noise("RGB", (8, 8)), tmp_path / "test/bird/0.png")
    with pytest.raises(DataError, match="classes .* differ from those of"):
        _shard("imagefolder", tmp_path / "train", tmp_path / "out2", test_src=str(tmp_path / "test"))
    with pytest.raises(ConfigError, match="'test' split and a test source"):
        _shard("imagefolder", tmp_path / "train", tmp_path / "out3", splits={"train": 0.5, "test": 0.5},
               test_src=str(tmp_path / "train"))


def test_imagenet_samples_flat_layout(tmp_path):
    root = shared_data("imagenet-samples")
    classes_txt = str(root / "classes.txt")
    manifest = _shard("imagefolder", root, tmp_path, class_list=classes_txt, limit=120, shard_size=50)

    assert len(manifest.classes) == 1000
    assert (manifest.classes[0].id, manifest.classes[0].name) == ("n01440764", "tench")
    counts = manifest.splits["train"].class_counts
    assert sum(counts) == manifest.num_samples == 120 and set(counts) == {0, 1}
    assert manifest.skipped == {}
    wnids = {path.name.split("_", 1)[0]: path for path in (root / "images").iterdir()}
    for sample in _samples(tmp_path, manifest):
        assert sample["jpg"] == wnids[manifest.classes[int(sample["cls"])].id].read_bytes()


# --- image-text --------------------------------------------------------------------------------------


def test_captions_csv_generated(tmp_path):
    _save(_noise("RGB", (16, 16), 1), tmp_path / "images/a.jpg")
    _save(_noise("RGB", (16, 16), 2), tmp_path / "images/b.jpg")
    _save(_noise("RGB", (16, 16), 3), tmp_path / "images/c.jpg")
    rows = [
        ("a.jpg", "A dog, running on grass ."),
        ("a.jpg", 'He said "hi", twice'),
        ("a.jpg", "   "),
        ("b.jpg", ""),
        ("c.jpg", "A cat ."),
        ("gone.jpg", "An image nobody has ."),
        ("", "A caption of no image ."),
    ]
    with (tmp_path / "captions.txt").open("w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    manifest = _shard("captions-csv", tmp_path / "captions.txt", tmp_path / "out")

    assert manifest.modality == "image-text" and manifest.classes == []
    assert manifest.splits["train"].num_samples == 2
    assert manifest.splits["train"].num_captions == 3
    assert manifest.skipped == {
        "caption without an image name": 1,
        "empty caption": 2,
        "missing caption": 1,
        "missing image": 1,
    }
    assert manifest.skipped_examples["missing image"] == ["gone.jpg"]
    records = {}
    for sample in _samples(tmp_path / "out", manifest):
        assert set(sample) == {"jpg", "json"}
        record = json.loads(sample["json"])
        assert sample["jpg"] == (tmp_path / "images" / record["id"]).read_bytes()
        records[record["id"]] = record["captions"]
    assert records == {"a.jpg": ["A dog, running on grass .", 'He said "hi", twice'], "c.jpg": ["A cat ."]}


def test_captions_csv_flickr8k(tmp_path):
    captions = shared_data("flickr8k", "captions.txt")
    manifest = _shard("captions-csv", captions, tmp_path, shard_size=300, splits={"train": 0.9, "val": 0.1})
    assert {k: (v.num_samples, v.num_captions) for k, v in manifest.splits.items()} == {
        "train": (720, 3600),
        "val": (80, 400),
    }
    assert manifest.skipped == {}
    assert len(manifest.shards) == 4
    sample = _samples(tmp_path, manifest, "val")[0]
    record = json.loads(sample["json"])
    assert len(record["captions"]) == 5
    assert sample["jpg"] == (captions.parent / "images" / record["id"]).read_bytes()


def test_captions_csv_without_header_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text("a.jpg,A dog .\n")
    with pytest.raises(DataError, match=r"captions\.csv: expected the CSV header 'image,caption', found 'a\.jpg,A dog \.'"):
        _shard("captions-csv", tmp_path / "captions.csv", tmp_path / "out")


def test_karpathy_json_keeps_its_splits(tmp_path):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        _save(_noise("RGB", (12, 12), i), tmp_path / f"imgs/part{i % 2}/{i}.jpg")
        sentences = [{"raw": f"picture {i} ."}, {"raw": f"another view of {i}", "tokens": ["x"]}]
        images.append({"filepath": f"part{i % 2}", "filename": f"{i}.jpg", "split": split, "sentences": sentences})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    src = tmp_path / "dataset.json"
    manifest = _shard("karpathy-json", src, tmp_path / "out", images_dir=str(tmp_path / "imgs"))

    assert {k: (v.num_samples, v.num_captions) for k, v in manifest.splits.items()} == {
        "train": (2, 4),
        "val": (1, 2),
        "test": (2, 4),
    }
    (val,) = _samples(tmp_path / "out", manifest, "val")
    assert json.loads(val["json"]) == {"id": "part0/2.jpg", "captions": ["picture 2 .", "another view of 2"]}
    with pytest.raises(ConfigError, match="karpathy-json keeps the train/val/test splits"):
        _shard("karpathy-json", src, tmp_path / "x", images_dir=str(tmp_path / "imgs"), splits={"train": 1.0})


def test_coco_captions(tmp_path):
    for name in ("000001.jpg", "000002.jpg"):
        _save(_noise("RGB", (10, 10)), tmp_path / "images" / name)
    coco = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}, {"id": 3, "file_name": "x.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "one"},
            {"image_id": 2, "caption": "two"},
            {"image_id": 1, "caption": "uno"},
            {"image_id": 9, "caption": "orphan"},
        ],
    }
    (tmp_path / "captions_train2017.json").write_text(json.dumps(coco))
    manifest = _shard("coco-captions", tmp_path / "captions_train2017.json", tmp_path / "out")

    assert manifest.splits["train"].num_samples == 2 and manifest.splits["train"].num_captions == 3
    assert manifest.skipped == {"caption of an unknown image": 1, "missing caption": 1}
    records = {json.loads(s["json"])["id"]: json.loads(s["json"])["captions"] for s in _samples(tmp_path / "out", manifest)}
    assert records == {"000001.jpg": ["one", "uno"], "000002.jpg": ["two"]}


# --- video -------------------------------------------------------------------------------------------


def test_video_class_folders_and_csv(tmp_path):
    kinetics = shared_data("kinetics")
    src = tmp_path / "src"
    (src / "wrestling").mkdir(parents=True)
    (src / "other").mkdir()
    (src / "wrestling/demo.mp4").symlink_to(kinetics / "arm_wrestling_demo.mp4")
    (src / "wrestling/clip.AVI").symlink_to(kinetics / "clip.avi")
    (src / "other/short.mp4").symlink_to(kinetics / "short_0.mp4")
    (src / "other/broken.mp4").write_bytes((kinetics / "short_1.mp4").read_bytes()[:4000])
    manifest = _shard("video", src, tmp_path / "out", shard_size=2)

    assert manifest.modality == "video"
    assert [c.name for c in manifest.classes] == ["other", "wrestling"]
    assert manifest.splits["train"].class_counts == [1, 2]
    assert manifest.skipped == {"unreadable video": 1}
    assert manifest.skipped_examples == {"unreadable video": ["other/broken.mp4"]}
    by_ext = Counter()
    for sample in _samples(tmp_path / "out", manifest):
        (ext,) = set(sample) - {"cls"}
        by_ext[ext] += 1
        originals = {p.resolve().read_bytes() for p in src.rglob("*") if p.suffix.lower() == f".{ext}"}
        assert sample[ext] in originals
    assert by_ext == {"mp4": 2, "avi": 1}

    shutil.copy(kinetics / "clip_10s.mp4", tmp_path / "clip_10s.mp4")
    (tmp_path / "clips.csv").write_text(f"path,label\nclip_10s.mp4,5\n{kinetics / 'clip.avi'},arm wrestling\n")
    labels = str(kinetics / "label_map_k400.txt")
    from_csv = _shard("video", tmp_path / "clips.csv", tmp_path / "out_csv", class_list=labels)
    assert len(from_csv.classes) == 400
    counts = from_csv.splits["train"].class_counts
    assert counts[5] == 1 and counts[[c.name for c in from_csv.classes].index("arm wrestling")] == 1


# --- storage -----------------------------------------------------------------------------------------


def _two_class_folder(root: Path, count: int = 5) -> Path:
    for cls in ("cat", "dog"):
        for i in range(count):
            _save(_noise("RGB", (8, 8), seed=i), root / f"{cls}/{i}.png")
    return root


def _packed(folder: Path, archive: Path) -> Path:
    """``folder`` as a .tar.gz (holding ``<folder name>/<class>/…``, like CIFAR-10's train.tar.gz) or .zip."""
    if archive.name.endswith(".zip"):
        shutil.make_archive(str(archive.with_suffix("")), "zip", folder.parent, folder.name)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("name", ["train.tar.gz", "train.zip"])
def test_an_archive_of_a_folder_is_a_source(tmp_path, name):
    folder = _two_class_folder(tmp_path / "train")
    from_folder = _shard("imagefolder", folder, tmp_path / "from-folder", splits={"train": 0.8, "val": 0.2})
    (tmp_path / "packed").mkdir()
    archive = _packed(folder, tmp_path / "packed" / name)
    test = _packed(_two_class_folder(tmp_path / "test", count=2), tmp_path / "test.tar.gz")
    manifest = _shard("imagefolder", archive, tmp_path / "from-archive", splits={"train": 0.8, "val": 0.2},
                      test_src=str(test))
    assert manifest.source == str(archive) and manifest.options["test_src"] == str(test)
    assert manifest.splits["test"].class_counts == [2, 2]
    for split in ("train", "val"):  # the same samples, in the same order, as from the folder itself
        assert _samples(tmp_path / "from-archive", manifest, split) == _samples(tmp_path / "from-folder", from_folder,
                                                                                 split)


def test_an_archive_on_s3_is_a_source(tmp_path, s3_bucket):
    import fsspec

    bucket_url, config = s3_bucket
    archive = _packed(_two_class_folder(tmp_path / "train"), tmp_path / "train.tar.gz")
    fs = fsspec.filesystem("s3", **config.s3fs_kwargs())
    fs.put(str(archive), f"{bucket_url}/sources/train.tar.gz")
    manifest = shard_dataset("imagefolder", f"{bucket_url}/sources/train.tar.gz", f"{bucket_url}/shards",
                             storage_config=config, progress=False)
    assert manifest.splits["train"].class_counts == [5, 5]
    assert manifest.source == f"{bucket_url}/sources/train.tar.gz"


def test_bad_archives_fail_with_one_clear_line(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"broken\.tar\.gz: not a readable archive"):
        _shard("imagefolder", broken, tmp_path / "out")
    with pytest.raises(DataError, match=r"missing\.zip: no such archive"):
        _shard("imagefolder", tmp_path / "missing.zip", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"archives are read for the folder formats .* not captions-csv"):
        _shard("captions-csv", tmp_path / "captions.tar.gz", tmp_path / "out")


def test_writes_to_s3(s3_bucket):
    bucket_url, config = s3_bucket
    out = f"{bucket_url}/digits"
    manifest = shard_dataset("digits", None, out, shard_size=20, limit=50, storage_config=config, progress=False)
    assert [s.num_samples for s in manifest.shards] == [20, 20, 10]
    assert ShardManifest.load(out, config) == manifest
    for shard in manifest.shards:
        assert sha256_of(f"{out}/{shard.name}", config) == shard.sha256
    with pytest.raises(DataError, match="already holds shards"):
        shard_dataset("digits", None, out, limit=50, storage_config=config, progress=False)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    first = _shard("digits", None, tmp_path, shard_size=100, limit=300)
    assert [s.name for s in first.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(DataError, match=r"already holds shards \(manifest\.json\); pass --overwrite"):
        _shard("digits", None, tmp_path, limit=300)
    with pytest.raises(StorageError, match="no such source folder"):
        _shard("imagefolder", tmp_path / "missing", tmp_path, overwrite=True)
    assert ShardManifest.load(str(tmp_path)) == first, "a failed run leaves the earlier shards alone"

    second = _shard("digits", None, tmp_path, shard_size=300, limit=300, overwrite=True)
    assert [s.name for s in second.shards] == ["train-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train-000000.tar"]


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_sources_fail_with_one_clear_line(tmp_path):
    with pytest.raises(StorageError, match=f"{tmp_path}/nope: no such source folder"):
        _shard("imagefolder", tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no class folders or images"):
        _shard("imagefolder", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown format 'tfrecord'; expected one of: imagefolder"):
        _shard("tfrecord", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="--format video needs --src"):
        _shard("video", None, tmp_path / "out")
    bad = _save(_noise("RGB", (32, 32)), tmp_path / "bad/cls/x.jpg")
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match=r"no usable samples in .*bad: 1 skipped \(unreadable image 1\)"):
        _shard("imagefolder", tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert FORMATS == ("imagefolder", "captions-csv", "coco-captions", "karpathy-json", "video", "digits",
                       "moving-digits", "moving-digits-motion")


def test_cli_prints_a_summary(tmp_path, capsys):
    _mixed_image_folder(tmp_path / "src")
    argv = ["shard", "--format", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert cli.main([*argv, "--splits", "train=0.5,val=0.5", "--shard-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 8 samples in 4 shards" in out
    assert "  train: 4 samples in 2 shards" in out and "  val: 4 samples in 2 shards" in out
    assert "  classes: 2 (cat, dog)" in out
    assert "    unreadable image: 1 (e.g. dog/truncated.jpg)" in out

    assert cli.main(argv) == 2
    assert "distill shard: error:" in capsys.readouterr().err
    assert cli.main([*argv[:4], str(tmp_path / "nope"), *argv[5:], "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"distill shard: error: {tmp_path}/nope: no such source folder"
    assert cli.main([*argv, "--splits", "train=2"]) == 2
    assert "fraction of 'train' must be in (0, 1]" in capsys.readouterr().err
