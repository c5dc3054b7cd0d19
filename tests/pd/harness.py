"""Run a Pd patch headless with recorders attached, the way the test drives the example patches.

The example patch is used as it ships: its `#X` records are kept and new objects are APPENDED to
its top-level canvas (Pd numbers objects in file order, so existing connections stay valid):
  * a `[table]` + `[tabwrite~]` per recorded nn~ outlet, written to a 32-bit wav by `[soundfiler]`;
  * `[print nn<K>]` on each nn~'s info outlet (its last outlet), banged at load: nn~ answers with
    `loaded`, `methods`, `attributes`, `dim`, ... lines on stderr;
  * timed messages (`[delay ms]` -> `[msg(` -> the nn~ object's left inlet), in Pd's logical time;
  * a source signal summed into an inlet ([adc~] is silent under -noaudio);
  * at the end: `bufsize 0` to every nn~ (joins its compute thread), `; pd dsp 0`, `; pd quit`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import wave
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

SR = 44100
PD_HEAD = "#N canvas 0 50 900 700 12;"


def records(text: str) -> List[str]:
    """A .pd file's records (';'-terminated, may span lines; '\\;' is an escaped semicolon)."""
    return [r.strip().replace("\n", " ") for r in re.split(r"(?<!\\);\s*(?:\n|$)", text) if r.strip()]


def top_level_objects(recs: List[str]) -> List[str]:
    """The records that are objects of the top-level canvas, in Pd's numbering order."""
    objs, depth = [], 0
    for r in recs[1:]:  # recs[0] opens the top-level canvas
        if r.startswith("#N canvas"):
            depth += 1
        elif r.startswith("#X restore"):
            depth -= 1
            if depth == 0:
                objs.append(r)
        elif depth == 0 and re.match(r"#X (obj|msg|floatatom|symbolatom|text|listbox) ", r):
            objs.append(r)
    return objs


@dataclass
class NnObject:
    index: int
    model: str
    method: str


def nn_objects(text: str) -> List[NnObject]:
    """Every `[nn~ model method ...]` of the top-level canvas (flags like -d skipped)."""
    out = []
    for i, r in enumerate(top_level_objects(records(text))):
        words = r.split()
        if len(words) > 4 and words[1] == "obj" and words[4] == "nn~":
            args = [w for w in words[5:] if not w.startswith("-")]
            out.append(NnObject(i, args[0] if args else "", args[1] if len(args) > 1 else "forward"))
    return out


@dataclass
class Instrumented:
    """A patch plus what to append; `build()` returns the .pd text."""
    text: str
    extra: List[str] = field(default_factory=list)
    links: List[Tuple[int, int, int, int]] = field(default_factory=list)
    tables: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # name -> (object, outlet)
    recorders: Dict[str, int] = field(default_factory=dict)  # name -> its [tabwrite~]

    def __post_init__(self):
        self.base = len(top_level_objects(records(self.text)))

    def add(self, line: str) -> int:
        self.extra.append(f"#X {line}")
        return self.base + len(self.extra) - 1

    def obj(self, text: str) -> int:
        return self.add(f"obj 10 {600 + 20 * len(self.extra)} {text}")

    def msg(self, text: str) -> int:
        return self.add(f"msg 300 {600 + 20 * len(self.extra)} {text}")

    def connect(self, src: int, outlet: int, dst: int, inlet: int) -> None:
        self.links.append((src, outlet, dst, inlet))

    def record(self, name: str, src: int, outlet: int, samples: int) -> None:
        self.obj(f"table {name} {samples}")
        self.recorders[name] = self.obj(f"tabwrite~ {name}")
        self.connect(src, outlet, self.recorders[name], 0)
        self.tables[name] = (src, outlet)

    def extra_index(self, i: int) -> int:
        return self.base + (len(self.extra) + i if i < 0 else i)

    def at(self, ms: float, dst: int, message: str) -> None:
        """Send `message` to `dst`'s left inlet at logical time `ms` after load."""
        start = self.loadbang()
        d = self.obj(f"delay {ms:g}")
        m = self.msg(message)
        self.connect(start, 0, d, 0)
        self.connect(d, 0, m, 0)
        self.connect(m, 0, dst, 0)

    def loadbang(self) -> int:
        if not hasattr(self, "_loadbang"):
            self._loadbang = self.obj("loadbang")
        return self._loadbang

    def build(self) -> str:
        body = self.text.rstrip()
        lines = [body] + [e + ";" for e in self.extra]
        lines += [f"#X connect {a} {b} {c} {d};" for a, b, c, d in self.links]
        return "\n".join(lines) + "\n"


def read_wav(path: str) -> np.ndarray:
    """Pd's 32-bit float wav (WAVE_FORMAT_IEEE_FLOAT or extensible) -> float32 samples."""
    with open(path, "rb") as f:
        data = f.read()
    i = 12
    while i < len(data):
        cid, size = data[i:i + 4], int.from_bytes(data[i + 4:i + 8], "little")
        if cid == b"data":
            return np.frombuffer(data[i + 8:i + 8 + size], dtype="<f4").copy()
        i += 8 + size + (size & 1)
    raise ValueError(f"{path}: no data chunk")


@dataclass
class PdRun:
    returncode: int
    stderr: str
    seconds: float
    tables: Dict[str, np.ndarray]

    def info(self, tag: str) -> Dict[str, List[str]]:
        """nn~ info lines printed by `[print <tag>]`: {'attributes': [...], 'dim': [...], ...}."""
        out: Dict[str, List[str]] = {}
        for line in self.stderr.splitlines():
            if line.startswith(f"{tag}: "):
                words = line[len(tag) + 2:].split()
                if words:
                    out[words[0]] = words[1:]
        return out

    def errors(self) -> List[str]:
        """Pd's error lines, less the EMPTY ones nn~ prints for every symbol argument of `set` (its
        buffer lookup throws an empty message for anything that is not a table name)."""
        return [line for line in self.stderr.splitlines() if line.startswith("error") and line.strip() != "error:"]


def run_pd(patch: Instrumented, workdir: str, external_dir: str, duration_ms: float,
           timeout: float = 600) -> PdRun:
    """Write the instrumented patch into `workdir` (next to its .ts files) and run Pd headless for
    `duration_ms` of logical time (-batch: as fast as the CPU allows); the tables come back."""
    start = patch.loadbang()
    # nn~ without its compute thread (`bufsize 0`: one model call per largest ratio, in the DSP tick):
    # in thread mode Pd was seen to segfault inside exit() ~1 run in 6 with two nn~, after all output
    # was written (nn~ swaps std::cerr's buffer from its compute threads)
    for nn in nn_objects(patch.text):
        patch.connect(start, 0, patch.msg("bufsize 0"), 0)
        patch.connect(patch.extra_index(-1), 0, nn.index, 0)
    patch.connect(start, 0, patch.msg("\\; pd dsp 1"), 0)
    files = {name: os.path.join(workdir, f"{name}.wav") for name in patch.tables}
    for name in patch.tables:  # a bang starts each recorder at the first DSP tick
        patch.connect(start, 0, patch.recorders[name], 0)
    end = patch.obj(f"delay {duration_ms:g}")
    patch.connect(start, 0, end, 0)
    order = patch.obj("t b b b")  # fires right to left: write tables, stop nn~ threads, quit
    patch.connect(end, 0, order, 0)
    sf = patch.obj("soundfiler")
    for name, path in files.items():
        patch.connect(order, 2, patch.msg(f"write -bytes 4 {path} {name}"), 0)
        patch.connect(patch.extra_index(-1), 0, sf, 0)
    for nn in nn_objects(patch.text):
        patch.connect(order, 1, patch.msg("bufsize 0"), 0)
        patch.connect(patch.extra_index(-1), 0, nn.index, 0)
    patch.connect(order, 0, patch.msg("\\; pd dsp 0 \\; pd quit"), 0)
    pd_file = os.path.join(workdir, "_run.pd")
    with open(pd_file, "w") as f:
        f.write(patch.build())
    cmd = ["pd", "-nogui", "-noaudio", "-batch", "-r", str(SR), "-stderr", "-path", external_dir,
           "-open", pd_file]
    t0 = time.monotonic()
    # one intra-op thread: nn~ runs several models per DSP tick; OpenMP threads spin against each other
    # on a loaded machine, and 2 threads crashed Pd intermittently (nn~ 1.6 in Pd 0.53)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.monotonic() - t0
    tables = {name: read_wav(path) for name, path in files.items() if os.path.exists(path)}
    return PdRun(proc.returncode, proc.stderr + proc.stdout, seconds, tables)
