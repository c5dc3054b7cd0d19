"""Fast checks of the training data path, schedule and checkpoints (no Ray Train run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msprior.config import load_config
from msprior.train.data import (DataError, WindowSampler, frames_from_arrow, open_table, read_split,
                                split_sources, unigram_entropy)
from msprior.train.loop import shard_kwargs

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

    frames = frames_from_arrow(train, **shard_kwargs(cfg, table.manifest))
    assert frames.rave.shape == (6 * 4 * 64, 4) and frames.cond.shape == (6 * 4 * 16,)
    sampler = WindowSampler(frames, seq_len=16, conditioning="tokens", cond_ratio=4, seed=0)
    batch = sampler.sample(32)
    assert batch["rave"].shape == (32, 17, 4) and batch["rave"].dtype == np.int64
    assert batch["tokens"].shape == (32, 4)
    # the synthetic tokens column is rave[::4, 0] % 8: a window aligned on the ratio reproduces it
    assert np.array_equal(batch["tokens"], batch["rave"][:, :16:4, 0] % 8)
    # windows never cross a chunk boundary: each follows the synthetic +1 (mod 16) rule mostly
    steps = (batch["rave"][:, 1:, 0] - batch["rave"][:, :-1, 0]) % 16
    assert (steps == 1).mean() > 0.8


def test_features_windows_and_clear_errors(train_table):
    cfg = load_config("encoder_decoder_continuous", TINY)
    table = open_table(train_table, 0.25, 0, "features")
    frames = frames_from_arrow(read_split(table, val=False), **shard_kwargs(cfg, table.manifest))
    batch = WindowSampler(frames, 16, "features", 4, seed=1).sample(8)
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
    from msprior.train.checkpoint import load_checkpoint, save_checkpoint
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


@pytest.mark.parametrize("inline_max_bytes", [1 << 30, 0], ids=["driver-read", "read_parquet"])
def test_train_dataset_holds_exactly_the_train_files(ray_session, train_table, inline_max_bytes):
    from msprior.train.data import train_dataset

    table = open_table(train_table, 0.25, 0)
    ds = train_dataset(table, inline_max_bytes=inline_max_bytes)
    sources = set()
    rows = 0
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        sources |= set(b["source"].to_pylist())
        rows += b.num_rows
    assert rows == 6 * 4 and sources == set(table.sources) - set(table.val_sources)


def test_codebooks_from_a_discrete_export(tmp_path):
    from msprior.codec import build_codec
    from msprior.train.run import TrainError, read_codebooks

    torch.jit.save(build_codec(discrete=True, num_quantizers=4, codebook_size=16), str(tmp_path / "d.ts"))
    assert tuple(read_codebooks(str(tmp_path / "d.ts")).shape[:2]) == (4, 16)
    torch.jit.save(build_codec(discrete=False), str(tmp_path / "c.ts"))
    with pytest.raises(TrainError, match="discrete RAVE"):
        read_codebooks(str(tmp_path / "c.ts"))


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    from msprior.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--db_path", str(tmp_path / "missing"), "--name", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "manifest.json" in err
