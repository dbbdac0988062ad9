"""The image-text pipeline end to end on a tiny generated caption set: a pre-trained tower (cached),
contrastive experts, distilled pairs, retrieval rows for every method, the pairs sheet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from engine import storage
from engine.config import load_config
from engine.evaluate.tasks import RETRIEVAL_METRICS as METRICS
from engine.experiment import ExperimentConfig
from jobs import pipeline

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe", "dot")


def caption_set(folder: Path) -> Path:
    """24 images of coloured shapes, 2 captions each, in the Flickr8k release layout."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows = ["image,caption"]
    rng = np.random.default_rng(0)
    for i in range(24):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        pixels = rng.integers(0, 40, (12, 12, 3)).astype(np.uint8)
        mask = {"square": np.s_[3:9, 3:9], "stripe": np.s_[5:7, :], "dot": np.s_[5:7, 5:7]}[shape]
        pixels[mask] = COLOURS[colour]
        Image.fromarray(pixels).save(images / f"{i:03d}.png")
        rows += [f"{i:03d}.png,a {colour} {shape} on black", f"{i:03d}.png,{shape} coloured {colour}"]
    (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    return folder / "captions.txt"


def test_image_text_pipeline_with_a_pretrained_tower(tmp_path, capsys):
    captions = caption_set(tmp_path / "source")
    tower = {"channels": 1, "num_classes": 0, "image_size": 8, "width": 8, "depth": 2}
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(tmp_path / "shards"), "image_size": 8, "channels": 1, "max_captions": 2},
        "prepare": {"format": "captions-csv", "src": str(captions), "splits": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "pretrain": {
            "data": {"shards": str(tmp_path / "digits"), "image_size": 8, "channels": 1},
            "prepare": {"format": "digits", "splits": {"train": 0.9, "val": 0.1}},
            "model": {"arch": "convnet", "kwargs": {"width": 8, "depth": 2}},
            "train": {"epochs": 2, "lr": 0.05, "batch_size": 128, "dsa": False},
            "checkpoint": str(tmp_path / "tower.safetensors"),
        },
        "model": {"arch": "clip", "kwargs": {"image_tower": {"arch": "convnet", "kwargs": tower}, "embed_dim": 16,
                                             "head": "linear", "freeze_image_encoder": True}},
        "experts": {"num_experts": 2, "record": "heads",
                    "train": {"objective": "contrastive", "epochs": 3, "lr": 0.1, "batch_size": 8, "dsa": False}},
        "distill": {"iterations": 2, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2, "lr_img": 100,
                    "lr_text": 100, "dsa": False},
        "pipeline": {"ipcs": [4]},
        "evaluate": {"sizes": [4, 8], "repeats": 1, "full": True, "full_epochs": 1,
                     "train": {"epochs": 3, "lr": 0.1, "dsa": False}},
        "resources": {"use_ray": False},
    }
    path = tmp_path / "vl.yaml"
    path.write_text(yaml.safe_dump(config))
    rows = pipeline.run_pipeline(load_config(ExperimentConfig, str(path)))

    assert "pre-training the image tower convnet" in capsys.readouterr().out
    measured = {(r["method"], r["size"]) for r in rows}
    assert measured == {("distilled:vl", 4), *((m, s) for m in ("random", "herding", "kcenter", "forgetting")
                                            for s in (4, 8)), ("full", 24)}
    for method, size in measured:
        metrics = {r["metric"]: r for r in rows if (r["method"], r["size"]) == (method, size)}
        assert list(metrics) == list(METRICS)
        recalls = [metrics[m]["mean"] for m in METRICS[:-1]]
        assert all(0 <= v <= 100 for v in recalls) and metrics["rsum"]["mean"] == pytest.approx(sum(recalls), abs=1e-3)
        assert metrics["tr_r10"]["mean"] >= metrics["tr_r1"]["mean"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert table.startswith("| method | size | tr_r1 |")

    out = tmp_path / "run" / "distill" / "vl" / "ipc-4"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "vl" and len(manifest["step_sizes"]) == 2
    assert len(manifest["nearest_captions"]) == 4
    assert all(" on black" in c["caption"] or "coloured" in c["caption"] for c in manifest["nearest_captions"])
    assert "<img src=\"data:image/png;base64," in (out / "pairs.html").read_text()

    # The tower is cached: a second run reuses the checkpoint and every finished step.
    stamp = (tmp_path / "tower.safetensors").stat().st_mtime_ns
    again = pipeline.run_pipeline(load_config(ExperimentConfig, str(path), ["evaluate.methods=[random]", "evaluate.full=false"]))
    assert (tmp_path / "tower.safetensors").stat().st_mtime_ns == stamp
    assert "pre-training" not in capsys.readouterr().out
    assert {r["method"] for r in again} == {"random"}
    assert storage.exists(str(tmp_path / "run" / "results.json"))

    # BiLP level 1 on pairs: each pair scored by its InfoNCE loss, clusters of image embeddings as classes;
    # experts, distillation and coresets then use the kept pairs only.
    kept = load_config(ExperimentConfig, str(path), [
        "selection.method=loss", "selection.keep_ratio=0.5", "selection.scoring_runs=2", "selection.scoring_epochs=1",
        "selection.clusters=3", f"run_dir={tmp_path / 'kept'}", "evaluate.methods=[distilled, random]",
        "evaluate.full=false", "evaluate.sizes=[4]"])
    rows = pipeline.run_pipeline(kept)
    subset_file = next((tmp_path / "kept" / "select").glob("loss-*/kept-0.5.json"))
    subset = json.loads(subset_file.read_text())
    assert subset["class_counts"] == [] and len(subset["header"]["kept_per_group"]) == 3
    assert 6 <= len(subset["keys"]) < 12 and subset["header"]["groups"] == "cluster"
    scores = json.loads((subset_file.parent / "scores.json").read_text())
    assert len(scores["scores"]) == 12 and set(scores["groups"].values()) == {0, 1, 2}
    assert {r["method"] for r in rows} == {"distilled:vl", "random"}
