"""The pipeline's stage records: what each stage's output was made with, so that a re-run continues.

Before a stage runs, the arguments that determine its output are written to
`<out>/stages/preprocess.json`, `train.<name>.json`, `export.<name>.json`, with a digest of the
previous stage's record (`guard`). A re-run whose arguments differ is refused in one line naming
the stage and the argument; `--force STAGE` removes that stage's output and every later stage's
first (`invalidate`), a folder only under its lease, so a crash during the redo cannot leave an old
output under a record of the new arguments. `p` is the pipeline's `Plan` (msprior.pipeline).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from typing import Any, Dict, List, Optional

from msprior import storage
from msprior.errors import UserError

STAGES = ("preprocess", "train", "export")  # recorded stages; registration is idempotent by sha256


class PipelineError(UserError):
    """A re-run whose arguments differ from a finished stage's, or a bad --force; one line."""


def _digest(inputs: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_record(p, stage: str) -> Optional[Dict[str, Any]]:
    path = p.record_path(stage)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def guard(p, stage: str, inputs: Dict[str, Any], has_output: bool) -> Dict[str, Any]:
    """Refuse a re-run with other arguments; else record this stage's inputs before it runs.

    `inputs` also gets `upstream`: the digest of the previous stage's inputs."""
    i = STAGES.index(stage)
    if i:
        prev = _read_record(p, STAGES[i - 1])
        inputs = {**inputs, "upstream": _digest(prev["inputs"]) if prev else None}
    inputs = json.loads(json.dumps(inputs, default=str))  # compare as written
    old = _read_record(p, stage)
    if old is not None:
        diff = [k for k in sorted(set(old["inputs"]) | set(inputs)) if old["inputs"].get(k) != inputs.get(k)]
        if diff:
            k = diff[0]
            what = f"from another {STAGES[i - 1]} output" if k == "upstream" else \
                f"with {k}={old['inputs'].get(k)!r}; this run asks {k}={inputs.get(k)!r}"
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise PipelineError(f"[{stage}] {p.record_path(stage)} was made {what}{more}: pass --force {stage} "
                                "to redo it (and the stages after it), or another --out")
        return inputs
    if has_output:
        p.echo(f"[{stage}] no record of the arguments its output was made with (older msprior): recording these")
    record = {"stage": stage, "inputs": inputs, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(p.record_path(stage), json.dumps(record, indent=1).encode())
    return inputs


def invalidate(p) -> None:
    """Remove the outputs, then the records, of the forced stages. Interrupted, it leaves old
    records over missing or partial outputs: a re-run with the old arguments completes them, one
    with the new arguments is refused again (never an old output adopted under new arguments)."""
    for stage in p.forced:
        for path in _outputs(p, stage):
            if storage.exists(path):
                p.echo(f"[{stage}] --force: removing {path}")
                remove_output(path, p.req.out)
    for stage in p.forced:
        remove_output(p.record_path(stage), p.req.out)


def _outputs(p, stage: str) -> List[str]:
    if stage == "preprocess":
        return [p.table]
    if stage == "export":
        return [p.model_path]
    sweep_record = storage.join(p.runs, f"{p.name}.sweep.json")
    trials = []
    if storage.exists(sweep_record):  # a sweep's trial runs, as it recorded them
        trials = [t["run_dir"] for t in json.loads(storage.read_bytes(sweep_record)).get("trials", []) if t.get("run_dir")]
    return [p.run_dir, *trials, sweep_record]


def remove_output(path: str, root: str) -> None:
    """Delete `path` (strictly inside the output root `root`); a folder only once we hold its lease:
    a table or run another process is writing is refused in one line, never deleted under it."""
    from msprior.data.lease import Lease

    fs, local = storage.filesystem(path)
    _, top = storage.filesystem(root)
    local, top = posixpath.normpath(local), posixpath.normpath(top)  # s3 keys are not resolved by the filesystem
    if not (local.rstrip("/") + "/").startswith(top.rstrip("/") + "/") or local.rstrip("/") == top.rstrip("/"):
        raise PipelineError(f"--force: {path} is not inside --out {root}; nothing deleted")
    if not fs.exists(local):
        return
    if not fs.isdir(local):
        fs.rm(local)
        return
    what = "preprocess" if fs.exists(local.rstrip("/") + "/intent.json") else "training"
    with Lease.acquire(path, what=what):
        fs.rm(local, recursive=True)
