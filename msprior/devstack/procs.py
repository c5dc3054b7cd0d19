"""Process supervision for the local servers: each runs in its own session and is stopped by it.

A server (`Daemon`) can outlive the process that started it (`cluster/local.sh up` returns, `down`
stops it later): its state (pid, marker) is saved, so stopping kills exactly that session -- never
`ray stop`, which kills every Ray of the user. Ray's job drivers leave the session (setsid); they
carry the stack's marker variable (`MARK`) in their environment, which is how `stop` finds them.
Started by a test (the default), a server also dies with that process (`die_with_parent`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional


def free_port(avoid: tuple = ()) -> int:
    """A TCP port free on 127.0.0.1 now (and, when asked, also free 10000 above: gRPC's default)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or port + 10000 > 65535:
            continue
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1")



MARK = "MSPRIOR_STACK_MARK"


def proc_info(pid: int):
    """(state, session id) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def owned_pids(sid: int, mark: Optional[str]) -> List[int]:
    """Live (non-zombie) processes in session `sid` or carrying `MSPRIOR_STACK_MARK=mark`."""
    needle = f"{MARK}={mark}".encode() if mark else None
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        info = proc_info(pid)
        if info is None or info[0] == "Z" or pid == os.getpid():
            continue
        if info[1] == sid:
            out.append(pid)
            continue
        if needle:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(pid)
            except OSError:
                pass
    return out


def is_ours(pid: int, mark: Optional[str] = None, hint: Optional[str] = None) -> bool:
    """Whether `pid` is still the process we started, not a later one that reused the number:
    it carries our mark in its environment, or `hint` in its command line."""
    try:
        if mark:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"{MARK}={mark}".encode() in f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return bool(hint) and hint.encode() in f.read()
    except OSError:
        return False


def signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def stop_session(leader: int, mark: Optional[str] = None, hint: Optional[str] = None,
                  grace: float = 15.0) -> None:
    """Stop the session `leader` started (its sid is its pid) and every process marked `mark`.

    A pid that now belongs to someone else (state left from before a reboot) is left alone: the
    session is only used when the leader is gone or still ours (`is_ours(leader, mark, hint)`);
    the kernel keeps a session id from being reused while any member lives.

    SIGTERM to the leader first: `ray start --block` and `mlflow server` then stop their own
    children in order (Ray's took ~3 s here; SIGTERM to all at once left gcs_server running
    for >10 s). What outlives the leader (job drivers, stragglers) gets SIGTERM, then SIGKILL.
    """

    info = proc_info(leader)
    if info is not None and info[0] != "Z" and not is_ours(leader, mark, hint):
        leader = -1  # not ours any more: only marked processes are

    def leader_alive() -> bool:
        info = proc_info(leader) if leader > 0 else None
        return bool(info) and info[0] != "Z" and info[1] == leader

    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and owned_pids(leader, mark):
            time.sleep(0.2)

    if leader > 0:
        signal_all([leader], signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and leader_alive():
        time.sleep(0.2)
    wait(2.0)  # the leader's children finish their own shutdown
    signal_all(owned_pids(leader, mark), signal.SIGTERM)
    wait(5.0)
    signal_all(owned_pids(leader, mark), signal.SIGKILL)
    wait(5.0)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl), so a crashed or
    killed test does not leave its servers running."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def write_private(path: Path, text: str) -> None:
    """Write a file only the user can read (credentials), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def http_ok(url: str, headers: Optional[Dict[str, str]] = None, expect: Optional[str] = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=3) as r:
            body = r.read().decode(errors="replace")
            return r.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_range(n: int, lo: int = 20000, hi: int = 30000) -> int:
    """First port of `n` consecutive ports free on 127.0.0.1, below the kernel's ephemeral range
    and away from Ray's default worker ports (10002-19999) that other local Rays use."""
    import random

    for _ in range(50):
        base = random.randrange(lo, hi - n)
        ok = True
        for p in range(base, base + n, 7):  # a sample: workers take ports one at a time anyway
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range on 127.0.0.1")


class Daemon:
    """A server in its own session, stoppable from any process that has its `state()`.

    By default it dies with the process that started it; `detach=True` lets it outlive that
    process (`cluster/local.sh up`), to be stopped later from the saved state.
    """

    kind = "daemon"

    def __init__(self, dir: str, env: Optional[Dict[str, str]] = None, start_timeout: float = 120.0,
                 detach: bool = False):
        self.dir = Path(dir).absolute()
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.detach = detach
        self.pid: Optional[int] = None
        self.mark: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    def _spawn(self, args: List[str], env: Dict[str, str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mark = f"{self.kind}-{secrets.token_hex(8)}"
        full_env = {**os.environ, **self.extra_env, **env, MARK: self.mark}
        with open(self.dir / f"{self.kind}.log", "ab") as log:
            self.proc = subprocess.Popen(args, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True,
                                         preexec_fn=None if self.detach else die_with_parent)
        self.pid = self.proc.pid

    def _wait_ready(self, ready) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.poll() if self.proc else None
                self.stop()
                raise RuntimeError(f"{self.kind} exited (code {code}) during start; "
                                   f"see {self.dir / (self.kind + '.log')}")
            if ready():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.kind} not ready after {self.start_timeout:.0f} s; "
                           f"see {self.dir / (self.kind + '.log')}")

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        info = self.pid and proc_info(self.pid)
        return bool(info) and info[0] != "Z" and is_ours(self.pid, self.mark)

    def processes(self) -> List[int]:
        """Every live process this server started (its session, plus marked job drivers)."""
        return owned_pids(self.pid, self.mark) if self.pid else []

    def stop(self) -> None:
        if self.pid:
            stop_session(self.pid, self.mark)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)  # reap our direct child
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        self.pid = None

    def state(self) -> Dict:
        return {"pid": self.pid, "mark": self.mark}

    def _load(self, state: Dict) -> None:
        self.pid, self.mark = state["pid"], state["mark"]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
