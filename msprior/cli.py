"""The `msprior` command line. Each command is a thin shell over a library function.

Flags keep the original MSPrior's names (`--out_path`, `--db_path`, ...); the dashed spelling
(`--out-path`) is accepted too. Errors the user can fix are printed as one line, exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

from msprior import console
from msprior.errors import UserError
from msprior.export.publish import PREVIEW_SECS
from msprior.redact import redact_text, redact_uri

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train MSPrior priors over RAVE latents with Ray and export them for nn~ (Max/MSP, PureData). "
         "Ray's and MLflow's own output goes to a log file named at the end; --verbose shows it.",
)


@app.callback()
def _root() -> None:
    """Train MSPrior priors over RAVE latents with Ray and export them for nn~ (Max/MSP, PureData)."""


def opt(default, *names: str, help: str = "", **kw):
    """A typer option that accepts both the original underscore name and the dashed one."""
    spellings: List[str] = []
    for n in names:
        spellings.append(n)
        dashed = n.replace("_", "-")
        if dashed != n and dashed not in spellings:
            spellings.append(dashed)
    return typer.Option(default, *spellings, help=help, **kw)


# --- commands --------------------------------------------------------------------------------


@app.command("config")
def config_cmd(
    config: str = opt("decoder_only", "--config", help="Shipped config name (msprior/configs/*.yaml) or a YAML path."),
    override: Optional[List[str]] = opt(None, "--override", help="section.key=value, repeatable."),
):
    """Print a resolved configuration as YAML (validates names, keys and types)."""
    from msprior.config import load_config

    typer.echo(load_config(config, override or []).to_yaml(), nl=False)


# --- data: demo codec, preprocess ---------------------------------------------------


@app.command("codec")
def codec_cmd(
    out: str = opt("rave.ts", "--out", help="Where to write the TorchScript file (local or s3://)."),
    discrete: bool = opt(False, "--discrete", help="RVQ token codec (like a discrete RAVE) instead of continuous."),
):
    """Write the small DEMO codec (NOT a trained RAVE): band energies, decoded as filtered noise.

    It has RAVE's exported interface (encode/decode, sr, encode_params), for demos and tests
    where no pretrained RAVE can be downloaded. Use a real RAVE export for real work.
    """
    from msprior.codec import save_codec

    console.echo(f"demo codec ({'discrete' if discrete else 'continuous'}) written to {save_codec(out, discrete)}")


@app.command("preprocess")
def preprocess_cmd(
    audio: str = opt(..., "--audio", help="Folder or s3://bucket/prefix of audio files (searched recursively)."),
    out_path: str = opt(..., "--out_path", help="Latent table folder or s3:// prefix (re-runs resume)."),
    rave: str = opt(..., "--rave", help="RAVE model exported as TorchScript (.ts), local or s3://."),
    num_secs: float = opt(16.0, "--num_secs", help="Chunk length in seconds."),
    resolution: int = opt(64, "--resolution", help="Bins per latent dimension (continuous RAVE only)."),
    batch_size: int = opt(64, "--batch_size", help="Chunks per encode batch."),
    num_workers: int = opt(1, "--num_workers", help="Encoder actors (each loads the model once)."),
    gpu: bool = opt(False, "--gpu", help="Encode on GPUs (a GPU fraction per actor)."),
    condition_ratio: int = opt(4, "--condition_ratio", help="RAVE frames per conditioning frame; 0 = none."),
    condition_tokens: int = opt(64, "--condition_tokens", help="k-means classes of the conditioning tokens."),
    min_frames: int = opt(257, "--min_frames", help="Skip files shorter than this many frames (one training window)."),
    files_per_task: int = opt(64, "--files_per_task", help="At most this many files per encode task..."),
    task_mb: float = opt(128.0, "--task_mb", help="...and about this many MB of input (a failed task redoes only these)."),
    target_file_mb: float = opt(192.0, "--target_file_mb", help="Rows per data file, in MB before compression."),
    decode_threads: int = opt(1, "--decode_threads", help="Decode threads per encoder (more for a GPU encoder)."),
):
    """Encode an audio corpus into a Parquet latent table with Ray Data (local or s3://)."""
    console.place(out_path)
    from msprior.data import PreprocessRequest, preprocess

    preprocess(PreprocessRequest(audio, out_path, rave, num_secs=num_secs, resolution=resolution,
                                 batch_size=batch_size, num_workers=num_workers, gpu=gpu,
                                 condition_ratio=condition_ratio, condition_tokens=condition_tokens,
                                 min_frames=min_frames, files_per_task=files_per_task, task_mb=task_mb,
                                 target_file_mb=target_file_mb, decode_threads=decode_threads), echo=console.echo)


# --- train and tune -----------------------------------------------------------------


@app.command("train")
def train_cmd(
    config: str = opt("decoder_only", "--config", help="Shipped config name (msprior/configs/*.yaml) or a YAML path."),
    db_path: str = opt(..., "--db_path", help="Latent table (folder or s3:// prefix) from `msprior preprocess`."),
    name: str = opt(..., "--name", help="Run name: the run folder under --storage_path and the MLflow experiment."),
    pretrained_embedding: Optional[str] = opt(None, "--pretrained_embedding", help="Discrete RAVE .ts: start from its codebooks."),
    num_workers: int = opt(1, "--num_workers", help="Ray Train workers (DDP)."),
    gpu: bool = opt(False, "--gpu", help="One GPU per worker (nccl, bf16 autocast)."),
    batch_size: Optional[int] = opt(None, "--batch_size", help="Windows per worker per step (global: x workers); default: config."),
    max_steps: Optional[int] = opt(None, "--max_steps", help="Training steps; default: config."),
    val_every: Optional[int] = opt(None, "--val_every", help="Steps between validations and checkpoints."),
    override: Optional[List[str]] = opt(None, "--override", help="section.key=value, repeatable."),
    resume: bool = opt(False, "--resume", help="Continue the run NAME from its last checkpoint."),
    tracking_uri: Optional[str] = opt(None, "--tracking_uri", help="MLflow URI (default MLFLOW_TRACKING_URI or ./mlflow.db)."),
    storage_path: Optional[str] = opt(None, "--storage_path", help="Where runs live (folder or s3://); default ./runs."),
    cpus_per_worker: float = opt(0.5, "--cpus_per_worker", help="Logical CPUs requested per worker."),
):
    """Train a prior on a latent table with Ray Train; prints progress, writes RUN/run.json."""
    console.place(_run_folder(storage_path, name))
    from msprior.train import train

    s = train(config, db_path, name, overrides=override or [], pretrained_embedding=pretrained_embedding,
                             num_workers=num_workers, gpu=gpu, batch_size=batch_size, max_steps=max_steps,
                             val_every=val_every, resume=resume, tracking_uri=tracking_uri,
                             storage_path=storage_path, cpus_per_worker=cpus_per_worker)
    console.echo(f"best checkpoint {s['best_checkpoint']} (val {s['best_val_loss']}); "
               f"export it with: msprior export --run {s['run_dir']}")


@app.command("tune")
def tune_cmd(
    sweep: str = opt("default", "--sweep", help="Shipped sweep name (msprior/configs/sweeps/) or a sweep YAML path."),
    db_path: str = opt(..., "--db_path", help="Latent table (folder or s3:// prefix)."),
    name: str = opt(..., "--name", help="Sweep name: MLflow experiment (parent run + one nested run per trial)."),
    num_samples: Optional[int] = opt(None, "--num_samples", help="Trials; default: the sweep file's."),
    gpus_per_trial: Optional[float] = opt(None, "--gpus_per_trial", help="GPU fraction per trial (0.5: two trials per GPU)."),
    num_workers: Optional[int] = opt(None, "--num_workers", help="Ray Train workers per trial."),
    max_steps: Optional[int] = opt(None, "--max_steps", help="Steps per trial; default: the sweep file's."),
    val_every: Optional[int] = opt(None, "--val_every", help="Steps between validations (ASHA's time unit)."),
    batch_size: Optional[int] = opt(None, "--batch_size", help="Windows per worker per step."),
    override: Optional[List[str]] = opt(None, "--override", help="section.key=value for every trial, repeatable."),
    tracking_uri: Optional[str] = opt(None, "--tracking_uri", help="MLflow URI (default MLFLOW_TRACKING_URI or ./mlflow.db)."),
    storage_path: Optional[str] = opt(None, "--storage_path", help="Where runs live (folder or s3://); default ./runs."),
    resume: bool = opt(False, "--resume", help="Continue the preempted sweep NAME (finished trials are kept)."),
):
    """Sweep training configs with Ray Tune (ASHA on validation cross-entropy); names the best trial."""
    console.place(_run_folder(storage_path, name))
    from msprior.config import resolve_sweep_path
    from msprior.train.tune import tune

    s = tune(resolve_sweep_path(sweep), db_path, name, num_samples=num_samples, gpus_per_trial=gpus_per_trial,
                            num_workers=num_workers, max_steps=max_steps, val_every=val_every, batch_size=batch_size,
                            overrides=override or [], tracking_uri=tracking_uri, storage_path=storage_path,
                            resume=resume)
    console.echo(f"best trial {s['best_trial']}: val {s['best_val_loss']:.4f}, config {s['best_config']}")
    console.echo(f"best checkpoint {s['best_checkpoint']}; export it with: msprior export --run {s['best_run_dir']}")



# --- export for nn~ and the MLflow registry -------------------------------------------


@app.command("export")
def export_cmd(
    run: str = opt(..., "--run", help="Run directory (local or s3://), MLflow run id, or a checkpoint dir/file."),
    out: str = opt("model.ts", "--out", help="Output TorchScript file for nn~."),
    checkpoint: str = opt("best", "--checkpoint", help="best | last checkpoint of the run."),
    batch_size: int = opt(1, "--batch_size", help="Parallel streams (nn~ mc channels); any training batch size."),
    continuous: bool = opt(False, "--continuous", help="Latents in/out (continuous RAVE); the manifest decides anyway."),
    quantize: Optional[str] = opt(None, "--quantize", help="int8: dynamic int8 Linear weights (realtime option)."),
    name: Optional[str] = opt(None, "--name", help="Registered model name (default msprior-<run name>)."),
    register: bool = typer.Option(True, "--register/--no-register", help="Register a version in MLflow."),
    tracking_uri: Optional[str] = opt(None, "--tracking_uri", help="MLflow tracking URI (default: the run's)."),
    preview_secs: float = opt(PREVIEW_SECS, "--preview_secs", help="Seconds of audio preview to log (0: none)."),
):
    """Export a trained prior as a TorchScript model for nn~ (Max/MSP, PureData) and register it."""
    console.place(os.path.dirname(os.path.abspath(out)))
    from msprior.export.publish import publish
    from msprior.export.run import export_run, sha256_file

    path = export_run(run, out, checkpoint=checkpoint, batch_size=batch_size,
                      continuous=True if continuous else None, quantize=quantize, tracking_uri=tracking_uri)
    console.echo(f"exported {path} (sha256 {sha256_file(path)[:12]})")
    if register:
        publish(path, run=run, checkpoint=checkpoint, name=name, tracking_uri=tracking_uri,
                preview_secs=preview_secs, measure_int8=quantize == "int8", echo=console.echo)


@app.command("pull")
def pull_cmd(
    ref: str = typer.Argument(..., help="NAME, NAME@alias (e.g. msprior-x@champion) or NAME/version."),
    out: str = opt("model.ts", "--out", help="Where to write the .ts file."),
    tracking_uri: Optional[str] = opt(None, "--tracking_uri", help="MLflow tracking URI."),
):
    """Download a registered nn~ model (.ts), verified against its sha256."""
    from msprior.registry import pull

    path = pull(ref, out, tracking_uri=tracking_uri)
    console.echo(f"pulled {ref} -> {path}")


# --- the whole pipeline, and the embedded demo -------------------------------------------


@app.command("pipeline")
def pipeline_cmd(
    audio: str = opt(..., "--audio", help="Folder or s3://bucket/prefix of audio files."),
    rave: str = opt(..., "--rave", help="RAVE model exported as TorchScript (.ts), local or s3://."),
    out: str = opt(..., "--out", help="Output folder or s3:// prefix (data/, runs/, export/ below it)."),
    config: str = opt("decoder_only", "--config", help="Shipped config name (msprior/configs/*.yaml) or a YAML path."),
    name: Optional[str] = opt(None, "--name", help="Run name (default: <config>-<id of the RAVE model and table>)."),
    override: Optional[List[str]] = opt(None, "--override", help="section.key=value, repeatable."),
    tune: bool = opt(False, "--tune", help="Sweep configs with Ray Tune instead of one training."),
    sweep: Optional[str] = opt(None, "--sweep", help="Shipped sweep name or a sweep YAML path (default: default)."),
    num_samples: Optional[int] = opt(None, "--num_samples", help="Sweep trials (default: the sweep file's)."),
    gpus_per_trial: Optional[float] = opt(None, "--gpus_per_trial", help="GPU fraction per trial (default: the sweep file's)."),
    num_workers: int = opt(1, "--num_workers", help="Ray workers for encoding and training."),
    gpu: bool = opt(False, "--gpu", help="Use GPUs (encode and train)."),
    batch_size: Optional[int] = opt(None, "--batch_size", help="Training batch size (default: config)."),
    max_steps: Optional[int] = opt(None, "--max_steps", help="Training steps (default: config)."),
    val_every: Optional[int] = opt(None, "--val_every", help="Steps between validations."),
    pretrained_embedding: bool = opt(False, "--pretrained_embedding", help="Start from the RAVE codebooks."),
    num_secs: float = opt(16.0, "--num_secs", help="Chunk length in seconds."),
    resolution: int = opt(64, "--resolution", help="Bins per latent dimension (continuous RAVE)."),
    condition_ratio: int = opt(4, "--condition_ratio", help="RAVE frames per conditioning frame."),
    tracking_uri: Optional[str] = opt(None, "--tracking_uri", help="MLflow tracking URI (default: local sqlite)."),
    registered_name: Optional[str] = opt(None, "--registered_name", help="Registered model name (default msprior-<name>)."),
    quantize: Optional[str] = opt(None, "--quantize", help="int8: dynamic int8 Linear weights in the export."),
    preview_secs: float = opt(PREVIEW_SECS, "--preview_secs", help="Seconds of audio preview to log (0: none)."),
    force: Optional[List[str]] = opt(None, "--force", help="Redo STAGE (preprocess|train|tune|export) and the "
                                     "stages after it, e.g. after changing its arguments; repeatable."),
):
    """Run preprocess -> train (or tune) -> export -> register; finished stages are skipped."""
    console.place(out)
    from msprior.config import resolve_sweep_path
    from msprior.pipeline import PipelineRequest, run_pipeline

    sweep = resolve_sweep_path(sweep) if sweep else None
    req = PipelineRequest(
        audio, rave, out, config=config, name=name, overrides=override or [], tune=tune, sweep=sweep,
        num_samples=num_samples, gpus_per_trial=gpus_per_trial, num_workers=num_workers, gpu=gpu,
        batch_size=batch_size, max_steps=max_steps, val_every=val_every, pretrained_embedding=pretrained_embedding,
        num_secs=num_secs, resolution=resolution, condition_ratio=condition_ratio, tracking_uri=tracking_uri,
        registered_name=registered_name, quantize=quantize, preview_secs=preview_secs, force=force or [])
    _print_pull(run_pipeline(req, echo=console.echo)["registered"])


@app.command("demo")
def demo_cmd(
    workdir: str = opt("msprior-demo", "--workdir", help="Work folder (codec, corpus, table, runs, mlflow.db)."),
    max_steps: int = opt(300, "--max_steps", help="Training steps of the small demo prior."),
):
    """The embedded default: demo codec + synthetic corpus -> the whole pipeline, locally."""
    console.place(workdir)
    from msprior.demo import run_demo

    run_demo(workdir, max_steps=max_steps, echo=console.echo)



def _print_pull(reg: dict) -> None:
    uri = redact_uri(reg.get("tracking_uri"))
    flag = f" --tracking_uri {uri}" if uri else ""
    console.echo(f"registered {reg['name']} version {reg['version']}; pull it with: "
               f"msprior pull {reg['name']}@champion --out model.ts{flag}")


# --- entry point -----------------------------------------------------------------------------


def _run_folder(storage_path: Optional[str], name: str) -> str:
    return os.path.join(storage_path or os.environ.get("MSPRIOR_STORAGE") or "runs", name)


# commands that start Ray or MLflow: their own output goes to a log file unless --verbose
NOISY = {"preprocess", "train", "tune", "export", "pipeline", "demo"}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # a global flag, anywhere on the line
    argv = [a for a in argv if a != "--verbose"]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        with console.session(command, quiet=command in NOISY and not verbose and "--help" not in argv):
            app(args=argv)  # standalone: click prints usage errors and exits itself
    except (UserError, FileNotFoundError) as e:  # every stage's one-line errors derive from UserError
        log = f" (full log: {console.last_log})" if console.last_log else ""
        typer.secho(f"error: {redact_text(str(e))}{log}", err=True, fg="red")  # no password in a message
        sys.exit(2)


if __name__ == "__main__":
    main()
