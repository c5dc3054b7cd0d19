"""The package as a user gets it: shipped configs found from any folder, and the wheel installed
WITHOUT constraints.txt into a fresh venv.

`make` installs from the lock; a user who adds msprior to their own environment (or a cluster image
on another base) gets whatever pyproject.toml's bounds resolve to. These tests build the wheel, make a
fresh venv with torch preinstalled (as a GPU user brings their own), install the wheel with pip and
with uv (newest versions) and with uv's lowest-direct resolution (every floor), and run the CLI and one import of each stage from a folder outside the repository, so the
code and the shipped configs come from the installed wheel, not from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH = os.environ.get("MSPRIOR_TORCH", "torch==2.13.0")  # the on-disk CPU wheel (pip's find-links)
FLOOR_REPORT = {"ray", "mlflow", "s3fs", "aiobotocore", "boto3", "pyarrow", "numpy", "typer"}
STAGES = "import msprior.data, msprior.train, msprior.export, msprior.registry, msprior.pipeline"


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
    with pytest.raises(ConfigError, match="sweep file not found: other.yaml"):
        resolve_sweep_path("other.yaml")
    with pytest.raises(ConfigError, match="config file not found: configs/nope.yaml"):
        resolve_config_path("configs/nope.yaml")


def run(cmd, cwd, timeout=900, env=None):
    """Run one command; on failure the assertion shows its last output lines."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT], cwd=out)
    (whl,) = out.glob("msprior-*.whl")
    return whl


def fresh_venv(where: Path) -> Path:
    """A new venv (no site packages) holding only torch; returns its bin/ folder."""
    run([sys.executable, "-m", "venv", where / "venv"], cwd=where)
    bin_dir = where / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", TORCH], cwd=where)
    return bin_dir


def check_installed(bin_dir: Path, cwd: Path) -> None:
    """The CLI, each stage's import and the shipped configs, all from the installed wheel."""
    site = run([bin_dir / "python", "-c", "import msprior; print(msprior.__file__)"], cwd=cwd)
    assert str(bin_dir.parent) in site and str(ROOT) not in site, site
    assert "preprocess" in run([bin_dir / "msprior", "--help"], cwd=cwd)
    run([bin_dir / "python", "-c", STAGES], cwd=cwd)
    cfg = run([bin_dir / "msprior", "config", "--config", "decoder_only", "--override", "model.dim=256"], cwd=cwd)
    assert "name: decoder_only" in cfg and "family: transformer" in cfg and "dim: 256" in cfg, cfg
    sweep = run([bin_dir / "python", "-c",
                 "from msprior.config import resolve_sweep_path; print(resolve_sweep_path('default'))"], cwd=cwd)
    assert sweep.strip().startswith(str(bin_dir.parent)), sweep


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_installs_with_pip_without_the_lock(wheel, tmp_path):
    bin_dir = fresh_venv(tmp_path)
    t0 = time.monotonic()
    run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp_path)
    print(f"pip install of the wheel without the lock: {time.monotonic() - t0:.0f} s")
    # pip reports a broken set of requirements here even where `install` exited 0
    run([bin_dir / "python", "-m", "pip", "check"], cwd=tmp_path)
    check_installed(bin_dir, tmp_path)
    shutil.rmtree(tmp_path / "venv")  # ~2 GB


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_installs_with_uv_without_the_lock(wheel, tmp_path):
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is missing: it comes with the test extra (pip install -e .[test])"
    bin_dir = fresh_venv(tmp_path)  # torch by pip: uv does not read pip's find-links (the on-disk wheel)
    t0 = time.monotonic()
    run([uv, "pip", "install", "-q", "--python", bin_dir / "python", wheel], cwd=tmp_path)
    print(f"uv pip install of the wheel without the lock: {time.monotonic() - t0:.0f} s")
    run([bin_dir / "python", "-m", "pip", "check"], cwd=tmp_path)
    check_installed(bin_dir, tmp_path)
    shutil.rmtree(tmp_path / "venv")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_lowest_allowed_versions_start(wheel, tmp_path):
    """pyproject.toml's floors are real: every direct requirement at its lowest allowed version
    (uv's lowest-direct resolution) still installs and starts (an old typer with a new click did not)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is missing: it comes with the test extra (pip install -e .[test])"
    bin_dir = fresh_venv(tmp_path)  # torch stays at the preinstalled build (it satisfies torch>=2.4)
    run([uv, "pip", "install", "-q", "--python", bin_dir / "python", "--resolution", "lowest-direct",
         "-r", ROOT / "pyproject.toml"], cwd=tmp_path)
    run([uv, "pip", "install", "-q", "--python", bin_dir / "python", "--no-deps", wheel], cwd=tmp_path)
    run([bin_dir / "python", "-m", "pip", "check"], cwd=tmp_path)
    frozen = run([bin_dir / "python", "-m", "pip", "freeze"], cwd=tmp_path).lower().splitlines()
    print("lowest set:", " ".join(ln for ln in frozen if ln.split("==")[0] in FLOOR_REPORT))
    check_installed(bin_dir, tmp_path)
    shutil.rmtree(tmp_path / "venv")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_runs_outside_the_repository(ray_session, train_table, tmp_path):
    """`msprior tune` with the default sweep from a folder that holds no configs/: the sweep and its
    base config come from the package; runs and mlflow.db land in the current folder."""
    from tests.test_train_windows import TINY

    msprior = Path(sys.executable).parent / "msprior"
    overrides = [a for o in [*TINY, "train.val_batches=1"] for a in ("--override", o)]
    out = run([msprior, "tune", "--db_path", train_table, "--name", "outside", "--num_samples", "1",
               "--max_steps", "2", "--val_every", "1", "--batch_size", "4", *overrides], cwd=tmp_path,
              timeout=500, env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert "best trial" in out, out
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs").is_dir()
    with pytest.raises(AssertionError, match="unknown sweep"):  # a name that is not shipped says so
        run([msprior, "tune", "--db_path", train_table, "--name", "x", "--sweep", "nope"], cwd=tmp_path)
