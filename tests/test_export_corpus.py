"""The export carries the digest of the committed content its prior was trained on (`table_sha256`,
from the table's manifest as training read it into the checkpoint), and the registry's corpus is
that digest: a table rewritten at the same path afterwards does not change an earlier export's
corpus, a copy of the table at another path is the same corpus. Tables are written by the real
write path (tests/_table_writer.py: lease, ledger, index), the manifest's digest as preprocess
computes it; the runs are tiny in-process trainings (tests/export_runs.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msprior.checkpoint import read_run_json, write_run_json
from msprior.data import table as tbl
from msprior.export.run import export_run, read_metadata
from msprior.registry import corpus_tags

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_runs import make_run, manifest  # noqa: E402

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


def write_table(path: Path, sources: str) -> str:
    """A committed table (ledger + index) and its manifest with `content_sha256`, as preprocess writes it."""
    if path.exists():
        shutil.rmtree(path)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "_table_writer.py"), str(path), sources],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (path / "manifest.json").write_text(json.dumps({**manifest(), "content_sha256": tbl.content_digest(str(path))}))
    return str(path)


def trained_on(root: Path, tag: str, table: str) -> str:
    """An export of a run trained on `table`: its checkpoint holds the manifest training read."""
    run = make_run(str(root / tag), "decoder_only", steps=2, name=tag)
    ckpt = Path(run) / "checkpoints" / "best" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["manifest"] = tbl.load_manifest(table)  # what training reads and its checkpoints keep
    torch.save(state, ckpt)
    write_run_json(run, {**read_run_json(run), "db_path": table})
    return export_run(run, str(root / f"{tag}.ts"))


def test_the_export_names_the_content_it_was_trained_on(tmp_path):
    table = write_table(tmp_path / "table", "a,b,c,d")
    copy = tmp_path / "copy"
    shutil.copytree(table, copy)
    digest = tbl.content_digest(table)
    first = trained_on(tmp_path, "first", table)
    on_copy = trained_on(tmp_path, "on-copy", str(copy))
    write_table(tmp_path / "table", "a,b,x")  # rewritten at the same path with other content
    second = trained_on(tmp_path, "second", table)

    first_tags, copy_tags, second_tags = (corpus_tags(read_metadata(x)) for x in (first, on_copy, second))
    assert second_tags["corpus"] != first_tags["corpus"]  # the same path, other content: another corpus
    assert first_tags["corpus"] == copy_tags["corpus"]  # a copy elsewhere: the same corpus
    assert first_tags["table"] != copy_tags["table"]
    assert first_tags["table_sha256"] == digest  # the content trained on, not the table as it is now
    assert read_metadata(first)["table_sha256"] == digest == read_metadata(on_copy)["table_sha256"]
    assert read_metadata(second)["table_sha256"] == tbl.content_digest(table) != digest
