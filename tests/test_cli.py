"""The command line is built from the stages' request types: each flag declared once, both spellings.

These run the real typer/click parser (`msprior.cli.main`) and stop at the stage boundary: the
stage function is replaced by one that records the request it was handed.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import typer

from msprior import cli, flags
from msprior.data.preprocess import PreprocessRequest
from msprior.export.publish import ExportRequest
from msprior.pipeline import PipelineRequest
from msprior.train.run import TrainRequest
from msprior.train.tune import SweepRequest

COMMANDS = {"preprocess": PreprocessRequest, "train": TrainRequest, "tune": SweepRequest,
            "export": ExportRequest, "pipeline": PipelineRequest}


def _options(name: str):
    group = typer.main.get_command(cli.app)
    return {p.name: p for p in group.commands[name].params}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_field_is_an_option_with_both_spellings_and_its_default(name):
    params = _options(name)
    for f in flags.flag_fields(COMMANDS[name]):
        p = params[f.name]
        first = (f.metadata[flags.NAMES] or f"--{f.name}").split("/")[0]
        assert first in p.opts, (name, f.name, p.opts)
        if "_" in first:
            assert first.replace("_", "-") in p.opts, f"{name} --{f.name}: no dashed spelling"
        assert p.required == f.metadata[flags.REQUIRED], (name, f.name)
        if not p.required and not p.multiple:
            assert p.default == f.default, (name, f.name, p.default, f.default)
    library_only = {f.name for f in dataclasses.fields(COMMANDS[name])} - {f.name for f in flags.flag_fields(COMMANDS[name])}
    assert not library_only & set(params), "a library-only field leaked onto the command line"


def test_the_pipeline_takes_a_stage_flag_as_the_stage_declares_it():
    """The drift this prevents: export's --preview_secs once defaulted to 8 and the pipeline's to 4."""
    pipe = {f.name: f for f in dataclasses.fields(PipelineRequest)}
    pairs = [("num_secs", PreprocessRequest, "num_secs"), ("resolution", PreprocessRequest, "resolution"),
             ("condition_ratio", PreprocessRequest, "condition_ratio"), ("config", TrainRequest, "config"),
             ("tracking_uri", TrainRequest, "tracking_uri"), ("preview_secs", ExportRequest, "preview_secs"),
             ("quantize", ExportRequest, "quantize"), ("num_samples", SweepRequest, "num_samples")]
    for mine, stage, theirs in pairs:
        src = {f.name: f for f in dataclasses.fields(stage)}[theirs]
        assert pipe[mine].default == src.default and pipe[mine].metadata[flags.HELP] == src.metadata[flags.HELP]


def _capture(monkeypatch, module, attr):
    seen = []

    def fake(req, *a, **kw):
        seen.append(req)
        raise SystemExit(0)

    monkeypatch.setattr(module, attr, fake)
    return seen


def test_a_command_line_becomes_the_stage_request(monkeypatch, tmp_path):
    import msprior.train.run as run

    seen = _capture(monkeypatch, run, "run_training")
    argv = ["train", "--db-path", "s3://b/table", "--name", "x", "--override", "model.dim=64",
            "--override=train.batch_size=8", "--max_steps", "5", "--gpu", "--storage_path", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    (req,) = seen
    assert req == TrainRequest(db_path="s3://b/table", name="x", overrides=("model.dim=64", "train.batch_size=8"),
                               max_steps=5, gpu=0, storage_path=str(tmp_path))  # a bare --gpu is --gpu 0


def test_export_register_switch_and_pipeline_force(monkeypatch, tmp_path):
    import msprior.export.publish as publish
    import msprior.pipeline as pipeline

    seen = _capture(monkeypatch, publish, "export_and_publish")
    with pytest.raises(SystemExit):
        cli.main(["export", "--run", "r", "--out", str(tmp_path / "m.ts"), "--no-register", "--preview-secs", "2"])
    assert seen[-1] == ExportRequest(run="r", out=str(tmp_path / "m.ts"), register=False, preview_secs=2.0)
    seen = _capture(monkeypatch, pipeline, "run_pipeline")
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--audio", "a", "--rave", "r.ts", "--out", str(tmp_path), "--force", "train",
                  "--registered_name", "mine", "--export-batch-size", "2"])
    assert seen[-1] == PipelineRequest("a", "r.ts", str(tmp_path), force=("train",), registered_name="mine",
                                       export_batch_size=2)


def test_a_usage_error_reaches_the_terminal_of_a_quiet_command(tmp_path):
    """Quiet commands send fds 1 and 2 to a log file; a usage error must still be seen (a real
    process: in-process capture would hide the fd redirection)."""
    import subprocess
    import sys

    for argv, flag in ((["preprocess", "--audio", "a", "--rave", "r.ts"], "--out_path"),
                       (["train", "--db_path", "x"], "--name")):
        p = subprocess.run([sys.executable, "-m", "msprior", *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and flag in p.stderr, (argv, p.stdout, p.stderr)
    assert not (tmp_path / "logs").exists()  # nothing ran: no log file either


def test_cli_declares_no_option_by_hand():
    """Options come from request fields only: one typer.Option/Argument call, in the builder."""
    tree = ast.parse(Path(cli.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("Option", "Argument")]
    assert len(calls) == 2, [ast.unparse(c)[:60] for c in calls]
