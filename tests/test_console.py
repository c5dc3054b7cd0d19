"""The console a user sees: msprior's own lines and one progress display per stage; Ray's and MLflow's
output in the log file, with no file descriptor redirected (a child process keeps the terminal)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest

# lines that only Ray, MLflow or pyarrow print (their loggers, actors, C++ core)
FOREIGN = re.compile(
    r"\(\w+ pid=\d+\)|core_worker|raylet|authentication_token|Progress bars disabled|streaming_executor"
    r"|Warning:|\bINFO\b|\bWARNING\b|mlflow\.[a-z_]+\.|Dataset \w+ execution"
)
# The one line the console may show that is not ours: Ray's C++ core writes it to the fd 2 of the
# process that starts a Ray Data actor pool (each pool actor gets its transform by ObjectRef, with
# max_restarts=-1: ray-project/ray#53727), once per process. Only a global fd redirection or
# max_restarts=0 (no encoder restarts) would keep it off; /work/shared/FIELD_NOTES.md, "Ray".
RAY_CORE = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*constructor arguments in the "
                      r"object store and max_restarts > 0")
# the final state of a stage's progress display off a terminal: "[train] ━━━ 20/20 steps 0:00:00 loss ..."
BAR = re.compile(r"^\[(\w+)\] \S+ \d+/\d+ (files|steps|trials) ")


def _msprior(*args: str, cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "msprior")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_a_session_redirects_no_descriptor(tmp_path, monkeypatch, capfd):
    """Python's output and the terminal's logging handlers go to the log; fds 1 and 2 stay the
    terminal's: a child process started during the command still writes there."""
    from msprior import console

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-in-the-env")
    lib = logging.getLogger("mlflow.probe")  # a library's handler on the terminal, made before the command
    handler = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(lib, "handlers", [handler])
    monkeypatch.setattr(lib, "propagate", False)
    before = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    with console.session("probe") as path:
        during = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
        subprocess.run([sys.executable, "-c", "print('a child process line')"], check=True)
        assert sys.stdout.encoding and sys.stderr.errors  # libraries read them (Ray Tune does at import)
        print("a python print; key s3cr3t-in-the-env")
        lib.warning("a library warning")
        console.echo("our own line")
    assert during == before
    out, err = capfd.readouterr()
    log = open(path).read()
    assert "a child process line" in out and "a child process line" not in log
    assert "our own line" in out and "our own line" in log  # ours: on the console and in the log
    for foreign in ("a python print", "a library warning"):
        assert foreign in log and foreign not in out + err, (foreign, out, err)
    assert "s3cr3t-in-the-env" not in log and "key ***" in log  # the log is written redacted
    assert handler.stream is sys.stderr  # put back after the command


@pytest.mark.timeout(300)
def test_a_ray_tasks_print_lands_in_the_log(ray_session, tmp_path, monkeypatch, capfd):
    """What a Ray worker prints is forwarded to the driver: during a command, into the log file."""
    from msprior import console

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    mark = f"printed-by-a-ray-task-{os.getpid()}"

    @ray_session.remote(num_cpus=0.1)
    def shout(text: str) -> None:
        print(text)

    with console.session("probe") as path:
        ray_session.get(shout.remote(mark))
        deadline = time.monotonic() + 60  # Ray's log monitor forwards it within a second or so
        while mark not in open(path).read() and time.monotonic() < deadline:
            time.sleep(0.5)
    out, err = capfd.readouterr()
    assert mark not in out + err
    assert os.path.exists(path) and mark in open(path).read()


def _watch_fds(proc: subprocess.Popen) -> set:
    """What fds 1 and 2 of a running process point at, sampled until it ends."""
    seen = set()
    while proc.poll() is None:
        for fd in (1, 2):
            try:
                seen.add(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            except OSError:
                pass
        time.sleep(0.5)
    return seen


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_pipeline_prints_at_most_30_lines(tmp_path):
    """A newcomer's `msprior demo` (the pipeline on the bundled corpus): at most 30 console lines,
    one progress display per stage, none of Ray's or MLflow's lines; fds 1 and 2 stay the pipes
    they were given the whole time; the full story is in the log file."""
    exe = os.path.join(os.path.dirname(sys.executable), "msprior")
    proc = subprocess.Popen([exe, "demo", "--workdir", str(tmp_path / "demo"), "--max_steps", "20"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import threading

    printed = []
    reader = threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True)
    reader.start()
    fds = _watch_fds(proc)
    reader.join(timeout=30)
    lines = [ln.rstrip("\n") for ln in printed]
    assert proc.returncode == 0, "\n".join(lines)[-4000:]
    assert fds and all(t.startswith("pipe:") for t in fds), fds  # never the log file
    assert len(lines) <= 30, "\n".join(lines)
    assert not [ln for ln in lines if FOREIGN.search(ln) and not RAY_CORE.search(ln)], "\n".join(lines)
    assert len([ln for ln in lines if RAY_CORE.search(ln)]) <= 1, "\n".join(lines)
    stages = [BAR.match(ln).group(1) for ln in lines if BAR.match(ln)]
    assert stages == ["preprocess", "train", "register"], "\n".join(lines)
    assert lines[-1].startswith("log: "), lines
    log = open(lines[-1][len("log: "):]).read()
    assert FOREIGN.search(log) and "progress: [train]" in log, log[-3000:]


@pytest.mark.slow
def test_preprocess_console_is_ours_and_the_log_holds_the_rest(tmp_path):
    from msprior.codec import save_codec
    from msprior.data.synthetic import write_corpus

    rave = save_codec(str(tmp_path / "rave.ts"), discrete=True)
    write_corpus(str(tmp_path / "audio"), n_files=3, seconds=4.0)
    out = tmp_path / "table"
    r = _msprior("preprocess", "--audio", str(tmp_path / "audio"), "--out_path", str(out), "--rave", rave,
                 "--num_secs", "2", "--min_frames", "16", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    console = (r.stdout + r.stderr).splitlines()
    foreign = [line for line in console if FOREIGN.search(line) and not RAY_CORE.search(line)]
    assert not foreign, foreign
    assert any(line.startswith("preprocess: encoded 3 files") for line in console), console
    assert [line for line in console if BAR.match(line)] and len(console) <= 10, console

    log = console[-1]
    assert log.startswith("log: "), console
    path = log[len("log: "):]
    assert os.path.dirname(path) == str(out / "logs")  # the log sits with the command's output
    text = open(path).read()
    assert FOREIGN.search(text), text[:2000]  # Ray's own lines went there, not to the console

    # --verbose gives the console back to Ray and MLflow (and proves FOREIGN matches their lines)
    r = _msprior("preprocess", "--audio", str(tmp_path / "audio"), "--out_path", str(tmp_path / "t2"),
                 "--rave", rave, "--num_secs", "2", "--min_frames", "16", "--verbose", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert FOREIGN.search(r.stdout + r.stderr)


# --- the log file: the user's own folder, private files, no symlink following (issue 20, 16) ---


def test_log_folder_and_file_are_private(tmp_path, monkeypatch):
    import stat as st

    from msprior import console

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = tmp_path / "state" / "msprior" / "logs"
    folder.mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)  # left open by someone's umask: tightened on use
    with console.session("probe") as path:
        print("to the log")
    assert os.path.dirname(path) == str(folder)
    assert st.S_IMODE(folder.stat().st_mode) == 0o700
    assert st.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read() == "to the log\n"


def test_log_never_follows_a_planted_symlink(tmp_path):
    """A symlink planted at the log's name (in a folder others could write) is neither followed
    nor replaced: the log gets the next free name, the link's target stays as it was."""
    from msprior import console

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "cmd.log").symlink_to(victim)
    (tmp_path / "cmd-2.log").symlink_to(tmp_path / "dangling")  # a link to a file not yet made
    path, fd = console._new_log(str(tmp_path), "cmd")
    os.write(fd, b"log line\n")
    os.close(fd)
    assert path == str(tmp_path / "cmd-3.log")
    assert victim.read_text() == "precious\n" and not (tmp_path / "dangling").exists()
    assert os.path.islink(tmp_path / "cmd.log") and open(path).read() == "log line\n"


def test_log_folder_that_is_a_symlink_is_refused(tmp_path, monkeypatch):
    from msprior import console
    from msprior.errors import UserError

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "state" / "msprior").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state" / "msprior" / "logs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="not a folder of this user"):
        console.user_log_dir()
