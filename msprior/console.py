"""What a user sees: msprior's own lines on the console, everyone else's output in a log file.

Ray (its C++ core writes straight to file descriptor 2, its actors' logs are forwarded to the
driver), MLflow and pyarrow print a great deal that a user does not need. During a command,
`session()` points file descriptors 1 and 2 at a log file, so that output from any library, thread
or child process lands there, and keeps a duplicate of the real terminal for msprior's own lines:
everything meant for the user goes through `echo()` or `out()`. The log file's path is printed at
the end. `--verbose` leaves the console as it is.

A command moves its log next to its output with `place(folder)` once it knows that folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import sys
import tempfile
from typing import Iterator, Optional, TextIO

_user: Optional[TextIO] = None  # the real terminal while a session redirects fds 1 and 2
_log_path: Optional[str] = None
_made: list = []  # folders place() created, removed again when the log stays empty
last_log: Optional[str] = None  # the log of the session that ended last (None: it was empty)


def out() -> TextIO:
    """The stream for msprior's own lines (the real terminal, also during a session)."""
    return _user if _user is not None else sys.stdout


def echo(message: str = "") -> None:
    print(message, file=out(), flush=True)


def log_path() -> Optional[str]:
    return _log_path


def _redirect_to(path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def place(folder: str) -> None:
    """Move the session's log into `<folder>/logs/` (local folders only; s3:// keeps it where it is)."""
    global _log_path
    if _log_path is None or "://" in folder:
        return
    target_dir = os.path.join(os.path.abspath(folder), "logs")
    target = os.path.join(target_dir, os.path.basename(_log_path))
    if target == _log_path:
        return
    missing, d = [], target_dir
    while not os.path.isdir(d):
        missing.insert(0, d)
        d = os.path.dirname(d)
    for d in missing:
        os.mkdir(d)
        _made.append(d)
    try:
        os.rename(_log_path, target)  # the open descriptors follow the file
    except OSError:  # another filesystem: copy, then write to the copy from now on
        shutil.copyfile(_log_path, target)
        _redirect_to(target)
        os.unlink(_log_path)
    _log_path = target


@contextlib.contextmanager
def session(command: str, quiet: bool = True) -> Iterator[Optional[str]]:
    """Send fds 1 and 2 to a log file for the duration of a command; yields the log path."""
    global _user, _log_path
    if not quiet or _user is not None:
        yield None
        return
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    folder = os.path.join(tempfile.gettempdir(), "msprior-logs")
    os.makedirs(folder, exist_ok=True)
    _log_path = os.path.join(folder, f"{command}-{stamp}-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    ray_was_up = _ray_is_up()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # the terminal behind fd 1; under a test's capture (sys.stdout replaced), that capture
    real = sys.stdout is sys.__stdout__
    _user = os.fdopen(os.dup(saved_out), "w", buffering=1) if real else sys.stdout
    _redirect_to(_log_path)
    failed = False
    try:
        yield _log_path
    except SystemExit as e:  # click ends every command with one; a non-zero code is a failure
        failed = e.code not in (0, None)
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if not ray_was_up:  # a Ray this command started: its exit messages belong in the log too
            _shutdown_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        if real:
            _user.close()
        _user = None
        _close_log(failed)


def _close_log(failed: bool) -> None:
    """Name a log that holds something (an error's line names it itself); drop an empty one."""
    global _log_path, last_log
    if os.path.getsize(_log_path) == 0:
        os.unlink(_log_path)
        for d in reversed(_made):  # only folders this session made, and only when empty
            try:
                os.rmdir(d)
            except OSError:
                break
        last_log = None
    else:
        last_log = _log_path
        if not failed:
            print(f"log: {_log_path}", file=sys.stderr, flush=True)
    _made.clear()
    _log_path = None


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
