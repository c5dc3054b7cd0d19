"""Cluster configs and the local stack.

Fast: the AWS launcher YAML passes Ray's own cluster-config validation; the KubeRay manifests
pass KubeRay's own CRD schema and the operator's rules (tests/test_cluster_schema.py, whose
checks are used here too); the runtime env is one Ray accepts and packs small, and forwards
NCCL/libfabric settings but no credentials. Slow: `cluster/local.sh up` starts a real Ray head, SeaweedFS S3 and MLflow server on
127.0.0.1, they answer, a submitted job reaches S3 and MLflow, and `down` leaves no process behind.
(`with Stack(...)`, the in-process form, is what tests/test_pipeline_job.py runs the pipeline on.)
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_schema import crd_errors, k8s_errors

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]


def load(path: Path):
    return yaml.safe_load(path.read_text())


# --- the cluster launcher config (cluster/aws.yaml) -------------------------------------------


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it touches the cloud: merge the provider's defaults, then check
    the result against Ray's cluster schema (ray/autoscaler/ray-schema.json) and its rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def test_launcher_yaml_passes_ray_validation():
    full = ray_validate(load(CLUSTER / "aws.yaml"))
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_worker=4),                                             # misspelt key
    lambda c: c["available_node_types"]["gpu"].update(resources={"GPU": 0.5}),    # not an integer
    lambda c: c["available_node_types"]["gpu"].pop("node_config"),                # required field
    lambda c: c.update(max_workers=1) or c["available_node_types"]["gpu"].update(min_workers=2),
])
def test_ray_validation_rejects_broken_launcher_configs(mutate):
    """The check above has teeth: Ray's validation refuses these edits of our file."""
    import jsonschema

    config = load(CLUSTER / "aws.yaml")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_launcher_yaml_shape():
    import ray

    c = load(CLUSTER / "aws.yaml")
    head = c["available_node_types"][c["head_node_type"]]
    gpu = c["available_node_types"]["gpu"]
    assert head["resources"].get("GPU", 0) == 0, "the head is the CPU node"
    assert gpu["resources"]["GPU"] >= 1 and gpu.get("min_workers", 0) == 0 < gpu["max_workers"]
    assert c["max_workers"] >= gpu["max_workers"]
    # Token auth on every node; the dashboard (job API) only on the head's loopback.
    for cmd in c["head_start_ray_commands"][-1:] + c["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in c["head_start_ray_commands"][-1]
    assert "/home/ray/.ray/auth_token" in c["file_mounts"]
    # Node images carry the Ray the client runs; torch matches the Makefile's pin.
    for image in (c["docker"]["head_image"], c["docker"]["worker_image"]):
        assert image.split(":")[1].startswith(ray.__version__ + "-"), image
    torch_pin = re.search(r"TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert any(torch_pin in cmd for cmd in c["setup_commands"])
    assert any("constraints.txt" in cmd for cmd in c["setup_commands"])


# --- least privilege on AWS (cluster/iam/, cluster/aws-setup.sh) -----------------------------

IAM = CLUSTER / "iam"


def test_launcher_creates_no_role_and_no_open_ssh(monkeypatch):
    """Every node type names its instance profile and security group: Ray's own bootstrap steps
    (what `ray up` runs) then leave both alone, instead of creating a head role with
    AmazonEC2FullAccess + AmazonS3FullAccess and a group with SSH from 0.0.0.0/0. Offline: with a
    field missing they would call AWS and fail here."""
    from ray.autoscaler._private.aws import config as aws

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    full = ray_validate(load(CLUSTER / "aws.yaml"))
    full["head_node"] = {}
    before = copy.deepcopy(full)
    assert aws._configure_iam_role(full) == before and full["head_node"] == {}
    # bootstrap's order: groups and subnets of EFA interfaces (gpu_8x) are copied up first
    full = aws._configure_from_network_interfaces(full)
    assert aws._configure_security_group(copy.deepcopy(full)) == full
    assert all(set(n["node_config"]["SecurityGroupIds"]) == {"sg-MSPRIOR"} for n in full["available_node_types"].values())
    profiles = {t: n["node_config"]["IamInstanceProfile"]["Arn"] for t, n in full["available_node_types"].items()}
    assert profiles.pop("head") == "arn:aws:iam::ACCOUNT_ID:instance-profile/msprior-head"
    assert set(profiles.values()) == {"arn:aws:iam::ACCOUNT_ID:instance-profile/msprior-worker"}
    assert set(profiles) >= {"gpu", "gpu_8x", "gpu_encode", "cpu_decode"}


def _statements(name: str) -> list:
    return json.loads((IAM / name).read_text())["Statement"]


def test_iam_policies_are_scoped_to_the_bucket_and_the_cluster():
    cluster_name = load(CLUSTER / "aws.yaml")["cluster_name"]
    bucket = {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    for name in ("msprior-node-policy.json", "msprior-head-policy.json"):
        for st in _statements(name):
            assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
            for action in st["Action"]:
                assert "*" not in action, (name, action)  # no s3:*, ec2:*, iam:*
                if action.startswith("s3:"):
                    assert st["Resource"] in bucket, (name, st)
                if action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
                    assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster_name
                if action == "ec2:CreateTags":
                    assert st["Condition"]["StringEquals"], st  # while launching, or on our nodes
                if action == "iam:PassRole":
                    assert st["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/msprior-worker"
    node_actions = {a for st in _statements("msprior-node-policy.json") for a in st["Action"]}
    assert all(a.startswith("s3:") for a in node_actions)


def _fake_aws(tmp_path) -> Path:
    """An `aws` CLI stand-in (no cloud here) that records each call and answers the look-ups."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "aws"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {tmp_path / 'calls'}
        case "$*" in
          "sts get-caller-identity"*) echo 123456789012 ;;
          "iam get-"*) exit 254 ;;
          "ec2 describe-vpcs"*) echo vpc-0abc ;;
          "ec2 describe-security-groups"*) echo None ;;
          "ec2 create-security-group"*) echo sg-0123 ;;
          "ec2 describe-subnets"*) echo subnet-0456 ;;
          "ec2 describe-placement-groups"*) exit 254 ;;
        esac
        """))
    script.chmod(0o755)
    return bin_dir


def test_aws_setup_opens_ssh_to_the_given_cidr_only(tmp_path):
    out = tmp_path / "aws.local.yaml"
    env = {**os.environ, "PATH": f"{_fake_aws(tmp_path)}:{os.environ['PATH']}", "AWS_LOCAL_YAML": str(out)}
    run = lambda *a: subprocess.run([str(CLUSTER / "aws-setup.sh"), *a], cwd=ROOT, env=env,  # noqa: E731
                                    text=True, capture_output=True, timeout=60)
    for bad in (["my-bucket", "0.0.0.0/0"], ["my-bucket", "10.0.0.0/8"], ["My_Bucket", "203.0.113.7/32"], ["b"]):
        r = run(*bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
        assert not (tmp_path / "calls").exists()  # refused before any AWS call
    r = run("my-bucket", "203.0.113.7/32")
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text()
    assert "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.7/32}]" in calls
    assert "0.0.0.0/0" not in calls and "FullAccess" not in calls
    assert '"arn:aws:s3:::my-bucket/*"' in calls and "BUCKET" not in calls
    assert "ec2 create-placement-group --region us-west-2 --group-name msprior-train --strategy cluster" in calls
    assert not re.search(r"ACCOUNT_ID|BUCKET|sg-MSPRIOR|subnet-MSPRIOR", yaml.safe_dump(load(out)))  # comments aside
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    cfg = _configure_from_network_interfaces(ray_validate(load(out)))
    for node in cfg["available_node_types"].values():
        assert set(node["node_config"]["SecurityGroupIds"]) == {"sg-0123"}  # one per EFA interface on gpu_8x
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::123456789012:")
    assert cfg["available_node_types"]["gpu_8x"]["node_config"]["SubnetIds"] == ["subnet-0456"] * 4
    assert "--env MSPRIOR_STORAGE=s3://my-bucket/msprior/runs" in cfg["docker"]["run_options"]


# --- KubeRay manifests (cluster/kuberay/*.yaml) -----------------------------------------------


def test_kuberay_manifests_agree():
    import ray

    cluster, job = (load(p) for p in MANIFESTS)
    # The RayJob brings up the same cluster as the long-lived RayCluster.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head is the CPU node"
    assert spec["enableInTreeAutoscaling"]
    for group in spec["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["requests"] == worker["resources"]["limits"]  # Guaranteed QoS
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert worker["image"] == head["image"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    # The job: the pipeline on S3 paths, with the runtime env of cluster/runtime_env.yaml.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    flags = dict(zip(argv[2::1], argv[3::1]))
    for flag in ("--audio", "--rave", "--out"):
        assert flags[flag].startswith("s3://"), flag
    assert flags["--config"] == "decoder_only"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = load(CLUSTER / "runtime_env.yaml")
    assert env["excludes"] == shared["excludes"] and env["env_vars"] == shared["env_vars"]
    # A working_dir inside the image is uploaded by the submitter pod: HTTPMode could not.
    assert env["working_dir"].startswith("/") and job["spec"]["submissionMode"] == "K8sJobMode"


def test_kuberay_pods_run_as_scoped_service_accounts():
    """Head and workers run as their own ServiceAccounts (IRSA: the bucket-only IAM policy), the
    workers without a Kubernetes token; the file grants no RBAC of its own."""
    accounts = {d["metadata"]["name"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "serviceaccounts.yaml").read_text())}
    for doc in accounts.values():
        assert k8s_errors(doc) == []  # Kubernetes' core/v1 schema, strict
        assert doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::ACCOUNT_ID:role/msprior-k8s-node"
    for path in MANIFESTS:
        doc = load(path)
        assert crd_errors(doc) == []
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head["serviceAccountName"] == "msprior-head" and accounts["msprior-head"]["automountServiceAccountToken"]
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "msprior-worker" and pod["automountServiceAccountToken"] is False
    assert accounts["msprior-worker"]["automountServiceAccountToken"] is False
    assert set(accounts) == {"msprior-head", "msprior-worker"}


def test_rayjob_entrypoint_flags_exist():
    """Every flag the RayJob passes is one jobs/pipeline.py accepts (once the lead's job lands)."""
    if not (ROOT / "jobs" / "pipeline.py").exists():
        pytest.skip("jobs/pipeline.py not written yet")
    argv = shlex.split(load(MANIFESTS[1])["spec"]["entrypoint"])
    out = subprocess.run([sys.executable, "jobs/pipeline.py", "--help"], cwd=ROOT, text=True,
                         capture_output=True, timeout=120,
                         env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in out.stdout, f"{flag} not in jobs/pipeline.py --help"


# --- the runtime env (cluster/runtime_env.yaml) -----------------------------------------------


def test_runtime_env_is_valid_and_ships_the_package(tmp_path):
    """Ray accepts the runtime env, and the package Ray would upload for `--working-dir .`
    (built with Ray's own packer, .gitignore and excludes applied) holds the code, not the venv."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown fields or bad types
    assert env["working_dir"] == "."
    pkg = tmp_path / "pkg.zip"
    create_package(str(ROOT), pkg, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(pkg).namelist())
    assert {"msprior/__init__.py", "msprior/devstack/stack.py", "configs/decoder_only.yaml"} <= names
    assert not any(n.startswith((".venv/", ".git/", "tests/", ".msprior-stack/")) for n in names)
    assert pkg.stat().st_size < min(GCS_STORAGE_MAX_SIZE, 100 * 2**20) // 10, pkg.stat().st_size


# --- cluster/local.sh ---------------------------------------------------------------------------


def local_sh(*args, env=None, timeout=300):
    return subprocess.run([str(CLUSTER / "local.sh"), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_runtime_env_forwards_settings_not_secrets():
    from ray.runtime_env import RuntimeEnv

    r = local_sh("runtime-env", env={"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
                                     "AWS_ENDPOINT_URL": "http://minio:9000",
                                     "AWS_SECRET_ACCESS_KEY": "do-not-ship"})
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    RuntimeEnv(**env)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "do-not-ship" not in r.stdout
    assert env["excludes"] == load(CLUSTER / "runtime_env.yaml")["excludes"]


NETWORK_SETTINGS = {"NCCL_SOCKET_IFNAME": "ens,eth", "NCCL_IB_DISABLE": "1", "NCCL_DEBUG": "INFO",
                    "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                    "GLOO_SOCKET_IFNAME": "eth0"}


def test_runtime_env_forwards_nccl_and_libfabric_settings():
    """Multi-node settings of the submitting shell reach every worker through the runtime env
    (NCCL_*, FI_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME, the storage path); a name that reads like a
    secret and the values of this shell's secrets do not."""
    from ray.runtime_env import RuntimeEnv

    secret = "Sup3r-s3cret-value"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "FI_", "TORCH_NCCL_", "GLOO_"))}
    r = subprocess.run([str(CLUSTER / "local.sh"), "runtime-env"], cwd=ROOT, text=True, capture_output=True,
                       timeout=120, env={**clean, "PYTHON": sys.executable, **NETWORK_SETTINGS,
                                         "MSPRIOR_STORAGE": "s3://my-bucket/msprior/runs",
                                         "NCCL_NET_AUTH_TOKEN": secret, "FI_EFA_SECRET_KEY": secret,
                                         "AWS_SECRET_ACCESS_KEY": secret, "FI_LOG_PROV": secret})
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout
    env = json.loads(r.stdout)
    RuntimeEnv(**env)
    shipped = env["env_vars"]
    assert {k: shipped.get(k) for k in NETWORK_SETTINGS} == NETWORK_SETTINGS
    assert shipped["MSPRIOR_STORAGE"] == "s3://my-bucket/msprior/runs"
    assert shipped["FI_LOG_PROV"] == "***"  # a forwarded name whose value is a secret of this shell
    assert not {"NCCL_NET_AUTH_TOKEN", "FI_EFA_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"} & set(shipped)
    # without them set, nothing of the kind is invented
    r = subprocess.run([str(CLUSTER / "local.sh"), "runtime-env"], cwd=ROOT, text=True, capture_output=True,
                       timeout=120, env={**clean, "PYTHON": sys.executable})
    assert not [k for k in json.loads(r.stdout)["env_vars"] if k.startswith(("NCCL_", "FI_"))]


def test_local_sh_usage_and_missing_stack(tmp_path):
    r = local_sh()
    assert r.returncode == 2 and "usage" in r.stderr
    r = local_sh("env", "--dir", str(tmp_path / "none"))
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "cluster/local.sh up" in r.stderr


def test_down_leaves_a_reused_pid_alone(tmp_path):
    """State from an earlier boot may name pids that now belong to other processes: `down` must
    not touch them (it checks each recorded leader's marker / command line first)."""
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        d = tmp_path / "stale"
        (d / "ray").mkdir(parents=True)
        server = {"pid": stranger.pid, "mark": "gone-1234", "dir": str(d / "x")}
        state = {"bucket": "msprior",
                 "s3": {"pid": stranger.pid, "dir": str(d / "s3"), "grpc_ports": [],
                        "endpoint": "http://127.0.0.1:1", "access_key": "a", "secret_key": "b"},
                 "mlflow": {**server, "port": 1, "artifacts_destination": "file:///x"},
                 "ray": {**server, "ports": {"gcs": 1, "dashboard": 2}, "temp_dir": None,
                         "num_cpus": 1}}
        (d / "state.json").write_text(json.dumps(state))
        assert local_sh("status", "--dir", str(d)).returncode == 1
        r = local_sh("down", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        assert stranger.poll() is None, "down killed a process it did not start"
        assert not (d / "state.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def parse_exports(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0]
    return out


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening(pids) -> list:
    """(address hex, port) of every TCP socket the processes listen on: what `ss -ltnp` shows,
    read from /proc so the test needs no iproute2."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addr, port = f[1].split(":")
                out.append((addr, int(port, 16)))
    return out


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_stack_up_answers_and_down_leaves_nothing(tmp_path):
    from msprior.devstack import Stack
    from msprior.devstack.procs import owned_pids

    stack_dir = tmp_path / "stack"
    t0 = time.monotonic()
    up = local_sh("up", "--dir", str(stack_dir), "--num_cpus", "2", timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    print(f"\nlocal.sh up: {time.monotonic() - t0:.1f} s")
    env = parse_exports(up.stdout)
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI",
            "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"} <= set(env)
    assert env["RAY_AUTH_MODE"] == "token"
    stack = Stack.load(str(stack_dir))
    try:
        pids = stack.processes()
        marks = [(stack._s3_state["pid"], None), (stack.mlflow.pid, stack.mlflow.mark),
                 (stack.ray.pid, stack.ray.mark)]
        assert len(pids) > 5

        # Every listener of every stack process is on the loopback interface.
        sockets = listening(pids)
        assert len(sockets) >= 8
        assert [s for s in sockets if s[0] not in LOOPBACK] == []

        # Ray answers `ray status` with the token, and refuses a client with another token.
        ray_env = {**os.environ, **env}
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")  # this venv's, not PATH's
        status = subprocess.run([ray_bin, "status", "--address", stack.ray.address], env=ray_env,
                                text=True, capture_output=True, timeout=120)
        assert status.returncode == 0 and "CPU" in status.stdout, status.stdout + status.stderr
        wrong = subprocess.run([ray_bin, "status", "--address", stack.ray.address],
                               env={**ray_env, "RAY_AUTH_TOKEN": "not-the-token"},
                               text=True, capture_output=True, timeout=120)
        assert wrong.returncode != 0 and "uthentication" in wrong.stderr

        # S3 accepts a put and a get with the printed credentials.
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"])
        fs.pipe("msprior/probe/hello.txt", b"hello")
        assert fs.cat("msprior/probe/hello.txt") == b"hello"

        # MLflow's health endpoint answers.
        with urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as r:
            assert r.read().decode().strip() == "OK"

        # A job sees the S3 and MLflow settings through the head's environment, writes to the
        # bucket, and logs an artifact that MLflow proxies into the stack's bucket.
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "probe.py").write_text(
            "import os, mlflow, s3fs\n"
            "s3fs.S3FileSystem().pipe('msprior/probe/from_job.txt', b'job')\n"
            "with mlflow.start_run() as run:\n"
            "    mlflow.log_text('artifact', 'probe.txt')\n"
            "print('RUN', run.info.run_id, os.environ['MLFLOW_TRACKING_URI'])\n")
        job = subprocess.run([ray_bin, "job", "submit", "--working-dir", str(job_dir), "--",
                              sys.executable, "probe.py"], env=ray_env, text=True, capture_output=True,
                             timeout=300)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "RUN " in job.stdout and env["MLFLOW_TRACKING_URI"] in job.stdout
        fs.invalidate_cache()
        assert fs.cat("msprior/probe/from_job.txt") == b"job"
        assert any(p.endswith("probe.txt") for p in fs.find("msprior/mlflow"))
        pids = sorted(set(pids) | set(stack.processes()))  # the job's workers too

        # A second `up` finds the running stack and prints the same variables.
        again = local_sh("up", "--dir", str(stack_dir))
        assert again.returncode == 0 and "already up" in again.stderr
        assert parse_exports(again.stdout) == env
    finally:
        t1 = time.monotonic()
        down = local_sh("down", "--dir", str(stack_dir), timeout=300)
        print(f"local.sh down: {time.monotonic() - t1:.1f} s")
    assert down.returncode == 0, down.stderr
    assert [p for p in pids if pid_alive(p)] == []
    assert all(owned_pids(pid, mark) == [] for pid, mark in marks)
    assert not (stack_dir / "state.json").exists()
    assert not Path(stack.ray.temp_dir).exists()
    assert (stack_dir / "mlflow" / "mlflow.db").exists(), "down keeps the data"


# --- the image's build context (cluster/Dockerfile.dockerignore) ---------------------------------


def build_context(root: Path) -> set:
    """The files `docker build -f cluster/Dockerfile .` would send from `root`, computed with
    docker-py's implementation of .dockerignore matching (the Docker CLI's rules)."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sent = exclude_paths(str(root), patterns, dockerfile="cluster/Dockerfile")
    return {p for p in sent if (root / p).is_file()}


SECRETS_AND_OUTPUTS = [
    "mlflow.db", "sub/dir/mlflow.db", "mlflow.db-journal", "mlartifacts/1/abc/artifacts/ts/model.ts",
    "mlruns/0/meta.yaml", "runs/percussion/run.json", "runs/percussion/checkpoint_00000100/checkpoint.pt",
    "out/runs/x/run.json", "msprior-demo/mlflow.db", "msprior-demo/out/export/demo.ts", "data/corpus/manifest.json",
    "data/corpus/latents/a.parquet", "out/data/centroids.npy", "model.ts", "out/export/prior.ts",
    "tests/fixtures/rave.ts", "corpus/a.wav", "corpus/b.flac", ".venv/bin/python", ".git/config",
    ".msprior-stack/s3.json", ".env", "cluster/.env", ".aws/credentials", "key.pem", ".ray/auth_token",
]
IMAGE_NEEDS = ["pyproject.toml", "constraints.txt", "msprior/__init__.py", "msprior/data/preprocess.py",
               "msprior/export/pyfunc.py", "configs/decoder_only.yaml", "configs/sweeps/default.yaml",
               "jobs/pipeline.py", "cluster/runtime_env.yaml", "README.md"]


def test_image_context_keeps_out_stores_outputs_and_secrets(tmp_path):
    for rel in SECRETS_AND_OUTPUTS + IMAGE_NEEDS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    sent = build_context(tmp_path)
    assert sorted(set(SECRETS_AND_OUTPUTS) & sent) == []
    assert sorted(set(IMAGE_NEEDS) - sent) == []


def test_image_context_of_this_checkout_is_the_package():
    """On the real working tree: every tracked file the install needs goes in; nothing else heavy."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, text=True, capture_output=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    sent = build_context(ROOT)
    needed = {f for f in tracked if f.startswith(("msprior/", "configs/", "jobs/"))} | {"pyproject.toml", "constraints.txt"}
    assert sorted(needed - sent) == []
    assert not [f for f in sent if f.startswith((".venv/", ".git/", "tests/", "msprior-demo/", "runs/", "mlartifacts/"))
                or f.endswith((".db", ".ts", ".parquet", ".wav"))]
