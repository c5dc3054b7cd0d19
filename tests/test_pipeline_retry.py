"""A file that failed for a transient cause is retried when the pipeline runs again.

The RAVE export here is the demo codec behind RAVE v1's interface whose `encode` raises "CUDA out
of memory" on loud input (what a GPU encoder does under memory pressure; `is_transient` takes it
for a passing failure). One loud file of four fails that way on every try: the pipeline retries it
once, then stops before training with one line saying how many files and how to resume (it never
trains on part of the corpus). A re-run goes back into preprocess for the file instead of skipping
the finished table.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_pipeline_job import TINY


class OomOnLoud(nn.Module):
    sr: int

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sr = int(inner.sr)
        self.register_buffer("encode_params", inner.encode_params.clone())

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().max() > 0.95):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (test: loud input)")
        return self.inner.encode(x)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(z)


def _cli(argv):
    from msprior.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rerun_retries_files_that_failed_for_a_transient_cause(ray_session, tmp_path, capsys):
    import soundfile as sf

    from msprior.codec import build_codec
    from msprior.data import load_report
    from msprior.data.synthetic import write_corpus

    rave = tmp_path / "rave.ts"
    torch.jit.save(torch.jit.script(OomOnLoud(build_codec(discrete=True))), str(rave))
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n_files=3, seconds=6.0, seed=5)
    t = np.arange(6 * 22050) / 22050
    sf.write(str(corpus / "loud.wav"), np.sign(np.sin(2 * np.pi * 110 * t)).astype(np.float32), 22050)
    out = tmp_path / "out"
    argv = ["pipeline", "--audio", str(corpus), "--rave", str(rave), "--out", str(out), "--num_secs", "3",
            "--max_steps", "4", "--val_every", "2", "--preview_secs", "0",
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *sum((["--override", o] for o in TINY), [])]

    assert _cli(argv) == 2  # never trains on part of the corpus
    first = capsys.readouterr()
    errors = [line for line in first.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 file(s) failed for a transient cause twice" in errors[0], first.err[-2000:]
    assert "re-run the same command to retry them" in errors[0]
    assert "[preprocess] retrying 1 file(s)" in first.out and "[train]" not in first.out
    assert not (out / "runs").exists()
    report = load_report(str(out / "data"))
    assert report["counts"]["files_retry"] == 1 and report["counts"]["files_ok"] == 3, report["counts"]
    (reason,) = [s["reason"] for s in report["skipped"] if s["source"].endswith("loud.wav")]
    assert "out of memory" in reason and "retried on resume" in reason
    # a re-run goes back into preprocess for the file (and stops again: it fails on every try)
    assert _cli(argv) == 2
    second = capsys.readouterr()
    assert "[preprocess] resuming" in second.out and "1 file(s) failed for a transient cause" in second.out
    assert not (out / "runs").exists()
