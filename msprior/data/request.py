"""What a preprocess run is asked (`PreprocessRequest`, its checks) and what its Ray tasks carry
(`Settings`, `RaveInfo`).

Part of the table contract: the request fields that shape a table's content are the ones
`msprior.data.intent.request_fields` records in `intent.json` (a resume must repeat them); the
others (task size, decode and encoder counts, batch size, the shuffle seed of a new table) change
how the work is spread, never what a committed file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from msprior import storage
from msprior.devices import CPU_HELP, GPU_HELP, RESOURCES_HELP, parse_resources
from msprior.errors import UserError
from msprior.flags import flag


class PreprocessError(UserError):
    """A preprocessing problem the user can fix; one line."""


@dataclass
class PreprocessRequest:
    """What `msprior preprocess` is asked to do: its flags, then library-only tuning knobs."""

    audio: str = flag(help="Folder or s3://bucket/prefix of audio files (searched recursively).")
    out_path: str = flag(help="Latent table folder or s3:// prefix (re-runs resume).")
    rave: str = flag(help="RAVE model exported as TorchScript (.ts), local or s3://.")
    num_secs: float = flag(16.0, "Chunk length in seconds.")
    resolution: int = flag(64, "Bins per latent dimension (continuous RAVE only).")
    batch_size: int = flag(64, "Chunks per RAVE encode call.")
    num_workers: int = flag(1, "Encoder actors (each loads the model once).")
    gpu: Optional[int] = flag(None, GPU_HELP + " Ray encoders share the GPUs (a fraction per actor).")
    cpu: bool = flag(False, CPU_HELP)
    condition_ratio: int = flag(4, "RAVE frames per conditioning frame; 0 = no conditioning.")
    condition_tokens: int = flag(64, "k-means classes of the conditioning tokens.")
    min_frames: int = flag(257, "One training window in frames: shorter files are padded to it (see --short).")
    short: str = flag("pad", "Files shorter than --min_frames: pad (silence after the audio, counted in the "
                             "manifest) or skip (reported in report.json).")
    normalize: bool = flag(False, "Peak-normalise each chunk, at most +30 dB (the original's flag).",
                           names="--normalize/--nonormalize")
    silence_threshold: Optional[int] = flag(None, "Drop each file's leading audio quieter than -N dBFS (the "
                                                  "original's flag, 30-50).")
    # the original's preprocess flags that have nothing to set here (accepted, so its commands run)
    num_tokens: Optional[int] = flag(None, "The original's RAVE vocabulary size: read from the RAVE export here.")
    db_size: Optional[int] = flag(None, "The original's LMDB size cap (GB): a Parquet table needs none.")
    dyndb: bool = flag(True, "The original's LMDB growth switch: a Parquet table always grows.",
                       names="--dyndb/--nodyndb")
    preprocessor: Sequence[str] = flag((), "The original's extra preprocessor modules: not loaded here "
                                           "(--condition_ratio computes the conditioning).")
    files_per_task: int = flag(1000, "At most this many files per task...")
    task_mb: float = flag(1024.0, "...and about this many MB of input files (a failed task redoes only these; "
                                  "a small corpus is cut into at least 4 tasks per encoder).")
    target_file_mb: float = flag(192.0, "Rows per data file, in MB before compression.")
    decode_cpus: float = flag(1.0, "Logical CPUs per decode task (the CPU decode stage).")
    decode_concurrency: Optional[int] = flag(None, "At most this many decode tasks at once; default: as many as "
                                                   "free CPUs allow (Ray Data scales them).")
    decode_in_encoder: bool = flag(False, "Decode inside the encoder actors (--decode_threads threads each) "
                                          "instead of in the CPU decode stage: the old path, for comparison.")
    decode_threads: int = flag(1, "Decode threads per encoder actor (only with --decode_in_encoder).")
    cpus_per_worker: float = flag(0.5, "Logical CPUs requested per encoder actor (its torch threads).")
    encoder_resources: Optional[str] = flag(None, RESOURCES_HELP.format(what="encoder actor"))
    shuffle_seed: int = flag(0, "Seed of the order files are grouped into tasks and data files (a new table "
                                "records it in intent.json; a resume keeps the table's).")
    threads_per_worker: Optional[int] = None  # torch threads per encoder; None: the CPUs Ray assigned it
    memory_per_worker_mb: Optional[float] = None  # Ray `memory=` of an encoder; None: estimated
    lease_ttl_s: Optional[float] = None  # None: MSPRIOR_LEASE_TTL_S or 60
    progress: bool = True
    stats_dir: Optional[str] = None  # encoders write their busy time there (bench/encoder_feed.py)


@dataclass(frozen=True)
class Settings:
    """What decode, encode and write tasks need: plain values, cheap to ship to Ray workers. The
    corpus and the table are Locations made on the driver: their S3 settings travel with them (a URL
    given here is resolved when the Settings is made)."""

    audio_root: storage.Location
    out_path: storage.Location
    run_id: str
    sr: int
    ratio: int
    chunk_samples: int
    min_frames: int
    resolution: int
    batch_size: int
    condition_ratio: int
    centroids: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    threads: int = 0  # torch threads of an encoder; 0: the CPUs Ray assigned it (never os.cpu_count())
    decode_threads: int = 1
    gpu: bool = False
    normalize: bool = False  # per chunk, the original's --normalize
    silence_db: Optional[int] = None  # the original's --silence_threshold
    pad_short: bool = True  # a file under min_frames frames is padded to it (else skipped)
    target_bytes: int = 192 << 20
    row_group_bytes: int = 64 << 20
    latent_loc: Optional[Tuple[float, ...]] = None  # continuous RAVE: the latent bins' fitted affine
    progress: object = None  # a ray.util.queue.Queue the encoders report (files, seconds of audio) to
    latent_scale: Optional[Tuple[float, ...]] = None
    epoch: int = 0  # the lease epoch every commit is fenced on (msprior.data.lease.fence)
    faults: Optional[Dict[str, str]] = None  # fault-injection settings of the driver (tests only)
    stats_dir: Optional[str] = None  # where encoders write their busy time (benchmarks only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio_root", storage.Location.of(self.audio_root))
        object.__setattr__(self, "out_path", storage.Location.of(self.out_path))


@dataclass(frozen=True)
class RaveInfo:
    data: bytes
    sha256: str
    facts: Dict  # the manifest's "rave" dict


def validate(req: PreprocessRequest) -> None:
    if req.num_secs <= 0:
        raise PreprocessError(f"--num_secs must be > 0 (got {req.num_secs})")
    if req.resolution < 2 or req.resolution > 32767:
        raise PreprocessError(f"--resolution must be in [2, 32767] (got {req.resolution})")
    if req.condition_ratio < 0:
        raise PreprocessError(f"--condition_ratio must be >= 0 (got {req.condition_ratio}; 0 turns conditioning off)")
    if min(req.num_workers, req.batch_size, req.files_per_task, req.decode_threads) < 1:
        raise PreprocessError("--num_workers, --batch_size, --files_per_task and --decode_threads must be >= 1")
    parse_resources(req.encoder_resources, "--encoder_resources")  # a typo: one line before anything starts
    if req.task_mb <= 0 or req.decode_cpus <= 0 or (req.decode_concurrency is not None and req.decode_concurrency < 1):
        raise PreprocessError("--task_mb and --decode_cpus must be > 0, --decode_concurrency >= 1")
    _validate_original(req)


def _validate_original(req: PreprocessRequest) -> None:
    """The original MSPrior's options: checked here, applied by the decode (msprior.data.audio)."""
    if req.short not in ("pad", "skip"):
        raise PreprocessError(f"--short {req.short!r}: use pad or skip")
    if req.silence_threshold is not None and req.silence_threshold <= 0:
        raise PreprocessError(f"--silence_threshold {req.silence_threshold}: give dB below full scale, e.g. 40")
    if req.preprocessor:
        raise PreprocessError(f"--preprocessor {' '.join(req.preprocessor)}: extra preprocessor modules are not "
                              "loaded here; conditioning features come from --condition_ratio / --condition_tokens")


def note_original(req: PreprocessRequest, rave: RaveInfo, echo) -> None:
    """Original flags with nothing to do here: say so once, so a copied command is not misread."""
    vocab = rave.facts.get("vocab_size")
    if req.num_tokens is not None and req.num_tokens != vocab:
        echo(f"note: --num_tokens {req.num_tokens}: the vocabulary is read from the RAVE export ({vocab} here)")
    if req.db_size is not None or not req.dyndb:
        echo("note: --db_size / --nodyndb size the original's LMDB file; a Parquet table needs no size")
