"""Reports and checkpoints leaving a worker: uploaded in the background, one at a time.

`ray.train.report(..., checkpoint_upload_mode=ASYNC)` (the installed Ray Train's own mode) returns
once rank 0's checkpoint is in a local folder; one upload thread per worker copies it into the run
folder and only then registers it. So training goes on during the upload, a kill during an upload
leaves the previous checkpoint the latest registered one (and `num_to_keep` deletes an old
checkpoint only after a newer one is registered), and Ray flushes the last upload before the
worker's training function returns. What Ray does not bound is how many uploads wait: `Uploads`
waits for the previous one before handing over the next, so at most one checkpoint is in flight
(one extra local copy on disk, never a growing queue).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional

from msprior.train.inputs import Fault


class Uploads:
    """One worker's reports. `report` / `storage`: `ray.train.report` and Ray's StorageContext
    (a test may pass stand-ins)."""

    def __init__(self, rank: int, fault: Optional[Fault] = None, report: Optional[Callable] = None,
                 storage: Any = None):
        self.rank, self.fault, self._report, self._storage = rank, fault, report, storage
        # called with the checkpoint's name right before its copy starts (the run lease's fence): an
        # upload queued before a takeover must not land after it
        self.before_upload: Optional[Callable[[str], None]] = None
        self.idle = threading.Event()  # set: no checkpoint upload in flight
        self.idle.set()

    def report(self, metrics: Dict[str, Any], directory: Optional[str] = None, name: Optional[str] = None,
               step: int = 0) -> None:
        """A barrier over all workers; rank 0 passes the local folder of the checkpoint it wrote
        (Ray deletes it after the upload)."""
        import ray.train

        checkpoint = None
        if directory is not None:
            self.idle.wait()  # the previous upload is done: at most one in flight
            self.idle.clear()
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        upload = (lambda c, n: self._upload(c, n, step)) if checkpoint is not None else None
        (self._report or ray.train.report)(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                                           checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                                           checkpoint_upload_fn=upload)

    def _upload(self, checkpoint, name: str, step: int):
        """In Ray's upload thread: Ray's own copy into the run folder (pyarrow), then `idle`."""
        import ray.train

        try:
            storage = self._storage or ray.train.get_context().get_storage()  # DeveloperAPI: StorageContext
            if self.before_upload is not None:
                self.before_upload(name)
            if self.fault is not None:
                self._partial_then_fail(storage, checkpoint, name, step)
            return storage.persist_current_checkpoint(checkpoint, name)
        finally:
            self.idle.set()

    def _partial_then_fail(self, storage, checkpoint, name: str, step: int) -> None:
        """Test hook (Fault point "upload"): half of checkpoint.pt lands in the run folder, then the fault."""
        import os

        if (self.rank, step, "upload") != (self.fault.rank, self.fault.step, self.fault.point):
            return
        dest = storage.build_checkpoint_path_from_name(name)
        storage.storage_filesystem.create_dir(dest)
        with open(os.path.join(checkpoint.path, "checkpoint.pt"), "rb") as f:
            data = f.read()
        with storage.storage_filesystem.open_output_stream(f"{dest}/checkpoint.pt") as out:
            out.write(data[: len(data) // 2])
        self.fault.fire(self.rank, step, "upload")
