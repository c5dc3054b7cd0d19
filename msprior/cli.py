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
