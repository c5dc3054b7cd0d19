"""The original MSPrior's command lines (acids-msprior 1.1.3) work here as they are.

ORIGINAL_* below are every flag of its `msprior_scripts/preprocess.py` and `train.py` (absl
definitions: name -> type). Each is an option of ours with the same type, or a one-line error that
names our equivalent. The end-to-end test runs its README's four commands verbatim on a discrete
and a continuous RAVE v2 export made by RAVE's own exporter, with extra flags that only bound steps.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest
import typer

from msprior import cli

FIXTURES = Path(__file__).parent / "fixtures"
# absl: DEFINE_string -> str, DEFINE_integer -> int, DEFINE_float -> float, DEFINE_bool -> bool,
# DEFINE_multi_string -> multi
ORIGINAL_PREPROCESS = {"rave": str, "out_path": str, "audio": str, "num_secs": int, "num_tokens": int,
                       "batch_size": int, "preprocessor": "multi", "gpu": int, "db_size": int, "dyndb": bool,
                       "normalize": bool, "silence_threshold": int, "resolution": int}
ORIGINAL_TRAIN = {"config": "multi", "db_path": str, "val_size": int, "batch_size": int, "name": str, "gpu": int,
                  "workers": int, "pretrained_embedding": str, "override": "multi", "ckpt": str, "ema": float,
                  "val_every": int}


def _options(command: str):
    group = typer.main.get_command(cli.app)
    return {opt: p for p in group.commands[command].params for opt in p.opts + p.secondary_opts}


@pytest.mark.parametrize("command, original", [("preprocess", ORIGINAL_PREPROCESS), ("train", ORIGINAL_TRAIN)])
def test_every_original_flag_is_an_option_of_the_same_type(command, original):
    opts = _options(command)
    for name, kind in original.items():
        p = opts.get(f"--{name}")
        assert p is not None, f"msprior {command} has no --{name}"
        if kind == "multi":
            assert p.multiple, f"--{name} is repeatable in the original"
        elif kind is bool:
            assert p.is_flag and f"--no{name}" in opts, f"--{name}/--no{name} (absl's negation)"
        else:  # an int flag of ours would refuse the original's --ema 0.999, a bool its --gpu 0
            ours = p.type_descriptor.annotation
            assert ours is kind or (kind is int and ours is float), (name, ours)  # a float takes every int


def _request(monkeypatch, argv):
    import msprior.data as data
    import msprior.train.run as run

    seen = []

    def fake(req, *a, **kw):
        seen.append(req)
        raise SystemExit(0)

    monkeypatch.setattr(run, "run_training", fake)
    monkeypatch.setattr(data, "preprocess", fake)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0, argv
    return seen[-1]


def test_an_original_train_command_line_with_every_flag_parses(monkeypatch):
    req = _request(monkeypatch, [
        "train", "--config", "decoder_only", "--config", "recurrent", "--db_path", "db", "--name", "n",
        "--val_size", "100", "--batch_size", "8", "--gpu", "0", "--workers", "4", "--pretrained_embedding", "r.ts",
        "--override", "NUM_LAYERS=4", "--override", "torch.optim.AdamW.betas=(.9, .95)", "--ckpt", "runs/n/x",
        "--ema", "0.999", "--val_every", "50"])
    assert req.config == "decoder_only+recurrent" and req.overrides == ("NUM_LAYERS=4", "torch.optim.AdamW.betas=(.9, .95)")
    assert (req.val_size, req.batch_size, req.gpu, req.workers, req.ckpt, req.ema, req.val_every) == \
        (100, 8, 0, 4, "runs/n/x", 0.999, 50)
    assert req.pretrained_embedding == "r.ts"


def test_an_original_preprocess_command_line_with_every_flag_parses(monkeypatch):
    req = _request(monkeypatch, [
        "preprocess", "--rave", "r.ts", "--out_path", "o", "--audio", "a", "--num_secs", "16", "--num_tokens", "1024",
        "--batch_size", "64", "--gpu", "1", "--db_size", "100", "--nodyndb", "--normalize", "--silence_threshold",
        "40", "--resolution", "64"])
    assert (req.num_secs, req.num_tokens, req.gpu, req.db_size, req.dyndb, req.normalize, req.silence_threshold) == \
        (16.0, 1024, 1, 100, False, True, 40)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_original_flags_without_a_meaning_here_fail_in_one_line_naming_ours(capsys, tmp_path):
    pre = ["preprocess", "--audio", str(tmp_path), "--out_path", str(tmp_path / "o"), "--rave", "r.ts"]
    assert "--condition_ratio" in _error(pre + ["--preprocessor", "my.module"], capsys)
    cfg = ["config", "--config", "decoder_only"]
    assert "--pretrained_embedding" in _error(cfg + ["--override", "PRETRAINED_RAVE='r.ts'"], capsys)
    assert "manifest" in _error(cfg + ["--override", "NUM_QUANTIZERS=8"], capsys)
    assert "section.key=value" in _error(cfg + ["--override", "attention.Decoder.num_layers=2"], capsys)
    (tmp_path / "mine.gin").write_text("NUM_LAYERS = 2\n")
    assert "as YAML" in _error(["config", "--config", str(tmp_path / "mine.gin")], capsys)


def test_gin_overrides_and_repeated_configs_resolve_to_our_keys(capsys):
    import yaml

    with pytest.raises(SystemExit):
        cli.main(["config", "--config", "decoder_only.gin", "--config", "recurrent", "--override", "NUM_LAYERS=4",
                  "--override", "torch.optim.AdamW.betas=(.9, .95)", "--override", "DROPOUT_RATE=.1",
                  "--override", "utils.build_warmed_exponential_lr_scheduler.peak_iteration=100"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["family"] == "gru"  # the later --config sets its keys over the first
    assert (cfg["model"]["num_layers"], cfg["optim"]["betas"], cfg["model"]["dropout"], cfg["optim"]["warmup_steps"]) \
        == (4, [0.9, 0.95], 0.1, 100)


def test_train_flags_of_the_original_in_our_terms(tmp_path):
    from msprior.train import original
    from msprior.train.original import OriginalFlagError

    assert original.overrides(0.999) == ["train.ema=0.999"] and original.overrides(None) == []
    manifest = {"counts": {"chunks": 400}}
    assert original.val_fraction(20, manifest) == 0.05 and original.val_fraction(100, manifest) == 0.25
    assert original.val_fraction(8192, manifest) == original.SMALL_TABLE_FRACTION  # the original's fallback
    run_dir = str(tmp_path / "runs" / "n")
    assert original.resumes(os.path.join(run_dir, "checkpoint_000001"), run_dir, "n")
    assert not original.resumes(None, run_dir, "n")
    with pytest.raises(OriginalFlagError, match="--resume --name n"):
        original.resumes(str(tmp_path / "lightning" / "last.ckpt"), run_dir, "n")
    assert "--num_workers" in original.workers_note(8)


def test_pretrained_embedding_of_a_continuous_rave_warns_and_trains_on(capsys):
    from msprior.train.plan import read_codebooks

    assert read_codebooks(str(FIXTURES / "rave" / "v2_continuous.ts")) is None
    out = capsys.readouterr()
    assert "continuous RAVE has no codebooks; training without pretrained embeddings" in out.out + out.err
    books = read_codebooks(str(FIXTURES / "rave" / "v2_discrete.ts"))
    assert tuple(books.shape[:2]) == (8, 1024)


# --- the README's four commands, verbatim --------------------------------------------------------

# only bounds the steps: 2 training steps of 2 windows, one validation batch
BOUND = ["--max_steps", "2", "--val_every", "2", "--batch_size", "2", "--override", "train.val_batches=1"]
PREVIEW = ["--preview_secs", "0"]  # no generated preview: its steps are the export's only long loop


def _msprior(*argv: str) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    assert done.value.code in (0, None), argv


def _exported(tmp: Path, name: str) -> str:
    """Where `msprior export --run RUN` put the model: RUN/<name>.ts (the original's), or ./model.ts."""
    found = [p for p in (tmp / "runs" / name / f"{name}.ts", tmp / "model.ts") if p.exists()]
    assert found, sorted(glob.glob(str(tmp / "**" / "*.ts"), recursive=True))
    return str(found[0])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the default model (8 x 512), twice exported: minutes on a loaded 2-core machine
@pytest.mark.parametrize("rave", ["v2_discrete", "v2_continuous"])
def test_the_original_readme_commands_run_verbatim(rave, ray_session, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MSPRIOR_STORAGE", raising=False)
    audio = tmp_path / "audio"
    shutil.copytree(FIXTURES / "audio", audio, ignore=shutil.ignore_patterns("*.md"))
    model = str(FIXTURES / "rave" / f"{rave}.ts")
    data, run = str(tmp_path / "data"), str(tmp_path / "runs" / "prior")
    # 1. preprocessing   2. training   3. export   4. export of a prior over a continuous RAVE
    _msprior("preprocess", "--audio", str(audio), "--out_path", data, "--rave", model)
    _msprior("train", "--config", "decoder_only", "--db_path", data, "--name", "prior",
             "--pretrained_embedding", model, *BOUND)
    _msprior("export", "--run", run, *PREVIEW)
    first = torch.jit.load(_exported(tmp_path, "prior"))
    exports = [first]
    if rave == "v2_continuous":  # the README's 4th command is for "a continuous rave" only (a discrete
        # table refuses --continuous in one line; the original exported a broken model)
        _msprior("export", "--run", run, "--continuous", *PREVIEW)
        exports.append(torch.jit.load(_exported(tmp_path, "prior")))
    for m in exports:  # the patch contract itself is tests/test_export.py's
        assert isinstance(m, torch.jit.ScriptModule) and hasattr(m, "forward")
