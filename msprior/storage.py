"""Local paths and s3:// URIs behind one small API: filesystems, listing, atomic writes.

S3 settings come from the standard AWS environment variables (`AWS_ENDPOINT_URL` or
`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`), read once on the driver into an `S3Options` that travels with Ray tasks (workers
may have been started before those variables were set). Secrets never appear in a repr or a log.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


@dataclass(frozen=True)
class S3Options:
    endpoint_url: Optional[str] = None
    key: Optional[str] = field(default=None, repr=False)
    secret: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    region: Optional[str] = None

    @classmethod
    def from_env(cls) -> "S3Options":
        env = os.environ
        return cls(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   key=env.get("AWS_ACCESS_KEY_ID") or None,
                   secret=env.get("AWS_SECRET_ACCESS_KEY") or None,
                   token=env.get("AWS_SESSION_TOKEN") or None,
                   # a region on a custom endpoint makes bucket creation send a refused
                   # LocationConstraint (SeaweedFS): only pass one when the user set it.
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def absolute(path: str) -> str:
    """An absolute local path (Ray tasks and Tune trials run in other working directories), or the
    s3:// URI unchanged."""
    return path if is_s3(path) or not path else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path pieces with '/' for s3:// URIs and os.path for local paths."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


_S3FS: dict = {}


def filesystem(path: str, s3: Optional[S3Options] = None):
    """(fsspec filesystem, path as that filesystem names it) for a local path or an s3:// URI."""
    if is_s3(path):
        import s3fs

        o = s3 or S3Options.from_env()
        client_kwargs = {}
        if o.endpoint_url:
            client_kwargs["endpoint_url"] = o.endpoint_url
        if o.region:
            client_kwargs["region_name"] = o.region
        ident = (o.endpoint_url, o.key, o.secret, o.token, o.region, os.getpid())
        fs = _S3FS.get(ident)
        if fs is None:  # one client per process and settings: creating one costs ~0.1 s of CPU
            fs = _S3FS[ident] = s3fs.S3FileSystem(
                key=o.key, secret=o.secret, token=o.token, client_kwargs=client_kwargs,
                # no listing cache: every listing sees the writes of other processes
                use_listings_cache=False, skip_instance_cache=True)
        return fs, path[len("s3://"):].rstrip("/")
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(Path(path).expanduser().resolve())


def pyarrow_filesystem(path: str, s3: Optional[S3Options] = None):
    """(pyarrow.fs.FileSystem, path) — pyarrow's native S3 client is the fastest for bulk reads."""
    import pyarrow.fs as pafs

    if is_s3(path):
        o = s3 or S3Options.from_env()
        kw = {}
        if o.endpoint_url:
            scheme, _, host = o.endpoint_url.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        if o.region:
            kw["region"] = o.region
        fs = pafs.S3FileSystem(access_key=o.key, secret_key=o.secret, session_token=o.token, **kw)
        return fs, path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def exists(path: str, s3: Optional[S3Options] = None) -> bool:
    fs, p = filesystem(path, s3)
    return fs.exists(p)


def read_bytes(path: str, s3: Optional[S3Options] = None) -> bytes:
    fs, p = filesystem(path, s3)
    return fs.cat_file(p)


def write_bytes(path: str, data: bytes, s3: Optional[S3Options] = None) -> None:
    """Write atomically: readers see the old file or the whole new one, never a part.

    Local: a hidden temp name in the same directory, then `os.replace`. S3: a single PUT (or a
    multipart upload) only becomes visible once complete, which is already atomic.
    """
    fs, p = filesystem(path, s3)
    if is_s3(path):
        fs.pipe_file(p, data)
        return
    d = os.path.dirname(p)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(p)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def list_files(path: str, s3: Optional[S3Options] = None) -> List[Tuple[str, int]]:
    """Every file below `path`, recursively: (path relative to `path` with '/', size in bytes).

    Hidden temp files of our own atomic writes (`.tmp-*`) are left out.
    """
    fs, root = filesystem(path, s3)
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        raise NotADirectoryError(f"{path} is a file: expected a directory or an s3:// prefix")
    out = []
    for p, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(p.replace(os.sep, "/"), root.replace(os.sep, "/"))
        if posixpath.basename(rel).startswith(".tmp-"):
            continue
        out.append((rel, int(info.get("size") or 0)))
    return sorted(out)


def delete(path: str, s3: Optional[S3Options] = None) -> None:
    """Remove one file or object; a missing one is not an error."""
    fs, p = filesystem(path, s3)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


# --- conditional writes: what a lease needs -------------------------------------------------------
#
# S3 (checked on SeaweedFS 4.48 and AWS): `If-None-Match: *` creates an object only when the key is
# free, `If-Match: <etag>` replaces it only when nobody replaced it since we read it; the loser of
# either race gets 412 PreconditionFailed. Locally, a hard link gives the create (it fails when the
# name exists) and the compare-and-swap holds an flock while it re-reads and renames.


class Conflict(Exception):
    """A conditional write lost: the object exists (create) or changed (swap)."""


def _s3_split(p: str) -> Tuple[str, str]:
    bucket, _, key = p.partition("/")
    return bucket, key


def _is_precondition(e: Optional[BaseException]) -> bool:
    """412 PreconditionFailed, also when s3fs re-raised it as an OSError (the cause keeps the code)."""
    while e is not None:
        err = getattr(e, "response", None) or {}
        if (err.get("Error") or {}).get("Code") == "PreconditionFailed" or \
                (err.get("ResponseMetadata") or {}).get("HTTPStatusCode") == 412:
            return True
        if "PreconditionFailed" in str(e) or "pre-conditions you specified" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def create_exclusive(path: str, data: bytes, s3: Optional[S3Options] = None) -> str:
    """Create `path` only if it does not exist; return its version tag (S3 ETag or a local token).

    Raises `Conflict` when it exists.
    """
    fs, p = filesystem(path, s3)
    if is_s3(path):
        bucket, key = _s3_split(p)
        try:
            r = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:
            if _is_precondition(e) or isinstance(e, FileExistsError):
                return _ours_or_conflict(path, data, s3)
            raise
        return str(r.get("ETag", ""))
    # the whole content first under a temp name, then a hard link: link() fails when the name exists
    # (the same guarantee as O_EXCL) and a reader never sees a half-written lease
    d = os.path.dirname(p)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(p)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, p)
    except FileExistsError:
        return _ours_or_conflict(path, data, s3)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _local_tag(data)


def _ours_or_conflict(path: str, data: bytes, s3: Optional[S3Options]) -> str:
    """A conditional write answered "precondition failed": when what is stored now is exactly what
    we wrote, it is our own earlier attempt whose answer was lost (the retry of a PUT that landed),
    so the write succeeded; else `Conflict`. Callers make each write's bytes unique to the writer."""
    try:
        current, tag = read_versioned(path, s3)
    except FileNotFoundError:
        raise Conflict(path) from None
    if current != data:
        raise Conflict(path) from None
    return tag


def _local_tag(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def read_versioned(path: str, s3: Optional[S3Options] = None) -> Tuple[bytes, str]:
    """(bytes, version tag) of a file or object; FileNotFoundError when it is missing."""
    fs, p = filesystem(path, s3)
    if is_s3(path):
        import fsspec.asyn

        bucket, key = _s3_split(p)

        async def get():
            r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with r["Body"] as body:
                return await body.read(), str(r.get("ETag", ""))

        try:
            return fsspec.asyn.sync(fs.loop, get)
        except FileNotFoundError:
            raise
        except Exception as e:
            if "NoSuchKey" in str(e) or "404" in str(e):
                raise FileNotFoundError(path) from None
            raise
    with open(p, "rb") as f:
        data = f.read()
    return data, _local_tag(data)


def read_aged(path: str, s3: Optional[S3Options] = None) -> Tuple[bytes, str, float]:
    """(bytes, version tag, seconds since it was last written), the age on the storage's own clock:
    S3's `Date` answer header minus the object's `LastModified` (both stamped by the server, 1 s
    resolution); locally a fresh probe file's mtime minus the file's (one file server's clock, also
    on a network mount). Never a difference between two hosts' clocks."""
    fs, p = filesystem(path, s3)
    if is_s3(path):
        import email.utils

        import fsspec.asyn

        bucket, key = _s3_split(p)

        async def get():
            r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with r["Body"] as body:
                data = await body.read()
            now = email.utils.parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            return data, str(r.get("ETag", "")), (now - r["LastModified"]).total_seconds()

        try:
            return fsspec.asyn.sync(fs.loop, get)
        except FileNotFoundError:
            raise
        except Exception as e:
            if "NoSuchKey" in str(e) or "404" in str(e):
                raise FileNotFoundError(path) from None
            raise
    with open(p, "rb") as f:
        data = f.read()
        written = os.fstat(f.fileno()).st_mtime
    probe = os.path.join(os.path.dirname(p), f".tmp-{uuid.uuid4().hex}-clock")
    try:
        with open(probe, "wb") as f:
            now = os.fstat(f.fileno()).st_mtime
    finally:
        os.unlink(probe)
    return data, _local_tag(data), now - written


def replace_if(path: str, data: bytes, tag: str, s3: Optional[S3Options] = None) -> str:
    """Replace `path` only if its version tag is still `tag`; return the new tag. Raises `Conflict`."""
    fs, p = filesystem(path, s3)
    if is_s3(path):
        bucket, key = _s3_split(p)
        try:
            r = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except Exception as e:
            if _is_precondition(e) or isinstance(e, (FileNotFoundError, FileExistsError)):
                return _ours_or_conflict(path, data, s3)
            raise
        return str(r.get("ETag", ""))
    # compare-and-swap under an flock on a sidecar file; the swap itself is a rename, so readers
    # always find the old or the new lease, never none
    import fcntl

    lock = os.open(os.path.join(os.path.dirname(p), "." + os.path.basename(p) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(p, "rb") as f:
                current = f.read()
        except FileNotFoundError:
            raise Conflict(path) from None
        if _local_tag(current) != tag:
            if current == data:  # our own earlier attempt of this very write
                return _local_tag(data)
            raise Conflict(path)
        write_bytes(path, data)
    finally:
        os.close(lock)
    return _local_tag(data)


# --- transient errors: retried with backoff, never turned into a permanent skip ---------------------

_TRANSIENT_WORDS = ("timeout", "timed out", "throttl", "slowdown", "slow down", "too many requests",
                    "connection", "connect", "service unavailable", "internal error", "bad gateway",
                    "requesttimeout", "broken pipe", "reset by peer", "temporarily", "out of memory")


STORAGE_FULL = "storage full (no space left on device)"


def is_storage_full(e: Optional[BaseException]) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain: our disk, never the input's fault."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_transient(e: BaseException) -> bool:
    """An error that may pass on retry: network/S3 trouble, throttling, GPU out of memory."""
    while e is not None:
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        name = type(e).__name__.lower()
        if any(w in name for w in ("timeout", "connection", "throttl", "outofmemory", "endpoint")):
            return True
        if any(w in str(e).lower() for w in _TRANSIENT_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry(fn, what: str = "", deadline_s: Optional[float] = None, first_wait_s: float = 0.5):
    """Call `fn()`; on a transient error wait (0.5 s, doubling, at most 8 s) and try again until
    `deadline_s` (default 90 s, env MSPRIOR_RETRY_S) has passed; then re-raise."""
    import time

    deadline_s = float(os.environ.get("MSPRIOR_RETRY_S", 90)) if deadline_s is None else deadline_s
    end, wait = time.monotonic() + deadline_s, first_wait_s
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + wait > end:
                raise
        time.sleep(wait)
        wait = min(wait * 2, 8.0)
