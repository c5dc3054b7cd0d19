"""Progress: one live line while the encoders work (files and hours encoded, x realtime, ETA).

No part of the table contract: the encoders report (files, seconds of audio) to a Ray queue after
each batch, never failing a batch for it; a lost report only makes the line lag.
"""

from __future__ import annotations

import threading
import time

from msprior import console


class Progress(threading.Thread):
    """One live line: files and hours encoded, x realtime, ETA. On a terminal it is rewritten in
    place twice a second; in a log, a new line every ~10 s. The encoders report to a Ray queue."""

    def __init__(self, total_files: int):
        from ray.util.queue import Queue

        super().__init__(daemon=True)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.total, self.files, self.seconds = total_files, 0, 0.0
        self.stop, self.t0 = threading.Event(), time.monotonic()
        self.out = console.out()
        self.tty = getattr(self.out, "isatty", lambda: False)()

    def run(self) -> None:
        while not self.stop.wait(0.5 if self.tty else 10.0):
            self._drain()
            self._print(end="" if self.tty else "\n")

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=2)
        self._drain()
        if self.tty and self.files:
            self._print(end="\n")
        try:
            self.queue.shutdown()
        except Exception:
            pass

    def _drain(self) -> None:
        try:
            for files, seconds in self.queue.get_nowait_batch(self.queue.qsize()):
                self.files, self.seconds = self.files + files, self.seconds + seconds
        except Exception:
            pass

    def _print(self, end: str) -> None:
        el = time.monotonic() - self.t0
        eta = el / self.files * (self.total - self.files) if self.files else float("nan")
        eta_txt = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "--"
        line = (f"preprocess: {self.files}/{self.total} files, {self.seconds / 3600:.2f} h of audio, "
                f"{self.seconds / max(el, 1e-9):.1f}x realtime, ETA {eta_txt}")
        self.out.write(("\r" + line if self.tty else line) + end)
        self.out.flush()
