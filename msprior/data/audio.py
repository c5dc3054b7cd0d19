"""Decode one audio file to mono float32 at the RAVE rate, and cut it into chunks.

Decoding is libsndfile (soundfile): wav/aiff/flac/ogg/opus/mp3 and the rest of its formats; what it
cannot open (m4a/aac/alac, wma, ac3, the soundtrack of a video file) goes through FFmpeg's decoders
bundled in the PyAV wheel (`av`; no system ffmpeg). Downmix is the mean of the channels; resampling
is soxr's band-limited "HQ" filter, for both decoders. Any file that cannot be used raises `SkipFile`
with a short reason that ends up in report.json.

The original MSPrior's preprocessing options live here too: `normalize` (per chunk, its peak to
0 dBFS with at most 30 dB of gain: RAVE's `normalize_signal`), `trim_leading_silence` (its
`--silence_threshold N`: ffmpeg's `silenceremove=1:0:-NdB`, which drops the audio before the first
20 ms whose RMS exceeds -N dBFS), and the short-file policy: a file shorter than one training window
is padded with silence to one window (`iter_chunks(pad=True)`) instead of being skipped.
"""

from __future__ import annotations

import io
import math
import re
from typing import List, Optional, Tuple

import numpy as np

# extensions listed as audio; everything else under the corpus is ignored (and reported as such)
AUDIO_EXTENSIONS = {
    "wav", "wave", "bwf", "rf64", "w64", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc",
    "caf", "au", "snd", "sd2", "voc", "wv", "mat", "pvf", "xi", "htk", "sds", "avr", "paf", "nist",
    "ircam", "mpc", "sf",
    # through PyAV (FFmpeg): compressed audio soundfile cannot open, and video soundtracks
    "m4a", "m4b", "aac", "alac", "wma", "ac3", "eac3", "amr", "mka", "mp2", "ape", "tta",
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "3gp", "flv", "ts",
}

SILENCE_PEAK = 1e-5  # below this peak amplitude (-100 dBFS) a whole file counts as silent


class SkipFile(Exception):
    """A file that is skipped (and reported) rather than encoded."""


def is_audio_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in AUDIO_EXTENSIONS


def decode(data: bytes, target_sr: int, max_seconds: Optional[float] = None) -> Tuple[np.ndarray, int, int]:
    """Encoded file bytes -> (mono float32 samples at target_sr, original rate, channels).

    `max_seconds` reads only the start of the file (for samples).
    """
    import soundfile as sf
    import soxr

    if len(data) == 0:
        raise SkipFile("empty file (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            frames = -1 if max_seconds is None else int(max_seconds * f.samplerate)
            x, sr = f.read(frames, dtype="float32", always_2d=True), f.samplerate
    except Exception as e:  # libsndfile's message says what it found; FFmpeg may still read it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^Error opening <[^>]*>: ", "", msg)  # drop the in-memory file's repr
        with _AvReader.open(io.BytesIO(data), msg) as f:
            frames = -1 if max_seconds is None else int(max_seconds * f.samplerate)
            x, sr = f.read(frames, dtype="float32", always_2d=True), f.samplerate
    if x.shape[0] == 0:
        raise SkipFile("no audio samples")
    if not np.isfinite(x).all():
        raise SkipFile("contains NaN or infinite samples")
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if np.abs(mono).max() < SILENCE_PEAK:
        raise SkipFile("silent (peak below -100 dBFS)")
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr), int(x.shape[1])


def chunk_bounds(n: int, chunk: int, ratio: int, min_frames: int) -> List[Tuple[int, int]]:
    """Sample ranges of the chunks of an n-sample file.

    Chunks hold `chunk` samples (a multiple of `ratio`). A file shorter than one chunk is one
    shorter chunk. The tail after the last full chunk is its own chunk when it has at least
    `min_frames` frames, else it joins the chunk before it (nothing is dropped). A file with
    fewer than `min_frames` frames in all yields no chunk (the caller skips and reports it).
    """
    if math.ceil(n / ratio) < min_frames:
        return []
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) > 1 and math.ceil((bounds[-1][1] - bounds[-1][0]) / ratio) < min_frames:
        bounds[-2] = (bounds[-2][0], bounds[-1][1])
        bounds.pop()
    return bounds


class _AvReader:
    """The part of soundfile.SoundFile that `stream` and `decode` use, over FFmpeg (PyAV): the first
    audio stream, decoded to float32 (frames, channels) at its own rate and channel count."""

    @classmethod
    def open(cls, src, soundfile_msg: str) -> "_AvReader":
        """Open `src` (path or file object), or SkipFile naming what both decoders said."""
        import av

        try:
            container = av.open(src)
        except Exception as e:
            raise SkipFile(f"cannot decode: {soundfile_msg}; FFmpeg: {_first_line(e)}") from None
        if not container.streams.audio:
            container.close()
            raise SkipFile("no audio stream (a video without sound?)")
        return cls(container)

    def __init__(self, container):
        import av

        self.container = container
        self._frames = self._decode(container, av.AudioResampler(format="fltp"))  # planar float, same rate
        try:
            first = next(self._frames, None)
        except Exception as e:
            container.close()
            raise SkipFile(f"cannot decode: FFmpeg: {_first_line(e)}") from None
        if first is None:
            container.close()
            raise SkipFile("no audio samples")
        self.samplerate, self.channels = first[1], first[0].shape[1]
        self._buf = first[0]

    @staticmethod
    def _decode(container, resampler):
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                yield out.to_ndarray().T.astype(np.float32, copy=False), int(out.sample_rate)
        for out in resampler.resample(None):  # flush
            yield out.to_ndarray().T.astype(np.float32, copy=False), int(out.sample_rate)

    def read(self, frames: int = -1, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        parts, have = [self._buf], len(self._buf)
        while frames < 0 or have < frames:
            nxt = next(self._frames, None)
            if nxt is None:
                break
            if nxt[0].shape[1] != self.channels:  # a stream that changes layout: downmix the frame
                nxt = (np.repeat(nxt[0].mean(axis=1, keepdims=True), self.channels, axis=1), nxt[1])
            parts.append(nxt[0])
            have += len(nxt[0])
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        n = len(x) if frames < 0 else min(frames, len(x))
        out, self._buf = x[:n], x[n:]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __enter__(self) -> "_AvReader":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# --- the original's options: peak normalisation, leading silence ----------------------------------

MAX_GAIN_DB = 30.0  # RAVE's normalize_signal: never more gain than this
SILENCE_WINDOW_S = 0.02  # ffmpeg silenceremove's RMS window


def normalize(x: np.ndarray, max_gain_db: float = MAX_GAIN_DB) -> np.ndarray:
    """Peak to 0 dBFS with at most `max_gain_db` of gain (RAVE's `normalize_signal`, per chunk)."""
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak == 0.0:
        return x
    gain_db = min(max_gain_db, -20.0 * math.log10(peak))
    return (x * 10 ** (gain_db / 20)).astype(np.float32)


def trim_leading_silence(blocks, threshold_db: float, sr: int):
    """Drop the audio before the first 20 ms window whose RMS exceeds -threshold_db dBFS, then pass
    the rest through (ffmpeg's `silenceremove=1:0:-NdB`, the original's --silence_threshold N).
    A stream that never gets louder raises SkipFile."""
    level, win = 10 ** (-abs(threshold_db) / 20), max(1, int(SILENCE_WINDOW_S * sr))
    pending = np.zeros(0, np.float32)
    blocks = iter(blocks)
    for x in blocks:
        pending = np.concatenate([pending, x])
        n = len(pending) // win * win
        if n == 0:
            continue
        rms = np.sqrt((pending[:n].reshape(-1, win).astype(np.float64) ** 2).mean(axis=1))
        loud = np.flatnonzero(rms > level)
        if len(loud):
            yield pending[loud[0] * win:]
            yield from blocks
            return
        pending = pending[n:]
    raise SkipFile(f"silent: never above -{abs(threshold_db):g} dBFS (--silence_threshold)")


# --- streaming: a long file is never whole in memory ------------------------------------------------

BLOCK_SECONDS = 10.0  # decoded per read: 10 s of 48 kHz stereo float32 is 3.8 MB


def stream(path_or_file, target_sr: int, block_seconds: float = BLOCK_SECONDS):
    """Yield mono float32 blocks at `target_sr` from an audio file, read `block_seconds` at a time
    through a streaming soxr resampler (the same samples as `decode`'s one-shot resample).

    Raises SkipFile (empty, cannot decode, NaN/inf, no samples, silent); silence is only known at
    the end, so the caller must drop what it made of a file that raises late.
    """
    import os

    import soundfile as sf
    import soxr

    if isinstance(path_or_file, str) and os.path.getsize(path_or_file) == 0:
        raise SkipFile("empty file (0 bytes)")
    try:
        f = sf.SoundFile(path_or_file)
    except Exception as e:  # not a libsndfile format: FFmpeg's decoders (PyAV) may read it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^Error opening [<'][^>']*[>']: ", "", msg)
        f = _AvReader.open(path_or_file, msg)
    with f:
        sr, channels = int(f.samplerate), int(f.channels)
        rs = soxr.ResampleStream(sr, target_sr, 1, dtype="float32", quality="HQ") if sr != target_sr else None
        peak, total = 0.0, 0
        block = max(1, int(block_seconds * sr))
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)
            except Exception as e:
                raise SkipFile(f"cannot decode: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
            last = x.shape[0] < block
            total += x.shape[0]
            if x.shape[0] and not np.isfinite(x).all():
                raise SkipFile("contains NaN or infinite samples")
            mono = x.mean(axis=1) if channels > 1 else x[:, 0]
            if len(mono):
                peak = max(peak, float(np.abs(mono).max()))
            out = rs.resample_chunk(np.ascontiguousarray(mono), last=last) if rs is not None else mono
            if len(out):
                yield np.ascontiguousarray(out, dtype=np.float32)
            if last:
                break
    if total == 0:
        raise SkipFile("no audio samples")
    if peak < SILENCE_PEAK:
        raise SkipFile("silent (peak below -100 dBFS)")


def iter_chunks(blocks, chunk: int, ratio: int, min_frames: int, sr: int, pad: bool = False, on_pad=None):
    """Cut a stream of sample blocks into the chunks of `chunk_bounds`, on the fly: yields
    (start sample, float32 samples). Holds at most two chunks plus one block.

    A chunk is final once what follows it cannot be a lone short tail that would join it: more than
    a chunk follows, or at least `min_frames` frames do. A stream under `min_frames` frames raises
    SkipFile, or with `pad` becomes one chunk of `min_frames` frames: the audio, then silence
    (`on_pad(seconds of silence added)` is called first); under one RAVE frame it is skipped still.
    """
    buf = np.zeros(0, np.float32)
    start, n = 0, 0  # sample index of buf[0]; samples seen

    def final(rest: int) -> bool:
        return rest > chunk or math.ceil(rest / ratio) >= min_frames

    for x in blocks:
        n += len(x)
        buf = np.concatenate([buf, x]) if len(buf) else np.asarray(x, np.float32)
        while len(buf) >= chunk and final(len(buf) - chunk):
            yield start, buf[:chunk].copy()
            buf, start = buf[chunk:], start + chunk
    if math.ceil(n / ratio) < min_frames and pad and n >= ratio:  # under one RAVE frame: nothing to pad
        if on_pad is not None:
            on_pad((min_frames * ratio - n) / sr)
        yield 0, np.concatenate([buf, np.zeros(min_frames * ratio - n, np.float32)])
        return
    if math.ceil(n / ratio) < min_frames:
        raise SkipFile(f"too short: {n / sr:.2f} s is under one training window "
                       f"({min_frames} frames = {min_frames * ratio / sr:.2f} s)")
    if len(buf):
        yield start, buf  # a file shorter than a chunk, a tail, or the last chunk with its short tail
