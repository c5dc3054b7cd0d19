"""MLflow registry round trip on a real sqlite store: export -> register -> pull gives the same bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from export_runs import Q, make_run, save_decoder
from msprior.export.run import export_run


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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

    c = registry.registry_client(uri)
    tags = c.get_model_version("msprior-tiny", "3").tags
    assert tags["val_loss"] == "1.5" and tags["continuous"] == "false" and tags["config"] == "decoder_only"
    assert tags["rave_sha256"] == "ab" * 32 and len(tags["sha256"]) == 64 and tags["torch_version"]

    import mlflow  # the pyfunc flavour runs the same file (no msprior code inside the model)

    from msprior.tracking import active

    with active(uri):
        model = mlflow.pyfunc.load_model("models:/msprior-tiny@champion")
    assert model.predict(np.zeros((1, Q, 4), dtype=np.float32)).shape == (1, Q + 1, 4)


def test_missing_name_alias_version_are_one_line_errors(store, tmp_path):
    from msprior import registry

    root, uri = store
    if not registry.registry_client(uri).search_registered_models():
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
    from msprior.checkpoint import read_run_json, write_run_json
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


# --- one corpus per registered model, tags in the creating call, champion under concurrency -------


def _export_for(root, tag: str, val_loss: float, rave_sha: str = "ab" * 32, db_path=None) -> str:
    """An export whose metadata names this RAVE sha256 and latent table (db_path)."""
    from msprior.export.run import read_metadata
    from msprior.checkpoint import read_run_json, write_run_json

    run = make_run(str(root / tag), "decoder_only", steps=3, val_loss=val_loss, name=tag)
    ckpt_file = root / tag / tag / "checkpoints" / "best" / "checkpoint.pt"
    state = torch.load(ckpt_file, weights_only=True)
    state["manifest"]["rave"]["sha256"] = rave_sha
    torch.save(state, ckpt_file)
    write_run_json(run, {**read_run_json(run), "db_path": db_path})
    out = export_run(run, str(root / f"{tag}.ts"))
    assert read_metadata(out)["rave_sha256"] == rave_sha
    return out


def test_registering_leaves_the_process_environment_and_mlflow_globals_as_they_were(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ: a register inside a long-lived
    driver would hand its store (and any credentials in the URI) to every later subprocess."""
    import mlflow

    from msprior import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    registry.register_export(_export(tmp_path, 2.0, "env"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before


def test_a_model_holds_one_corpus_and_versions_carry_it(tmp_path):
    from msprior import registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a = _export_for(tmp_path, "x", 2.0, "aa" * 32, "/data/corpus-a")
    (tmp_path / "other").mkdir()  # a run of the same name on another corpus, with a better loss
    b = _export_for(tmp_path / "other", "x", 0.5, "bb" * 32, "/data/corpus-b")
    v1 = registry.register_export(a, tracking_uri=uri)
    assert v1["name"] == "msprior-x" and v1["champion"]
    with pytest.raises(registry.RegistryError, match=r"^registered model 'msprior-x' holds priors of another "
                       r"corpus .*pass another name \(e\.g\. --name msprior-x-[0-9a-f]{8}\)$"):
        registry.register_export(b, name="msprior-x", tracking_uri=uri)  # a name given: refused
    c = registry.registry_client(uri)
    assert [str(v.version) for v in registry.all_versions(c, "msprior-x")] == ["1"]  # nothing half-registered
    v2 = registry.register_export(b, tracking_uri=uri)  # the default name: its own model
    assert v2["name"] == f"msprior-x-{registry.corpus_id('bb' * 32, '/data/corpus-b')[:8]}" and v2["champion"]
    assert str(c.get_model_version_by_alias("msprior-x", "champion").version) == "1"
    rm = c.get_registered_model("msprior-x")
    assert rm.tags[registry.BOUND_RAVE] == "aa" * 32 and rm.tags[registry.BOUND_TABLE] == "/data/corpus-a"
    tags = c.get_model_version("msprior-x", "1").tags
    assert tags["corpus"] == registry.corpus_id("aa" * 32, "/data/corpus-a") == rm.tags[registry.BOUND_CORPUS]
    assert registry.corpus_id("aa" * 32, "/data/corpus-a") != registry.corpus_id("aa" * 32, "/data/corpus-b")


def test_version_without_sha256_is_refused_by_pull_and_never_a_duplicate(tmp_path):
    """What the old two-step registration left after a crash between the version and its tags."""
    from msprior import registry
    from msprior.export.publish import publish

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ts = _export_for(tmp_path, "t", 1.0)
    first = registry.register_export(ts, name="msprior-t", tracking_uri=uri)
    c = registry.registry_client(uri)
    src = c.get_model_version("msprior-t", first["version"]).source
    from msprior.tracking import active

    with active(uri):  # MLflow's registry store reads the logged model through its fluent globals
        bare = c.create_model_version("msprior-t", source=src)  # a version without any tag
    with pytest.raises(registry.RegistryError, match=rf"^msprior-t v{bare.version} has no sha256 tag, so its "
                       r"download cannot be verified; pull another version \(aliases: champion \(v1\); versions: 1, 2\)$"):
        registry.pull(f"msprior-t/{bare.version}", str(tmp_path / "x.ts"), tracking_uri=uri)
    assert not (tmp_path / "x.ts").exists()

    # the first version is deleted: the tagless one must not pass for a copy of this file
    c.delete_model_version("msprior-t", first["version"])
    info = publish(ts, name="msprior-t", tracking_uri=uri, preview_secs=0, echo=lambda s: None)
    assert info["version"] == "3" and info["champion"]  # registered again, and only it can be champion
    assert c.get_model_version("msprior-t", "3").tags["sha256"] == info["sha256"]
    pulled = registry.pull("msprior-t@champion", str(tmp_path / "c.ts"), tracking_uri=uri)
    assert open(pulled, "rb").read() == open(ts, "rb").read()

    # a registration that stopped after its version, before the alias: the skipped re-run settles it
    c.delete_registered_model_alias("msprior-t", "champion")
    again = publish(ts, name="msprior-t", tracking_uri=uri, preview_secs=0, echo=lambda s: None)
    assert again["version"] == "3" and again["champion"]
    assert str(c.get_model_version_by_alias("msprior-t", "champion").version) == "3"


REGISTER = """
import json, sys
from msprior import registry
info = registry.register_export(sys.argv[1], name=sys.argv[2], tracking_uri=sys.argv[3], echo=print)
print("RESULT", json.dumps(info), flush=True)
"""


def _register_proc(ts, name, uri, env=None):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", REGISTER, ts, name, uri], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def _finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_champion_survives_a_stalled_concurrent_registration(tmp_path):
    """Process A registers a worse model, chooses itself as champion, and stalls before the alias
    write; process B registers a better model meanwhile; A then writes its stale choice. The
    re-read after each write brings the alias back to B's version."""
    import json

    from msprior import registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base, worse, better = (_export_for(tmp_path, t, loss) for t, loss in (("base", 2.0), ("worse", 1.5), ("better", 1.0)))
    assert registry.register_export(base, name="msprior-race", tracking_uri=uri)["champion"]
    flag = tmp_path / "go"
    a = _register_proc(worse, "msprior-race", uri, {registry.STALL_ENV: str(flag)})
    lines = []
    for line in a.stdout:  # until A has chosen itself and stalls before writing
        lines.append(line)
        if line.startswith("[fault] stalled"):
            break
    assert lines and lines[-1].startswith("[fault] stalled"), "".join(lines)
    assert "champion -> version 2" not in "".join(lines)  # A's write is still pending
    b_out = _finish(_register_proc(better, "msprior-race", uri))
    b = json.loads(b_out.split("RESULT ", 1)[1])
    assert b["version"] == "3" and b["champion"]
    flag.touch()
    a_out = "".join(lines) + _finish(a)
    # A wrote its stale choice, read again, and put the alias back on B's better version
    assert a_out.index("champion -> version 2") < a_out.rindex("champion -> version 3"), a_out[-2000:]
    c = registry.registry_client(uri)
    assert str(c.get_model_version_by_alias("msprior-race", "champion").version) == "3"


@pytest.mark.slow
def test_two_processes_registering_at_once_leave_the_better_champion(tmp_path):
    from msprior import registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exports = [_export_for(tmp_path, f"e{i}", loss) for i, loss in enumerate((1.7, 1.2, 1.4, 1.1))]
    registry.register_export(exports[0], name="msprior-duo", tracking_uri=uri)
    procs = [_register_proc(ts, "msprior-duo", uri) for ts in exports[1:]]  # three at once, no stall
    for p in procs:
        _finish(p)
    c = registry.registry_client(uri)
    losses = {str(v.version): float(v.tags["val_loss"]) for v in registry.all_versions(c, "msprior-duo")}
    assert sorted(losses.values()) == [1.1, 1.2, 1.4, 1.7]
    assert str(c.get_model_version_by_alias("msprior-duo", "champion").version) == min(losses, key=losses.get)
