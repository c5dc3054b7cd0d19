"""The `msprior` command line. Each command is a thin shell over a library function.

A command's flags are the fields of its stage's request type (`command(...)` below); they keep the
original MSPrior's names (`--out_path`, `--db_path`, ...) and accept the dashed spelling
(`--out-path`) too. Errors the user can fix are printed as one line, exit code 2.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import re
import sys
from typing import Any, Callable, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import typer

from msprior import console, flags
from msprior.data.preprocess import PreprocessRequest
from msprior.demo import CodecRequest, DemoRequest
from msprior.errors import UserError
from msprior.export.combine import CombineRequest
from msprior.export.publish import ExportRequest
from msprior.pipeline import PipelineRequest
from msprior.redact import redact_text, redact_uri
from msprior.registry import PullRequest
from msprior.train.evaluate import EvaluateRequest
from msprior.train.request import TrainRequest, run_folder
from msprior.train.tune import SweepRequest

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


# --- commands from request types ----------------------------------------------------------------
#
# Every option comes from a field of a stage's request dataclass (msprior.flags.flag): its name, type,
# default and help are declared there once, and the command hands the filled request to the stage.

# commands that start Ray or MLflow: their own output goes to a log file unless --verbose
NOISY = {"preprocess", "train", "tune", "export", "pipeline", "demo"}
_verbose = False  # set by main() from the global --verbose flag
REPEATABLE = Optional[List[str]]  # what a sequence field becomes on the command line


def _spellings(name: str) -> List[str]:
    """`--out_path` -> ["--out_path", "--out-path"]: the original MSPrior name and the dashed one."""
    dashed = name.replace("_", "-")
    return [name] if dashed == name else [name, dashed]


def _cli_type(hint: Any) -> Any:
    """The type typer parses for a request field: sequences are repeatable options; a field that
    also takes library objects (TrainRequest.config: a name, a Config or a dict) is a string."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (list, tuple, collections.abc.Sequence):
        return REPEATABLE
    if get_origin(hint) is Union:
        inner = str if str in args and len(args) > 1 else _cli_type(args[0])
        return Optional[inner] if type(None) in get_args(hint) else inner
    return hint


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    meta, cli_type = f.metadata, REPEATABLE if f.metadata.get(flags.REPEAT) else _cli_type(hint)
    default = ... if meta[flags.REQUIRED] else (None if cli_type == REPEATABLE else f.default)
    if meta[flags.ARGUMENT]:
        info = typer.Argument(default, help=meta[flags.HELP])
    else:
        names = _spellings(meta[flags.NAMES] or f"--{f.name}")  # "--a_b/--no-a_b": "--a-b/--no-a-b" too
        info = typer.Option(default, *names, help=meta[flags.HELP])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=cli_type)


def command(name: str, request: type, run: Callable[[Any], Any], only: Sequence[str] = ()) -> None:
    """Add `msprior NAME`: one option per flag field of `request` (those in `only`, if given);
    `run(request)` does the work and its docstring is the command's help."""
    hints = get_type_hints(request)
    chosen = [f for f in flags.flag_fields(request) if not only or f.name in only]
    repeatable = {f.name for f in chosen if _cli_type(hints[f.name]) == REPEATABLE}
    joined = {f.name: f.default for f in chosen if f.metadata.get(flags.REPEAT)}  # --config a --config b

    def value(k: str, v: Any) -> Any:
        if k in joined:
            return flags.JOIN.join(v) if v else joined[k]
        return tuple(v or ()) if k in repeatable else v

    def callback(**values: Any) -> None:
        req = request(**{k: value(k, v) for k, v in values.items()})
        # the log file takes fds 1 and 2 only now: a usage error (parsed above) reaches the terminal
        with console.session(name, quiet=name in NOISY and not _verbose):
            run(req)

    callback.__signature__ = inspect.Signature([_parameter(f, hints[f.name]) for f in chosen])
    callback.__doc__ = run.__doc__
    app.command(name)(callback)


# --- what each command does with its request -------------------------------------------------------


def config_cmd(req: TrainRequest) -> None:
    """Print a resolved configuration as YAML (validates names, keys and types)."""
    from msprior.config import load_config

    typer.echo(load_config(req.config, req.overrides).to_yaml(), nl=False)


def codec_cmd(req: CodecRequest) -> None:
    """Write the small DEMO codec (NOT a trained RAVE): band energies, decoded as filtered noise.

    It has RAVE's exported interface (encode/decode, sr, encode_params), for demos and tests
    where no pretrained RAVE can be downloaded. Use a real RAVE export for real work.
    """
    from msprior.codec import save_codec

    kind = "discrete" if req.discrete else "continuous"
    console.echo(f"demo codec ({kind}) written to {save_codec(req.out, req.discrete)}")


def preprocess_cmd(req: PreprocessRequest) -> None:
    """Encode an audio corpus into a Parquet latent table with Ray Data (local or s3://)."""
    console.place(req.out_path)
    from msprior.data import preprocess

    preprocess(req, echo=console.echo)


def train_cmd(req: TrainRequest) -> None:
    """Train a prior on a latent table with Ray Train; prints progress, writes RUN/run.json."""
    console.place(run_folder(req.storage_path, req.name))
    from msprior.train.run import run_training

    s = run_training(req)
    console.echo(f"best checkpoint {s['best_checkpoint']} (val {s['best_val_loss']}); "
                 f"export it with: msprior export --run {s['run_dir']}")


def tune_cmd(req: SweepRequest) -> None:
    """Sweep training configs with Ray Tune (ASHA on validation cross-entropy); names the best trial."""
    console.place(run_folder(req.storage_path, req.name))
    from msprior.train.tune import run_sweep

    s = run_sweep(req)
    console.echo(f"best trial {s['best_trial']}: val {s['best_val_loss']:.4f}, config {s['best_config']}")
    console.echo(f"best checkpoint {s['best_checkpoint']}; export it with: msprior export --run {s['best_run_dir']}")


def export_cmd(req: ExportRequest) -> None:
    """Export a trained prior as a TorchScript model for nn~ (Max/MSP, PureData) and register it."""
    console.place(os.path.dirname(os.path.abspath(req.out)) if req.out else req.run if os.path.isdir(req.run) else ".")
    from msprior.export.publish import export_and_publish

    export_and_publish(req, echo=console.echo)


def evaluate_cmd(req: EvaluateRequest) -> None:
    """Score a trained prior on a latent table (held-out material): cross-entropy per quantizer."""
    from msprior.train.evaluate import evaluate

    evaluate(req, echo=console.echo)


def combine_cmd(req: CombineRequest) -> None:
    """Put a prior export and a streaming RAVE export in one nn~ file: RAVE's encode/decode/forward, the
    prior as `prior`, the prior's attributes, and `generate` (control inlets in, audio out)."""
    from msprior.export.combine import combine

    combine(req, echo=console.echo)


@dataclasses.dataclass
class CompactRequest:
    """The original's `compact` flags, accepted so that its command line gets a useful answer."""

    db: str = flags.flag(help="The original's LMDB database (a latent table here).")
    max_elm: Optional[int] = flags.flag(None, "The original's number of entries to keep.")


def compact_cmd(req: CompactRequest) -> None:
    """Not needed here (the original copied the first N entries of an LMDB database to DB_compact)."""
    raise UserError(f"compact --db {req.db}: not needed here: a latent table is zstd Parquet read through its index "
                    "(nothing to compact); to train on less material, run `msprior preprocess` on a subset of "
                    "the audio folder")


def pull_cmd(req: PullRequest) -> None:
    """Download a registered nn~ model (.ts), verified against its sha256."""
    from msprior.registry import pull

    console.echo(f"pulled {req.ref} -> {pull(req.ref, req.out, tracking_uri=req.tracking_uri)}")


def pipeline_cmd(req: PipelineRequest) -> None:
    """Run preprocess -> train (or tune) -> export -> register; finished stages are skipped."""
    console.place(req.out)
    from msprior.pipeline import run_pipeline

    _print_pull(run_pipeline(req, echo=console.echo)["registered"])


def demo_cmd(req: DemoRequest) -> None:
    """The embedded default: demo codec + synthetic corpus -> the whole pipeline, locally."""
    console.place(req.workdir)
    from msprior.demo import run_demo

    run_demo(req.workdir, max_steps=req.max_steps, echo=console.echo)


command("config", TrainRequest, config_cmd, only=("config", "overrides"))
command("codec", CodecRequest, codec_cmd)
command("preprocess", PreprocessRequest, preprocess_cmd)
command("train", TrainRequest, train_cmd)
command("tune", SweepRequest, tune_cmd)
command("export", ExportRequest, export_cmd)
command("evaluate", EvaluateRequest, evaluate_cmd)
command("combine", CombineRequest, combine_cmd)
command("compact", CompactRequest, compact_cmd)
command("pull", PullRequest, pull_cmd)
command("pipeline", PipelineRequest, pipeline_cmd)
command("demo", DemoRequest, demo_cmd)


def _print_pull(reg: dict) -> None:
    uri = redact_uri(reg.get("tracking_uri"))
    flag = f" --tracking_uri {uri}" if uri else ""
    console.echo(f"registered {reg['name']} version {reg['version']}; pull it with: "
               f"msprior pull {reg['name']}@champion --out model.ts{flag}")


# --- entry point -----------------------------------------------------------------------------


def _bare_gpu(argv: List[str]) -> List[str]:
    """A bare `--gpu` (this tool's older switch) is `--gpu 0`: the original's flag takes an index."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--gpu" and (i + 1 == len(argv) or not re.fullmatch(r"-?\d+", argv[i + 1])):
            out.append("0")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    global _verbose
    argv = list(sys.argv[1:] if argv is None else argv)
    _verbose = "--verbose" in argv  # a global flag, anywhere on the line
    argv = _bare_gpu([a for a in argv if a != "--verbose"])
    try:
        app(args=argv)  # standalone: click prints usage errors and exits itself
    except (UserError, FileNotFoundError) as e:  # every stage's one-line errors derive from UserError
        log = f" (full log: {console.last_log})" if console.last_log else ""
        typer.secho(f"error: {redact_text(str(e))}{log}", err=True, fg="red")  # no password in a message
        sys.exit(2)


if __name__ == "__main__":
    main()
