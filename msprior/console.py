"""What a user sees: msprior's own lines on the console, everyone else's output in a log file.

Ray (its C++ core writes straight to file descriptor 2, its actors' logs are forwarded to the
driver), MLflow and pyarrow print a great deal that a user does not need. During a command,
`session()` points file descriptors 1 and 2 at a log file, so that output from any library, thread
or child process lands there, and keeps a duplicate of the real terminal for msprior's own lines:
everything meant for the user goes through `echo()` or `out()`. The log file's path is printed at
the end. `--verbose` leaves the console as it is.

A command moves its log next to its output with `place(folder)` once it knows that folder. Until
then it lives in the user's own log folder (`user_log_dir()`, mode 0700), each file mode 0600 and
created fresh, never through a symlink planted at its name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import stat
import sys
from typing import Iterator, Optional, TextIO

from msprior.errors import UserError

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


# A log holds paths, hosts and error texts: only its user may read it. Created fresh (O_EXCL) and
# never through a symlink (O_NOFOLLOW): a link planted at the name cannot redirect our output.
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)


def user_log_dir() -> str:
    """The per-user folder for logs, mode 0700: $XDG_STATE_HOME/msprior/logs (~/.local/state/...),
    ~/Library/Logs/msprior on macOS. Refused when it is a symlink or someone else's."""
    if sys.platform == "darwin":
        folder = os.path.expanduser("~/Library/Logs/msprior")
    else:
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        folder = os.path.join(state, "msprior", "logs")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UserError(f"log folder {folder}: not a folder of this user (a symlink?); remove it or set XDG_STATE_HOME")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _create_log(path: str) -> int:
    """A new log file, mode 0600, opened without following a symlink; its descriptor."""
    return os.open(path, _LOG_FLAGS, 0o600)


def _new_log(folder: str, stem: str):
    """Create `<stem>.log` in `folder` (or `<stem>-2.log`, ... when the name is taken, by an earlier
    command of this process or by something planted there); (its path, its open descriptor)."""
    for n in range(1, 100):
        path = os.path.join(folder, f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
        try:
            return path, _create_log(path)
        except FileExistsError:
            continue
    raise UserError(f"log folder {folder}: 99 logs named {stem}*; remove old logs there")


def _redirect_to(path: str, fd: Optional[int] = None) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = _create_log(path) if fd is None else fd
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
        fd = _create_log(target)
        with open(_log_path, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
            shutil.copyfileobj(src, dst)
        _redirect_to(target, fd)
        os.unlink(_log_path)
    _log_path = target


@contextlib.contextmanager
def session(command: str, quiet: bool = True) -> Iterator[Optional[str]]:
    """Send fds 1 and 2 to a log file for the duration of a command; yields the log path."""
    global _user, _log_path
    from msprior.redact import install_log_redaction

    install_log_redaction()  # log records and a crash's traceback are written redacted
    if not quiet or _user is not None:
        yield None
        return
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    _log_path, log_fd = _new_log(user_log_dir(), f"{command}-{stamp}-{os.getpid()}")
    sys.stdout.flush()
    sys.stderr.flush()
    ray_was_up = _ray_is_up()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # the terminal behind fd 1; under a test's capture (sys.stdout replaced), that capture
    real = sys.stdout is sys.__stdout__
    _user = os.fdopen(os.dup(saved_out), "w", buffering=1) if real else sys.stdout
    _redirect_to(_log_path, log_fd)
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
