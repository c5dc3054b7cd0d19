"""`msprior evaluate` and the shared quality measures (msprior.train.quality): no Ray, seconds each."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from msprior.train import quality
from msprior.conditioning import ConditioningSpec
from tests.export_runs import make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny decoder_only prior (Q=4, V=16, seq_len 16), the shapes of the session's train_table."""
    return make_run(str(tmp_path_factory.mktemp("eval_runs")), "decoder_only", steps=40)


def test_windows_cover_each_chunk_once_in_order():
    from msprior.data.reader import Frames

    lengths = np.array([40, 16, 17, 35])  # seq_len 16: 2, 0, 1 and 2 windows
    rave = np.arange(lengths.sum() * 2, dtype=np.int16).reshape(-1, 2)
    frames = Frames(rave=rave, starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths=lengths)
    w = quality.tile_windows(frames, 16)
    assert w.rave.shape == (5, 17, 2) and w.tokens == 5 * 16
    firsts = [int(x) // 2 for x in w.rave[:, 0, 0]]
    assert firsts == [0, 16, 56, 73, 89]  # starts 0 and 16 of chunk 0, 0 of chunk 2, 0 and 16 of chunk 3
    targets = np.concatenate([x[1:, 0] // 2 for x in w.rave])
    assert len(set(targets.tolist())) == len(targets)  # no frame is a target twice
    cond = Frames(rave=rave, starts=frames.starts, lengths=lengths, cond=np.arange(40, dtype=np.int16),
                  cond_starts=np.concatenate([[0], np.cumsum(-(-lengths // 3))[:-1]]))
    wc = quality.tile_windows(cond, 16, ConditioningSpec(kind="tokens", ratio=3))  # stride 15: starts on conditioning frames
    assert wc.cond.shape == (len(wc), 6) and wc.rave[1, 0, 0] // 2 == 15 and wc.cond[1, 0] == 5


def test_unigram_and_histogram_measures():
    counts = np.array([[3, 1, 0, 0]])
    # add-one smoothing: p = (4, 2, 1, 1) / 8
    assert quality.unigram_ce(counts, np.array([[1, 0, 0, 1]]))[0] == pytest.approx(-(math.log(0.5) + math.log(1 / 8)) / 2)
    assert quality.histogram_kl(counts, counts) == 0.0 and quality.histogram_kl(counts, counts[:, ::-1]) > 0.5
    assert quality.token_counts(np.array([[[0, 1], [0, 3]]]), 4).tolist() == [[2, 0, 0, 0], [0, 1, 0, 1]]
    frames = np.array([[[1, 2], [1, 2], [1, 3], [1, 3]]])
    assert quality.repeat_fraction(frames) == pytest.approx(2 / 3)


def test_evaluate_prints_per_quantizer_ce_of_every_window(run_dir, train_table, capsys):
    """The printed CE is `prior.quantizer_losses` over every window of the table, token-weighted: the
    same number whatever the batch size, and the mean of one forward pass over all windows."""
    from msprior.cli import main
    from msprior.export.run import load_trained
    from msprior.train.evaluate import EvaluateRequest, evaluate

    with pytest.raises(SystemExit) as ok:
        main(["evaluate", "--run", run_dir, "--db_path", train_table, "--batch_size", "5"])
    assert ok.value.code in (0, None)
    out = capsys.readouterr().out
    assert "q3" in out and "mean" in out and "of a vocabulary of 16" in out
    r = evaluate(EvaluateRequest(run=run_dir, db_path=train_table, batch_size=64), echo=lambda s: None)
    assert r["windows"] == 8 * 4 * 3 and r["tokens"] == r["windows"] * 16  # 8 files x 4 chunks x 3 windows of 16
    printed = [float(line.split()[1]) for line in out.splitlines() if re.match(r"\s*q\d+ ", line)]
    assert printed == pytest.approx(r["ce_q"], abs=1e-4)  # batch 5 (uneven last batch) == batch 64

    prior = load_trained(run_dir).prior
    windows = quality.held_out_windows(train_table, 16)
    with torch.no_grad():
        whole = prior.loss(next(iter({k: torch.from_numpy(v) for k, v in b.items()}
                                     for b in windows.batches(len(windows)))))
    assert r["ce"] == pytest.approx(float(whole), abs=1e-4)
    assert r["ce"] < r["unigram"] and r["unigram"] == pytest.approx(math.log(16), abs=0.1)


def test_evaluate_refuses_in_one_line(run_dir, train_table, tmp_path, capsys):
    from msprior.checkpoint import write_run_json
    from msprior.cli import main
    from tests._train_data import write_synthetic_table

    other = tmp_path / "q3"
    write_synthetic_table(other, num_files=2, quantizers=3)
    short = tmp_path / "short"
    write_synthetic_table(short, num_files=2, frames=12)
    unfinished = tmp_path / "unfinished"
    write_run_json(str(unfinished), {"name": "unfinished", "best_checkpoint": None, "last_checkpoint": None})
    cond_run = make_run(str(tmp_path), "encoder_decoder", steps=2)  # conditioning ratio 2, the table's is 4
    cases = [
        (["--run", run_dir, "--db_path", str(other)], "the table has 3 quantizers x 16 tokens, the prior"),
        (["--run", run_dir, "--db_path", str(tmp_path / "nope")], "no manifest.json"),
        (["--run", str(tmp_path / "nope"), "--db_path", train_table], "neither a run directory nor an MLflow run id"),
        (["--run", str(unfinished), "--db_path", train_table], "no checkpoint recorded"),
        (["--run", run_dir, "--db_path", str(short)], "no chunk holds seq_len \\+ 1 = 17 frames"),
        (["--run", run_dir, "--db_path", train_table, "--checkpoint", "first"], "--checkpoint must be 'best' or 'last'"),
        (["--run", run_dir, "--db_path", train_table, "--batch_size", "0"], "--batch_size 0: must be >= 1"),
        (["--run", cond_run, "--db_path", train_table], "conditioning ratio differs \\(2 vs 4\\)"),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as err:
            main(["evaluate", *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert re.search(match, lines[0]), (match, lines[0])


def test_generation_check_samples_through_the_streaming_path(run_dir, train_table):
    from msprior.export.run import load_trained

    prior = load_trained(run_dir).prior.train()
    windows = quality.held_out_windows(train_table, 16)
    batch = {k: torch.from_numpy(v) for k, v in next(windows.batches(8)).items()}
    counts = quality.target_counts([{"rave": windows.rave}], 16)
    torch.manual_seed(0)
    m = quality.generation_check(prior, [batch], 16, counts, streams=4, frames=12)
    assert prior.training  # the caller's mode is given back
    assert set(m) == {"gen_kl", "gen_kl_ref", "gen_repeat"} and all(math.isfinite(v) for v in m.values())
    assert 0.0 <= m["gen_repeat"] <= 1.0 and m["gen_kl_ref"] >= 0.0
    gen = quality.generate(prior, {k: v[:2] for k, v in batch.items()}, 12, temperature=0.0)
    assert gen.shape == (2, 12, 4) and int(gen.max()) < 16
    # greedy streaming equals greedy sampling of the full prefix, frame after frame
    ctx = batch["rave"][:2, :1]
    for t in range(3):
        frame, _ = prior.eval().sample(ctx, temperature=0.0)
        assert torch.equal(frame, gen[:, t]), t
        ctx = torch.cat([ctx, frame[:, None]], dim=1)


def test_evaluate_agrees_with_the_bench_scorer(run_dir, train_table):
    """bench/quality.py scores msprior's prior on its own held-out windows: the same numbers (1e-3)."""
    from bench.quality_msprior import heldout_windows, score, table_chunks
    from msprior.export.run import load_trained
    from msprior.train.evaluate import EvaluateRequest, evaluate

    bench = score(load_trained(run_dir).prior, heldout_windows(table_chunks(train_table), 16))
    r = evaluate(EvaluateRequest(run=run_dir, db_path=train_table), echo=lambda s: None)
    assert r["ce_q"] == pytest.approx(bench, abs=1e-3)


@pytest.mark.parametrize("config", ["recurrent", "encoder_decoder", "encoder_decoder_continuous"])
def test_generation_check_of_every_family(config, tmp_path):
    """GRU state and conditioned streams (tokens, features at the decoder rate) go through the check."""
    from msprior.export.run import load_trained
    from tests.export_runs import synthetic_batch

    cfg_run = make_run(str(tmp_path), config, steps=2)
    prior = load_trained(cfg_run).prior
    batch = synthetic_batch(3, 17, load_trained(cfg_run).config.model.conditioning, torch.Generator().manual_seed(0))
    counts = quality.target_counts([{"rave": batch["rave"].numpy()}], 16)
    m = quality.generation_check(prior, [batch], 16, counts, streams=3, frames=16)
    assert all(math.isfinite(v) for v in m.values()), m
