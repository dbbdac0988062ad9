"""The distill and evaluate jobs on digits: outputs, resume, divergence, data parallelism on Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors

from engine import storage
from engine.config import load_config
from engine.data.manifest import ShardManifest
from engine.data.writers import shard_dataset
from engine.distill.loop import DistillDiverged
from engine.distill.synthetic import CHECKPOINT_NAME, SyntheticSet
from engine.errors import ConfigError, DataError
from engine.experiment import ExperimentConfig
from engine.seeds import evaluation_seeds
from engine.trajectories.train import safetensors_metadata
from jobs import buffer, distill, evaluate

BASE = {
    "data": {"image_size": 8, "channels": 1},
    "model": {"arch": "convnet", "kwargs": {"width": 16, "depth": 2}},
    "experts": {"num_experts": 2, "train": {"epochs": 4, "lr": 0.05, "batch_size": 128}},
    "distill": {"iterations": 4, "syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 2, "lr_img": 100,
                "checkpoint_every": 2},
    "evaluate": {"repeats": 2, "train": {"epochs": 20}},
    "resources": {"use_ray": False},
}


def config_file(folder: Path, run_dir: Path, shards: str, store: str, **sections) -> str:
    raw = json.loads(json.dumps(BASE))
    raw["run_dir"] = str(run_dir)
    raw["data"]["shards"] = shards
    raw["experts"]["store"] = store
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Digits shards and a 2-expert x 4-epoch store, trained once for the module (no Ray)."""
    root = tmp_path_factory.mktemp("distill")
    shards, store = str(root / "shards"), str(root / "store")
    config = config_file(root, root / "buffer", shards, store)
    raw = yaml.safe_load(Path(config).read_text())
    raw["prepare"] = {"format": "digits", "splits": {"train": 0.7, "val": 0.1, "test": 0.2}}
    Path(config).write_text(yaml.safe_dump(raw))
    assert buffer.main([config]) == 0
    return root, shards, store


def load(path: str, *overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, list(overrides))


def test_distill_writes_the_set_and_resumes_to_the_same_result(experiment, tmp_path, capsys):
    root, shards, store = experiment
    whole = load(config_file(tmp_path, tmp_path / "whole", shards, store))
    expected = distill.run_distill(whole)
    matched = expected.metadata["matched_parameters"]  # a classifier recording all: full matching itself
    assert matched == expected.metadata["full_matching_parameters"] > 0
    assert f"matching {matched:,} parameters (all; full matching: {matched:,}, 1.00x)" in capsys.readouterr().out

    split = config_file(tmp_path, tmp_path / "split", shards, store)
    distill.run_distill(load(split, "distill.iterations=2"))  # "interrupted" after 2
    out = tmp_path / "split" / "distill" / "mtt" / "ipc-1"
    assert json.loads((out / "manifest.json").read_text())["iterations"] == 2
    resumed = distill.run_distill(load(split))
    torch.testing.assert_close(resumed.images, expected.images, rtol=0, atol=0)
    torch.testing.assert_close(resumed.alphas, expected.alphas, rtol=0, atol=0)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "mtt" and manifest["ipc"] == 1 and manifest["iterations"] == 4
    assert manifest["step_sizes"] == pytest.approx(resumed.alphas.tolist())
    assert (out / "grid.png").stat().st_size > 0 and (out / CHECKPOINT_NAME).exists()
    checkpoint = json.loads(safetensors_metadata((out / CHECKPOINT_NAME).read_bytes())["checkpoint"])
    assert len(checkpoint["losses"]) == 4  # every iteration's loss, across the resume
    assert Image.open(out / "loss.png").size[0] > 300
    shard_manifest = ShardManifest.load(str(out / "shards"))
    assert shard_manifest.splits["train"].class_counts == [1] * 10
    assert SyntheticSet.load(str(out)).images.shape == (10, 1, 8, 8)


def test_a_checkpoint_with_other_settings_is_refused(experiment, tmp_path):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store)
    distill.run_distill(load(path, "distill.iterations=2"))
    with pytest.raises(Exception, match=r"checkpoint.safetensors was written with other distill settings \(syn_steps\)"):
        distill.run_distill(load(path, "distill.syn_steps=3"))


def test_an_exploding_loss_stops_with_its_iteration_and_keeps_the_last_checkpoint(experiment, tmp_path):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store)
    config = load(path, "distill.lr_lr=1e4", "distill.checkpoint_every=1", "distill.iterations=20")
    with pytest.raises(DistillDiverged, match=r"^iteration (\d+): loss .* the last good checkpoint "
                                              r"\(iteration \d+\) is kept") as failure:
        distill.run_distill(config)
    failed_at = int(failure.value.args[0].split(":")[0].split()[1])
    checkpoint = (tmp_path / "run" / "distill" / "mtt" / "ipc-1" / CHECKPOINT_NAME).read_bytes()
    metadata = json.loads(safetensors_metadata(checkpoint)["checkpoint"])
    assert metadata["iteration"] == failed_at  # the state before the failing iteration, never after
    assert torch.isfinite(load_safetensors(checkpoint)["synthetic/images"]).all()


def test_evaluate_writes_rows_for_every_method_and_a_table(experiment, tmp_path):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store, evaluate={"full": True, "full_epochs": 2})
    config = load(path, "distill.iterations=2")
    distill.run_distill(config)
    rows = evaluate.run_evaluate(config, [1])
    assert [(r["method"], r["size"]) for r in rows] == [
        ("distilled:mtt", 1), ("random", 1), ("herding", 1), ("kcenter", 1), ("forgetting", 1), ("full", 126)]
    seeds = evaluation_seeds(0, 2)
    for r in rows:
        assert r["metric"] == "accuracy" and len(r["runs"]) == 2 and 0 <= r["mean"] <= 100
        assert r["mean"] == pytest.approx(sum(r["runs"]) / 2, abs=1e-3)
        assert r["seeds"] == seeds and r["lr"] > 0 and r["epochs"] == (2 if r["method"] == "full" else 20)
    results = storage.read_json(str(tmp_path / "run" / "results.json"))
    assert results["rows"] == rows
    header = results["header"]
    assert header["split"] == "test" and header["evaluation_seeds"] == seeds and header["train"]["epochs"] == 20
    assert {"python", "torch", "ray", "numpy"} <= set(header["versions"])
    assert header["commit"] is None or len(header["commit"]) >= 40
    table = (tmp_path / "run" / "results.md").read_text()
    assert Image.open(tmp_path / "run" / "results.png").size[1] > 300
    assert "| distilled:mtt |" in table and "| herding |" in table


def test_results_scored_on_another_split_are_kept_and_the_best_snapshot_is_reported(experiment, tmp_path, capsys):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store, evaluate={"methods": ["distilled", "random"]})
    config = load(path, "distill.snapshot_every=2")
    distill.run_distill(config)
    assert sorted(p.name for p in (tmp_path / "run" / "distill" / "mtt" / "ipc-1" / "snapshots").iterdir()) == [
        "iteration-000002.safetensors", "iteration-000004.safetensors"]
    rows = evaluate.run_evaluate(config, [1])
    best = next(r for r in rows if r["method"] == "distilled:mtt (best val)")
    assert best["iteration"] in (2, 4) and best["selected_on"]["split"] == "val"
    final = next(r for r in rows if r["method"] == "distilled:mtt")
    if best["iteration"] == 4:  # the final set itself: the same networks give the same numbers
        assert best["runs"] == final["runs"]

    on_val = evaluate.run_evaluate(load(path, "distill.snapshot_every=2", "evaluate.split=val"), [1])
    assert all(r["method"] != "distilled:mtt (best val)" for r in on_val)  # never chosen on the reported split
    kept = storage.read_json(str(tmp_path / "run" / "results-test.json"))
    assert kept["header"]["split"] == "test" and kept["rows"] == rows
    assert storage.read_json(str(tmp_path / "run" / "results.json"))["header"]["split"] == "val"
    assert "kept as results-test.json" in capsys.readouterr().out


def test_datm_soft_labels_and_the_loss_threshold(experiment, tmp_path):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store)
    config = load(path, "distill.labels=soft", "distill.iterations=2", "distill.skip_loss_above=1e-9")
    result = distill.run_distill(config)
    initial = load_initial_images(config)
    torch.testing.assert_close(result.images, initial, rtol=0, atol=0)  # every iteration was above the threshold
    assert result.metadata["skipped_iterations"] == 2
    assert result.labels.shape == (10, 10) and result.labels.is_floating_point()
    assert (result.labels.argmax(1) == torch.arange(10)).all()  # images the experts classify correctly


def test_two_ray_train_workers_equal_one_process_with_the_same_segments(ray_session, experiment, tmp_path):
    root, shards, store = experiment
    local = load(config_file(tmp_path, tmp_path / "local", shards, store), "distill.segments_per_iteration=2",
                 "distill.iterations=2")
    on_ray = load(config_file(tmp_path, tmp_path / "ray", shards, store), "resources.distill_workers=2",
                  "resources.use_ray=null", "distill.iterations=2")
    expected = distill.run_distill(local)
    result = distill.run_distill(on_ray)
    torch.testing.assert_close(result.images, expected.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.alphas, expected.alphas, rtol=1e-5, atol=1e-9)
    assert not torch.equal(expected.images, load_initial_images(local))


def test_dm_classes_split_across_two_ray_train_workers_equal_one_process(ray_session, experiment, tmp_path):
    """Distribution matching needs no experts; two workers each take half the classes (and read only their
    rows of the stream), and the summed gradients give the set one process gives."""
    root, shards, store = experiment
    dm = {"method": "dm", "iterations": 3, "ipc": 2, "batch_real": 200, "lr_img": 1.0}

    def dm_config(name: str) -> str:
        path = config_file(tmp_path, tmp_path / name, shards, str(tmp_path / f"store-{name}"))
        Path(path).write_text(yaml.safe_dump({**yaml.safe_load(Path(path).read_text()), "distill": dm}))
        return path

    local = load(dm_config("local"))
    on_ray = load(dm_config("ray"), "resources.distill_workers=2", "resources.use_ray=null")
    expected = distill.run_distill(local)
    result = distill.run_distill(on_ray)
    torch.testing.assert_close(result.images, expected.images, rtol=1e-5, atol=1e-6)
    assert result.alphas.numel() == 0 and result.metadata["method"] == "dm"
    assert not torch.equal(expected.images, load_initial_images(local))


def test_held_out_shards_are_scored_without_distilling_again(experiment, tmp_path, capsys):
    root, shards, store = experiment
    path = config_file(tmp_path, tmp_path / "run", shards, store, evaluate={"methods": ["distilled", "random"]})
    distill.run_distill(load(path, "distill.iterations=2"))
    other = tmp_path / "other-digits"
    shard_dataset("digits", None, str(other), splits={"test": 1.0}, limit=200, seed=7, progress=False)
    rows = evaluate.run_evaluate(load(path, "distill.iterations=2", f"evaluate.test_shards={other}"), [1])
    results = storage.read_json(str(tmp_path / "run" / "heldout" / "other-digits" / "results.json"))
    assert results["rows"] == rows and results["header"]["shards"] == str(other)
    assert (tmp_path / "run" / "heldout" / "other-digits" / "results.png").exists()
    assert not (tmp_path / "run" / "results.json").exists()  # the experiment's own results are not touched
    assert f"on the test split of {other}" in capsys.readouterr().out

    with pytest.raises(DataError, match=r"evaluate.test_shards: .*nowhere holds no shards"):
        evaluate.run_evaluate(load(path, f"evaluate.test_shards={tmp_path / 'nowhere'}"), [1])
    with pytest.raises(DataError, match=r"has no 'val' split \(it has test\); set evaluate.split"):
        evaluate.run_evaluate(load(path, f"evaluate.test_shards={other}", "evaluate.split=val"), [1])


def load_initial_images(config: ExperimentConfig) -> torch.Tensor:
    """The synthetic images before any update (iteration 0 of the same seed)."""
    from engine.runtime import LocalRuntime
    from engine.stages.distill import prepare

    return prepare(config, config.distill, LocalRuntime()).build(torch.device("cpu")).synthetic.images.detach()


@pytest.mark.parametrize(("override", "message"), [
    ("distill.ipc=0", r"distill\.ipc: Input should be greater than or equal to 1 \(got 0\)"),
    ("distill.max_start_epoch=4", r"distill: max_start_epoch \(4\) \+ expert_epochs \(2\) needs experts of 5 epochs"),
    ("pipeline.per_ipc={10: {syn_stepz: 3}}", r"pipeline\.per_ipc\.10\.syn_stepz: Extra inputs are not permitted"),
    ("evaluate.methods=[random, best]", r"evaluate\.methods: .*unknown methods \['best'\]"),
    ("distill.gradient=adjoint", r"distill\.gradient: Input should be 'unrolled' or 'exact'"),
    ("resources.distill_workers=2", r"distill_workers 2 runs data-parallel workers on Ray Train; it cannot be "
                                    r"combined with resources.use_ray false"),
    ("selection.keep_ratio=0", r"selection\.keep_ratio: Input should be greater than 0"),
    ("selection.keep_ratio=1.5", r"selection\.keep_ratio: Input should be less than or equal to 1"),
    ("selection.score_at=9", r"selection.score_at 9 is not an epoch of the scoring runs"),
    ("distill.method=gm", r"distill: Input tag 'gm' found using 'method' does not match any of the expected tags"),
    ("distill.method=dm", r"distill\.expert_epochs: unknown key \(for dm\)"),
    ("distill.lr_text=5", r"distill\.lr_text: unknown key \(for mtt\)"),
    ("experts.record=lora+heads", r"experts.record 'lora\+heads': unknown part 'lora'; choose from all, heads, "
                                  r"head, encoder"),
    ("model.kwargs.widht=3", r"model: .*convnet: widht: Extra inputs are not permitted"),
    ("distill.dsa_strategy=color_zoom", r"DSA strategy 'color_zoom': unknown family \['zoom'\]"),
])
def test_bad_experiment_values_fail_naming_the_key(tmp_path, override, message):
    path = config_file(tmp_path, tmp_path / "run", "shards", "store")
    with pytest.raises(ConfigError, match=message):
        load(path, override)
