"""Decode one audio file to mono float32 at the RAVE rate, and cut it into chunks.

Decoding is libsndfile (soundfile): wav/aiff/flac/ogg/opus/mp3 and the rest of its formats;
resampling is soxr's band-limited "HQ" filter. Any file that cannot be used raises `SkipFile`
with a short reason that ends up in report.json.
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
    except Exception as e:  # libsndfile's message says what it found
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^Error opening <[^>]*>: ", "", msg)  # drop the in-memory file's repr
        raise SkipFile(f"cannot decode: {msg}") from None
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
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^Error opening [<'][^>']*[>']: ", "", msg)
        raise SkipFile(f"cannot decode: {msg}") from None
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


def iter_chunks(blocks, chunk: int, ratio: int, min_frames: int, sr: int):
    """Cut a stream of sample blocks into the chunks of `chunk_bounds`, on the fly: yields
    (start sample, float32 samples). Holds at most two chunks plus one block.

    A chunk is final once what follows it cannot be a lone short tail that would join it: more than
    a chunk follows, or at least `min_frames` frames do. Raises SkipFile when the whole stream is
    under `min_frames` frames.
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
    if math.ceil(n / ratio) < min_frames:
        raise SkipFile(f"too short: {n / sr:.2f} s is under one training window "
                       f"({min_frames} frames = {min_frames * ratio / sr:.2f} s)")
    if len(buf):
        yield start, buf  # a file shorter than a chunk, a tail, or the last chunk with its short tail
