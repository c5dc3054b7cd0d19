"""The pipeline's stage records and credential redaction, on real runs.

One tiny pipeline (a one-trial sweep, so both the training and the sweep writers run) against a
real `mlflow server` on 127.0.0.1, addressed with a URI that carries a user and a password: the
server ignores them, and none of the files, artifacts or printed lines may contain the password.
Re-runs then show the stage records at work: the same arguments skip every stage, changed ones are
refused in one line naming the stage and the argument, `--force export` redoes the export only.
"""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import yaml

from tests.test_pipeline_job import TINY

SECRET = "s3cr3t-t0ken"
SWEEP = {
    "base": "decoder_only", "overrides": TINY, "search": {"optim.lr": {"choice": [0.003]}},
    "scheduler": {"grace_period": 1, "reduction_factor": 2}, "num_samples": 1,
    "resources": {"num_workers": 1, "cpus_per_worker": 0.5}, "train": {"max_steps": 20, "val_every": 10, "batch_size": 8},
}


def _cli(capsys, argv):
    """`msprior ARGV` in-process: (exit code, stdout, stderr)."""
    from msprior.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _files_with(root: str, needle: bytes):
    """Every file below `root` whose bytes (or, for zip archives like `.ts`, any member's) hold `needle`."""
    hits = []
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            data = open(path, "rb").read()
            members = [data]
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    members += [z.read(n) for n in z.namelist()]
            if any(needle in m for m in members):
                hits.append(path)
    return hits


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from msprior.devstack import MLflowServer

    with MLflowServer(str(tmp_path_factory.mktemp("mlflow"))) as m:
        yield m


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stage_records_and_no_credentials_anywhere(ray_session, mlflow_server, tmp_path, capsys):
    from msprior.codec import save_codec
    from msprior.data.synthetic import write_corpus
    from msprior.registry import all_versions, registry_client as _client

    save_codec(str(tmp_path / "rave.ts"), discrete=True)
    write_corpus(str(tmp_path / "corpus"), n_files=3, seconds=6.0, seed=3)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    uri = mlflow_server.uri.replace("http://", f"http://msprior:{SECRET}@")
    out = tmp_path / "out"
    argv = ["pipeline", "--audio", str(tmp_path / "corpus"), "--rave", str(tmp_path / "rave.ts"), "--out", str(out),
            "--tune", "--sweep", str(tmp_path / "sweep.yaml"), "--num_secs", "3", "--tracking_uri", uri,
            "--preview_secs", "1", *sum((["--override", o] for o in TINY), [])]

    code, printed, err = _cli(capsys, argv)
    assert code == 0, (printed + err)[-4000:]
    name = next(f for f in os.listdir(out / "export") if f.endswith(".ts"))[:-3]
    assert name.startswith("decoder_only-") and len(name) == len("decoder_only-") + 8  # corpus id in the name
    assert f"msprior pull msprior-{name}@champion --out model.ts --tracking_uri {mlflow_server.uri}" in printed
    assert sorted(os.listdir(out / "stages")) == ["export.%s.json" % name, "preprocess.json", "train.%s.json" % name]

    # --- no password: not printed, not in any file under --out (run.json, sweep.json, stage records,
    # the .ts and its metadata), not in the server's artifacts, params or tags
    assert SECRET not in printed + err
    assert _files_with(str(out), SECRET.encode()) == []
    assert _files_with(str(out / "export"), mlflow_server.uri.encode())  # the scan sees inside the .ts
    sweep = json.loads((out / "runs" / f"{name}.sweep.json").read_text())
    assert sweep["tracking_uri"] == mlflow_server.uri  # recorded without the credentials
    assert json.loads(open(sweep["best_run_dir"] + "/run.json").read())["tracking_uri"] == mlflow_server.uri
    c = _client(uri)
    (version,) = all_versions(c, f"msprior-{name}")
    from msprior.registry import corpus_id  # the corpus is the table's committed content, not its path

    assert version.tags["table_sha256"] != "unknown"
    assert version.tags["corpus"] == corpus_id(version.tags["rave_sha256"], "content:" + version.tags["table_sha256"])
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 2  # the sweep and its trial (the export is logged to the trial's run)
    for r in runs:
        assert SECRET not in json.dumps([r.data.params, r.data.tags])
    assert _files_with(str(mlflow_server.dir / "artifacts"), SECRET.encode()) == []
    assert any(f.endswith("export.json") for _, _, fs in os.walk(mlflow_server.dir / "artifacts") for f in fs)

    # --- the same arguments again: every stage skipped, nothing new registered
    code, printed, err = _cli(capsys, argv)
    assert code == 0, err
    for stage in ("preprocess", "tune", "export", "register"):
        assert f"[{stage}] skipped" in printed, printed
    assert len(all_versions(c, f"msprior-{name}")) == 1

    # --- changed arguments: one line naming the stage and the argument; nothing rewritten
    before = {f: (out / "stages" / f).read_bytes() for f in os.listdir(out / "stages")}
    other_rave = tmp_path / "other.ts"
    save_codec(str(other_rave), discrete=False)
    for change, stage, arg in ((["--quantize", "int8"], "export", "quantize='none'; this run asks quantize='int8'"),
                               (["--override", "model.num_layers=2"], "train", "model.num_layers=1; this run asks model.num_layers=2"),
                               (["--num_secs", "2"], "preprocess", "num_secs=3.0; this run asks num_secs=2.0"),
                               (["--rave", str(other_rave), "--name", name], "preprocess", "rave_sha256=")):
        code, printed, err = _cli(capsys, argv + change)
        assert code == 2, (change, printed, err)
        line = err.strip()
        assert len(line.splitlines()) == 1 and line.startswith(f"error: [{stage}] ") and arg in line, line
        assert f"pass --force {stage} to redo it" in line
    assert {f: (out / "stages" / f).read_bytes() for f in os.listdir(out / "stages")} == before

    # --- --force export: the export (only) is redone with the new argument and registered
    code, printed, err = _cli(capsys, argv + ["--quantize", "int8", "--force", "export"])
    assert code == 0, (printed + err)[-4000:]
    assert "[preprocess] skipped" in printed and "[tune] skipped" in printed and "[export] skipped" not in printed
    assert json.loads((out / "stages" / f"export.{name}.json").read_text())["inputs"]["quantize"] == "int8"
    assert len(all_versions(c, f"msprior-{name}")) == 2
    code, printed, err = _cli(capsys, argv + ["--quantize", "int8"])  # and now it is the recorded one
    assert code == 0 and "[export] skipped" in printed, err
    code, _, err = _cli(capsys, argv + ["--force", "nope"])
    assert code == 2 and "--force nope: not a stage; one of preprocess, train, export (or tune)" in err

    # --- --force tune (= train) with another config: the sweep and the export are redone, the old
    # trial's run removed, the preprocessed table kept
    old_trial = sweep["best_run_dir"]
    code, printed, err = _cli(capsys, argv + ["--quantize", "int8", "--force", "tune", "--override", "model.num_layers=2"])
    assert code == 0, (printed + err)[-4000:]
    assert "[preprocess] skipped" in printed and "[tune] skipped" not in printed and "[export] skipped" not in printed
    assert not os.path.exists(old_trial)
    record = json.loads((out / "stages" / f"train.{name}.json").read_text())["inputs"]
    assert record["model.num_layers"] == 2
    assert len(all_versions(c, f"msprior-{name}")) == 3


def test_stage_guard_upstream_and_outputs_without_record(tmp_path):
    """The records alone (no Ray): an output made by an older msprior is adopted with a printed line;
    a stage whose upstream record changed underneath it is refused; --force names real stages."""
    from msprior.codec import save_codec
    from msprior.pipeline import PipelineError, PipelineRequest, guard, plan

    save_codec(str(tmp_path / "rave.ts"), discrete=True)
    said = []
    p = plan(PipelineRequest(str(tmp_path / "audio"), str(tmp_path / "rave.ts"), str(tmp_path / "out")), said.append)
    assert p.name.startswith("decoder_only-") and p.forced == []
    guard(p, "preprocess", {"num_secs": 16.0}, has_output=True)
    assert said == ["[preprocess] no record of the arguments its output was made with (older msprior): recording these"]
    guard(p, "train", {"max_steps": 10}, has_output=False)
    guard(p, "train", {"max_steps": 10}, has_output=True)  # same inputs, same upstream: fine
    os.remove(p.record_path("preprocess"))  # the table remade by hand with other settings
    guard(p, "preprocess", {"num_secs": 8.0}, has_output=True)
    with pytest.raises(PipelineError, match=r"^\[train\] .*train\.decoder_only-[0-9a-f]{8}\.json was made from another "
                       r"preprocess output: pass --force train to redo it"):
        guard(p, "train", {"max_steps": 10}, has_output=True)
    forced = plan(PipelineRequest(str(tmp_path / "audio"), str(tmp_path / "rave.ts"), str(tmp_path / "out"),
                                  force=["tune"]))
    assert forced.forced == ["train", "export"]
