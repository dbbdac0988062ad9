"""Every shipped config loads and validates, says how to run it, and runs end to end on generated data
of its shape (so a config that cannot finish, e.g. one that evaluates on a split it never writes, fails
here rather than after hours on a cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from generated_data import captions_csv, image_folder, video_folder

from engine.config import load_config, validate
from engine.data.writers import shard_dataset
from engine.experiment import ExperimentConfig
from jobs import pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "cifar10.yaml", "imagenet1k.yaml", "kinetics400.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_starts_with_its_command(path):
    config = load_config(ExperimentConfig, str(path))
    assert Path(config.run_dir).is_absolute()  # Ray workers run elsewhere: local paths are resolved at load
    first_lines = path.read_text().splitlines()[:12]
    assert first_lines[0].startswith("# ") and any("uv run distill" in line for line in first_lines)


# --- every shipped config runs end to end, on generated data of its shape ---------------------------------

SMOKE_CLASSES = ["alpha", "beta", "gamma"]


def shrink(raw: dict, root: Path) -> dict:
    """The config with its data generated under ``root`` and every budget cut to one tiny step; its
    model, data shape, methods, sizes and splits are kept."""
    raw = dict(raw, run_dir=str(root / "run"))
    raw["data"] = dict(raw["data"], shards=str(root / "shards"))
    if raw.get("prepare"):
        raw["prepare"] = generated_sources(raw["prepare"], raw["data"], root)
    else:  # shards the user writes first (kinetics400): write them the way its header says
        generate_video_shards(raw["data"], root)
    if raw.get("pretrain"):
        pretrain = raw["pretrain"]
        pretrain["data"] = dict(pretrain["data"], shards=str(root / "tower-shards"))
        pretrain["prepare"] = generated_sources(pretrain["prepare"], pretrain["data"], root / "tower")
        pretrain["train"] = dict(pretrain.get("train", {}), epochs=1)
        pretrain["checkpoint"] = str(root / "tower.safetensors")
    raw["experts"] = dict(raw.get("experts", {}), num_experts=1)
    raw["experts"]["train"] = dict(raw["experts"].get("train", {}), epochs=2)
    raw["distill"] = tiny_distill(raw.get("distill", {}))
    pipeline = raw.setdefault("pipeline", {})
    pipeline["per_ipc"] = {ipc: tiny_distill({"method": raw["distill"].get("method"), **values}, keep_method=False)
                           for ipc, values in pipeline.get("per_ipc", {}).items()}
    pipeline["variants"] = {name: tiny_variant(values) for name, values in pipeline.get("variants", {}).items()}
    if raw.get("selection"):
        raw["selection"] = dict(raw["selection"], scoring_runs=1, scoring_epochs=1)
    evaluate = raw.setdefault("evaluate", {})
    evaluate.update(repeats=1, full_epochs=1)
    evaluate["train"] = dict(evaluate.get("train", {}), epochs=1)
    if raw.get("prepare", {}).get("format") == "captions-csv":  # pairs: sizes that fit 24 generated images
        pipeline["ipcs"], evaluate["sizes"] = [4], [4, 8]
    if not raw.get("prepare"):  # generated clips: 4 training clips per class, about 2 after a half is selected
        pipeline["ipcs"] = [1, 2]
    if raw.get("labels"):
        raw["labels"] = shrink_labels(raw["labels"], raw["data"], root)
    raw["resources"] = {"use_ray": False}
    return raw


def shrink_labels(labels: dict, data: dict, root: Path) -> dict:
    """One image per class, students and projector one tiny step, the dual encoder on generated pairs and a
    tower pre-trained for one epoch on the generated training split."""
    labels = dict(labels, ipc=1)
    labels["student"] = dict(labels.get("student", {}), epochs=2, batch_size=3)
    labels["rded"] = dict(labels.get("rded", {}), images_per_class=8, crops=2)
    labels["projector"] = dict(labels.get("projector", {}), teacher_epochs=[1, 2], epochs=1, max_batches=1)
    encoder = dict(labels.get("encoder", {}))
    if encoder:
        encoder["data"] = dict(encoder["data"], shards=str(root / "encoder-shards"))
        encoder["prepare"] = generated_sources(encoder["prepare"], encoder["data"], root / "encoder")
        encoder["pretrain"] = dict(encoder["pretrain"], data=dict(encoder["pretrain"]["data"], shards=data["shards"]),
                                   checkpoint=str(root / "encoder-tower.safetensors"))
        encoder["pretrain"]["train"] = dict(encoder["pretrain"].get("train", {}), epochs=1)
        encoder["experts"] = dict(encoder["experts"], num_experts=1)
        encoder["experts"]["train"] = dict(encoder["experts"]["train"], epochs=1)
        labels["encoder"] = encoder
    return labels


def tiny_distill(distill: dict, keep_method: bool = True) -> dict:
    """One tiny step of the section's method (trajectory matching or distribution matching)."""
    tiny = {"iterations": 2, "checkpoint_every": 1, "snapshot_every": 1}
    if distill.get("method", "mtt") == "dm":
        tiny["batch_real"] = 8
    else:
        tiny |= {"syn_steps": 2, "max_start_epoch": 1, "expert_epochs": 1}
    out = dict(distill, **tiny)
    return out if keep_method else {k: v for k, v in out.items() if k != "method"}


def tiny_variant(overrides: dict) -> dict:
    """A pipeline variant with its own distill section cut to one tiny step too."""
    if "distill" in overrides:
        overrides = dict(overrides, distill=tiny_distill(overrides["distill"]))
    if "pipeline.per_ipc" in overrides:
        overrides = dict(overrides, **{"pipeline.per_ipc": {}})
    return overrides


def generated_sources(prepare: dict, data: dict, root: Path) -> dict:
    prepare = dict(prepare)
    side = data["image_size"]
    if prepare["format"] == "imagefolder":
        prepare["src"] = str(image_folder(root / "train", SMOKE_CLASSES, 70, (side + 8, side + 4)))
        if prepare.get("test_src"):
            prepare["test_src"] = str(image_folder(root / "test", SMOKE_CLASSES, 4, (side + 8, side + 4), seed=1))
        if prepare.get("class_list"):
            (root / "classes.txt").write_text("".join(f"{c}\t{c} name\n" for c in SMOKE_CLASSES))
            prepare["class_list"] = str(root / "classes.txt")
    elif prepare["format"] == "captions-csv":
        prepare["src"] = str(captions_csv(root / "flickr", 24))
    elif prepare["format"].startswith("moving-digits"):
        prepare["limit"] = 300  # clips made from the embedded digits: a few of them
    else:
        assert prepare["format"] == "digits", f"no generator for {prepare['format']}"
    return prepare


def generate_video_shards(data: dict, root: Path) -> None:
    frames = data.get("frames", 8) + 2
    train = video_folder(root / "clips", SMOKE_CLASSES, 5, frames=frames)
    test = video_folder(root / "test-clips", SMOKE_CLASSES, 1, frames=frames, seed=1)
    shard_dataset("video", str(train), data["shards"], splits={"train": 0.8, "val": 0.2}, test_src=str(test),
                  progress=False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_runs_end_to_end_on_generated_data(path, tmp_path):
    raw = shrink(yaml.safe_load(path.read_text()), tmp_path)
    config = validate(ExperimentConfig, raw, str(path))
    rows = pipeline.run_pipeline(config)
    if config.labels is not None:  # a label-space experiment: a row per (kind of labels, images)
        assert {r["method"] for r in rows} == {f"{k}:{i}" for k in config.labels.kinds for i in config.labels.images}
        assert json.loads((tmp_path / "run" / "labels" / "results.json").read_text())["rows"] == rows
        return
    name = f"distilled:{config.distill.method}"
    assert {r["size"] for r in rows if r["method"] == name} == set(config.pipeline.ipcs)
    assert any(r["method"] == f"{name} (best val)" for r in rows)
    variants = {f"distilled:{v}" for v in config.pipeline.variants}
    assert {r["method"] for r in rows if r["method"] in variants} == variants
    coresets = {r["method"] for r in rows} - {name, f"{name} (best val)", "full"} - {
        f"{v}{best}" for v in variants for best in ("", " (best val)")}
    assert coresets == set(config.evaluate.methods) - {"distilled"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["header"]["split"] == config.evaluate.split
