"""Fast checks of the training data path, schedule and checkpoints (no Ray Train run)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from msprior.config import load_config
from msprior.data.reader import DataError, frames_from_arrow, open_table, read_split, split_sources, unigram_entropy
from msprior.data.windows import WindowSampler

TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.cond_layers=1",
        "model.seq_len=16", "optim.warmup_steps=10", "optim.lr=0.003", "data.val_fraction=0.25"]


def test_split_is_by_source_deterministic_and_never_empty():
    sources = [f"f{i}.wav" for i in range(20)]
    val = split_sources(sources, 0.25, seed=0)
    assert len(val) == 5 and val == split_sources(list(reversed(sources)), 0.25, seed=0)
    assert split_sources(sources, 0.25, seed=1) != val  # the seed moves the split
    assert len(split_sources(sources[:3], 0.01, seed=0)) == 1  # at least one validation file
    assert split_sources(sources[:1], 0.5, seed=0) == []  # one file: nothing to hold out
    # adding files keeps earlier validation files on their side unless they cross the cut
    assert set(split_sources(sources + ["zz.wav"], 0.25, 0)) & set(val)


def test_table_split_windows_and_conditioning_alignment(train_table):
    cfg = load_config("encoder_decoder", TINY)
    table = open_table(train_table, cfg.data.val_fraction, cfg.data.seed, "tokens")
    assert len(table.sources) == 8 and len(table.val_sources) == 2
    val = read_split(table, val=True)
    train = read_split(table, val=False)
    assert set(val["source"].to_pylist()) == set(table.val_sources)
    assert not set(train["source"].to_pylist()) & set(table.val_sources)  # split by file, never by chunk

    frames = frames_from_arrow(train, 4, table.cond)
    assert frames.rave.shape == (6 * 4 * 64, 4) and frames.cond.shape == (6 * 4 * 16,)
    sampler = WindowSampler(frames, seq_len=16, cond=table.cond, seed=0)
    batch = sampler.sample(32)
    assert batch["rave"].shape == (32, 17, 4) and batch["rave"].dtype == np.int64
    assert batch["tokens"].shape == (32, 4)
    # the synthetic tokens column is rave[::4, 0] % 8: a window aligned on the ratio reproduces it
    assert np.array_equal(batch["tokens"], batch["rave"][:, :16:4, 0] % 8)
    # windows never cross a chunk boundary: each follows the synthetic +1 (mod 16) rule mostly
    steps = (batch["rave"][:, 1:, 0] - batch["rave"][:, :-1, 0]) % 16
    assert (steps == 1).mean() > 0.8


def test_features_windows_and_clear_errors(train_table):
    table = open_table(train_table, 0.25, 0, "features")
    frames = frames_from_arrow(read_split(table, val=False), 4, table.cond)
    batch = WindowSampler(frames, 16, table.cond, seed=1).sample(8)
    assert batch["features"].shape == (8, 4, 3) and batch["features"].dtype == np.float32
    with pytest.raises(DataError, match="lower model.seq_len"):
        WindowSampler(frames, seq_len=64, seed=0)  # chunks hold 64 frames: 65 do not fit
    with pytest.raises(DataError, match="manifest.json"):
        open_table(str(table.db_path) + "/nope", 0.1, 0)


def test_unigram_entropy_is_near_log_v(train_table):
    table = open_table(train_table, 0.25, 0)
    frames = frames_from_arrow(read_split(table, val=True), num_quantizers=4)
    assert math.log(16) - 0.1 < unigram_entropy(frames) <= math.log(16)


def test_schedule_warmup_then_decay():
    from msprior.train.schedule import lr_factor

    assert lr_factor(0, 10, 0.01, 0.9) == pytest.approx(0.01)
    assert lr_factor(5, 10, 0.01, 0.9) == pytest.approx(0.505)
    assert lr_factor(10, 10, 0.01, 0.9) == 1.0
    assert lr_factor(12, 10, 0.01, 0.9) == pytest.approx(0.81)


def test_checkpoint_round_trip_weights_only(tmp_path, train_table):
    from msprior.model import DatasetFacts, build_prior
    from msprior.checkpoint import load_checkpoint, save_checkpoint
    from msprior.train.schedule import make_optimizer, make_scheduler

    cfg = load_config("decoder_only", TINY)
    table = open_table(train_table, 0.25, 0)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(table.manifest))
    opt = make_optimizer(prior.parameters(), cfg.optim)
    sched = make_scheduler(opt, cfg.optim)
    batch = {"rave": torch.randint(0, 16, (2, 17, 4))}
    prior.loss(batch).backward()
    opt.step()
    sched.step()
    state = {"model": prior.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": 1, "val_loss": 2.0, "best_val_loss": 2.0, "config": cfg.to_dict(), "manifest": table.manifest}
    save_checkpoint(str(tmp_path / "ck"), state)
    back = load_checkpoint(str(tmp_path / "ck"))  # torch.load(weights_only=True) inside
    assert back["step"] == 1 and back["config"] == cfg.to_dict()
    sched2 = make_scheduler(make_optimizer(prior.parameters(), cfg.optim), cfg.optim)
    sched2.load_state_dict(back["scheduler"])
    assert sched2.last_epoch == 1


def test_resource_check_fails_fast_with_what_to_lower(ray_session):
    from msprior.train.run import TrainError, check_resources

    with pytest.raises(TrainError, match="lower --num_workers"):
        check_resources(num_workers=64, cpus_per_worker=0.5, gpus_per_worker=0.0)
    with pytest.raises(TrainError, match="GPU"):
        check_resources(num_workers=1, cpus_per_worker=0.5, gpus_per_worker=1.0)
    assert check_resources(1, 0.5, 0.0, trials=8, driver_cpus=0.01) >= 2  # several trials share the CPUs


def test_a_fill_decodes_below_the_training_worker(monkeypatch):
    """Ray runs every worker at nice 15: a fill at any nice value under 15 would run ahead of the
    training step it feeds (measured 5x slower steps at the old absolute nice 10)."""
    import threading
    from types import SimpleNamespace

    from msprior.data import node_cache, windows

    seen = {}

    def fill(spec, rel, sources, identity):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return SimpleNamespace(path="p", read_bytes=1, num_chunks=2)

    monkeypatch.setattr(node_cache, "fill", fill)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert windows._fill(None, "f", [], None) == {"path": "p", "read_bytes": 1, "chunks": 2}
    assert seen["nice"] == 19 > 15
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the worker keeps its own


def test_row_group_readers_in_flight_are_bounded(ray_session):
    """Each validation-window or floor task holds a decoded row group: never more than `limit` at
    once, whatever the number of files the draw lands in (the bench's peak memory grew with them)."""
    from msprior.data.layout import bounded

    def interval(k: int):  # defined here: Ray pickles it by value (the test module is not importable there)
        import time

        t = time.time()
        time.sleep(2.0)
        return k, t, time.time()

    task = ray_session.remote(num_cpus=0.25)(interval)
    out = bounded([lambda k=k: task.remote(k) for k in range(6)], limit=2)
    assert [k for k, _, _ in out] == list(range(6))  # in the order asked
    edges = sorted([(t0, 1) for _, t0, _ in out] + [(t1, -1) for _, _, t1 in out])
    running = np.cumsum([d for _, d in edges])
    assert running.max() <= 2, out


def test_table_is_read_through_its_index_only(tmp_path):
    """Files the index does not list (a killed run's temp file, a stray shard) are never read."""
    from tests._train_data import write_synthetic_table

    write_synthetic_table(tmp_path / "t", num_files=6, sources_per_file=3)  # 2 data files of 3 sources
    (tmp_path / "t" / "latents" / ".tmp-0123-00000002.parquet").write_bytes(b"PAR1 half a file")
    (tmp_path / "t" / "latents" / "stray.parquet").write_bytes(b"not parquet at all")
    table = open_table(str(tmp_path / "t"), 0.34, 0)
    assert table.files == ["latents/00000000.parquet", "latents/00000001.parquet"]
    assert len(table.sources) == 6 and len(table.val_sources) == 2
    val, train = read_split(table, val=True), read_split(table, val=False)
    assert set(val["source"].to_pylist()) == set(table.val_sources) and val.num_rows == 2 * 4
    assert train.num_rows == 4 * 4 and not set(train["source"].to_pylist()) & set(table.val_sources)


def test_legacy_table_without_index_still_reads(tmp_path):
    from tests._train_data import write_synthetic_table

    write_synthetic_table(tmp_path / "t", num_files=4, index=False)
    (tmp_path / "t" / "latents" / ".tmp-dead-00000009.parquet").write_bytes(b"half")  # a killed write
    table = open_table(str(tmp_path / "t"), 0.25, 0)
    assert len(table.files) == 4 and read_split(table, val=False).num_rows == 3 * 4
    (tmp_path / "t" / "latents" / "broken.parquet").write_bytes(b"not parquet")  # listed, so read
    with pytest.raises(DataError, match="broken.parquet: unreadable"):
        open_table(str(tmp_path / "t"), 0.25, 0)


def _edit_rows(path, column, value):
    """Rewrite one Parquet file with `column`'s first value set to `value` (a hand-edited table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    vals = t[column].to_pylist()
    vals[0] = [value] + list(vals[0][1:])
    pq.write_table(t.set_column(t.schema.get_field_index(column), column,
                                pa.array(vals, t.schema.field(column).type)), path)


@pytest.mark.parametrize("column,value,conditioning", [("rave", 16, "none"), ("rave", -1, "none"),
                                                        ("tokens", 8, "tokens")])
def test_out_of_range_tokens_are_refused_naming_the_file(ray_session, tmp_path, monkeypatch, column, value,
                                                         conditioning):
    """Where the data is read (a worker's node-cache fill, the validation windows' row groups), a bad
    token stops the run in one line naming the file."""
    from msprior.data import node_cache
    from msprior.data.layout import open_data, validation_windows
    from msprior.data.reader import ReadSpec
    from tests._train_data import write_synthetic_table

    monkeypatch.setenv("MSPRIOR_CACHE_DIR", str(tmp_path / "cache"))
    write_synthetic_table(tmp_path / "t", num_files=4)  # vocab 16, 8 conditioning tokens
    bad = tmp_path / "t" / "latents" / "00000002.parquet"
    _edit_rows(str(bad), column, value)
    table = open_table(str(tmp_path / "t"), 0.0, 0, conditioning)
    spec = ReadSpec.of(table)
    with pytest.raises(DataError) as fill:
        node_cache.fill(spec, "latents/00000002.parquet", ["dir/file_02.wav"])
    data = open_data(table, spec)  # schema only: no token is read before training
    with pytest.raises(DataError) as cut:  # windows from every file: the bad one among them
        validation_windows(data, 16, 8, 16, seed=0)
    for e in (fill, cut):
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and f"column {column}" in msg and "[0, " in msg


def test_rank_windows_through_the_node_cache(ray_session, tmp_path, monkeypatch):
    """Ranks read their strata through the node cache (memory-mapped, read-only); windows stay inside
    chunks and aligned with the conditioning; the validation windows are the same on every call."""
    from msprior.data import node_cache
    from msprior.data.layout import open_data, validation_windows
    from msprior.data.reader import ReadSpec
    from msprior.data.windows import TrainWindows
    from tests._train_data import write_synthetic_table

    monkeypatch.setenv("MSPRIOR_CACHE_DIR", str(tmp_path / "cache"))
    write_synthetic_table(tmp_path / "t", num_files=8, sources_per_file=2)
    table = open_table(str(tmp_path / "t"), 0.25, 0, "tokens")
    data = open_data(table, ReadSpec.of(table))
    assert data.train_chunks == 6 * 4 and data.val_chunks == 2 * 4
    ranks = [TrainWindows(data.for_workers(), r, 2, 16, seed=r) for r in range(2)]
    for w in ranks:
        while not w.warm:
            w.poll(block=True)
    assert sum(w.sampler.total for w in ranks) == 6 * 4 * ((64 - 17) // 4 + 1)  # every train start, once
    mine = [{s for srcs in w.mine.values() for s in srcs} for w in ranks]
    assert not mine[0] & mine[1] and len(mine[0]) == len(mine[1]) == 3  # strata: disjoint, equal
    part = ranks[0].sampler.parts[0]
    assert isinstance(part.rave, np.memmap) and not part.rave.flags.writeable  # page cache, not heap
    batch = ranks[1].sample(64)
    assert batch["rave"].shape == (64, 17, 4) and batch["tokens"].shape == (64, 4)
    assert np.array_equal(batch["tokens"], batch["rave"][:, :16:4, 0] % 8)  # aligned in every file
    assert ((batch["rave"][:, 1:, 0] - batch["rave"][:, :-1, 0]) % 16 == 1).mean() > 0.8  # inside chunks
    val_sources = set(table.val_sources)
    assert not any(s in val_sources for w in ranks for f in w.mine.values() for s in f)
    val = validation_windows(data, 16, 3, 5, seed=0)
    again = validation_windows(data, 16, 3, 5, seed=0)
    assert len(val) == 3 and all(np.array_equal(a["rave"], b["rave"]) for a, b in zip(val, again))
    assert np.array_equal(val[0]["tokens"], val[0]["rave"][:, :16:4, 0] % 8)
    reads = node_cache.fills(data.spec)
    assert sum(f["read_bytes"] for f in reads if f["kind"] == "fill") == sum(
        os.path.getsize(tmp_path / "t" / f) for f in table.files)  # each file decoded once on this node
    assert {f["kind"] for f in reads} == {"fill", "layout", "validation"}  # every storage read is logged


def test_config_refuses_non_finite_and_negative_numbers():
    from msprior.config import ConfigError

    for bad in (".nan", ".inf", "-.inf", "nan", "inf"):
        with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
            load_config("decoder_only", [f"optim.lr={bad}"])
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config("decoder_only", ["optim.lr=-0.001"])
    with pytest.raises(ConfigError, match="optim.lr_scaling must be one of"):
        load_config("decoder_only", ["optim.lr_scaling=cubic"])


def test_lr_rule_follows_the_number_of_workers():
    from msprior.config import scaled_lr

    optim = load_config("decoder_only", ["optim.lr=0.001"]).optim
    assert scaled_lr(optim, 1) == 0.001 and scaled_lr(optim, 4) == pytest.approx(0.002)  # sqrt by default
    optim.lr_scaling = "linear"
    assert scaled_lr(optim, 4) == pytest.approx(0.004)
    optim.lr_scaling = "none"
    assert scaled_lr(optim, 64) == 0.001


@pytest.mark.parametrize("name", ["..", ".", "../up", "a/b", "a\\b", ".hidden", "", "x" * 200])
def test_run_names_cannot_leave_the_storage_folder(train_table, tmp_path, name):
    from msprior.train.run import TrainError, train

    with pytest.raises(TrainError, match="--name"):
        train("decoder_only", train_table, name, storage_path=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "up").exists()


def test_codebooks_from_a_discrete_export(tmp_path):
    from msprior.codec import build_codec
    from msprior.train.plan import TrainError, read_codebooks

    torch.jit.save(build_codec(discrete=True, num_quantizers=4, codebook_size=16), str(tmp_path / "d.ts"))
    assert tuple(read_codebooks(str(tmp_path / "d.ts")).shape[:2]) == (4, 16)
    torch.jit.save(build_codec(discrete=False), str(tmp_path / "c.ts"))
    assert read_codebooks(str(tmp_path / "c.ts")) is None  # a continuous RAVE: warned, training goes on
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "l.ts"))
    with pytest.raises(TrainError, match="not a RAVE export"):
        read_codebooks(str(tmp_path / "l.ts"))


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    from msprior.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--db_path", str(tmp_path / "missing"), "--name", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "manifest.json" in err
