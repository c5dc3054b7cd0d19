"""`msprior pipeline` never enters training on a partial table (files_retry non-empty).

The set-up of tests/test_pipeline_retry.py (a RAVE export whose encoder raises "CUDA out of
memory" on loud input, on every try: a transient cause that never passes), cut to one pipeline
run over two files, with a tripwire at the train stage: a pipeline without the guard fails here as
soon as it would start training, instead of training, exporting and registering first.
"""

import numpy as np
import pytest
import torch

from msprior import pipeline
from tests.test_pipeline_job import TINY
from tests.test_pipeline_retry import OomOnLoud, _cli


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_train_stage_is_never_entered_on_a_partial_table(ray_session, tmp_path, capsys, monkeypatch):
    import soundfile as sf

    from msprior.codec import build_codec
    from msprior.data import load_report
    from msprior.data.synthetic import write_corpus

    def tripwire(p):
        raise AssertionError(f"the train stage was entered on {p.table}, a table with files left to retry")

    monkeypatch.setattr(pipeline, "stage_train", tripwire)
    rave = tmp_path / "rave.ts"
    torch.jit.save(torch.jit.script(OomOnLoud(build_codec(discrete=True))), str(rave))
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n_files=1, seconds=6.0, seed=5)
    t = np.arange(6 * 22050) / 22050
    sf.write(str(corpus / "loud.wav"), np.sign(np.sin(2 * np.pi * 110 * t)).astype(np.float32), 22050)
    out = tmp_path / "out"
    argv = ["pipeline", "--audio", str(corpus), "--rave", str(rave), "--out", str(out), "--num_secs", "3",
            "--max_steps", "4", "--val_every", "2", "--preview_secs", "0",
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *sum((["--override", o] for o in TINY), [])]

    assert _cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 file(s) failed for a transient cause twice" in errors[0], err[-2000:]
    assert load_report(str(out / "data"))["counts"]["files_retry"] == 1
    assert not (out / "runs").exists()
