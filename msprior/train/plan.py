"""Step 1 of a training, before Ray starts: resolve the request into a `Plan` (config, table, run
folder) and refuse, in one line, what cannot run: a bad name or config, a table that does not fit
the config, codebooks of another RAVE, a run folder in the wrong state, a resume with another config
or table (`check_resume` against the run's `request.json`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

from msprior import console
from msprior.conditioning import ConditioningSpec
from msprior.config import Config, load_config
from msprior.devices import Device
from msprior.train.request import TrainError, TrainRequest, check_name, has_checkpoints, in_root, runs_root


def read_codebooks(rave_ts: str):
    """The RVQ codebooks (`encoder.rvq.layers.N._codebook.embed`, (V, d) each) of a discrete RAVE export."""
    import io

    import torch

    from msprior import storage

    where = storage.Location.of(rave_ts)  # local or s3:// (a latent table's copy of its RAVE model)
    if not where.exists():
        raise TrainError(f"--pretrained_embedding {rave_ts}: file not found")
    try:
        module = torch.jit.load(io.BytesIO(where.read_bytes()), map_location="cpu")
    except Exception as e:  # not TorchScript
        raise TrainError(f"--pretrained_embedding {rave_ts}: not a TorchScript RAVE export ({e.__class__.__name__})") from None
    pattern = re.compile(r"encoder\.rvq\.layers\.(\d+)\._codebook\.embed$")
    found = {int(m.group(1)): b.detach().float().clone()
             for n, b in module.named_buffers() if (m := pattern.search(n))}
    if not found and hasattr(module, "encode"):  # a continuous RAVE: the original warned and trained on
        console.echo(f"warning: --pretrained_embedding {rave_ts}: a continuous RAVE has no codebooks; training "
                     "without pretrained embeddings (pretrained embeddings need a discrete RAVE)")
        return None
    if not found:
        raise TrainError(
            f"--pretrained_embedding {rave_ts}: no RVQ codebooks (encoder.rvq.layers.N._codebook.embed) and no "
            "encode method: not a RAVE export"
        )
    return torch.stack([found[i] for i in sorted(found)])  # [Q, V, d]


@dataclass
class Plan:
    """What the driver resolved before starting anything on Ray."""

    cfg: Config
    table: Any  # msprior.data.reader.Table
    runs_root: str  # the folder (or s3:// prefix) that holds one folder per run
    run_dir: str
    codebooks: Any = None
    tracking: Dict[str, Any] = field(default_factory=dict)  # uri, client, run_id
    device: Optional[Device] = None  # msprior.devices' choice, made once Ray is up


def resolve_config(config: Union[str, Config, Dict], overrides: Sequence[str] = (), *, batch_size=None,
                   max_steps=None, val_every=None) -> Config:
    from msprior.config import apply_overrides

    flags = [f"train.{k}={v}" for k, v in
             (("batch_size", batch_size), ("max_steps", max_steps), ("val_every", val_every)) if v is not None]
    if isinstance(config, Config):
        return apply_overrides(config, list(overrides) + flags)
    if isinstance(config, dict):
        return apply_overrides(Config.from_dict(config), list(overrides) + flags)
    return load_config(config, list(overrides) + flags)


def check_table_vs_config(cfg: Config, manifest: Dict, db_path: str) -> None:
    table = ConditioningSpec.from_manifest(manifest)
    if cfg.model.conditioning != "none":
        if not table.has(cfg.model.conditioning):
            raise TrainError(f"{db_path}: config {cfg.name} needs conditioning ({cfg.model.conditioning}) but the "
                             "table has none; preprocess with conditioning or use --config decoder_only")
        if table.ratio != cfg.model.cond_ratio:
            raise TrainError(f"{db_path}: the table's conditioning ratio is {table.ratio}, the config's "
                             f"model.cond_ratio is {cfg.model.cond_ratio}: pass --override model.cond_ratio="
                             f"{table.ratio}")


def _check_codebooks(codebooks, manifest: Dict, path: str) -> None:
    q, v = manifest["rave"]["num_quantizers"], manifest["rave"]["vocab_size"]
    if codebooks.shape[0] != q or codebooks.shape[1] != v:
        raise TrainError(f"--pretrained_embedding {path}: {codebooks.shape[0]} codebooks of {codebooks.shape[1]} "
                         f"entries, the table has {q} quantizers x {v}: use the RAVE model that encoded the table")


def _run_dir_state(req: TrainRequest, runs_root: str, run_dir: str) -> None:
    exists = has_checkpoints(run_dir)
    if exists and not req.resume:
        raise TrainError(f"run {req.name!r} already has checkpoints in {runs_root}: pass --resume to continue it "
                         "or choose another --name")
    if req.resume and not exists:
        raise TrainError(f"--resume: run {req.name!r} has no checkpoint in {runs_root} (check --name / --storage_path)")


def plan(req: TrainRequest) -> Plan:
    """Config, table (manifest + index), run folder and resume checks: every fast failure first."""
    from msprior import storage as st
    from msprior.train import original
    from msprior.data.reader import open_table, read_manifest

    check_name(req.name)
    if not req.db_path and req.ctx.data is None:
        raise TrainError("--db_path: give the latent table written by `msprior preprocess`")
    if req.num_workers < 1:
        raise TrainError(f"--num_workers {req.num_workers}: must be >= 1")
    overrides, codebooks = list(req.overrides) + original.overrides(req.ema), None
    if req.pretrained_embedding:
        codebooks = read_codebooks(req.pretrained_embedding)
    if codebooks is not None:
        overrides.append(f"model.pretrained_embedding_dim={int(codebooks.shape[2])}")
    if req.val_size is not None and req.ctx.data is None:
        frac = original.val_fraction(req.val_size, read_manifest(st.absolute(req.db_path)))
        overrides.append(f"data.val_fraction={frac}")
    if original.workers_note(req.workers) and req.ctx.progress:
        console.echo(original.workers_note(req.workers))
    cfg = resolve_config(req.config, overrides, batch_size=req.batch_size, max_steps=req.max_steps,
                         val_every=req.val_every)
    if req.ctx.data is not None:
        table = req.ctx.data.table
    else:
        table = open_table(st.absolute(req.db_path), cfg.data.val_fraction, cfg.data.seed, cfg.model.conditioning)
    check_table_vs_config(cfg, table.manifest, table.db_path)
    if codebooks is not None:
        _check_codebooks(codebooks, table.manifest, req.pretrained_embedding)
    root = runs_root(req.storage_path)
    run_dir = in_root(root, req.name)
    if original.resumes(req.ckpt, run_dir, req.name):  # the original's --ckpt: a checkpoint of this run
        req.resume = True
    _run_dir_state(req, root, run_dir)
    if req.resume:
        check_resume(req.name, run_dir, cfg, table)
    return Plan(cfg=cfg, table=table, runs_root=root, run_dir=run_dir, codebooks=codebooks)


RESUME_SECTIONS = ("model", "data")  # what a checkpoint's weights and split depend on


def request_record(cfg: Config, table) -> Dict[str, Any]:
    return {"config": cfg.to_dict(), "table": table.identity(), "db_path": table.db_path,
            "conditioning": ConditioningSpec.from_manifest(table.manifest).to_manifest()}  # the table's


def check_resume(name: str, run_dir: str, cfg: Config, table) -> None:
    """Refuse (one line) to resume a run with another model/data config or another table."""
    from msprior.checkpoint import read_run_request

    old = read_run_request(run_dir)
    if old is None:  # a run started before the request was recorded: nothing to compare
        return
    new = request_record(cfg, table)
    for section in RESUME_SECTIONS:
        was, now = old["config"].get(section) or {}, new["config"][section]
        for key in sorted(now):
            if key in was and was[key] != now[key]:
                raise TrainError(f"--resume {name}: the run was trained with {section}.{key}={was[key]!r}, the "
                                 f"request gives {now[key]!r}: resume with the same config or choose another --name")
    for key, now in new["table"].items():
        was = old["table"].get(key)
        if was is not None and was != now:
            raise TrainError(f"--resume {name}: the run was trained on another table ({key} {was} there, {now} in "
                             f"{table.db_path}): resume with its table ({old.get('db_path')}) or choose another --name")
    if "conditioning" in old:  # recorded since ConditioningSpec; feature names included
        ConditioningSpec.from_dict(old["conditioning"]).check_compatible(
            ConditioningSpec.from_dict(new["conditioning"]),
            f"--resume {name}: the run's table ({old.get('db_path')}) vs {table.db_path}",
            "resume with its table or choose another --name")
