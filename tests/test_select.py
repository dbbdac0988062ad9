"""BiLP level 1: scoring, the kept subset, and every later stage reading only the kept samples."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine import storage
from engine.config import load_config
from engine.data.shards import DataConfig
from engine.data.stream import EpochOrder, EpochStream
from engine.data.writers import shard_dataset
from engine.errors import EngineError
from engine.experiment import ExperimentConfig
from engine.runtime import LocalRuntime
from engine.select.bilp import keep_lowest
from engine.select.subset import KeptSamples, Subset
from engine.stages import buffer, distill, evaluate, select
from engine.stages.context import selection_folder, subset_url
from engine.trajectories import TrajectoryStore

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    shard_dataset("digits", None, str(out), shard_size=300, splits={"train": 0.7, "val": 0.1, "test": 0.2})
    return str(out)


def write_config(tmp_path: Path, shards: str, **sections) -> str:
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": shards, "image_size": 8, "channels": 1},
        "model": {"arch": "convnet", "kwargs": {"width": 8, "depth": 1}},
        "experts": {"num_experts": 1, "val_split": None, "train": {"epochs": 2, "lr": 0.05, "batch_size": 64}},
        "selection": {"method": "random", "keep_ratio": 0.3},
        "distill": {"method": "mtt", "iterations": 2, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1},
        "pipeline": {"ipcs": [2]},
        "evaluate": {"methods": ["distilled", "random", "herding", "forgetting"], "repeats": 1, "full": True,
                     "full_epochs": 1, "train": {"epochs": 2}},
        "resources": {"use_ray": False},
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_keep_lowest_keeps_the_lowest_scores_of_each_class():
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 0.5, 0.7, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert keep_lowest(scores, groups, 0.5).tolist() == [1, 3, 5, 6]
    assert keep_lowest(scores, groups, 0.1, minimum=1).tolist() == [1, 5]  # at least one per class
    assert keep_lowest(scores, groups, 0.1, minimum=3).tolist() == [1, 2, 3, 5, 6, 7]


def poison_pruned_samples(shards: str, subset: Subset) -> int:
    """Rewrite the training shards in place with every sample outside the subset made undecodable, so that
    any stage that decodes one of them fails with a DataError naming it."""
    poisoned = 0
    for path in Path(shards).glob("train-*.tar"):
        members = []
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info).read()
                key, kind = info.name.split(".", 1)
                if key not in subset.keys and kind in ("png", "jpg"):
                    data, poisoned = b"pruned: not an image", poisoned + 1
                members.append((info.name, data))
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return poisoned


def test_the_kept_subset_is_honoured_by_buffer_distill_and_evaluate(digits, tmp_path):
    shards = str(tmp_path / "shards")
    shard_dataset("digits", None, shards, shard_size=300, splits={"train": 0.7, "val": 0.1, "test": 0.2})
    config = load_config(ExperimentConfig, write_config(tmp_path, shards))
    runtime = LocalRuntime()
    subset = select.run(config, runtime)
    assert 0.29 < len(subset) / 1258 < 0.32 and min(subset.class_counts) >= 2
    assert poison_pruned_samples(shards, subset) > 800

    buffer.run(config, runtime)  # experts train on the kept samples only (a pruned one would fail to decode)
    store = TrajectoryStore.open(config.store_url)
    assert store.manifest.fingerprint.endswith(f"kept-{subset.fingerprint}")
    distill.run(config, config.distill_for(2), runtime)
    dm = load_config(ExperimentConfig, write_config(tmp_path, shards, distill={"method": "dm", "iterations": 2,
                                                                               "batch_real": 16}))
    distill.run(dm, dm.distill_for(2), runtime)
    rows = evaluate.run(config, runtime)
    assert {r["method"] for r in rows} == {"distilled:mtt", "random", "herding", "forgetting", "full"}
    full = next(r for r in rows if r["method"] == "full")
    assert full["size"] == round(len(subset) / 10)  # the full row trains on the kept samples


def test_a_store_trained_on_the_whole_split_refuses_a_subset_run(digits, tmp_path):
    whole = load_config(ExperimentConfig, write_config(tmp_path, digits, selection={"method": "none"}))
    buffer.run(whole, LocalRuntime())
    kept = load_config(ExperimentConfig, write_config(tmp_path, digits))
    select.run(kept, LocalRuntime())
    with pytest.raises(EngineError, match=r"was recorded on data .*, not .*:kept-"):
        buffer.run(kept, LocalRuntime())


def test_scores_and_subsets_keyed_by_sample_key_survive_resharding(digits, tmp_path):
    config = load_config(ExperimentConfig, write_config(tmp_path, digits))
    subset = select.run(config, LocalRuntime())
    scores = storage.read_json(storage.join(selection_folder(config, buffer.prepare_data(config)), "scores.json"))
    resharded = str(tmp_path / "resharded")  # the same samples, other shards: 7 per shard instead of 300
    shard_dataset("digits", None, resharded, shard_size=7, splits={"train": 0.7, "val": 0.1, "test": 0.2})
    data = DataConfig(shards=resharded, image_size=8, channels=1)
    other = LocalRuntime().source(data, columns=("key", "label"))
    order = [str(k) for b in EpochStream(other, EpochOrder(0), 4096) for k in b["key"]]
    assert sorted(order) == sorted(scores["scores"]) and len(other.shard_names()) > 100
    manifest = buffer.prepare_data(config.model_copy(update={"data": data}))
    counts = subset.counts_on(manifest.fingerprint(), other.shard_names(),
                              lambda: LocalRuntime().source(data, columns=("key", "shard")))
    kept = KeptSamples(LocalRuntime().source(data, columns=("key", "image"), keep=subset.keys), subset.keys, counts)
    read = [str(k) for b in EpochStream(kept, EpochOrder(3), 64).epoch(0) for k in b["key"]]
    assert sorted(read) == sorted(subset.keys)  # every kept sample, nothing else, whatever the layout


def test_scores_or_a_subset_from_other_data_or_emptying_a_class_are_refused(digits, tmp_path):
    config = load_config(ExperimentConfig, write_config(tmp_path, digits))
    subset = select.run(config, LocalRuntime())
    manifest = buffer.prepare_data(config)
    scores_url = Path(selection_folder(config, manifest)) / "scores.json"
    stored = storage.read_json(str(scores_url))
    stored["header"]["data"] = "0123456789abcdef:train:8px:1ch:crop:norm"
    storage.write_json(str(scores_url), stored)
    Path(subset_url(config, manifest)).unlink()
    with pytest.raises(EngineError, match=r"scores.json scores other data \(0123456789abcdef"):
        select.run(config, LocalRuntime())

    emptied = Subset(subset.keys, subset.layout, subset.shard_counts, [0, *subset.class_counts[1:]], subset.header)
    emptied.save(str(tmp_path / "emptied.json"))
    with pytest.raises(EngineError, match=r"emptied.json: the kept subset leaves class 0 with zero samples"):
        Subset.load(str(tmp_path / "emptied.json"))

    other = Subset(subset.keys | {"train-99999999"}, "another layout", {}, [], {})
    with pytest.raises(EngineError, match="names 1 samples that are not in these shards"):
        other.counts_on(manifest.fingerprint(), LocalRuntime().source(config.data).shard_names(),
                        lambda: LocalRuntime().source(config.data, columns=("key", "shard")))


def test_loss_scoring_runs_resume_after_sigkill(digits, tmp_path):
    """Kill `distill select` while its first scoring run is mid-way; the rerun resumes it from its last saved
    epoch, trains the second, and writes the subset."""
    path = write_config(tmp_path, digits, selection={"method": "loss", "keep_ratio": 0.5, "scoring_runs": 2,
                                                     "scoring_epochs": 25, "score_at": "init"})
    config = load_config(ExperimentConfig, path)
    runs = Path(selection_folder(config, buffer.prepare_data(config))) / "runs" / "trajectories"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, "-m", "jobs.select", path], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list((runs / "partial" / "expert-00000").glob("epoch-*.safetensors"))) < 3:
            assert time.time() < deadline, "no scoring epoch was saved in time"
            assert job.poll() is None, "select ended before it was killed"
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not Path(subset_url(config, buffer.prepare_data(config))).exists()
    subset = select.run(config, LocalRuntime())
    store = TrajectoryStore.open(str(runs))
    assert store.experts() == [0, 1]
    assert store.status(0).summary["started_at_epoch"] >= 2  # resumed, not restarted
    assert len(subset) == sum(subset.class_counts) and 600 < len(subset) < 660
