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
