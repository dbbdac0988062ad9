"""Streaming: statistics in one pass over batches, per-class samples and epoch orders that do not depend
on how the stream is cut, and experts trained from a stream."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.data.augment import ZCA
from engine.data.memory import CachedShards, ShardReader, load_in_memory
from engine.data.preprocess import PixelStatistics, Preprocess, PreprocessConfig
from engine.data.shards import DataConfig
from engine.data.stream import EpochOrder, EpochStream, StreamedImages
from engine.data.writers import shard_dataset
from engine.distill.base import init_synthetic
from engine.distill.mtt import Config as MTTConfig
from engine.distill.real import StreamClassBatches
from engine.errors import DataError
from engine.runtime.data import RayShardSource


def pixels(n: int = 300, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 6, 6), generator=generator)
    return (base * torch.tensor([0.4, 0.8, 1.0]).view(1, 3, 1, 1)).to(torch.uint8)  # channels differ


def test_streamed_mean_std_and_zca_equal_the_in_memory_ones():
    images = pixels()
    unit = images.float() / 255
    per_channel = unit.transpose(0, 1).reshape(3, -1).double()
    mean, std = per_channel.mean(1), per_channel.std(1)
    normalised = (unit - mean.float().view(1, 3, 1, 1)) / std.float().view(1, 3, 1, 1)
    reference = ZCA.fit(normalised, eps=0.1)

    config = PreprocessConfig(normalize=True, zca=True, zca_eps=0.1)
    streamed = Preprocess.fit_stream(images.split(37), config)  # odd batches: the cut must not matter
    torch.testing.assert_close(streamed.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.std.double(), std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.zca.mean, reference.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.zca.whiten, reference.whiten, rtol=1e-5, atol=1e-5)

    halves = [PixelStatistics(covariance=True).add(part) for part in (images[:111], images[111:])]
    merged = Preprocess.from_statistics(halves[0].merge(halves[1]), config)  # two workers' partial sums
    torch.testing.assert_close(merged.zca.whiten, streamed.zca.whiten, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(streamed.apply(images), streamed.apply(unit))  # uint8 or [0, 1]: the same input


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stream") / "digits"
    shard_dataset("digits", None, str(out), shard_size=97, limit=500, progress=False)
    return str(out)


def keys_of(stream: EpochStream, epoch: int) -> list[str]:
    return [key for batch in stream.epoch(epoch) for key in batch["key"]]


def test_one_epoch_order_whatever_reads_the_shards(ray_session, digits_shards):
    config = DataConfig(shards=digits_shards, image_size=8, channels=1, shuffle_buffer=64)
    order = EpochOrder(seed=7, shuffle_buffer=64)
    sources = {"local": ShardReader(config), "local cache": CachedShards(ShardReader(config)),
               "ray": RayShardSource(config.model_copy(update={"cache": "none"})),
               "ray cache": RayShardSource(config.model_copy(update={"cache": "memory"}), local_below_bytes=0),
               "ray cache filled here": RayShardSource(config.model_copy(update={"cache": "memory"}))}
    assert not sources["ray"].cached and sources["ray cache"].cached
    orders = {name: keys_of(EpochStream(source, order, 32), 0) for name, source in sources.items()}
    reference = orders.pop("local")
    assert len(reference) == len(set(reference)) == 500  # every sample once
    assert all(keys == reference for keys in orders.values()), "readers disagree on the epoch's order"
    stream = EpochStream(sources["local cache"], order, 32)
    assert keys_of(stream, 1) != reference and sorted(keys_of(stream, 1)) == sorted(reference)  # reshuffled
    assert keys_of(stream, 0) == reference  # from the cache, the same epoch again
    batch = next(iter(stream.epoch(0)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 1, 8, 8)
    assert batch["label"].dtype == torch.int64


def test_a_shard_shorter_than_its_manifest_stops_the_epoch(digits_shards, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["num_samples"] += 1
    manifest["shards"][0]["num_samples"] += 1  # the manifest promises a sample the tar does not hold
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stream = EpochStream(ShardReader(DataConfig(shards=str(copy), image_size=8, channels=1)), EpochOrder(0), 50)
    with pytest.raises(DataError, match=r"shard train-000000\.tar: 97 samples read, the manifest says 98"):
        list(stream.epoch(0))


def test_a_shard_that_disappears_mid_stream_is_named(digits_shards, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_shards, copy)
    reader = ShardReader(DataConfig(shards=str(copy), image_size=8, channels=1))
    batches = EpochStream(reader, EpochOrder(0, shuffle_buffer=20), 10).epoch(0)  # reads a shard at a time
    next(batches)
    for shard in copy.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match=r"shard train-00000\d\.tar: gone from .* while it was being read"):
        list(batches)


def test_streamed_initialisation_and_coresets_pick_the_same_samples(digits_shards):
    config = DataConfig(shards=digits_shards, image_size=8, channels=1)
    in_memory = load_in_memory(config)
    streamed = StreamedImages(ShardReader(config, columns=("image", "label", "key")), lambda x: x.float() / 255,
                              (1, 8, 8))
    assert len(streamed) == len(in_memory) and streamed.shape == (500, 1, 8, 8)
    distill = MTTConfig(ipc=3, max_start_epoch=2)
    from_memory = init_synthetic(in_memory.images.float() / 255, in_memory.labels, 10, distill.ipc, distill.init,
                                 torch.Generator().manual_seed(4), 0.01)
    from_stream = init_synthetic(streamed, in_memory.labels, 10, distill.ipc, distill.init,
                                 torch.Generator().manual_seed(4), 0.01)
    torch.testing.assert_close(from_stream.images, from_memory.images, rtol=0, atol=0)
    positions = torch.tensor([499, 3, 3, 250])  # any order, repeats allowed
    torch.testing.assert_close(streamed[positions], in_memory.images[positions].float() / 255, rtol=0, atol=0)
    every = torch.cat(list(streamed.batches()))
    torch.testing.assert_close(every, in_memory.images.float() / 255, rtol=0, atol=0)


def test_class_batches_drop_samples_pruned_while_they_wait_in_the_queue(digits_shards):
    config = DataConfig(shards=digits_shards, image_size=8, channels=1)
    streamed = StreamedImages(ShardReader(config, columns=("image", "label", "key")), lambda x: x.float() / 255,
                              (1, 8, 8))
    counts = torch.bincount(load_in_memory(config).labels, minlength=10).tolist()
    pruned: set[str] = set()
    batches = StreamClassBatches(streamed, counts, classes=[0, 1], batch_size=4, seed=0, shuffle_buffer=16,
                                 skip=pruned)
    batches.batch(1)  # rows of class 0 met on the way wait in its queue
    waiting = [str(row["key"]) for row in batches.queues[0]]
    assert len(waiting) >= 2
    pruned.update(waiting[1:])  # causal pruning judges samples that are already queued, not the first
    for _ in range(counts[0]):
        _, keys = batches.batch(0)
        assert not pruned & set(keys), "a pruned sample was compared with"
    assert batches.skipped[0] == set(waiting[1:])
