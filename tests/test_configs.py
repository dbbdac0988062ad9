"""Every shipped config loads and validates, and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.experiment import ExperimentConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "cifar10.yaml", "imagenet1k.yaml", "kinetics400.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_starts_with_its_command(path):
    config = load_config(ExperimentConfig, str(path))
    assert Path(config.run_dir).is_absolute()  # Ray workers run elsewhere: local paths are resolved at load
    first_lines = path.read_text().splitlines()[:12]
    assert first_lines[0].startswith("# ") and any("uv run distill" in line for line in first_lines)
