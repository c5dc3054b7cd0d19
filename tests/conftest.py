"""Shared pytest fixtures. Each helper adds its own section; keep sections independent."""

from __future__ import annotations

import os

import pytest


# --- data: one Ray runtime and one SeaweedFS S3 server per test session ----------------


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole session (ray.init costs seconds here).

    Logical CPUs (4 on a 2-core machine) and fractional actors avoid Ray's silent resource deadlocks
    (two 1-CPU actors holding both cores starve the read tasks); listeners stay on 127.0.0.1. Stopped at the end only if this fixture started it.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=512 * 1024 * 1024)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (SeaweedFS on 127.0.0.1, free ports) with a `test-bucket`."""
    from msprior.devstack import SeaweedS3

    server = SeaweedS3(data_dir=str(tmp_path_factory.mktemp("seaweed"))).start()
    server.create_bucket("test-bucket")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the session's S3 server, for one test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    return s3_server


# --- train: a synthetic latent table, per-test run storage and sqlite MLflow -----------


@pytest.fixture(scope="session")
def train_table(tmp_path_factory):
    """A small learnable latent table (8 files x 4 chunks x 64 frames, Q=4, V=16, conditioning)."""
    from tests._train_data import write_synthetic_table

    root = tmp_path_factory.mktemp("train_table")
    write_synthetic_table(root)
    return str(root)


@pytest.fixture
def train_dirs(tmp_path):
    """(storage_path, tracking_uri) for one test: runs and a sqlite MLflow store under tmp_path."""
    return str(tmp_path / "runs"), f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
