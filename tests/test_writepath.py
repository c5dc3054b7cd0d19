"""The preprocess write path's parts on real storage: the lease (local and SeaweedFS), conditional
writes, float64 statistics at scale, streaming decode and on-the-fly chunking, transient errors."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from msprior import storage
from msprior.data import audio as audio_mod
from msprior.data import table as tbl
from msprior.data.lease import Lease, LeaseHeld, read_owner
from msprior.data.synthetic import melody

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["local", "s3"])
def table_path(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "table")
    request.getfixturevalue("s3_env")
    return f"s3://test-bucket/lease-{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_conditional_writes(table_path):
    p = storage.join(table_path, "x.json")
    tag = storage.create_exclusive(p, b"one")
    with pytest.raises(storage.Conflict):
        storage.create_exclusive(p, b"two")
    with pytest.raises(storage.Conflict):
        storage.replace_if(p, b"three", "not-the-tag")
    assert storage.read_versioned(p) == (b"one", tag)
    storage.replace_if(p, b"four", tag)
    assert storage.read_versioned(p)[0] == b"four"


def test_second_live_run_refuses_naming_the_owner(table_path):
    with Lease.acquire(table_path, ttl_s=30, run_id="first") as a:
        with pytest.raises(LeaseHeld, match=r"pid \d+, run first, heartbeat") as e:
            Lease.acquire(table_path, ttl_s=30, run_id="second")
        assert "\n" not in str(e.value) and a.renew()
    assert read_owner(table_path) is None  # released
    with Lease.acquire(table_path, ttl_s=30, run_id="third"):
        assert read_owner(table_path)["run_id"] == "third"


def test_dead_owner_is_taken_over_and_finds_out(table_path):
    dead = Lease.acquire(table_path, ttl_s=1.0, run_id="dead")
    dead._stop.set()  # the owner stops beating (a SIGKILLed run, a paused VM)
    dead._thread.join()
    time.sleep(2.5)  # past the TTL on the storage's clock (S3 stamps whole seconds)
    with Lease.acquire(table_path, ttl_s=30, run_id="next") as nxt:
        assert nxt.took_over["run_id"] == "dead"
        assert not dead.renew() and dead.lost  # its next heartbeat loses the compare-and-swap
        with pytest.raises(Exception, match="took the lease over"):
            dead.check()
        assert read_owner(table_path)["run_id"] == "next"


def test_racing_runs_one_wins(table_path):
    results = []

    def go(i):
        try:
            results.append(("won", Lease.acquire(table_path, ttl_s=30, run_id=f"r{i}")))
        except LeaseHeld as e:
            results.append(("refused", e))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for k, r in results if k == "won"]
    assert len(won) == 1 and len(results) == 4
    assert read_owner(table_path)["run_id"] == won[0].run_id
    won[0].release()


def test_feature_moments_are_float64_exact_on_30m_rows():
    """30 M rows of 3 features, accumulated per task (1 M rows each) and merged: the manifest's
    mean/std equal a float64 reference over all rows within 1e-4 relative."""
    rng = np.random.default_rng(0)
    n_parts, rows, parts, ref = 30, 1_000_000, [], []
    for i in range(n_parts):  # loudness-like offsets, a drifting mean, tiny spread on one feature
        x = np.stack([-40.0 + 10.0 * rng.standard_normal(rows) + i * 0.1,
                      11.0 + 0.5 * rng.standard_normal(rows),
                      1e3 + 1e-3 * rng.standard_normal(rows)], 1).astype(np.float32)
        parts.append(tbl.moments(x))
        ref.append(x)
    mean, std = tbl.mean_std(tbl.merge_moments(parts))
    allx = np.concatenate(ref).astype(np.float64)
    assert allx.shape[0] >= 30_000_000
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-4)
    np.testing.assert_allclose(std, allx.std(0), rtol=1e-4)
    # what a float32 running sum over the rows gives (the old way): wrong well beyond 1e-4
    acc = np.zeros(3, np.float32)
    for x in ref:
        acc = (acc + np.cumsum(x, 0, dtype=np.float32)[-1]).astype(np.float32)
    assert np.abs(acc / len(allx) - allx.mean(0)).max() / np.abs(allx.mean(0)).max() > 1e-4


def test_iter_chunks_matches_chunk_bounds():
    rng = np.random.default_rng(1)
    for _ in range(1500):
        ratio = int(rng.choice([4, 16, 64]))
        chunk, min_frames = ratio * int(rng.integers(1, 20)), int(rng.integers(1, 30))
        n, block = int(rng.integers(0, 3000)), int(rng.integers(1, 500))
        x = np.arange(n, dtype=np.float32)
        want = audio_mod.chunk_bounds(n, chunk, ratio, min_frames)
        try:
            got = list(audio_mod.iter_chunks((x[i:i + block] for i in range(0, n, block)), chunk, ratio,
                                             min_frames, 44100))
        except audio_mod.SkipFile:
            got = []
        assert [(s, s + len(c)) for s, c in got] == want
        assert all(np.array_equal(c, x[s:s + len(c)]) for s, c in got)


@pytest.mark.parametrize("sr,channels", [(48000, 2), (22050, 1), (44100, 1)])
def test_stream_equals_whole_file_decode(tmp_path, sr, channels):
    rng = np.random.default_rng(2)
    x = np.stack([0.3 * melody(23.0, sr, rng) for _ in range(channels)], 1)
    path = str(tmp_path / "a.wav")
    sf.write(path, x, sr)
    whole, _, _ = audio_mod.decode(open(path, "rb").read(), 44100)
    streamed = np.concatenate(list(audio_mod.stream(path, 44100, block_seconds=3.0)))
    np.testing.assert_array_equal(streamed, whole)


def test_stream_reports_bad_files(tmp_path):
    from msprior.data.synthetic import write_bad_files

    write_bad_files(str(tmp_path))
    for name, word in [("empty.wav", "empty"), ("notes.wav", "decode"), ("silent.wav", "silent")]:
        with pytest.raises(audio_mod.SkipFile, match=word):
            list(audio_mod.stream(str(tmp_path / name), 44100))


def test_transient_errors_are_retried_and_bad_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, first_wait_s=0.01) == "ok" and len(calls) == 3
    assert storage.is_transient(TimeoutError()) and storage.is_transient(RuntimeError("CUDA out of memory."))
    assert not storage.is_transient(audio_mod.SkipFile("cannot decode: Format not recognised."))
    with pytest.raises(ValueError):
        storage.retry(lambda: (_ for _ in ()).throw(ValueError("bad header")), first_wait_s=0.01)


def test_ledger_moments_round_trip(tmp_path):
    """Records written and read back through the ledger keep float64 sums exactly."""
    x = np.random.default_rng(3).standard_normal((1000, 15))
    m = tbl.moments(x)
    tbl.write_ledger_entry(str(tmp_path), "part-a", {"file": None, "features": m, "sources": []})
    (e,) = tbl.read_ledger(str(tmp_path))
    assert e["stem"] == "part-a" and json.loads(json.dumps(m)) == e["features"]


def test_encode_task_with_several_decode_threads_gives_the_same_rows(tmp_path):
    """An encode task (in this process: the actor class without Ray) with 3 decode threads returns
    exactly the rows of one decode thread, each file complete, bad files as one error row each."""
    from msprior.codec import save_codec
    from msprior.data import features as feat
    from msprior.data.encode import Encoder
    from msprior.data.request import Settings
    from msprior.data.synthetic import write_bad_files, write_corpus

    write_corpus(str(tmp_path / "c"), n_files=4, seconds=9.0, seed=0)
    write_bad_files(str(tmp_path / "c" / "bad"))
    files = sorted(p for p in (tmp_path / "c").rglob("*.*") if p.suffix != ".txt")
    rave = save_codec(str(tmp_path / "codec.ts"), discrete=True)
    n = len(feat.feature_names())
    rows = {}
    for threads in (1, 3):
        s = Settings(audio_root=str(tmp_path / "c"), out_path="", run_id="", sr=44100, ratio=1024,
                     chunk_samples=172 * 1024, min_frames=32, resolution=64, batch_size=4, condition_ratio=4,
                     centroids=np.random.default_rng(0).standard_normal((8, n)).astype(np.float32),
                     scale=np.ones(n, np.float32), decode_threads=threads)
        enc = Encoder([open(rave, "rb").read()], s)
        t = enc({"source": np.array([str(p.relative_to(tmp_path / "c")) for p in files]),
                 "path": np.array([str(p) for p in files])})
        rows[threads] = t.sort_by([("source", "ascending"), ("chunk", "ascending")])
    assert rows[1].equals(rows[3])
    errors = {r["source"] for r in rows[1].to_pylist() if r["error"]}
    assert errors == {f"bad/{n}" for n in ("empty.wav", "notes.wav", "garbage.flac", "corrupt.wav", "tiny.wav",
                                          "silent.wav")}
    good = [r for r in rows[1].to_pylist() if not r["error"]]
    assert len({r["source"] for r in good}) == 4 and all(r["n_chunks"] == 3 for r in good)


def test_transient_failures_are_not_committed_and_come_back_on_resume(tmp_path):
    """A write task's bundle with a good file, a bad file and a file failed for a transient cause:
    only the first two are committed (the ledger says so), and the next run's pending list has the
    third again; a data file holds only complete files."""
    from msprior.data.lease import Lease
    from msprior.data.commit import commit_bundle
    from msprior.data.encode import rows_table
    from msprior.data.plan import pending as pending_files
    from msprior.data.request import Settings

    out = str(tmp_path / "table")
    chunk = {"start_s": 0.0, "frames": 2, "rave": np.zeros(8, np.int16), "tokens": np.zeros(0, np.int16),
             "features": np.zeros(0, np.float32)}
    files = [("good.wav", ""), ("bad.wav", ""), ("flaky.wav", ""), ("partial.wav", "")]
    chunks = {"good.wav": {0: chunk, 1: chunk}, "partial.wav": {0: chunk, 1: chunk}}
    errors = {"bad.wav": ("cannot decode: Format not recognised.", False),
              "flaky.wav": ("ReadTimeoutError: Read timeout on endpoint URL", True)}
    t = rows_table(files, chunks, errors)
    t = t.filter(~((np.asarray(t["source"].to_pylist()) == "partial.wav") & (np.asarray(t["chunk"].to_pylist()) == 1)))
    s = Settings(audio_root="", out_path=out, run_id="r1", sr=44100, ratio=1024, chunk_samples=1024, min_frames=1,
                 resolution=64, batch_size=1, condition_ratio=0, centroids=None, scale=None)
    with Lease.acquire(out, ttl_s=30, run_id="r1") as lease:
        entry = commit_bundle(t, dataclasses.replace(s, epoch=lease.epoch))
    assert [x[0] for x in entry["sources"]] == ["good.wav"] and entry["skipped"][0][0] == "bad.wav"
    assert {x[0] for x in entry["failed"]} == {"flaky.wav", "partial.wav"}
    (rec,) = tbl.read_ledger(out)
    assert "failed" not in rec and rec["file"] == entry["file"]
    pending, done = pending_files([(f, f, 1) for f, _ in files], [rec])
    assert sorted(p[0] for p in pending) == ["flaky.wav", "partial.wav"] and done == 1
    assert tbl.read_table(out)["source"].to_pylist() == ["good.wav", "good.wav"]
