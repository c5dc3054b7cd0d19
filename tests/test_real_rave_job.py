"""The whole pipeline through `ray job submit` on the local stack (Ray head, SeaweedFS S3, MLflow
server), on RAVE's own discrete and continuous exports and the real-audio corpus, both read from S3;
the registered prior is pulled back and its generated stream decoded by the RAVE export's `decode`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_pipeline_job import TINY, _submit, _wait_job
from tests.test_real_rave import AUDIO, RAVES, _generate, audio_files

RATIO = {"v2_discrete": 1024, "v2_continuous": 512}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipeline_job_on_rave_exports(tmp_path):
    import s3fs

    from msprior.devstack import Stack

    with Stack(str(tmp_path / "stack"), bucket="msprior") as st:  # one stack, one job per export
        env = {**os.environ, **st.env()}
        s3env = st.env()
        fs = s3fs.S3FileSystem(key=s3env["AWS_ACCESS_KEY_ID"], secret=s3env["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": s3env["AWS_ENDPOINT_URL"]})
        fs.put(str(AUDIO), "msprior/inputs/corpus", recursive=True)
        for name in sorted(RATIO):
            fs.put(RAVES[name], f"msprior/inputs/{name}.ts")
            _job(env, fs, tmp_path, name)


def _job(env, fs, tmp_path, name: str) -> None:
    run = name.replace("_", "-")
    argv = ["--audio", "s3://msprior/inputs/corpus", "--rave", f"s3://msprior/inputs/{name}.ts",
            "--out", f"s3://msprior/runs/{run}", "--config", "decoder_only", "--name", run,
            "--max_steps", "4", "--val_every", "2", "--num_secs", "4", "--num_workers", "2",
            "--batch_size", "4", *sum((["--override", o] for o in TINY), [])]
    if name == "v2_discrete":
        argv.append("--pretrained_embedding")
    status, logs = _wait_job(env, _submit(env, argv))
    assert "succeeded" in status, status + "\n" + logs[-4000:]
    assert f"[register] msprior-{run} version 1" in logs, logs[-3000:]

    fs.invalidate_cache()
    manifest = json.loads(fs.cat(f"msprior/runs/{run}/data/manifest.json"))
    assert manifest["counts"]["files_ok"] == len(audio_files())  # wav, flac, ogg, aiff; 16-48 kHz
    assert manifest["rave"]["continuous"] == (name == "v2_continuous")
    exported = fs.cat(f"msprior/runs/{run}/export/{run}.ts")
    pulled = tmp_path / f"{run}.pulled.ts"
    r = subprocess.run([sys.executable, "-m", "msprior", "pull", f"msprior-{run}@champion", "--out", str(pulled)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert pulled.read_bytes() == exported

    z = _generate(torch.jit.load(str(pulled)), 16)  # the registered prior's stream ...
    with torch.no_grad():
        audio = torch.jit.load(RAVES[name]).decode(z)  # ... through the RAVE export's own decoder
    assert audio.shape == (1, 1, 16 * RATIO[name]) and torch.isfinite(audio).all()
