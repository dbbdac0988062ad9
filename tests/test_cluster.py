"""Jobs submitted to a real Ray head with the JobSubmissionClient, and the cluster configs in cluster/."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --block`` on loopback in its own process group; yields the dashboard URL."""
    from ray.job_submission import JobSubmissionClient

    dashboard = free_port()
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(free_port()),
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats",
        # Own agent ports: the session's cluster (ray_session) may hold Ray's defaults, and a head whose
        # job agent cannot bind never accepts a job ("No available agent to submit job").
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
    ]  # fmt: skip
    # A loopback-only test cluster: token authentication off, so the client needs no token file.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise AssertionError(f"the Ray head did not start:\n{(tmp_path / 'ray-head.log').read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def submit(client, timeout: float = 120, **job) -> str:
    """Submit a job, retrying while the head's job agent is still registering (the dashboard answers first)."""
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.time() > deadline:
                raise
            time.sleep(2)


def wait_for(client, job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.time() > deadline:
            client.stop_job(job_id)
            raise AssertionError(f"job {job_id} still {status} after {timeout} s")
        time.sleep(2)
    return status


def test_buffer_then_distill_submitted_to_a_ray_head(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from engine.distill.synthetic import SyntheticSet
    from engine.trajectories import TrajectoryStore

    run_dir = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "data": {"shards": str(tmp_path / "shards"), "image_size": 8, "channels": 1},
        "prepare": {"format": "digits", "splits": {"train": 0.8, "val": 0.2}},
        "model": {"arch": "convnet", "kwargs": {"width": 8, "depth": 2}},
        "experts": {"num_experts": 2, "train": {"epochs": 3, "lr": 0.05, "batch_size": 128}},
        "distill": {"iterations": 3, "syn_steps": 4, "expert_epochs": 1, "max_start_epoch": 2},
    }))
    client = JobSubmissionClient(ray_head)
    runtime_env = {"working_dir": str(REPO_ROOT), "env_vars": {"TQDM_DISABLE": "1"}}
    for job in ("buffer", "distill"):
        job_id = submit(client, entrypoint=f"python -m jobs.{job} {config}", runtime_env=runtime_env)
        status = wait_for(client, job_id)
        assert status == "SUCCEEDED", f"jobs.{job} {status}:\n{client.get_job_logs(job_id)[-4000:]}"

    store = TrajectoryStore.open(str(run_dir / "trajectories"))
    assert store.experts() == [0, 1]
    assert len((run_dir / "buffer" / "results.json").read_text()) > 0
    synthetic = SyntheticSet.load(str(run_dir / "distill" / "mtt" / "ipc-1"))
    assert synthetic.images.shape == (10, 1, 8, 8) and synthetic.metadata["iterations"] == 3


# --- the cluster configs ------------------------------------------------------------------------------


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_the_aws_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: unknown or mistyped keys fail
    validate_config(prepare_config(config))  # and as `ray up` sees it, with the AWS defaults filled in
    assert config["docker"]["image"] == f"rayproject/ray:{ray_version()}-py311-gpu"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert all(w["min_workers"] == 0 and w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    assert any(w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for w in workers.values())


def test_kuberay_manifests_agree_with_the_aws_config():
    aws = load("aws.yaml")
    cluster, job = load("kuberay-cluster.yaml"), load("kuberay-job.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray_version() and spec["enableInTreeAutoscaling"] is True
        images = {c["image"] for c in containers(spec)}
        assert images == {aws["docker"]["image"]}
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(head["cpu"]) == aws["available_node_types"][aws["head_node_type"]]["resources"]["CPU"]
        aws_workers = {(w["resources"]["CPU"], w["resources"]["GPU"], w["max_workers"])
                       for k, w in aws["available_node_types"].items() if k != aws["head_node_type"]}
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert group["minReplicas"] == 0
            assert (int(limits["cpu"]), limits["nvidia.com/gpu"], group["maxReplicas"]) in aws_workers


def test_runtime_envs_install_exactly_the_projects_dependencies():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    wanted = [d for d in pyproject["project"]["dependencies"] if not d.startswith("ray")]
    assert load("runtime_env.yaml")["pip"] == wanted
    job_env = yaml.safe_load(load("kuberay-job.yaml")["spec"]["runtimeEnvYAML"])
    assert job_env["pip"] == wanted
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    assert ray_pin.endswith(f"=={ray_version()}")


def test_rayignore_keeps_data_and_results_out_of_uploads():
    ignored = (REPO_ROOT / ".rayignore").read_text().split()
    assert {"/.venv/", "/runs/", "/data/"} <= set(ignored)


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def ray_version() -> str:
    import ray

    return ray.__version__
