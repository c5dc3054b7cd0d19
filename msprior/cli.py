"""The `msprior` command line. Each command is a thin shell over a library function.

Flags keep the original MSPrior's names (`--out_path`, `--db_path`, ...); the dashed spelling
(`--out-path`) is accepted too. Errors the user can fix are printed as one line, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train MSPrior priors over RAVE latents with Ray and export them for nn~ (Max/MSP, PureData).",
)


@app.callback()
def _root() -> None:
    """Train MSPrior priors over RAVE latents with Ray and export them for nn~ (Max/MSP, PureData)."""


class UserError(Exception):
    """An error caused by input the user can fix; printed as one line without a traceback."""


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
    config: str = opt("decoder_only", "--config", help="Config name (configs/*.yaml) or path."),
    override: Optional[List[str]] = opt(None, "--override", help="section.key=value, repeatable."),
):
    """Print a resolved configuration as YAML (validates names, keys and types)."""
    from msprior.config import load_config

    typer.echo(load_config(config, override or []).to_yaml(), nl=False)


# --- data: demo codec, preprocess (issue 3) ---------------------------------------------------


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

    typer.echo(f"demo codec ({'discrete' if discrete else 'continuous'}) written to {save_codec(out, discrete)}")


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
):
    """Encode an audio corpus into a Parquet latent table with Ray Data (local or s3://)."""
    from msprior.data import PreprocessError, preprocess

    try:
        preprocess(audio, out_path, rave, num_secs=num_secs, resolution=resolution, batch_size=batch_size,
                   num_workers=num_workers, gpu=gpu, condition_ratio=condition_ratio,
                   condition_tokens=condition_tokens, min_frames=min_frames, echo=typer.echo)
    except PreprocessError as e:
        raise UserError(str(e)) from None


# --- entry point -----------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    from msprior.config import ConfigError

    try:
        app(args=argv)  # standalone: click prints usage errors and exits itself
    except (UserError, ConfigError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
