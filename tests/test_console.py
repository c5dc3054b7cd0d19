"""The console a user sees: msprior's own lines only; Ray's and MLflow's output in the log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# lines that only Ray, MLflow or pyarrow print (their loggers, actors, C++ core)
FOREIGN = re.compile(
    r"\(\w+ pid=\d+\)|core_worker|raylet|authentication_token|Progress bars disabled|streaming_executor"
    r"|Warning:|\bINFO\b|\bWARNING\b|mlflow\.|Dataset \w+ execution"
)


def _msprior(*args: str, cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "msprior")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


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
    foreign = [line for line in console if FOREIGN.search(line)]
    assert not foreign, foreign
    assert any(line.startswith("preprocess: encoded 3 files") for line in console), console
    assert len(console) <= 10, console

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
        os.write(1, b"to the log\n")
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
