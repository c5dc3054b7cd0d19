"""MLflow registry round trip on a real sqlite store: export -> register -> pull gives the same bytes."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from export_runs import Q, make_run, save_decoder
from msprior.export.run import export_run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return root, f"sqlite:///{root}/mlflow.db"


def _export(root, val_loss: float, tag: str) -> str:
    run = make_run(str(root / tag), "decoder_only", steps=5, val_loss=val_loss, name="tiny")
    return export_run(run, str(root / f"{tag}.ts"))


def test_round_trip_and_champion_moves_only_when_better(store, tmp_path):
    from msprior import registry

    root, uri = store
    first = _export(root, 2.0, "a")
    worse = _export(root, 2.5, "b")
    better = _export(root, 1.5, "c")

    v1 = registry.register_export(first, tracking_uri=uri)
    assert v1["name"] == "msprior-tiny" and v1["champion"]
    v2 = registry.register_export(worse, tracking_uri=uri)
    assert not v2["champion"]
    pulled = registry.pull("msprior-tiny@champion", str(tmp_path / "champ.ts"), tracking_uri=uri)
    assert open(pulled, "rb").read() == open(first, "rb").read()  # the worse version did not take it

    v3 = registry.register_export(better, tracking_uri=uri)
    assert v3["champion"] and v3["version"] == "3"
    pulled = registry.pull("msprior-tiny@champion", str(tmp_path / "champ.ts"), tracking_uri=uri)
    assert open(pulled, "rb").read() == open(better, "rb").read()
    assert open(registry.pull("msprior-tiny/2", str(tmp_path / "v2.ts"), tracking_uri=uri), "rb").read() == \
        open(worse, "rb").read()

    c = registry._client(uri)
    tags = c.get_model_version("msprior-tiny", "3").tags
    assert tags["val_loss"] == "1.5" and tags["continuous"] == "false" and tags["config"] == "decoder_only"
    assert tags["rave_sha256"] == "ab" * 32 and len(tags["sha256"]) == 64 and tags["torch_version"]

    import mlflow  # the pyfunc flavour runs the same file (no msprior code inside the model)

    model = mlflow.pyfunc.load_model("models:/msprior-tiny@champion")
    assert model.predict(np.zeros((1, Q, 4), dtype=np.float32)).shape == (1, Q + 1, 4)


def test_missing_name_alias_version_are_one_line_errors(store, tmp_path):
    from msprior import registry

    root, uri = store
    if not registry._client(uri).search_registered_models():
        registry.register_export(_export(root, 2.0, "d"), tracking_uri=uri)
    with pytest.raises(registry.RegistryError, match=r"no registered model 'nope'; registered models: .*msprior-tiny"):
        registry.pull("nope@champion", str(tmp_path / "x.ts"), tracking_uri=uri)
    with pytest.raises(registry.RegistryError, match=r"no alias 'staging'; aliases: champion \(v\d+\); versions: 1"):
        registry.pull("msprior-tiny@staging", str(tmp_path / "x.ts"), tracking_uri=uri)
    with pytest.raises(registry.RegistryError, match=r"no version 99"):
        registry.pull("msprior-tiny/99", str(tmp_path / "x.ts"), tracking_uri=uri)
    assert not (tmp_path / "x.ts").exists()


def test_cli_export_from_mlflow_run_id_registers_with_preview_and_pulls(store, tmp_path):
    """`msprior export --run <mlflow run id>` (tag msprior.run_dir), preview WAV, then `msprior pull`."""
    from msprior.cli import main
    from msprior.train.checkpoint import read_run_json, write_run_json
    from msprior.train.tracking import RUN_DIR_TAG, client, experiment_id

    root, uri = store
    run_dir = make_run(str(tmp_path), "recurrent", steps=5, val_loss=3.0, name="cli")

    table = tmp_path / "table"
    table.mkdir()
    save_decoder(str(table / "rave.ts"))
    c = client(uri)
    exp = experiment_id(c, "cli")  # artifacts next to the sqlite file, not ./mlruns
    run_id = c.create_run(exp, tags={RUN_DIR_TAG: run_dir}).info.run_id
    info = read_run_json(run_dir)
    write_run_json(run_dir, {**info, "mlflow_run_id": run_id, "tracking_uri": uri, "db_path": str(table)})

    out = tmp_path / "cli.ts"
    with pytest.raises(SystemExit) as ok:
        main(["export", "--run", run_id, "--out", str(out), "--tracking_uri", uri, "--preview_secs", "1"])
    assert ok.value.code in (0, None)
    arts = [a.path for a in c.list_artifacts(run_id, "previews")] + [a.path for a in c.list_artifacts(run_id, "export")]
    assert "previews/cli.preview.wav" in arts and "export/cli.ts" in arts  # logged to the training run
    pulled = tmp_path / "pulled.ts"
    with pytest.raises(SystemExit) as ok:
        main(["pull", "msprior-cli@champion", "--out", str(pulled), "--tracking_uri", uri])
    assert ok.value.code in (0, None)
    assert pulled.read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit) as err:
        main(["pull", "msprior-cli@nope", "--out", str(pulled), "--tracking_uri", uri])
    assert err.value.code == 2
