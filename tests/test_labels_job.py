"""The labels stage end to end on generated CIFAR-shaped data (configs/cifar10-hello.yaml cut to one tiny
step): it resumes without redoing work, and refuses a projector of another class list or a missing teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_configs import shrink

from engine.config import validate, with_overrides
from engine.errors import DataError
from engine.experiment import ExperimentConfig
from engine.stages.context import expert_snapshot, prepare_data
from jobs.labels import run_labels

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10-hello.yaml"


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    root = tmp_path_factory.mktemp("hello")
    config = validate(ExperimentConfig, shrink(yaml.safe_load(CONFIG.read_text()), root), str(CONFIG))
    return config, run_labels(config)


def test_a_second_run_reuses_the_images_store_and_projector(hello, capsys):
    config, rows = hello
    folder = Path(config.run_dir) / "labels"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = run_labels(config)
    out = capsys.readouterr().out
    assert "(already fitted)" in out and "already complete" in out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == before  # nothing rewritten
    assert [r["label_bytes"] for r in again] == [r["label_bytes"] for r in rows]
    soft = next(r for r in rows if r["labels"] == "soft-stored")
    store = folder / "random" / "soft-labels"
    assert soft["label_bytes"] == sum(p.stat().st_size for p in store.glob("epoch-*.safetensors"))
    assert next(r for r in rows if r["labels"] == "hard")["label_bytes"] == 0


def test_a_projector_for_another_class_list_is_refused(hello):
    config, _ = hello
    info = Path(config.run_dir) / "labels" / "projector" / "projector.json"
    saved = info.read_text()
    stored = json.loads(saved)
    stored["identity"]["classes"] = ["cat", "dog", "emu"]
    info.write_text(json.dumps(stored))
    try:
        with pytest.raises(DataError, match=r"projector.json: a projector for another class list \(3 classes"):
            run_labels(config)
    finally:
        info.write_text(saved)


def test_a_teacher_snapshot_the_store_does_not_hold_is_a_clear_error(hello):
    config, _ = hello
    with pytest.raises(DataError, match=r"trajectories: expert 0 has no snapshot of epoch 9 \(epochs 0 \.\. 2\)"):
        expert_snapshot(config, prepare_data(config), 0, 9, torch.device("cpu"))
    with pytest.raises(DataError, match=r"no complete expert 3"):
        expert_snapshot(config, prepare_data(config), 3, None, torch.device("cpu"))


def test_teacher_epochs_past_the_experts_are_refused_at_load():
    raw = yaml.safe_load(CONFIG.read_text())
    raw["labels"]["projector"]["teacher_epochs"] = [3, 40]
    with pytest.raises(Exception, match=r"labels: teacher epochs \[3, 40\] go past experts.train.epochs \(10\)"):
        validate(ExperimentConfig, raw, str(CONFIG))


def test_the_distilled_set_is_an_image_source_too(hello):
    config, _ = hello
    distilled = with_overrides(config, {"labels.images": ["distilled"], "labels.kinds": ["hard", "soft-stored"]})
    rows = run_labels(distilled)
    assert [r["method"] for r in rows] == ["hard:distilled", "soft-stored:distilled"]
    assert (Path(config.run_dir) / "labels" / "distilled" / "grid.png").exists()
