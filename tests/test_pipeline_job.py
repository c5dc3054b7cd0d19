"""Issue 6 end to end: a real Ray head, SeaweedFS S3 and `mlflow server` on 127.0.0.1; the pipeline
submitted with `ray job submit`; the registered model pulled back; a re-submission skips every stage."""

import json
import re
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.seq_len=32",
        "optim.warmup_steps=5", "train.batch_size=8", "train.val_batches=2"]


def _ray(env, *args, timeout=120):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _wait_job(env, job_id, timeout=600):
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        r = _ray(env, "job", "status", job_id)
        status = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr).lower()  # drop colours
        if any(s in status for s in ("succeeded", "failed", "stopped", "does not exist")):
            break
        time.sleep(3)
    logs = _ray(env, "job", "logs", job_id).stdout
    return status, logs


def _submit(env, argv):
    r = _ray(env, "job", "submit", "--no-wait", "--working-dir", ".", "--",
             sys.executable, "jobs/pipeline.py", *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pipeline_as_ray_job_on_local_stack(tmp_path):
    import s3fs

    from msprior.codec import save_codec
    from msprior.data.synthetic import write_corpus
    from msprior.devstack import Stack

    with Stack(str(tmp_path / "stack"), bucket="msprior") as st:
        env = {**os.environ, **st.env()}
        s3env = st.env()
        fs = s3fs.S3FileSystem(key=s3env["AWS_ACCESS_KEY_ID"], secret=s3env["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": s3env["AWS_ENDPOINT_URL"]})
        # the user's inputs, in the bucket: a RAVE-compatible codec and a small corpus
        save_codec(str(tmp_path / "rave.ts"), discrete=True)
        fs.put(str(tmp_path / "rave.ts"), "msprior/inputs/rave.ts")
        write_corpus(str(tmp_path / "corpus"), n_files=4, seconds=8.0, seed=3)
        fs.put(str(tmp_path / "corpus"), "msprior/inputs/corpus", recursive=True)

        argv = ["--audio", "s3://msprior/inputs/corpus", "--rave", "s3://msprior/inputs/rave.ts",
                "--out", "s3://msprior/runs/e2e", "--config", "decoder_only", "--name", "e2e",
                "--max_steps", "20", "--val_every", "10", "--num_secs", "4", "--num_workers", "1",
                *sum((["--override", o] for o in TINY), [])]
        job = _submit(env, argv)
        status, logs = _wait_job(env, job)
        assert "succeeded" in status, status + "\n" + logs[-4000:]
        assert "[register] msprior-e2e version 1" in logs, logs[-3000:]

        # the registered model comes back byte-identical to the export in the bucket
        fs.invalidate_cache()
        exported = fs.cat("msprior/runs/e2e/export/e2e.ts")
        pulled = tmp_path / "pulled.ts"
        r = subprocess.run([sys.executable, "-m", "msprior", "pull", "msprior-e2e@champion", "--out", str(pulled)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert pulled.read_bytes() == exported
        manifest = json.loads(fs.cat("msprior/runs/e2e/data/manifest.json"))
        assert manifest["counts"]["files_ok"] == 4

        # re-submitting finds every stage done
        job2 = _submit(env, argv)
        status2, logs2 = _wait_job(env, job2)
        assert "succeeded" in status2, status2 + "\n" + logs2[-4000:]
        for stage in ("preprocess", "train", "export", "register"):
            assert f"[{stage}] skipped" in logs2, logs2[-3000:]
        assert "msprior-e2e version 1" in logs2  # nothing new registered
