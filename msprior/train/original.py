"""The original MSPrior's `train` flags that are not one of our own, said in our terms.

    --ema F         train.ema=F (the same decay of an exponential moving average of the weights)
    --val_size N    data.val_fraction: files holding about N chunks are validation (the original drew
                    N random chunks; a split by file keeps windows of one recording on one side)
    --ckpt PATH     --resume, when PATH is a checkpoint of run NAME; a Lightning .ckpt is refused
    --workers N     nothing: windows are drawn from memory, there are no loader processes
"""

from __future__ import annotations

from typing import Dict, List, Optional

from msprior.errors import UserError

SMALL_TABLE_FRACTION = 0.05  # the original's fallback when --val_size exceeds the dataset


class OriginalFlagError(UserError):
    """An original flag that cannot mean here what it meant there; one line naming ours."""


def overrides(ema: Optional[float]) -> List[str]:
    return [] if ema is None else [f"train.ema={ema}"]


def val_fraction(val_size: Optional[int], manifest: Dict) -> Optional[float]:
    """--val_size N as a fraction of the table's chunks (the original: 5% when N exceeds them)."""
    if val_size is None:
        return None
    if val_size < 0:
        raise OriginalFlagError(f"--val_size {val_size}: must be >= 0")
    chunks = int((manifest.get("counts") or {}).get("chunks") or 0)
    if not chunks or val_size >= chunks:
        return SMALL_TABLE_FRACTION
    return val_size / chunks


def resumes(ckpt: Optional[str], run_dir: str, name: str) -> bool:
    """--ckpt: True (resume run NAME) when the path lies inside the run's folder; else one line."""
    if ckpt is None:
        return False
    from msprior import storage

    ck, run = storage.Location.of(ckpt), storage.Location.of(run_dir)
    if ck == run or ck.url.startswith(run.join("").url):  # the run folder or a path inside it
        return True
    raise OriginalFlagError(
        f"--ckpt {ckpt}: not a checkpoint of run {name!r} ({run_dir}); a run continues from its own last "
        f"checkpoint with --resume --name {name} (a PyTorch Lightning .ckpt of the original cannot be loaded)")


def workers_note(workers: Optional[int]) -> Optional[str]:
    if workers is None:
        return None
    return (f"note: --workers {workers} (the original's loader processes) is not needed here: windows are "
            "drawn from memory; --num_workers sets the DDP workers")
