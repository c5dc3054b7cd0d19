"""Progress: the preprocess stage's display (files encoded of the total, hours of audio, x realtime),
drawn by the one progress component, `msprior.console.progress`.

No part of the table contract: the encoders report (files, seconds of audio) to a Ray queue after
each batch, never failing a batch for it; a lost report only makes the display lag.
"""

from __future__ import annotations

import contextlib
import threading
import time

from msprior import console


class Progress(threading.Thread):
    """Drains the encoders' reports from a Ray queue into the stage's progress display twice a second."""

    def __init__(self, total_files: int):
        from ray.util.queue import Queue

        super().__init__(daemon=True)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.total, self.files, self.seconds = total_files, 0, 0.0
        self.stop, self.t0 = threading.Event(), time.monotonic()
        self.display = contextlib.ExitStack()
        self.bar = self.display.enter_context(console.progress("preprocess", total_files, "files"))

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self._drain()
            self._show()

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=2)
        self._drain()
        self._show()
        self.display.close()
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

    def _show(self) -> None:
        el = time.monotonic() - self.t0
        self.bar.update(self.files, note=f"{self.seconds / 3600:.2f} h of audio, "
                                         f"{self.seconds / max(el, 1e-9):.1f}x realtime")
