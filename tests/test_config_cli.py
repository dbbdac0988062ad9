from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from engine import cli
from engine.config import JobConfig, Section, load_config, to_yaml
from engine.errors import ConfigError
from engine.experiment import ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Distill(Section):
    ipc: int = Field(10, ge=1)
    lr: float = 0.01


class _Job(JobConfig):
    distill: _Distill = Field(default_factory=_Distill)


def _write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_valid_config_with_overrides(tmp_path):
    path = _write(tmp_path, "run_dir: runs/a\ndistill:\n  ipc: 3\n")
    config = load_config(_Job, path, ["distill.lr=1e-3", "run_dir=s3://bucket/x"])
    assert config.distill.ipc == 3
    assert config.distill.lr == pytest.approx(1e-3)
    assert config.run_dir == "s3://bucket/x"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("run_dir: r\ndistill: {ipc: 0}\n", [], "job.yaml: distill.ipc: Input should be greater than or equal to 1"),
        ("run_dir: r\ndistill: {ipcs: 2}\n", [], "job.yaml: distill.ipcs: unknown key"),
        ("run_dir: r\ndistill: {ipc: ten}\n", [], "job.yaml: distill.ipc: Input should be a valid integer"),
        ("distill: {ipc: 2}\n", [], "job.yaml: run_dir: required key is missing"),
        ("run_dir: r\n", ["distill.bogus=1"], "command line (distill.bogus=1): distill.bogus: unknown key"),
        ("run_dir: r\n", ["distill.ipc=0"], "command line (distill.ipc=0): distill.ipc: Input should be greater"),
        ("run_dir: r\n", ["distill={ipc: x}"], "command line (distill={ipc: x}): distill.ipc: Input should be a valid"),
        ("run_dir: r\n", ["distill.ipc"], "command line: expected key=value"),
        ("run_dir: [unclosed\n", [], "job.yaml: line 2 not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(_Job, path, overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distill.lr_img=abc"], "command line (distill.lr_img=abc): distill.lr_img: Input should be a valid number"),
        (["distill.method=xx"], "command line (distill.method=xx): distill: Input tag 'xx'"),
        (["pipeline.per_ipc={10: {iterations: x}}"],
         "command line (pipeline.per_ipc={10: {iterations: x}}): pipeline.per_ipc.10.iterations: Input should be"),
    ],
)
def test_a_bad_override_of_a_shipped_config_is_named(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, str(REPO_ROOT / "configs" / "quickstart.yaml"), overrides)
    assert str(err.value).startswith(expected)


def test_print_config_prints_the_resolved_config_and_runs_nothing(capsys, tmp_path):
    run_dir = tmp_path / "never-written"
    assert cli.main(["pipeline", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--print-config",
                     f"run_dir={run_dir}", "distill.iterations=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == str(run_dir) and printed["distill"]["iterations"] == 7
    assert printed["distill"]["method"] == "mtt" and "lr_img" in printed["distill"]
    assert not run_dir.exists()


def test_secrets_are_masked_in_resolved_config(tmp_path):
    path = _write(tmp_path, "run_dir: r\nstorage: {s3_secret_access_key: hunter2, s3_access_key_id: AKIA123}\n")
    text = to_yaml(load_config(_Job, path))
    assert "hunter2" not in text and "AKIA123" not in text


def test_cli_help_lists_jobs(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.JOBS:
        assert name in out


def test_unknown_job_fails(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown job 'nope'" in capsys.readouterr().err


def test_console_script_help():
    """The installed `distill` entry point works in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True, check=True)
    assert "shard" in out.stdout


def test_a_missing_extra_is_one_line_naming_it():
    from engine.extras import require

    with pytest.raises(ConfigError, match=r"^decoding video needs no_such_av, from the 'video' extra: "
                                          r"uv sync --extra video, or pip install 'distill-engine\[video\]'$"):
        require("no_such_av", "video", "decoding video")
    assert require("json", "vl", "anything").dumps([]) == "[]"
