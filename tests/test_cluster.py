"""Jobs submitted to a real Ray head with the JobSubmissionClient, and the cluster configs in cluster/."""

from __future__ import annotations

import json
import os
import re
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


def test_dependencies_come_from_the_lock_not_from_hand_kept_pip_lists():
    runtime_envs = {
        "runtime_env.yaml": load("runtime_env.yaml"),
        "kuberay-job.yaml runtimeEnvYAML": yaml.safe_load(load("kuberay-job.yaml")["spec"]["runtimeEnvYAML"]),
    }
    for name, env in runtime_envs.items():
        assert not {"pip", "uv", "conda"} & set(env), f"{name} installs its own package list"
        assert env["env_vars"]["TQDM_DISABLE"] == "1"
        # No credentials in a runtime env: they are logged and shown in the dashboard.
        assert not [k for k in env["env_vars"] if k.startswith("AWS_") or k.startswith("RAY_AUTH_TOKEN")], name
    assert runtime_envs["kuberay-job.yaml runtimeEnvYAML"]["working_dir"].startswith("s3://")

    # Every documented submission runs `uv run --frozen`: the driver gets exactly uv.lock, and Ray's uv
    # runtime-env hook hands the same `uv run` to the workers.
    documents = ["cluster/aws.yaml", "cluster/kuberay-cluster.yaml", "cluster/README.md", "README.md"]
    submissions = [(doc, line) for doc in documents for line in shell_lines(REPO_ROOT / doc)
                   if re.search(r"ray job submit .* -- ", line)]
    assert {doc for doc, _ in submissions} == set(documents)
    for doc, line in submissions:
        assert " -- uv run --frozen python -m jobs." in line, f"{doc}: {line}"
    assert load("kuberay-job.yaml")["spec"]["entrypoint"].startswith("uv run --frozen python -m jobs.")
    setup = " ".join(load("aws.yaml")["setup_commands"])
    assert "uv sync --frozen" in setup and "pip install -e" not in setup and "uv pip install" not in setup

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    assert ray_pin.endswith(f"=={ray_version()}")  # the lock's Ray is the images' Ray


def test_the_kuberay_job_reads_its_shards_from_s3():
    entrypoint = load("kuberay-job.yaml")["spec"]["entrypoint"].split()
    overrides = dict(arg.split("=", 1) for arg in entrypoint if "=" in arg and not arg.startswith("-"))
    assert overrides["data.shards"].startswith("s3://")
    assert overrides["run_dir"].startswith("s3://")


def test_every_aws_node_has_an_instance_profile_scoped_to_the_run_bucket():
    config = load("aws.yaml")
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: {arn!r}"

    policy = json.loads((CLUSTER / "iam-run-bucket-policy.json").read_text())
    statements = policy["Statement"]
    assert statements and all(s["Effect"] == "Allow" for s in statements)
    buckets = set()
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions  # no s3:*, no *
        for resource in resources:
            match = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", resource)
            assert match, resource  # never "*", never another service
            buckets.add(match.group(1))
            if match.group(2):
                assert set(actions) <= OBJECT_ACTIONS, actions
            else:
                assert set(actions) <= BUCKET_ACTIONS, actions
    assert len(buckets) == 1  # the run bucket, nothing else
    granted = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= granted


OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                  "s3:ListMultipartUploadParts"}
BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}


def test_rayignore_and_rsync_exclude_keep_the_same_things_off_the_cluster():
    rayignore = [line for line in (REPO_ROOT / ".rayignore").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    rsync_exclude = load("aws.yaml")["rsync_exclude"]
    assert {"/.venv/", "/runs/", "/data/", "/.git/"} <= set(rayignore)
    assert set(rsync_exclude) == set(rayignore)
    # The repository is synced by file_mounts from its root, so the anchored patterns are the right ones.
    assert load("aws.yaml")["file_mounts"]["/home/ray/distill-engine"] == "."


def test_token_authentication_is_on_everywhere():
    for spec in (load("kuberay-cluster.yaml")["spec"], load("kuberay-job.yaml")["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
    aws = load("aws.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in aws[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, start
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    # The token travels as a file from the machine running `ray up`, never as a literal in the repo.
    assert aws["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for path in [*CLUSTER.iterdir(), REPO_ROOT / ".rayignore"]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN[=:]\s*['\"]?[A-Za-z0-9]", text), path
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text), path


def shell_lines(path: Path) -> list[str]:
    """The file's lines with comment markers dropped and backslash continuations joined."""
    lines = [re.sub(r"^#\s?", "", line) for line in path.read_text().splitlines()]
    return re.sub(r"\s*\\\n\s*", " ", "\n".join(lines)).splitlines()


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def ray_version() -> str:
    import ray

    return ray.__version__
