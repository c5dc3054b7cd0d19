"""The package as a user gets it: shipped configs found from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_shipped_names_and_repository_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    from msprior.config import ConfigError, config_dir, load_config, resolve_config_path, resolve_sweep_path

    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = config_dir() / "sweeps" / "default.yaml"
    assert resolve_sweep_path("default") == resolve_sweep_path("sweeps/default") == str(shipped)
    assert resolve_sweep_path("configs/sweeps/default.yaml") == str(shipped)  # the old default
    assert resolve_config_path("configs/recurrent.yaml") == config_dir() / "recurrent.yaml"
    assert load_config("recurrent").model.family == "gru"
    own = tmp_path / "mine.yaml"
    own.write_text("base: recurrent\n")
    assert resolve_sweep_path(str(own)) == str(own) and resolve_sweep_path("mine.yaml") == "mine.yaml"
    with pytest.raises(ConfigError, match="unknown sweep.*default"):
        resolve_sweep_path("defualt")
    with pytest.raises(ConfigError, match="--sweep other.yaml: file not found"):
        resolve_sweep_path("other.yaml")
    with pytest.raises(ConfigError, match="configs/nope.yaml: config file not found"):
        resolve_config_path("configs/nope.yaml")


def run(cmd, cwd, timeout=900, env=None):
    """Run one command; on failure the assertion shows its last output lines."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}"
    return p.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_runs_outside_the_repository(ray_session, train_table, tmp_path):
    """`msprior tune` with the default sweep from a folder that holds no configs/: the sweep and its
    base config come from the package; runs and mlflow.db land in the current folder."""
    from tests.test_train_data import TINY

    msprior = Path(sys.executable).parent / "msprior"
    overrides = [a for o in [*TINY, "train.val_batches=1"] for a in ("--override", o)]
    out = run([msprior, "tune", "--db_path", train_table, "--name", "outside", "--num_samples", "1",
               "--max_steps", "2", "--val_every", "1", "--batch_size", "4", *overrides], cwd=tmp_path,
              timeout=500, env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert "best trial" in out, out
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs").is_dir()
    with pytest.raises(AssertionError, match="unknown sweep"):  # a name that is not shipped says so
        run([msprior, "tune", "--db_path", train_table, "--name", "x", "--sweep", "nope"], cwd=tmp_path)
