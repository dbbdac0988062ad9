"""A 4-trial distillation sweep with ASHA on the local Ray cluster, and its best config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine import storage
from engine.config import load_config
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig
from jobs import distill, sweep

CONFIG = {
    "data": {"image_size": 8, "channels": 1},
    "prepare": {"format": "digits", "splits": {"train": 0.7, "val": 0.1, "test": 0.2}},
    "model": {"arch": "convnet", "kwargs": {"width": 16, "depth": 2}},
    "experts": {"num_experts": 2, "train": {"epochs": 4, "lr": 0.05, "batch_size": 128}},
    "distill": {"iterations": 4, "syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 2, "lr_img": 100},
    "sweep": {
        # noise-initialised sets score far below real ones after a few iterations, so ASHA stops them
        "space": {"distill.init": {"grid": ["real", "noise"]}, "distill.lr_img": {"grid": [100, 300]}},
        "num_samples": 1, "report_every": 1, "eval_epochs": 30, "grace_period": 1, "reduction_factor": 2,
        "max_concurrent": 1,
    },
    "resources": {"use_ray": False},
}


def write(tmp_path: Path, **changes) -> str:
    raw = json.loads(json.dumps(CONFIG))
    raw["run_dir"] = str(tmp_path / "run")
    raw["data"]["shards"] = str(tmp_path / "shards")
    for section, values in changes.items():
        raw[section].update(values)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_four_trials_with_asha_and_a_runnable_best_config(ray_session, tmp_path):
    path = write(tmp_path)
    rows = sweep.run(load_config(ExperimentConfig, path))
    assert len(rows) == 4
    assert sorted((r["values"]["distill.init"], r["values"]["distill.lr_img"]) for r in rows) == [
        ("noise", 100), ("noise", 300), ("real", 100), ("real", 300)]
    for r in rows:  # a trial's status says whether ASHA cut it short
        assert r["status"] == ("complete" if r["reports"] == 4 else "stopped early (ASHA)")
        assert 0 <= r["val_accuracy"] <= 100
    assert any(r["status"] == "stopped early (ASHA)" for r in rows)
    results = storage.read_json(str(tmp_path / "run" / "sweep" / "results.json"))
    assert results["best"]["values"]["distill.init"] == "real"
    assert "stopped early (ASHA)" in (tmp_path / "run" / "sweep" / "results.md").read_text()

    best = load_config(ExperimentConfig, str(tmp_path / "run" / "sweep" / "best.yaml"), ["distill.iterations=2"])
    assert best.distill.init == "real" and best.distill.lr_img == results["best"]["values"]["distill.lr_img"]
    synthetic = distill.run_distill(best)
    assert synthetic.images.shape == (10, 1, 8, 8)
    assert (Path(best.run_dir) / "distill" / "mtt" / "ipc-1" / "synthetic.safetensors").exists()


@pytest.mark.parametrize(("space", "message"), [
    ({"distill.lr_imgg": {"choice": [1, 2]}}, r"sweep\.space\.distill\.lr_imgg: choice value 1 does not fit"),
    ({"distill.syn_steps": {"choice": [0, 5]}}, r"sweep\.space\.distill\.syn_steps: choice value 0 does not fit"),
])
def test_a_space_that_does_not_fit_the_config_is_refused(tmp_path, space, message):
    config = load_config(ExperimentConfig, write(tmp_path, sweep={"space": space}))
    from engine.stages.sweep import check_space

    with pytest.raises(ConfigError, match=message):
        check_space(config)


def test_bad_space_kinds_fail_at_load(tmp_path):
    path = write(tmp_path, sweep={"space": {"distill.lr_img": {"lognormal": [1, 2]}}})
    with pytest.raises(ConfigError, match=r"sweep\.space: .*give exactly one of choice, uniform, loguniform, grid"):
        load_config(ExperimentConfig, path)
