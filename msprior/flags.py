"""Request fields that are also command-line flags: a name, a default and a help text, written once.

Each stage's request dataclass (`PreprocessRequest`, `TrainRequest`, `SweepRequest`,
`ExportRequest`, `PipelineRequest`, ...) marks the fields a user may set with `flag(...)`;
`msprior.cli` builds every command's options from those fields, so a default cannot drift between
the CLI, the pipeline and the stage. A field declared by another request is reused with
`like(OtherRequest, "name")`: the pipeline's `num_secs` is preprocess's, default and help alike.
Fields without `flag` (progress switches, fault injection, preloaded data) are library-only.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any, Dict, List, Optional

HELP = "help"  # metadata keys
NAMES = "names"  # explicit option names, e.g. "--register/--no-register"; default --<field name>
REQUIRED = "required"  # required on the command line though the library has a default
ARGUMENT = "argument"  # a positional argument instead of an option
REPEAT = "repeat"  # a str field the command line takes repeatedly (the original's multi flags); joined by JOIN
JOIN = "+"  # `--config recurrent --config mine.yaml` -> "recurrent+mine.yaml" (config.load_config layers them)


def flag(default: Any = MISSING, help: str = "", *, names: Optional[str] = None, required: bool = False,
         argument: bool = False, repeat: bool = False) -> Any:
    """A dataclass field that the CLI shows as `--<name>` (and `--<dashed-name>`) with this help.

    No `default`: required everywhere. `required=True`: required on the command line only (the
    library call may leave it empty, e.g. when a sweep hands over a loaded table). `repeat=True`: a
    string the command line may give several times, joined with JOIN.
    """
    meta = {HELP: help, NAMES: names, REQUIRED: required or default is MISSING, ARGUMENT: argument,
            REPEAT: repeat}
    return field(default=default, metadata=meta)


def like(request: type, name: str, **changes: Any) -> Any:
    """The field `name` of another request type, same default and help (`changes` may set them)."""
    source = {f.name: f for f in fields(request)}[name]
    meta: Dict[str, Any] = dict(source.metadata)
    default = changes.pop("default", source.default)
    meta.update(changes)
    return field(default=default, metadata=meta)


def flag_fields(request: type) -> List[Field]:
    """The fields of `request` that are command-line flags, in declaration order."""
    return [f for f in fields(request) if HELP in f.metadata]
