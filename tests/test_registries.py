"""Every registered method, coreset and label source loads through the experiment config by its name, and
a method's config accepts exactly its own keys."""

from __future__ import annotations

import typing

import pytest

from engine.config import validate
from engine.distill import METHODS
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig
from engine.labels import LABEL_SOURCES
from engine.select import CORESETS

OBJECTIVE_MODELS = {
    "classification": {"arch": "convnet", "kwargs": {"width": 8, "depth": 1}},
    "contrastive": {"arch": "clip", "kwargs": {"image_tower": {"arch": "convnet", "kwargs": {
        "channels": 3, "num_classes": 0, "image_size": 8, "width": 8, "depth": 1}}}},
}


def experiment(method: str, **distill) -> dict:
    objective = METHODS[method].objective
    return {"run_dir": "run", "data": {"shards": "shards"}, "model": OBJECTIVE_MODELS[objective],
            "experts": {"record": "heads" if objective == "contrastive" else "all",
                        "train": {"objective": objective, "epochs": 4}},
            "distill": {"method": method, **({"max_start_epoch": 2} if METHODS[method].needs_trajectories else {}),
                        **distill}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_loads_by_name_with_its_own_keys(name):
    method = METHODS[name]
    config = validate(ExperimentConfig, experiment(name), "test")
    assert type(config.distill) is method.Config and config.distill.method == name
    assert typing.get_args(method.Config.model_fields["method"].annotation) == (name,)
    assert config.distill_for(3).ipc == 3 and type(config.distill_for(3)) is method.Config
    with pytest.raises(ConfigError, match=rf"distill\.no_such_key: unknown key \(for {name}\)"):
        validate(ExperimentConfig, experiment(name, no_such_key=1), "test")


def test_a_method_must_fit_the_experts_objective():
    raw = experiment("mtt")
    raw["experts"]["train"]["objective"] = "contrastive"
    raw["model"], raw["experts"]["record"] = OBJECTIVE_MODELS["contrastive"], "heads"
    with pytest.raises(ConfigError, match="distill.method 'mtt' distils for classification experts"):
        validate(ExperimentConfig, raw, "test")


def test_configs_without_a_method_get_the_one_for_their_experts():
    for expected in ("mtt", "vl"):
        raw = experiment(expected)
        del raw["distill"]["method"]
        assert validate(ExperimentConfig, raw, "test").distill.method == expected


@pytest.mark.parametrize("name", sorted(CORESETS))
def test_each_coreset_is_an_evaluate_method(name):
    raw = experiment("mtt") | {"evaluate": {"methods": ["distilled", name]}}
    assert validate(ExperimentConfig, raw, "test").evaluate.methods == ["distilled", name]


@pytest.mark.parametrize("name", sorted(LABEL_SOURCES))
def test_each_label_source_loads_by_name(name):
    raw = experiment("mtt") | {"evaluate": {"labels": name}}
    assert validate(ExperimentConfig, raw, "test").evaluate.labels == name
    with pytest.raises(ConfigError, match="unknown label source 'teacher'"):
        validate(ExperimentConfig, experiment("mtt") | {"evaluate": {"labels": "teacher"}}, "test")
