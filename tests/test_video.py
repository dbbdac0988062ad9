"""Video end to end: the embedded moving digits, clips through Ray Data, and bad clips at shard and read time."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import sources
from engine.data.memory import load_in_memory
from engine.data.shards import DataConfig, iter_shards, resolve_shards
from engine.data.writers import shard_dataset
from engine.errors import DataError
from engine.runtime.data import count_samples, materialize


def test_moving_digits_are_clips_of_a_digit_sliding_across_the_canvas():
    source = sources.moving_digits_source(clips_per_digit=1)
    assert source.modality == "video" and len(source.items) == 1797 and len(source.classes) == 10
    rng = np.random.default_rng(3)
    sprite = np.full((16, 16), 200, dtype=np.uint8)
    frames = sources.moving_frames(sprite, sources.DIRECTIONS["right"], rng)
    assert len(frames) == 8 and frames[0].shape == (32, 32)
    columns = [np.nonzero(f.any(0))[0] for f in frames]
    assert all(c[0] == columns[0][0] + 2 * t and len(c) == 16 for t, c in enumerate(columns))  # 2 px a frame
    by_motion = sources.moving_digits_source(by_direction=True, clips_per_digit=1)
    assert len(by_motion.classes) == 40 and by_motion.classes[12].name == "3 right"


def test_a_moving_digits_shard_round_trips_through_ray_data_with_its_labels(ray_session, tmp_path):
    shards = str(tmp_path / "shards")
    manifest = shard_dataset("moving-digits", None, shards, shard_size=40, limit=120,
                             splits={"train": 0.8, "test": 0.2}, progress=False)
    assert manifest.modality == "video" and manifest.splits["train"].num_samples == 96
    counts = count_samples(shards)
    assert counts.class_counts == manifest.splits["train"].class_counts and not counts.mismatches(manifest, "train")
    config = DataConfig(shards=shards, image_size=32, channels=1, frames=8)
    on_ray, local = materialize(config, local_below_bytes=0), load_in_memory(config)
    assert on_ray.images.shape == (96, 8, 1, 32, 32) and on_ray.labels.tolist() == local.labels.tolist()
    torch.testing.assert_close(on_ray.images, local.images, rtol=0, atol=0)
    # lossless: the first sample decodes to exactly the frames generated for it, and its label is its digit
    written = next(iter_shards(resolve_shards(shards, "train"), None))
    source = next(it for it in sources.moving_digits_source().items if it.data == written.members["video"])
    assert np.array_equal(local.images[0, :, 0].numpy(), np.stack(_frames_of(source.data)))
    assert local.labels[0].item() == source.label == int(written.members["cls"])


def test_an_undecodable_clip_is_skipped_at_shard_time_and_named_at_read_time(ray_session, tmp_path):
    src = tmp_path / "clips"
    (src / "a").mkdir(parents=True)
    good = sources.moving_digits_source(clips_per_digit=1).items[:3]
    for i, item in enumerate(good):
        (src / "a" / f"{i}.avi").write_bytes(item.data)
    (src / "a" / "truncated.avi").write_bytes(good[0].data[:300])
    shards = str(tmp_path / "shards")
    manifest = shard_dataset("video", str(src), shards, splits={"train": 1.0}, progress=False)
    assert manifest.skipped == {"unreadable video": 1} and manifest.skipped_examples["unreadable video"] == [
        "a/truncated.avi"]
    # a clip broken after sharding: the readers name the shard and the sample
    tar_path = Path(shards) / "train-000000.tar"
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info.name, data[:200] if info.name == "train-00000001.avi" else data))
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = DataConfig(shards=shards, image_size=16, channels=1, frames=8)
    message = r"shard train-000000.tar, sample train-00000001: corrupt or unreadable video"
    with pytest.raises(DataError, match=message):
        load_in_memory(config)
    for local_below_bytes in (0, 2**30):  # decoded by Ray tasks, and by this process (a small split)
        with pytest.raises(DataError, match=message):
            materialize(config, local_below_bytes=local_below_bytes)


def _frames_of(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="gray") for f in container.decode(video=0)]
