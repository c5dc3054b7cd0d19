"""Structured audio for bench/quality.py: synthetic speech (espeak-ng) and General-MIDI music
(MIDI written here, rendered by fluidsynth with the FluidR3_GM soundfont). Never sine tones.

Every file is exactly FILE_SAMPLES samples (2^20 at 44.1 kHz mono, 23.78 s): one chunk of the
original MSPrior's preprocessing (2^ceil(log2(16 s x sr)) samples) and one `msprior preprocess
--num_secs FILE_SECS` chunk of 1024 frames at RAVE ratio 1024, so both tools see whole chunks of
the same length and sample windows the same way. Needs `apt-get install -y espeak-ng fluidsynth
fluid-soundfont-gm` (Debian). Deterministic in (seed, file index).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
from typing import List

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SR = 44100
FILE_SAMPLES = 1 << 20  # 23.78 s: one original-MSPrior chunk (16 s rounded up to a power of two)
FILE_SECS = FILE_SAMPLES / SR
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
APT = "apt-get update && apt-get install -y espeak-ng fluidsynth fluid-soundfont-gm"

# espeak-ng voice + variant: 10 voices (languages, male/female variants)
VOICES = ["en+m3", "en-us+f2", "en-gb-scotland+m1", "fr+f3", "de+m4", "es+f1", "it+m2", "nl+f4",
          "pt+m5", "sv+f5"]

_WORDS = {
    "subject": ["the old sailor", "a quiet child", "my neighbour", "the orchestra", "every farmer",
                "the small dog", "our teacher", "a tired traveller", "the river", "the city council",
                "her brother", "the machine", "a young painter", "the wind", "nobody in the room"],
    "verb": ["carried", "remembered", "painted", "followed", "discovered", "forgot", "described",
             "opened", "answered", "watched", "repaired", "counted", "measured", "ignored", "sang"],
    "object": ["a basket of apples", "the long letter", "seven wooden chairs", "the northern road",
               "an unfinished song", "the broken clock", "a map of the valley", "the morning train",
               "two silver coins", "the garden gate", "a question about time", "the last candle"],
    "tail": ["before the storm arrived", "without saying a word", "in the middle of the night",
             "while the bells were ringing", "after a very long winter", "near the harbour",
             "for the third time this week", "because nobody else would", "under a grey sky",
             "slowly and carefully", "with great surprise", "at the edge of the forest"],
}


def need_tools() -> None:
    """Exit with one line when espeak-ng, fluidsynth or the GM soundfont is missing."""
    missing = [t for t in ("espeak-ng", "fluidsynth") if shutil.which(t) is None]
    if not os.path.exists(SOUNDFONT):
        missing.append(SOUNDFONT)
    if missing:
        raise SystemExit(f"bench/quality: missing {', '.join(missing)}; install with: {APT}")


# --- speech --------------------------------------------------------------------------------------


def sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    text = f"{w['subject']} {w['verb']} {w['object']} {w['tail']}."
    if rng.random() < 0.3:
        text = f"Did {w['subject']} really say that? " + text
    return text[0].upper() + text[1:]


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """float32 samples at SR (espeak-ng renders at 22.05 kHz: upsampled x2)."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", f.name, text],
                       check=True, capture_output=True)
        x, sr = sf.read(f.name, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    return resample_poly(x, SR, sr).astype(np.float32)


def speech_file(rng: random.Random) -> np.ndarray:
    """Utterances of one voice (varied speed and pitch) separated by short pauses."""
    voice = rng.choice(VOICES)
    parts, n = [], 0
    while n < FILE_SAMPLES:
        text = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
        x = espeak(text, voice, rng.randint(130, 190), rng.randint(30, 70))
        pause = np.zeros(int(SR * rng.uniform(0.15, 0.6)), np.float32)
        parts += [x, pause]
        n += len(x) + len(pause)
    return np.concatenate(parts)


# --- music: a tiny Standard MIDI File writer ------------------------------------------------------

TICKS = 480  # per quarter note
PROGRESSIONS = [[0, 5, 3, 4], [0, 3, 4, 0], [5, 3, 0, 4], [0, 4, 5, 3], [1, 4, 0, 0]]
MAJOR = [0, 2, 4, 5, 7, 9, 11]
MELODY = [0, 4, 11, 24, 40, 56, 65, 71, 73, 80]  # GM programs: piano, e-piano, vibes, guitar, ...
HARMONY = [0, 19, 25, 48, 49, 88, 89]
BASS = [32, 33, 34, 38]


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.insert(0, (n & 0x7F) | 0x80)
    return bytes(out)


def midi_bytes(events: List[tuple], bpm: float) -> bytes:
    """A format-0 SMF from (tick, status, data1, data2) events (channel in the status byte)."""
    body = b"\x00\xff\x51\x03" + int(60_000_000 / bpm).to_bytes(3, "big")  # tempo
    last = 0
    for tick, status, d1, d2 in sorted(events, key=lambda e: (e[0], e[1] & 0xF0 != 0x80)):
        msg = bytes([status, d1]) if status & 0xF0 == 0xC0 else bytes([status, d1, d2])
        body += _varlen(tick - last) + msg
        last = tick
    body += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS) + b"MTrk" + struct.pack(">I", len(body)) + body


def _note(ev: list, ch: int, tick: int, dur: int, pitch: int, vel: int) -> None:
    ev.append((tick, 0x90 | ch, pitch, vel))
    ev.append((tick + dur, 0x80 | ch, pitch, 0))


def _bar(ev: list, rng: random.Random, t: int, key: int, degree: int, drums: bool) -> None:
    """One 4/4 bar: a held chord, a bass line, an 8th/quarter-note melody, optional drums."""
    bar = 4 * TICKS
    triad = [key + 48 + MAJOR[(degree + i) % 7] + 12 * ((degree + i) // 7) for i in (0, 2, 4)]
    for p in triad:
        _note(ev, 1, t, bar - 10, p, rng.randint(50, 70))
    for beat in range(4):
        _note(ev, 2, t + beat * TICKS, TICKS - 20, triad[0] - 12 + (7 if beat == 2 else 0), 80)
    pos = 0
    while pos < bar:
        dur = rng.choice([TICKS // 2, TICKS // 2, TICKS, TICKS * 3 // 2])
        dur = min(dur, bar - pos)
        if rng.random() > 0.15:  # some rests
            step = rng.choice([0, 2, 4, 0, 2, 4, 1, 3, 5, 6])
            _note(ev, 0, t + pos, dur - 10, key + 60 + MAJOR[(degree + step) % 7], rng.randint(70, 105))
        pos += dur
    if drums:
        for eighth in range(8):
            tt = t + eighth * TICKS // 2
            _note(ev, 9, tt, 60, 42, 60)  # closed hi-hat
            if eighth in (0, 4):
                _note(ev, 9, tt, 60, 36, 100)  # kick
            if eighth in (2, 6):
                _note(ev, 9, tt, 60, 38, 90)  # snare


def music_midi(rng: random.Random) -> bytes:
    bpm = rng.uniform(80, 150)
    key = rng.randint(0, 11)
    ev: list = [(0, 0xC0, rng.choice(MELODY), 0), (0, 0xC1, rng.choice(HARMONY), 0), (0, 0xC2, rng.choice(BASS), 0)]
    bars = int(FILE_SECS * bpm / 240) + 2  # a little longer than the file
    prog = rng.choice(PROGRESSIONS)
    drums = rng.random() < 0.7
    for b in range(bars):
        _bar(ev, rng, b * 4 * TICKS, key, prog[b % len(prog)], drums)
    return midi_bytes(ev, bpm)


def music_file(rng: random.Random) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        mid, wav = os.path.join(d, "m.mid"), os.path.join(d, "m.wav")
        with open(mid, "wb") as f:
            f.write(music_midi(rng))
        subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(SR), "-T", "wav", "-F", wav, SOUNDFONT, mid],
                       check=True, capture_output=True)
        x, sr = sf.read(wav, dtype="float32")
    assert sr == SR, sr
    return x.mean(axis=1) if x.ndim > 1 else x


# --- the corpus ------------------------------------------------------------------------------------


def fit(x: np.ndarray) -> np.ndarray:
    """Exactly FILE_SAMPLES samples (zero-padded or cut), peak 0.8."""
    x = np.pad(x, (0, max(0, FILE_SAMPLES - len(x))))[:FILE_SAMPLES]
    return (0.8 * x / max(1e-6, float(np.abs(x).max()))).astype(np.float32)


def make_corpus(root: str, num_files: int, heldout: int, seed: int, echo=print) -> None:
    """`root/train/*.wav` and `root/heldout/*.wav`, alternating speech and music; written once
    (a finished corpus has `root/DONE`)."""
    if os.path.exists(os.path.join(root, "DONE")):
        return
    need_tools()
    for sub in ("train", "heldout"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(num_files):
        rng = random.Random(f"{seed}:{i}")
        kind = "speech" if i % 2 == 0 else "music"
        sub = "heldout" if i >= num_files - heldout else "train"
        path = os.path.join(root, sub, f"{i:03d}_{kind}.wav")
        if not os.path.exists(path):
            x = speech_file(rng) if kind == "speech" else music_file(rng)
            sf.write(path + ".tmp.wav", fit(x), SR, subtype="PCM_16")
            os.replace(path + ".tmp.wav", path)
        echo(f"corpus: {i + 1}/{num_files} files", end="\r")
    echo("")
    open(os.path.join(root, "DONE"), "w").close()
