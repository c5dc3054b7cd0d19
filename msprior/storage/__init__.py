"""Where data lives: a local folder or an s3:// prefix behind one `Location`.

`Location.of(url)` resolves a URL once: a local path becomes absolute (Ray tasks and Tune trials
run in other working directories); an s3:// URL carries the S3 settings read from the standard AWS
environment variables (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`) at that moment, on the driver. A
Location is picklable and travels with Ray tasks: a worker started before those variables were set
still reads and writes with the driver's settings. Stages pass Locations around and never test for
a scheme; filesystems, atomic and conditional writes and retries live here. Secrets never appear
in a repr or a log. The module functions (`read_bytes(where)`, ...) take a URL or a Location.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

_SCHEME = "s3://"


def _is_s3(url: str) -> bool:
    return str(url).startswith(_SCHEME)


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


@dataclass(frozen=True)
class Location:
    """A file or folder: an absolute local path or an s3:// URL (`url`), with the S3 settings it
    was resolved with (`s3`, None for a local one). Equal when the URLs are equal."""

    url: str
    s3: Optional[S3Options] = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, where: "Where") -> "Location":
        """A Location unchanged; a URL resolved (S3 settings from this process's environment)."""
        if isinstance(where, Location):
            return where
        url = str(where)
        if _is_s3(url):
            return cls(url.rstrip("/") if len(url) > len(_SCHEME) else url, S3Options.from_env())
        return cls(os.path.abspath(os.path.expanduser(url)) if url else url)

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return not _is_s3(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url) if not self.is_local else os.path.basename(self.url)

    def join(self, *parts: str) -> "Location":
        if self.is_local:
            return Location(os.path.join(self.url, *parts))
        return Location(posixpath.join(self.url, *parts), self.s3)

    def at(self, fs_path: str) -> "Location":
        """The Location of `fs_path` as this Location's filesystem names it (`fs()`, `pyarrow()`:
        a bucket/key for S3), with the same settings."""
        return Location(_SCHEME + fs_path.lstrip("/"), self.s3) if not self.is_local else Location(fs_path)

    def fs(self):
        """(fsspec filesystem, path as that filesystem names it)."""
        return _fsspec(self)

    def pyarrow(self):
        """(pyarrow.fs.FileSystem, path): pyarrow's native S3 client is the fastest for bulk reads."""
        return _pyarrow(self)

    def ray_storage(self) -> Tuple[str, object]:
        """(storage_path, storage_filesystem) for Ray Train/Tune's RunConfig: a local folder as
        itself (Ray's default filesystem), S3 through pyarrow's client with these settings."""
        if self.is_local:
            return self.url, None
        fs, path = _pyarrow(self)
        return path, fs

    def exists(self) -> bool:
        fs, p = self.fs()
        return fs.exists(p)

    def read_bytes(self) -> bytes:
        fs, p = self.fs()
        return fs.cat_file(p)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self, data)

    def list_files(self) -> List[Tuple[str, int]]:
        return list_files(self)

    def listdir(self) -> List[str]:
        """Names of the entries right below this folder ([] when it does not exist)."""
        fs, p = self.fs()
        if not fs.exists(p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))

    def delete(self) -> None:
        delete(self)

    # conditional writes (what a lease needs): see `create_exclusive`, `replace_if` below
    def create_exclusive(self, data: bytes) -> str:
        return create_exclusive(self, data)

    def replace_if(self, data: bytes, tag: str) -> str:
        return replace_if(self, data, tag)

    def read_versioned(self) -> Tuple[bytes, str]:
        return read_versioned(self)

    def read_aged(self) -> Tuple[bytes, str, float]:
        return read_aged(self)

    def local_path(self, tmp: str) -> str:
        """Where this file is (or is to be written) on this machine: itself when local (its folder
        made), else `tmp/<name>` (then see `download_to`, `upload_from`)."""
        if not self.is_local:
            return os.path.join(tmp, self.name)
        os.makedirs(os.path.dirname(self.url), exist_ok=True)
        return self.url

    def download_to(self, local: str) -> None:
        """Copy this file to the local path `local` (nothing to do when it is this very file)."""
        if os.path.abspath(local) != self.url:
            fs, p = self.fs()
            retry(lambda: fs.get_file(p, local), what=self.url)

    def upload_from(self, local: str) -> None:
        """Write this file, atomically, from the local path `local` (nothing to do when it is this file)."""
        if os.path.abspath(local) != self.url:
            with open(local, "rb") as f:
                self.write_bytes(f.read())

    @contextmanager
    def local_copy(self, suffix: str = "") -> Iterator[str]:
        """A local path to read this file with a library that wants one: the file itself, or a
        download of the object (retried on transient errors) removed afterwards."""
        if self.is_local:
            yield self.url
            return
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=suffix or "-" + self.name)
        os.close(fd)
        try:
            fs, p = self.fs()
            retry(lambda: fs.get_file(p, tmp), what=self.url)
            yield tmp
        finally:
            os.unlink(tmp)


Where = Union[str, Path, Location]


def url_of(filesystem, fs_path: str) -> str:
    """The URL of `fs_path` inside a pyarrow filesystem (a Ray checkpoint's `.filesystem`, `.path`)."""
    proto = getattr(filesystem, "type_name", "local")
    return fs_path if proto == "local" else f"{proto}://{fs_path}"


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
    s3:// URL unchanged (without a trailing '/')."""
    return Location.of(path).url


def join(base: Where, *parts: str) -> str:
    """The URL of `parts` below `base` ('/' for s3://, os.path for local paths)."""
    return Location.of(base).join(*parts).url


_S3FS: dict = {}


def _fsspec(loc: Location):
    if loc.is_local:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(Path(loc.url).expanduser().resolve())
    import s3fs

    o = loc.s3 or S3Options.from_env()
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
    return fs, loc.url[len(_SCHEME):].rstrip("/")


def _pyarrow(loc: Location):
    import pyarrow.fs as pafs

    if loc.is_local:
        return pafs.LocalFileSystem(), str(Path(loc.url).expanduser().resolve())
    o = loc.s3 or S3Options.from_env()
    kw = {}
    if o.endpoint_url:
        scheme, _, host = o.endpoint_url.partition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    if o.region:
        kw["region"] = o.region
    fs = pafs.S3FileSystem(access_key=o.key, secret_key=o.secret, session_token=o.token, **kw)
    return fs, loc.url[len(_SCHEME):].rstrip("/")


def filesystem(where: Where):
    """(fsspec filesystem, path as that filesystem names it) for a local path or an s3:// URL."""
    return Location.of(where).fs()


def pyarrow_filesystem(where: Where):
    """(pyarrow.fs.FileSystem, path) of a local path or an s3:// URL."""
    return Location.of(where).pyarrow()


def exists(where: Where) -> bool:
    return Location.of(where).exists()


def read_bytes(where: Where) -> bytes:
    return Location.of(where).read_bytes()


def write_bytes(where: Where, data: bytes) -> None:
    """Write atomically: readers see the old file or the whole new one, never a part.

    Local: a hidden temp name in the same directory, then `os.replace`. S3: a single PUT (or a
    multipart upload) only becomes visible once complete, which is already atomic.
    """
    loc = Location.of(where)
    fs, p = loc.fs()
    if not loc.is_local:
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


def list_files(where: Where) -> List[Tuple[str, int]]:
    """Every file below `path`, recursively: (path relative to `path` with '/', size in bytes).

    Hidden temp files of our own atomic writes (`.tmp-*`) are left out.
    """
    loc = Location.of(where)
    fs, root = loc.fs()
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        raise NotADirectoryError(f"{loc.url} is a file: expected a directory or an s3:// prefix")
    out = []
    for p, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(p.replace(os.sep, "/"), root.replace(os.sep, "/"))
        if posixpath.basename(rel).startswith(".tmp-"):
            continue
        out.append((rel, int(info.get("size") or 0)))
    return sorted(out)


def delete(where: Where) -> None:
    """Remove one file or object; a missing one is not an error."""
    loc = Location.of(where)
    fs, p = loc.fs()
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


# what a lease needs, and what every storage call is wrapped in: their own modules, one API here
from msprior.storage.conditional import (Conflict, create_exclusive, read_aged, read_versioned,  # noqa: E402
                                         replace_if)
from msprior.storage.retries import STORAGE_FULL, is_storage_full, is_transient, retry  # noqa: E402

__all__ = ["Location", "Where", "S3Options", "url_of", "sha256_file", "absolute", "join", "filesystem",
           "pyarrow_filesystem", "exists", "read_bytes", "write_bytes", "list_files", "delete", "Conflict",
           "create_exclusive", "read_versioned", "read_aged", "replace_if", "STORAGE_FULL", "is_storage_full",
           "is_transient", "retry"]
