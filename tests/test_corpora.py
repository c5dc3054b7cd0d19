"""Corpora as people have them: compressed formats and video soundtracks (PyAV: FFmpeg's decoders in
a wheel), one-shot folders (short files padded to one training window), the original's --normalize
and --silence_threshold, and a one-file corpus that validates on chunks it never trains on.

The compressed files are encoded here by PyAV from generated tones (no binary fixture).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from msprior.data import audio
from msprior.data.audio import SkipFile

SR = 44100
FIXTURES = Path(__file__).parent / "fixtures"


def tone(seconds: float, freq: float = 440.0, sr: int = SR, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)])  # (channels, n)


def encode(path: Path, x: np.ndarray, codec: str, sr: int = SR, fmt=None, video: bool = False) -> Path:
    """Write `x` (channels, n) with PyAV's encoder `codec` (and a black video stream first)."""
    import av

    layout = "mono" if x.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as c:
        if video:  # the picture is the first stream, as in a film
            v = c.add_stream("mpeg4", rate=10)
            v.width = v.height = 32
            v.pix_fmt = "yuv420p"
        s = c.add_stream(codec, rate=sr, layout=layout)  # every stream is declared before the first packet
        if video:
            for _ in range(int(x.shape[1] / sr * 10)):
                c.mux(v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
            c.mux(v.encode(None))
        step, pts = s.codec_context.frame_size or 1024, 0
        for i in range(0, x.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + step]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, pts
            pts += frame.samples
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.mark.parametrize("name, codec, fmt, video", [
    ("a.mp3", "libmp3lame", None, False),
    ("a.m4a", "aac", None, False),
    ("a.aac", "aac", "adts", False),
    ("a.opus", "libopus", None, False),
    ("clip.mp4", "aac", None, True),   # a video's soundtrack
    ("clip.mkv", "libopus", None, True),
])
def test_compressed_audio_and_video_soundtracks_decode_downmixed_and_resampled(tmp_path, name, codec, fmt, video):
    sr = 48000 if codec == "libopus" else SR
    path = encode(tmp_path / name, tone(2.0, 440.0, sr, channels=2), codec, sr, fmt, video)
    assert audio.is_audio_name(name)
    x = np.concatenate(list(audio.stream(str(path), 32000, block_seconds=0.5)))  # several blocks
    assert abs(len(x) / 32000 - 2.0) < 0.1
    assert abs(peak_hz(x[3200:-3200], 32000) - 440.0) < 5  # the tone, at the new rate
    assert 0.3 < np.abs(x).max() < 0.6  # the mean of the two channels (0.5 and 0.35)
    whole, orig_sr, channels = audio.decode(path.read_bytes(), 32000)  # the one-shot reader agrees
    assert (orig_sr, channels) == (sr, 2) and abs(len(whole) - len(x)) <= 32


def test_bad_compressed_files_are_reported_in_one_line(tmp_path):
    good = encode(tmp_path / "good.m4a", tone(1.0), "aac")
    (tmp_path / "cut.m4a").write_bytes(good.read_bytes()[:200])  # the moov atom is gone
    with pytest.raises(SkipFile, match=r"^cannot decode: .*FFmpeg: "):
        list(audio.stream(str(tmp_path / "cut.m4a"), SR))
    import av

    with av.open(str(tmp_path / "silent_film.mp4"), "w") as c:  # a video without sound
        v = c.add_stream("mpeg4", rate=10)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        for _ in range(5):
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        c.mux(v.encode(None))
    with pytest.raises(SkipFile, match="no audio stream"):
        list(audio.stream(str(tmp_path / "silent_film.mp4"), SR))


def test_short_files_are_padded_to_one_window_and_say_so():
    ratio, min_frames = 1024, 40
    x = tone(0.5)[0]  # 22050 samples: 22 frames
    pads = []
    (chunk,) = list(audio.iter_chunks([x], 64 * ratio, ratio, min_frames, SR, pad=True, on_pad=pads.append))
    assert chunk[0] == 0 and len(chunk[1]) == min_frames * ratio
    np.testing.assert_array_equal(chunk[1][:len(x)], x)
    assert not chunk[1][len(x):].any() and pads == [pytest.approx((min_frames * ratio - len(x)) / SR)]
    with pytest.raises(SkipFile, match="too short"):  # the policy `--short skip`
        list(audio.iter_chunks([x], 64 * ratio, ratio, min_frames, SR))
    with pytest.raises(SkipFile, match="too short"):  # under one RAVE frame: nothing to pad
        list(audio.iter_chunks([x[:500]], 64 * ratio, ratio, min_frames, SR, pad=True))
    long = tone(3.0)[0]  # a file of a window or more is never padded
    got = list(audio.iter_chunks([long], 64 * ratio, ratio, min_frames, SR, pad=True, on_pad=pads.append))
    assert len(pads) == 1 and sum(len(c) for _, c in got) == len(long)


def test_normalize_is_ravess_normalize_signal():
    x = tone(0.1, amp=0.25)[0]
    assert np.abs(audio.normalize(x)).max() == pytest.approx(1.0, rel=1e-4)
    quiet = tone(0.1, amp=1e-3)[0]  # -60 dBFS: at most +30 dB
    assert np.abs(audio.normalize(quiet)).max() == pytest.approx(10 ** (30 / 20) * 1e-3, rel=1e-3)
    assert not audio.normalize(np.zeros(10, np.float32)).any()


def test_silence_threshold_trims_only_the_leading_silence():
    lead = np.full(SR, 1e-3, np.float32)  # one second at -60 dBFS, then a tone, a pause and a tone
    body = np.concatenate([tone(0.5)[0], np.zeros(SR // 2, np.float32), tone(0.5)[0]])
    blocks = [np.concatenate([lead, body])[i:i + 4096] for i in range(0, SR + len(body), 4096)]
    out = np.concatenate(list(audio.trim_leading_silence(blocks, 40, SR)))
    assert len(body) <= len(out) < len(body) + int(0.02 * SR)  # within one 20 ms window of the tone
    np.testing.assert_array_equal(out[-len(body):], body)  # the pause inside is kept
    assert len(np.concatenate(list(audio.trim_leading_silence(blocks, 70, SR)))) == SR + len(body)
    with pytest.raises(SkipFile, match="silence_threshold"):
        list(audio.trim_leading_silence([lead], 40, SR))


# --- end to end: preprocess and train --------------------------------------------------------------

TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.seq_len=32",
        "optim.warmup_steps=1", "train.val_batches=1"]


def _msprior(*argv: str) -> None:
    from msprior.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code in (0, None), argv


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_folder_of_fifty_one_second_mp3s_preprocesses_and_trains(ray_session, tmp_path):
    from msprior.data import load_manifest, read_table

    shots = tmp_path / "one_shots"
    shots.mkdir()
    rng = np.random.default_rng(0)
    for i in range(50):
        x = tone(1.0, float(rng.uniform(100, 1000))) * np.exp(-4 * np.arange(SR) / SR).astype(np.float32)
        encode(shots / f"hit_{i:02d}.mp3", x, "libmp3lame")
    encode(shots / "pad.m4a", tone(1.0, 330.0, channels=2), "aac")
    table, storage = str(tmp_path / "table"), str(tmp_path / "runs")
    _msprior("preprocess", "--audio", str(shots), "--out_path", table, "--rave",
             str(FIXTURES / "rave" / "v2_discrete.ts"), "--batch_size", "16")
    m = load_manifest(table)
    rows = read_table(table).to_pylist()
    assert m["counts"]["files_ok"] == 51 and m["counts"]["files_padded"] == 51  # every file padded, none skipped
    assert {r["source"] for r in rows} == {f"hit_{i:02d}.mp3" for i in range(50)} | {"pad.m4a"}
    assert all(r["frames"] == 257 for r in rows)  # one window (the default --min_frames) each
    _msprior("train", "--db_path", table, "--name", "shots", "--max_steps", "3", "--val_every", "3",
             "--batch_size", "4", "--storage_path", storage, "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}",
             *sum((["--override", o] for o in TINY), []))
    assert os.path.exists(os.path.join(storage, "shots", "run.json"))


def _one_file_table(tmp_path, seconds: float, num_secs: float = 2.0):
    from msprior.codec import save_codec
    from msprior.data.preprocess import PreprocessRequest, preprocess
    from msprior.data.synthetic import melody

    import soundfile as sf

    corpus = tmp_path / "one"
    corpus.mkdir(parents=True)
    sf.write(str(corpus / "take.wav"), 0.4 * melody(seconds, SR, np.random.default_rng(1)), SR)
    rave = save_codec(str(tmp_path / "codec.ts"), discrete=True)
    out = str(tmp_path / "table")
    preprocess(PreprocessRequest(str(corpus), out, rave, num_secs=num_secs, min_frames=16, condition_ratio=0,
                                 progress=False))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_one_file_corpus_validates_on_chunks_it_never_trains_on(ray_session, tmp_path):
    from msprior.data.layout import open_data, validation_windows
    from msprior.data.reader import DataError, ReadSpec, open_table, read_split

    table = open_table(_one_file_table(tmp_path, 21.0), val_fraction=0.2, seed=0)
    chunks = int(table.index["chunks"][0].as_py())
    assert table.val_sources == [] and table.val_from == chunks - round(0.2 * chunks)
    val, train = read_split(table, val=True), read_split(table, val=False)
    assert set(val["chunk"].to_pylist()) == set(range(table.val_from, chunks))
    assert set(train["chunk"].to_pylist()) == set(range(table.val_from))
    data = open_data(table, ReadSpec.of(table))
    assert (data.train_chunks, data.val_chunks) == (table.val_from, chunks - table.val_from)
    val_frames = np.concatenate(val.column("rave").to_pylist()).reshape(-1, table.manifest["rave"]["num_quantizers"])
    windows = validation_windows(data, 15, 2, 4, seed=0)
    for w in (w for b in windows for w in b["rave"]):  # each validation window lies in the last chunks
        hits = [i for i in range(len(val_frames) - 15) if np.array_equal(val_frames[i:i + 16], w)]
        assert hits, "a validation window outside the validation chunks"

    with pytest.raises(DataError, match="one file of one chunk"):
        open_table(_one_file_table(tmp_path / "short", 3.0, num_secs=8.0), val_fraction=0.05, seed=0)
