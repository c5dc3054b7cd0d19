"""What a user sees: msprior's own lines and one progress display per stage on the console,
everyone else's output in a log file.

Ray (its actors' and tasks' output, forwarded to the driver), MLflow, pyarrow and Python's warnings
print a great deal that a user does not need. During a command, `session()` sends Python's
`sys.stdout`/`sys.stderr` and every logging handler that wrote to the terminal to a log file, and
keeps the terminal for msprior's own lines: `echo()` (the "msprior" logger, whose handlers write to
the terminal and to the log) and `progress()`. No file descriptor is touched: a child process keeps
its own output, Ray's processes write theirs to Ray's session logs, and what C++ code in this
process writes to fd 2 stays on the terminal (Ray's core logs one ERROR line when a Ray Data actor
pool starts, ray-project/ray#53727). Ray's logging (its driver loggers, its workers' root loggers,
`log_to_driver`) is set by `ray_init_kwargs()`, which `msprior.runtime.ensure_ray` hands to
`ray.init`. What reaches the log is redacted (`msprior.redact`). The log's path is printed at the
end. `--verbose` leaves everything on the console.

A command moves its log next to its output with `place(folder)` once it knows that folder. Until
then it lives in the user's own log folder (`user_log_dir()`, mode 0700), each file mode 0600 and
created fresh, never through a symlink planted at its name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import stat
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional, TextIO

from msprior.errors import UserError

LOG_EVERY_S = 10.0  # a progress line lands in the log file this often (and at the end)
_user: Optional[TextIO] = None  # the terminal while a session sends Python's output to the log
_log_path: Optional[str] = None
_made: list = []  # folders place() created, removed again when the log stays empty
last_log: Optional[str] = None  # the log of the session that ended last (None: it was empty)
_LOG = logging.getLogger("msprior")


def out() -> TextIO:
    """The stream for msprior's own lines (the terminal, also during a session)."""
    return _user if _user is not None else sys.stdout


def echo(message: str = "") -> None:
    """One line for the user: on the console (above a live progress bar), and in the log."""
    _setup_logger()
    _LOG.info(message)


def log_path() -> Optional[str]:
    return _log_path


# --- the log file -------------------------------------------------------------------------------

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


class _LogStream:
    """The log file as a text stream: what `sys.stdout`/`sys.stderr` and the routed logging handlers
    write to during a session. Text is redacted on its way in; `place()` may swap the file below."""

    def __init__(self, fd: int):
        self.file = os.fdopen(fd, "w", buffering=1)
        self.lock = threading.Lock()  # Ray's log thread, Ray Data's and ours write at once

    def write(self, text: str) -> int:
        from msprior.redact import redact_text

        with self.lock:
            self.file.write(redact_text(text))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self.file.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # faulthandler and subprocess(stdout=sys.stdout) want a descriptor
        return self.file.fileno()

    def __getattr__(self, name: str):  # encoding, errors, closed, ...: the file's (Ray Tune asks for them)
        return getattr(self.file, name)


_stream: Optional[_LogStream] = None


def place(folder: str) -> None:
    """Move the session's log into `<folder>/logs/` (local folders only; s3:// keeps it where it is)."""
    from msprior import storage

    global _log_path
    if _log_path is None or not storage.Location.of(folder).is_local:
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
        os.rename(_log_path, target)  # the open descriptor follows the file
    except OSError:  # another filesystem: copy, then write to the copy from now on
        _stream.flush()
        fd = _create_log(target)
        with open(_log_path, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
            shutil.copyfileobj(src, dst)
        with _stream.lock:
            old, _stream.file = _stream.file, os.fdopen(fd, "w", buffering=1)
        old.close()
        os.unlink(_log_path)
    _log_path = target


# --- logging: ours and Ray's, set here only -------------------------------------------------------


class _ToUser(logging.Handler):
    """msprior's own lines on the console: above a live progress bar, else straight to `out()`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if _bar is not None:
                _bar.print(line)
            else:
                stream = out()
                stream.write(line + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


def _setup_logger() -> None:
    """The "msprior" logger: INFO and up on the console (and, during a session, in the log), never
    again through the root logger's handlers (Ray's)."""
    if not any(isinstance(h, _ToUser) for h in _LOG.handlers):
        _LOG.addHandler(_ToUser())
        _LOG.setLevel(logging.INFO)
        _LOG.propagate = False


def ray_init_kwargs(log_to_driver: bool = True) -> Dict[str, Any]:
    """Ray's logging, as `ray.init` arguments (`msprior.runtime.ensure_ray`): the driver's "ray"
    loggers and every worker's root logger at INFO in Ray's TEXT format; what the workers print is
    forwarded to the driver's `sys.stdout`/`sys.stderr` (during a session: the log file)."""
    import ray

    _setup_logger()
    root = logging.getLogger()
    for h in list(root.handlers):  # the handler an earlier ray.init of this process added: one is enough
        if any(type(f).__name__ == "CoreContextFilter" for f in h.filters):
            root.removeHandler(h)
    return {"logging_config": ray.LoggingConfig(encoding="TEXT", log_level="INFO"),
            "log_to_driver": log_to_driver, "configure_logging": True, "logging_level": "INFO"}


def adopt_handlers() -> None:
    """After `ray.init`: the handlers Ray made write to the log during a session; all redacted."""
    from msprior.redact import install_log_redaction

    if _stream is not None:
        for h in _handlers_on({sys.__stdout__, sys.__stderr__, _user}):
            h.setStream(_stream)
    install_log_redaction()


def _handlers_on(streams: set) -> list:
    """Every logging handler that holds one of `streams` (Ray's, MLflow's, alembic's, the root's)."""
    loggers = [logging.getLogger()] + [v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers  # "stream" in vars: not one that reads sys.stderr itself
            if isinstance(h, logging.StreamHandler) and "stream" in vars(h) and h.stream in streams]


@contextlib.contextmanager
def _routed(stream: _LogStream) -> Iterator[None]:
    """Python's output and the terminal's logging handlers into `stream`, msprior's lines also;
    put back afterwards (handlers made during the block, e.g. by ray.init, write to stderr again)."""
    before = [(h, h.stream) for h in _handlers_on({sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__})]
    for h, _ in before:
        h.setStream(stream)
    ours = logging.StreamHandler(stream)
    ours.setFormatter(logging.Formatter("%(asctime)s msprior: %(message)s"))
    _LOG.addHandler(ours)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        _LOG.removeHandler(ours)
        for h, old in before:
            h.setStream(old)
        for h in _handlers_on({stream}):
            h.setStream(sys.stderr)


@contextlib.contextmanager
def session(command: str, quiet: bool = True) -> Iterator[Optional[str]]:
    """Send Python's output and logging to a log file for the duration of a command; yields its path."""
    global _user, _log_path, _stream
    from msprior.redact import install_log_redaction

    _setup_logger()
    install_log_redaction()  # log records and a crash's traceback are written redacted
    if not quiet or _user is not None:
        yield None
        return
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    _log_path, log_fd = _new_log(user_log_dir(), f"{command}-{stamp}-{os.getpid()}")
    sys.stdout.flush()
    sys.stderr.flush()
    ray_was_up = _ray_is_up()
    _user, _stream = sys.stdout, _LogStream(log_fd)  # sys.stdout: the terminal, or a test's capture
    failed = False
    try:
        with _routed(_stream):
            try:
                yield _log_path
            finally:
                if not ray_was_up:  # a Ray this command started: its exit messages belong in the log too
                    _shutdown_ray()
    except SystemExit as e:  # click ends every command with one; a non-zero code is a failure
        failed = e.code not in (0, None)
        raise
    except BaseException:
        failed = True
        raise
    finally:
        _user = None
        _stream.file.close()
        _stream = None
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


# --- progress: the one display every stage uses ---------------------------------------------------

_bar: Optional["Bar"] = None  # the live display, while a stage shows one


class Bar:
    """One stage's progress (`progress()`): a rich bar redrawn in place on a terminal, its final
    state as one line on any other console; a plain line in the log every LOG_EVERY_S and at the end."""

    def __init__(self, stage: str, total: Optional[float], unit: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        stream = out()
        tty = getattr(stream, "isatty", lambda: False)()
        # off a terminal rich prints the bar once, at the end: wide enough never to wrap it
        term = Console(file=stream, width=None if tty else 200, highlight=False, soft_wrap=False)
        self.stage, self.unit, self.last_log = stage, unit, time.monotonic()
        self.bar = Progress(TextColumn("[{task.description}]", markup=False), BarColumn(bar_width=24),
                            MofNCompleteColumn(), TextColumn(unit, markup=False), TimeRemainingColumn(),
                            TextColumn("{task.fields[note]}", markup=False), console=term, transient=False,
                            redirect_stdout=False, redirect_stderr=False, refresh_per_second=2)
        self.task = self.bar.add_task(stage, total=total, note="")
        self.bar.start()

    def update(self, completed: Optional[float] = None, *, advance: Optional[float] = None,
               total: Optional[float] = None, note: Optional[str] = None) -> None:
        self.bar.update(self.task, completed=completed, advance=advance, total=total,
                        **({} if note is None else {"note": note}))
        if time.monotonic() - self.last_log >= LOG_EVERY_S:
            self._log()

    def print(self, line: str) -> None:
        """A line above the live bar (an `echo` while the bar is shown)."""
        self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.bar.stop()
        self._log()

    def _log(self) -> None:
        self.last_log = time.monotonic()
        t = self.bar.tasks[0]
        of = "?" if t.total is None else f"{t.total:.0f}"
        line = f"[{self.stage}] {t.completed:.0f}/{of} {self.unit} {t.fields.get('note', '')}"
        if _stream is not None:
            _stream.write(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} progress: {line.rstrip()}\n")


@contextlib.contextmanager
def progress(stage: str, total: Optional[float], unit: str) -> Iterator[Bar]:
    """The progress display of one stage (preprocess, train, tune, export): `bar.update(...)`."""
    global _bar
    bar = Bar(stage, total, unit)
    outer, _bar = _bar, bar
    try:
        yield bar
    finally:
        _bar = outer
        bar.close()
