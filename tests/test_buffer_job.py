"""The buffer job end to end: experts trained on the local Ray cluster into a store on disk or S3 (moto),
and a job killed with SIGKILL that resumes without restarting any expert from scratch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from engine import storage
from engine.data.writers import shard_dataset
from engine.trajectories import TrajectoryStore
from jobs import buffer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    shard_dataset("digits", None, str(out), splits={"train": 0.7, "val": 0.1, "test": 0.2})
    return str(out)


def write_config(path: Path, run_dir: str, shards: str, **experts) -> str:
    config = {
        "run_dir": run_dir,
        "data": {"shards": shards, "image_size": 8, "channels": 1},
        "model": {"arch": "convnet", "kwargs": {"width": 16, "depth": 2}},
        "experts": {"num_experts": 2, "train": {"epochs": 3, "lr": 0.05, "batch_size": 64}, **experts},
        "resources": {"cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def check_store(url: str, storage_config=None, experts: int = 2, epochs: int = 3) -> TrajectoryStore:
    store = TrajectoryStore.open(url, storage_config)
    assert store.experts() == list(range(experts))
    for expert_id in range(experts):
        store.verify(expert_id)  # size and sha256 against the sidecar
        assert sorted(store.load_expert(expert_id)) == list(range(epochs + 1))
    return store


def test_two_digits_experts_on_the_local_ray_cluster(ray_session, digits_shards, tmp_path, capsys):
    config = write_config(tmp_path / "buffer.yaml", str(tmp_path / "run"), digits_shards)
    assert buffer.main([config]) == 0
    store = check_store(str(tmp_path / "run" / "trajectories"))
    results = storage.read_json(str(tmp_path / "run" / "buffer" / "results.json"))
    assert [e["expert"] for e in results["experts"]] == [0, 1]
    assert all(e["final"]["val_accuracy"] > 30 for e in results["experts"])  # 3 epochs of 10-way digits
    assert (tmp_path / "run" / "buffer" / "results.md").exists()

    # Running the same command again trains nothing: both experts are complete.
    before = [store.status(i).sha256 for i in range(2)]
    assert buffer.main([config]) == 0
    again = storage.read_json(str(tmp_path / "run" / "buffer" / "results.json"))
    assert all(e["resumed_complete"] for e in again["experts"])
    assert [TrajectoryStore.open(store.url).status(i).sha256 for i in range(2)] == before
    assert "already complete" in capsys.readouterr().out


def test_two_digits_experts_into_s3(ray_session, digits_shards, s3_bucket, tmp_path):
    bucket, storage_config = s3_bucket
    config = write_config(tmp_path / "buffer.yaml", f"{bucket}/run", digits_shards)
    overrides = [f"storage.s3_endpoint_url={storage_config.s3_endpoint_url}", "storage.s3_region=us-east-1"]
    assert buffer.main([config, *overrides]) == 0
    check_store(f"{bucket}/run/trajectories", storage_config)
    assert storage.exists(f"{bucket}/run/buffer/results.json", storage_config)


def test_a_store_for_another_model_refuses_the_job(ray_session, digits_shards, tmp_path, capsys):
    from engine.cli import main as cli_main

    config = write_config(tmp_path / "buffer.yaml", str(tmp_path / "run"), digits_shards)
    small = ["experts.num_experts=1", "experts.train.epochs=1", "resources.use_ray=false"]
    assert buffer.main([config, *small]) == 0
    code = cli_main(["buffer", config, *small, "model.kwargs.width=8"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was recorded for convnet(" in err and "width=16" in err and "width=8" in err


@pytest.mark.parametrize("data", ["cached", "streamed"])
def test_sigkill_mid_run_then_resume(ray_session, digits_shards, tmp_path, data):
    """Kill the job (driver and its local Ray cluster) once every expert has saved some epochs but not
    all; the rerun must resume every expert after its last saved epoch, never from scratch. Cached: the
    split decoded once into the object store, experts as Tune trials; streamed: every epoch read from the
    shards, experts as Ray Train runs."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "buffer.yaml", str(run_dir), digits_shards)
    partial = run_dir / "trajectories" / "partial"
    epochs = 12  # enough that no expert finishes before the kill (at 3 saved epochs)
    overrides = [f"experts.train.epochs={epochs}", "resources.num_cpus=2",
                 f"data.cache={'memory' if data == 'cached' else 'none'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.buffer", config, *overrides], cwd=REPO_ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        saved = wait_for_saved_epochs(partial, job, log_path, experts=2, at_least=3, timeout=300)
    finally:
        kill_with_everything_it_started(job)
    assert all(max(s) < epochs for s in saved.values()), f"an expert finished before the kill: {saved}"

    store_url = str(run_dir / "trajectories")
    assert TrajectoryStore.open(store_url).experts() == []  # nothing half-written is visible
    assert buffer.main([config, *overrides]) == 0
    store = check_store(store_url, epochs=epochs)
    for expert_id in range(2):
        started = store.status(expert_id).summary["started_at_epoch"]
        assert started >= 2, f"expert {expert_id} restarted at epoch {started} (saved before the kill: {saved})"


def kill_with_everything_it_started(job: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started, as a lost node would. Its process group is not enough:
    Ray's workers run in groups of their own and go on training for seconds after their raylet is gone
    (long enough to finish an expert of these small epochs)."""
    processes = [psutil.Process(job.pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        processes += processes[0].children(recursive=True)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    psutil.wait_procs(processes, timeout=10)


def wait_for_saved_epochs(
    partial: Path, job: subprocess.Popen, log_path: Path, experts: int, at_least: int, timeout: float
) -> dict[int, list[int]]:
    """Poll the store's partial folder until every expert has ``at_least`` epoch files; a job that exits
    or stalls first fails the test with the end of its log (what went wrong is otherwise invisible)."""
    deadline = time.time() + timeout
    saved: dict[int, list[int]] = {}
    while time.time() < deadline and job.poll() is None:
        saved = {
            i: sorted(int(p.stem.removeprefix("epoch-")) for p in (partial / f"expert-{i:05d}").glob("epoch-*.safetensors"))
            for i in range(experts)
        }
        if all(len(epochs) >= at_least for epochs in saved.values()):
            return saved
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace")[-3000:]
    state = f"exited with {job.returncode}" if job.poll() is not None else f"still running after {timeout} s"
    raise AssertionError(f"the job {state} before saving {at_least} epochs per expert (saved: {saved}); its log ends:\n{tail}")


def test_a_one_worker_ray_train_expert_equals_the_in_process_expert(ray_session, digits_shards, tmp_path):
    """Same seed, same data order (one epoch order whatever reads the shards): the same trajectory."""
    config = write_config(tmp_path / "buffer.yaml", str(tmp_path / "run"), digits_shards, num_experts=1)
    assert buffer.main([config, f"run_dir={tmp_path / 'local'}", "resources.use_ray=false"]) == 0
    assert buffer.main([config, f"run_dir={tmp_path / 'train'}", "resources.use_ray=true",
                        "resources.expert_trainer=train", "resources.expert_workers=1"]) == 0
    local = check_store(str(tmp_path / "local" / "trajectories"), experts=1).load_expert(0)
    on_train = check_store(str(tmp_path / "train" / "trajectories"), experts=1).load_expert(0)
    for epoch in range(4):
        for name, value in local[epoch].items():
            torch.testing.assert_close(on_train[epoch][name], value, rtol=1e-5, atol=1e-6)


def test_a_two_worker_data_parallel_expert_writes_a_complete_trajectory(ray_session, digits_shards, tmp_path):
    config = write_config(tmp_path / "buffer.yaml", str(tmp_path / "run"), digits_shards, num_experts=1)
    assert buffer.main([config, "resources.use_ray=true", "resources.expert_workers=2"]) == 0
    store = check_store(str(tmp_path / "run" / "trajectories"), experts=1)
    metrics = store.status(0).metrics
    assert metrics[-1]["val_accuracy"] > 30 and metrics[-1]["train_loss"] < metrics[1]["train_loss"]
