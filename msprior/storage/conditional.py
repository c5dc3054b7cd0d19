"""Conditional writes, what a lease needs (msprior.data.lease): create-if-absent, compare-and-swap,
reads with a version tag and an age on the storage's own clock. Through `storage.Location`."""

from __future__ import annotations

import os
import uuid
from typing import Optional, Tuple

from msprior.storage import Location, Where, write_bytes

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


def create_exclusive(where: Where, data: bytes) -> str:
    """Create `path` only if it does not exist; return its version tag (S3 ETag or a local token).

    Raises `Conflict` when it exists.
    """
    loc = Location.of(where)
    fs, p = loc.fs()
    if not loc.is_local:
        bucket, key = _s3_split(p)
        try:
            r = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:
            if _is_precondition(e) or isinstance(e, FileExistsError):
                return _ours_or_conflict(loc, data)
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
        return _ours_or_conflict(loc, data)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _local_tag(data)


def _ours_or_conflict(loc: Location, data: bytes) -> str:
    """A conditional write answered "precondition failed": when what is stored now is exactly what
    we wrote, it is our own earlier attempt whose answer was lost (the retry of a PUT that landed),
    so the write succeeded; else `Conflict`. Callers make each write's bytes unique to the writer."""
    try:
        current, tag = read_versioned(loc)
    except FileNotFoundError:
        raise Conflict(loc.url) from None
    if current != data:
        raise Conflict(loc.url) from None
    return tag


def _local_tag(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def _s3_get(loc: Location, fs, p: str) -> Tuple[bytes, str, float]:
    """(bytes, ETag, age in s on the server's clock) of an object; FileNotFoundError when missing."""
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
            raise FileNotFoundError(loc.url) from None
        raise


def read_versioned(where: Where) -> Tuple[bytes, str]:
    """(bytes, version tag) of a file or object; FileNotFoundError when it is missing."""
    loc = Location.of(where)
    fs, p = loc.fs()
    if not loc.is_local:
        return _s3_get(loc, fs, p)[:2]
    with open(p, "rb") as f:
        data = f.read()
    return data, _local_tag(data)


def read_aged(where: Where) -> Tuple[bytes, str, float]:
    """(bytes, version tag, seconds since it was last written), the age on the storage's own clock:
    S3's `Date` answer header minus the object's `LastModified` (both stamped by the server, 1 s
    resolution); locally a fresh probe file's mtime minus the file's (one file server's clock, also
    on a network mount). Never a difference between two hosts' clocks."""
    loc = Location.of(where)
    fs, p = loc.fs()
    if not loc.is_local:
        return _s3_get(loc, fs, p)
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


def replace_if(where: Where, data: bytes, tag: str) -> str:
    """Replace `path` only if its version tag is still `tag`; return the new tag. Raises `Conflict`."""
    loc = Location.of(where)
    fs, p = loc.fs()
    if not loc.is_local:
        bucket, key = _s3_split(p)
        try:
            r = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except Exception as e:
            if _is_precondition(e) or isinstance(e, (FileNotFoundError, FileExistsError)):
                return _ours_or_conflict(loc, data)
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
            raise Conflict(loc.url) from None
        if _local_tag(current) != tag:
            if current == data:  # our own earlier attempt of this very write
                return _local_tag(data)
            raise Conflict(loc.url)
        write_bytes(loc, data)
    finally:
        os.close(lock)
    return _local_tag(data)
