"""Preprocess end to end on a generated corpus: real Ray (one session), real files, real S3."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from msprior.codec import save_codec
from msprior.data import (PreprocessError, PreprocessRequest, list_shards, load_manifest, load_report,
                          read_index, read_table)
from msprior.data import preprocess as _preprocess
from msprior.data.synthetic import melody, write_bad_files, write_corpus
from msprior.rave import load_rave, quantize_normal, sha256_file
from tests.data_helpers import reference_audio

pytestmark = pytest.mark.timeout(600)

NUM_SECS, MIN_FRAMES, COND = 4.0, 32, 4  # chunks of 172 frames at 44.1 kHz / 1024; window 0.74 s
# two files per encode task and tiny data files: several commits even on this small corpus
OPTS = dict(num_secs=NUM_SECS, min_frames=MIN_FRAMES, batch_size=8, condition_ratio=COND,
            condition_tokens=8, progress=False, files_per_task=2, target_file_mb=0.01)


def preprocess(audio, out, rave, **kw):
    return _preprocess(PreprocessRequest(audio, out, rave, **kw))
BAD = {  # file -> a word its reason must contain
    "bad/empty.wav": "empty", "bad/notes.wav": "decode", "bad/garbage.flac": "decode",
    "bad/corrupt.wav": "decode", "bad/tiny.wav": "too short", "bad/silent.wav": "silent",
    "bad/README.txt": "ignored",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tones, chords and noise at 22.05/44.1/48 kHz, mono/stereo, wav/flac; short, odd and bad files."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root), n_files=4, seconds=9.0, seed=0)  # 3 chunks each: 4 s + 4 s + 1 s tail
    rng = np.random.default_rng(3)
    extra = root / "extra"
    extra.mkdir()
    sf.write(str(extra / "short_2s.wav"), 0.4 * melody(2.0, 44100, rng), 44100)  # one shorter chunk
    sf.write(str(extra / "tail_8.5s_48k.wav"), 0.4 * melody(8.5, 48000, rng), 48000)  # tail joins chunk 1
    sf.write(str(extra / "odd_rate_11025.aiff"), 0.4 * melody(3.0, 11025, rng), 11025)
    sf.write(str(extra / "vorbis.ogg"), 0.4 * melody(3.0, 44100, rng), 44100, format="OGG", subtype="VORBIS")
    four = np.stack([0.3 * melody(3.0, 44100, rng) for _ in range(4)], 1)
    sf.write(str(extra / "four_channels.wav"), four, 44100)
    write_bad_files(str(root / "bad"))
    good = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not str(p.relative_to(root)).startswith("bad/"))
    return root, good


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    d = tmp_path_factory.mktemp("codecs")
    return {kind: save_codec(str(d / f"{kind}.ts"), discrete=(kind == "discrete"))
            for kind in ("continuous", "discrete")}


@pytest.fixture(scope="module")
def tables(ray_session, corpus, codecs, tmp_path_factory):
    out = {}
    for kind, rave in codecs.items():
        path = str(tmp_path_factory.mktemp(f"table_{kind}"))
        out[kind] = (path, preprocess(str(corpus[0]), path, rave, **OPTS))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_table_matches_manifest_and_direct_encode(kind, tables, corpus, codecs):
    path, summary = tables[kind]
    root, good = corpus
    m = load_manifest(path)
    t = read_table(path)
    rows = t.to_pylist()
    q, vocab = m["rave"]["num_quantizers"], m["rave"]["vocab_size"]
    assert (m["rave"]["continuous"], vocab) == ((kind == "continuous"), 64)
    assert m["rave"]["sha256"] == sha256_file(codecs[kind]) == sha256_file(os.path.join(path, "rave.ts"))
    assert sorted({r["source"] for r in rows}) == good
    assert m["counts"]["files_ok"] == len(good) == summary["files_encoded"]
    assert m["counts"]["chunks"] == len(rows) == summary["table_chunks"]
    assert m["counts"]["frames"] == sum(r["frames"] for r in rows) == summary["frames"]
    for r in rows:
        assert len(r["rave"]) == r["frames"] * q and 0 <= min(r["rave"]) and max(r["rave"]) < vocab
        nc = math.ceil(r["frames"] / COND)
        assert len(r["tokens"]) == nc and len(r["features"]) == nc * m["conditioning"]["features"]["size"]
        assert max(r["tokens"]) < m["conditioning"]["tokens"]["vocab_size"]

    by = {(r["source"], r["chunk"]): r for r in rows}
    chunk = m["chunk"]["frames"] * 1024
    assert [by[("extra/tail_8.5s_48k.wav", c)]["frames"] for c in (0, 1)] == [172, math.ceil((374850 - 172 * 1024) / 1024)]  # tail merged
    assert ("extra/tail_8.5s_48k.wav", 2) not in by
    assert by[("extra/short_2s.wav", 0)]["frames"] == math.ceil(2 * 44100 / 1024)

    # the tokens of a chunk equal the model's own encode of the same audio, called directly
    rave = load_rave(codecs[kind])
    for source, c, (a, b) in [("melody/melody_003_22050_stereo.flac", 1, (chunk, 2 * chunk)),
                              ("extra/tail_8.5s_48k.wav", 1, (chunk, None))]:
        x = torch.from_numpy(reference_audio(str(root / source), 44100)[a:b])[None]
        z = rave.encode(x)[0]  # [Q, T]
        loc, scale = rave.latent_bins(m["rave"]["latent_loc"], m["rave"]["latent_scale"])
        want = torch.round(z).long() if kind == "discrete" else quantize_normal(z, 64, loc, scale)
        got = np.asarray(by[(source, c)]["rave"]).reshape(-1, q).T
        np.testing.assert_array_equal(got, want.numpy())

    from msprior.model import DatasetFacts

    facts = DatasetFacts.from_manifest(m)
    assert (facts.num_quantizers, facts.vocab_size, facts.cond_ratio) == (q, 64, COND)
    assert facts.cond_features == 15 and len(facts.feature_std) == 15 and facts.cond_vocab == 8
    assert np.load(os.path.join(path, "centroids.npy")).shape == (8, 15)
    # the manifest's statistics (merged from the write tasks' float64 moments) are those of the table
    f = np.concatenate([np.asarray(r["features"], np.float64) for r in rows]).reshape(-1, 15)
    feats = m["conditioning"]["features"]
    np.testing.assert_allclose(feats["mean"], f.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(feats["std"], f.std(0) + 1e-6, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_report_names_every_bad_file(tables):
    path, summary = tables["continuous"]
    report = load_report(path)
    reasons = {s["source"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(BAD)
    for source, word in BAD.items():
        assert word in reasons[source] and "\n" not in reasons[source], (source, reasons[source])
    assert summary["files_skipped"] == len(BAD) - 1 and summary["files_ignored"] == 1


@pytest.mark.slow
def test_rerun_adds_nothing_and_resume_fills_gaps(tables, corpus, codecs, tmp_path):
    src, _ = tables["continuous"]
    key = [("source", "ascending"), ("chunk", "ascending")]
    before = read_table(src).sort_by(key)
    files = list_shards(src)
    assert 1 < len(files) < len(corpus[1])  # several sources per data file, several data files
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    again = preprocess(str(corpus[0]), src, codecs["continuous"], **OPTS)
    assert again["files_encoded"] == 0 and again["files_already_done"] == len(corpus[1])
    assert {p: os.stat(p).st_mtime_ns for p in list_shards(src)} == mtimes
    assert read_table(src).num_rows == before.num_rows

    # a killed run: one data file written but never committed (its ledger record missing), a stray
    # temp file, an orphan data file, no index/manifest/report yet
    table = tmp_path / "table"
    shutil.copytree(src, table)
    for name in ("index.parquet", "manifest.json", "report.json"):
        (table / name).unlink()
    idx = read_index(str(table))  # from the ledger while no index exists
    assert sorted(idx["source"].to_pylist()) == corpus[1]
    victim = sorted(table.glob("ledger/part-*.json"))[0]
    lost = {s for s, _, _ in json.loads(victim.read_text())["sources"]}
    victim.unlink()
    (table / "latents" / ".tmp-deadbeef-part-x.parquet").write_bytes(b"partial")
    (table / "latents" / "part-orphan.parquet").write_bytes(b"not parquet")
    visible = set(read_index(str(table))["source"].to_pylist())
    assert visible == set(corpus[1]) - lost  # an uncommitted file is never part of the table
    assert read_table(str(table)).num_rows == sum(1 for s in before["source"].to_pylist() if s not in lost)
    resumed = preprocess(str(corpus[0]), str(table), codecs["continuous"], **OPTS)
    assert resumed["files_encoded"] == len(lost) and resumed["files_already_done"] == len(corpus[1]) - len(lost)
    assert not list((table / "latents").glob(".tmp-*")) and not (table / "latents" / "part-orphan.parquet").exists()
    assert read_table(str(table)).sort_by(key).equals(before)
    m, m0 = load_manifest(str(table)), load_manifest(src)
    assert (m["counts"], m["rave"], m["chunk"], m["created"]) == (m0["counts"], m0["rave"], m0["chunk"], m0["created"])
    f, f0 = m["conditioning"]["features"], m0["conditioning"]["features"]  # float64 sums, merged in another order
    np.testing.assert_allclose(f["mean"] + f["std"], f0["mean"] + f0["std"], rtol=1e-9)
    assert (table / "centroids.npy").read_bytes() == (Path(src) / "centroids.npy").read_bytes()

    with pytest.raises(PreprocessError, match="resolution"):  # other settings: refuse, one line
        preprocess(str(corpus[0]), str(table), codecs["continuous"], **{**OPTS, "resolution": 32})
    with pytest.raises(PreprocessError, match="conditioning.ratio=4, this run has 2"):
        preprocess(str(corpus[0]), str(table), codecs["continuous"], **{**OPTS, "condition_ratio": 2})


@pytest.mark.slow
def test_s3_round_trip(tables, corpus, codecs, s3_env, capfd):
    from msprior import storage

    local, _ = tables["discrete"]
    out = "s3://test-bucket/tables/discrete"
    summary = preprocess(str(corpus[0]), out, codecs["discrete"], **{**OPTS, "target_file_mb": 192})
    assert summary["files_encoded"] == len(corpus[1]) and summary["data_files_written"] == 1
    key = [("source", "ascending"), ("chunk", "ascending")]
    assert read_table(out).sort_by(key).equals(read_table(local).sort_by(key))
    m, ml = load_manifest(out), load_manifest(local)
    assert m["counts"] == ml["counts"] and m["rave"] == ml["rave"]
    assert storage.read_bytes(out + "/rave.ts") == Path(codecs["discrete"]).read_bytes()
    assert {s["source"] for s in load_report(out)["skipped"]} == set(BAD)

    # audio read from S3 by the Ray read tasks, too
    fs, _ = storage.filesystem("s3://test-bucket")
    for rel in corpus[1][:2]:
        fs.put_file(str(corpus[0] / rel), f"test-bucket/audio/{rel}")
    s = preprocess("s3://test-bucket/audio", "s3://test-bucket/tables/from-s3", codecs["discrete"],
                   **{**OPTS, "condition_ratio": 0})
    assert s["files_encoded"] == 2 and load_manifest("s3://test-bucket/tables/from-s3")["conditioning"] is None
    t = read_table("s3://test-bucket/tables/from-s3")
    assert "tokens" not in t.column_names and t.num_rows == sum(
        1 for r in read_table(local).to_pylist() if r["source"] in corpus[1][:2])
    out, err = capfd.readouterr()
    assert s3_env.secret_key not in out + err and s3_env.secret_key not in repr(storage.S3Options.from_env())


@pytest.mark.slow
def test_nothing_encodable_exits_nonzero_with_one_line(ray_session, codecs, tmp_path, capsys):
    from msprior.cli import main

    write_bad_files(str(tmp_path / "bad"))
    out = tmp_path / "table"
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--audio", str(tmp_path / "bad"), "--out_path", str(out),
              "--rave", codecs["continuous"], "--min_frames", "32"])
    assert e.value.code == 2
    # stderr may also carry Ray workers' own log lines; ours is exactly one "error:" line
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: nothing could be encoded") and "report.json" in errors[0]
    assert len(json.loads((out / "report.json").read_text())["skipped"]) == len(BAD)


def test_bad_arguments_are_one_line(codecs, tmp_path):
    with pytest.raises(PreprocessError, match="no such directory"):
        preprocess(str(tmp_path / "nope"), str(tmp_path / "t"), codecs["continuous"])
    (tmp_path / "sd.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(PreprocessError, match="state dict"):
        preprocess(str(tmp_path), str(tmp_path / "t"), str(tmp_path / "sd.pt"))


@pytest.mark.slow
def test_gpu_without_gpu_is_one_line(ray_session, corpus, codecs, tmp_path):
    if ray_session.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has a GPU")
    from msprior.devices import DeviceError

    with pytest.raises(DeviceError, match="--gpu 0: no CUDA GPU"):  # one line, naming the flag and the way out
        preprocess(str(corpus[0] / "extra"), str(tmp_path / "t"), codecs["discrete"], gpu=True, **OPTS)


@pytest.mark.slow
def test_data_files_mix_the_corpus_and_the_old_decode_path_gives_the_same_table(ray_session, codecs, tmp_path):
    """24 short files, tasks of 6: no data file holds one contiguous run of the sorted listing (the
    pending files are shuffled with the recorded seed before grouping). The old path (decode threads
    inside the encoder) writes the same rows."""
    from tests.test_preprocess_plan import contiguous

    rng = np.random.default_rng(5)
    (tmp_path / "c").mkdir()
    for i in range(24):
        sf.write(str(tmp_path / "c" / f"f{i:02d}.wav"), 0.4 * melody(1.0, 44100, rng), 44100)
    kw = {**OPTS, "files_per_task": 6, "target_file_mb": 0.001, "condition_ratio": 0}
    new = preprocess(str(tmp_path / "c"), str(tmp_path / "new"), codecs["discrete"], **kw)
    listing = [(f"f{i:02d}.wav", "", 0) for i in range(24)]
    idx = read_index(str(tmp_path / "new"))
    per_file = {}
    for src, f in zip(idx["source"].to_pylist(), idx["file"].to_pylist()):
        per_file.setdefault(f, []).append(src)
    assert new["files_encoded"] == 24 and len(per_file) >= 3, per_file
    assert not any(contiguous(srcs, listing) for srcs in per_file.values()), per_file
    assert json.loads((tmp_path / "new" / "intent.json").read_text())["shuffle_seed"] == 0
    preprocess(str(tmp_path / "c"), str(tmp_path / "old"), codecs["discrete"], decode_in_encoder=True, **kw)
    key = [("source", "ascending"), ("chunk", "ascending")]
    assert read_table(str(tmp_path / "old")).sort_by(key).equals(read_table(str(tmp_path / "new")).sort_by(key))


def test_long_files_decode_in_their_own_stage_into_the_same_table(ray_session, codecs, tmp_path, monkeypatch):
    """A file decoding past decode.LONG_DECODED goes to a decode stage of its own (its `memory=`
    does not throttle every other decode); the two stages feed one encoder pool, same table."""
    from msprior.data import decode, flow

    rng = np.random.default_rng(6)
    (tmp_path / "c").mkdir()
    for i, seconds in enumerate([1.0] * 5 + [3.0] * 2):
        sf.write(str(tmp_path / "c" / f"f{i}.wav"), 0.4 * melody(seconds, 44100, rng), 44100)
    seen, build = [], flow.build_stages
    monkeypatch.setattr(flow, "build_stages", lambda branches, *a: seen.append([m for _, m in branches]) or build(
        branches, *a))
    kw = {**OPTS, "files_per_task": 3, "target_file_mb": 0.001, "condition_ratio": 0}
    monkeypatch.setattr(decode, "LONG_DECODED", 4 * 2 * 44100 * 2)  # 2 s of PCM16 decoded: the 3 s files are long
    split = preprocess(str(tmp_path / "c"), str(tmp_path / "split"), codecs["discrete"], **kw)
    monkeypatch.setattr(decode, "LONG_DECODED", 1 << 40)
    one = preprocess(str(tmp_path / "c"), str(tmp_path / "one"), codecs["discrete"], **kw)
    assert len(seen[0]) == 2 and seen[0][0] < seen[0][1] and len(seen[1]) == 1, seen
    assert split["files_encoded"] == one["files_encoded"] == 7
    key = [("source", "ascending"), ("chunk", "ascending")]
    assert read_table(str(tmp_path / "split")).sort_by(key).equals(read_table(str(tmp_path / "one")).sort_by(key))
