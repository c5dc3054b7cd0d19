"""`train.unigram_bias` through a real training (Ray Train, one worker): a fresh run's output biases
start at the log unigram of the training tokens its window sampler holds (Prior.init_output_bias)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_train_windows import TINY

Q, V = 4, 16  # the session's train_table


def _expected_bias(db_path: str, cfg) -> np.ndarray:
    """Centred log add-one unigram [Q, V] of the training split's tokens (every chunk holds a window)."""
    from msprior.data import reader
    from msprior.train import quality

    table = reader.open_table(db_path, cfg.data.val_fraction, cfg.data.seed)
    frames = reader.frames_from_arrow(reader.read_split(table, val=False), Q)
    assert frames.lengths.min() > cfg.model.seq_len
    logp = np.log(quality.token_counts(frames.rave, V) + 1.0)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return logp - logp.mean(axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_fresh_training_starts_at_its_tokens_unigram(ray_session, train_table, train_dirs):
    from msprior.checkpoint import load_run
    from msprior.config import load_config
    from msprior.train import train

    storage, uri = train_dirs
    # lr 1e-6: one step moves a bias by ~1e-6, so the checkpoint shows the initialisation
    overrides = TINY + ["optim.lr=1e-6", "train.unigram_bias=true"]
    s = train("decoder_only", train_table, "u", max_steps=1, overrides=overrides, num_workers=1, batch_size=4,
              val_every=1, storage_path=storage, tracking_uri=uri)
    bias = load_run(s["run_dir"], "last")["model"]["predictor.out_b"].numpy()
    expected = _expected_bias(train_table, load_config("decoder_only", overrides))
    assert expected.std() > 0.02  # the table's marginals are ~uniform, yet not exactly
    np.testing.assert_allclose(bias, expected, atol=1e-4)
