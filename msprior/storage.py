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
        fs = s3fs.S3FileSystem(key=o.key, secret=o.secret, token=o.token, client_kwargs=client_kwargs,
                               # s3fs caches listings; a fresh instance per call sees others' writes
                               skip_instance_cache=True)
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
