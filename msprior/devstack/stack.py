"""The local stack behind `cluster/local.sh`: SeaweedFS S3 + MLflow server + Ray head on 127.0.0.1.

`python -m msprior.devstack up|down|env|status` (what local.sh runs); `Stack` is also a context
manager for tests. All state (pids, ports, credentials: mode 600) in one directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from msprior.devstack.procs import is_ours, owned_pids, proc_info, stop_session, write_private
from msprior.devstack.servers import MLflowServer, RayHead, SeaweedS3


class Stack:
    """SeaweedFS S3 + MLflow server + Ray head on 127.0.0.1, all state in `dir`.

    `with Stack(dir) as st: subprocess.run(["ray", "job", "submit", ...], env={**os.environ,
    **st.env()})`. `Stack.load(dir)` re-attaches to a stack another process started (what
    `cluster/local.sh down` uses). Data (S3 objects, the MLflow database) stays in `dir` across
    down/up; credentials are new on every `up`.
    """

    def __init__(self, dir: str = ".msprior-stack", bucket: str = "msprior",
                 num_cpus: Optional[int] = None, start_timeout: float = 120.0,
                 detach: bool = False):
        self.dir = Path(dir).absolute()
        self.detach = detach  # outlive this process (Ray and MLflow; SeaweedS3 always does)
        self.bucket = bucket
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.s3: Optional[SeaweedS3] = None
        self.mlflow: Optional[MLflowServer] = None
        self.ray: Optional[RayHead] = None
        self._s3_state: Optional[Dict] = None
        self.timings: Dict[str, float] = {}  # seconds each server took to answer

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def start(self) -> "Stack":
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            t = time.monotonic()
            self.s3 = SeaweedS3(data_dir=str(self.dir / "s3"), start_timeout=self.start_timeout)
            self.s3.start()
            self.s3.create_bucket(self.bucket)
            self._save()
            self.timings["s3"], t = time.monotonic() - t, time.monotonic()
            self.mlflow = MLflowServer(str(self.dir / "mlflow"), f"s3://{self.bucket}/mlflow",
                                       env=self.s3.env(), start_timeout=self.start_timeout,
                                       detach=self.detach)
            self.mlflow.start()
            self._save()
            self.timings["mlflow"], t = time.monotonic() - t, time.monotonic()
            job_env = {**self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                       **self.mlflow.env()}
            self.ray = RayHead(str(self.dir / "ray"), num_cpus=self.num_cpus, env=job_env,
                               start_timeout=self.start_timeout, detach=self.detach)
            self.ray.start()
            self._save()
            self.timings["ray"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        return self

    def env(self) -> Dict[str, str]:
        """The variables a client exports to use the stack (S3, MLflow, Ray job API)."""
        out: Dict[str, str] = {}
        if self._s3_state:
            s = self._s3_state
            out.update({"AWS_ENDPOINT_URL": s["endpoint"], "AWS_ACCESS_KEY_ID": s["access_key"],
                        "AWS_SECRET_ACCESS_KEY": s["secret_key"]})
        if self.mlflow and self.mlflow.port:
            out.update(self.mlflow.env())
        if self.ray and self.ray.ports:
            out.update(self.ray.env())
        return out

    def exports(self) -> str:
        """`export` lines for a POSIX shell (`eval "$(cluster/local.sh env)"`)."""
        import shlex

        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        if self.ray and self.ray.ports:
            lines.append(f"# ray status --address {self.ray.address}   "
                         f"(dashboard: {self.ray.dashboard_url})")
        if self.s3 is not None or self._s3_state:
            lines.append(f"# bucket: s3://{self.bucket}   (MLflow artifacts under s3://{self.bucket}/mlflow)")
        return "\n".join(lines) + "\n"

    def processes(self) -> List[int]:
        pids: List[int] = []
        if self._s3_state and self._s3_state.get("pid") and self._s3_alive():
            pids += owned_pids(self._s3_state["pid"], None)
        for d in (self.mlflow, self.ray):
            if d is not None:
                pids += d.processes()
        return pids

    def _save(self) -> None:
        if self.s3 is not None and self.s3.proc is not None:
            self._s3_state = {"pid": self.s3.proc.pid, "endpoint": self.s3.endpoint,
                              "access_key": self.s3.access_key, "secret_key": self.s3.secret_key,
                              "dir": str(self.s3.dir),
                              "grpc_ports": list(getattr(self.s3, "_grpc_ports", []))}
        state = {"bucket": self.bucket, "s3": self._s3_state,
                 "mlflow": self.mlflow.state() if self.mlflow else None,
                 "ray": self.ray.state() if self.ray else None}
        write_private(self.state_file, json.dumps(state, indent=1))
        write_private(self.dir / "env.sh", self.exports())

    @classmethod
    def load(cls, dir: str = ".msprior-stack") -> Optional["Stack"]:
        """The stack recorded in `dir`, or None when there is none."""
        st = cls(dir)
        if not st.state_file.exists():
            return None
        state = json.loads(st.state_file.read_text())
        st.bucket = state.get("bucket", st.bucket)
        st._s3_state = state.get("s3")
        if state.get("mlflow") and state["mlflow"].get("pid"):
            st.mlflow = MLflowServer.from_state(state["mlflow"])
        if state.get("ray") and state["ray"].get("pid"):
            st.ray = RayHead.from_state(state["ray"])
        return st

    def _s3_alive(self) -> bool:
        info = proc_info(self._s3_state["pid"])
        return bool(info) and info[0] != "Z" and is_ours(self._s3_state["pid"],
                                                          hint=self._s3_state["dir"])

    def alive(self) -> bool:
        """True when every server recorded is still running."""
        s3_ok = bool(self._s3_state) and self._s3_alive()
        return s3_ok and all(d is not None and d.alive() for d in (self.mlflow, self.ray))

    def stop(self) -> None:
        """Stop Ray, then MLflow, then S3 (the order jobs depend on them); keep the data."""
        for d in (self.ray, self.mlflow):
            if d is not None:
                d.stop()
        if self.s3 is not None:  # started in this process
            self.s3.stop()
            if self._s3_state:
                stop_session(self._s3_state["pid"], hint=self._s3_state["dir"])
        elif self._s3_state:  # started by another process: stop by session, then weed's cleanup
            stop_session(self._s3_state["pid"], hint=self._s3_state["dir"])
            s3 = SeaweedS3(data_dir=self._s3_state["dir"])
            s3._grpc_ports = self._s3_state.get("grpc_ports", [])
            s3.stop()
        self.ray = self.mlflow = self.s3 = None
        self._s3_state = None
        self.state_file.unlink(missing_ok=True)
        (self.dir / "env.sh").unlink(missing_ok=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)  # stdout carries only the exports


def up(a: argparse.Namespace, st: Optional[Stack]) -> int:
    """Start the stack (or re-attach to a running one) and print its exports."""
    if st is not None and st.alive():
        _say(f"stack already up in {st.dir}")
        sys.stdout.write(st.exports())
        return 0
    if st is not None:
        _say(f"cleaning up a stopped stack in {st.dir}")
        st.stop()
    t0 = time.monotonic()
    _say(f"starting S3, MLflow and Ray on 127.0.0.1 (state in {Path(a.dir).absolute()}) ...")
    try:
        st = Stack(a.dir, bucket=a.bucket, num_cpus=a.num_cpus, detach=True).start()
    except RuntimeError as e:
        _say(f"error: {e}")
        return 1
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in st.timings.items())
    _say(f"stack up in {time.monotonic() - t0:.0f} s ({parts}); stop it with: cluster/local.sh down")
    sys.stdout.write(st.exports())
    return 0


def down(a: argparse.Namespace, st: Optional[Stack]) -> int:
    """Stop what `up` started; keep the data unless --purge."""
    if st is not None:
        st.stop()
        _say(f"stack in {st.dir} stopped")
    else:
        _say(f"no stack recorded in {Path(a.dir).absolute()}")
    if a.purge:
        shutil.rmtree(a.dir, ignore_errors=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m msprior.devstack up|down|env|status [--dir DIR]` (cluster/local.sh)."""
    ap = argparse.ArgumentParser(prog="cluster/local.sh", description=(
        "A local msprior stack on 127.0.0.1: Ray head (token auth), SeaweedFS S3, MLflow server. "
        "`up` prints the variables to export: eval \"$(cluster/local.sh up)\"."))
    ap.add_argument("command", choices=["up", "down", "env", "status"])
    ap.add_argument("--dir", default=".msprior-stack", help="state, logs and data (default: %(default)s)")
    ap.add_argument("--bucket", default="msprior", help="bucket created on up (default: %(default)s)")
    ap.add_argument("--num_cpus", "--num-cpus", type=int, default=None,
                    help="logical CPUs of the Ray head (default: max(4, cores))")
    ap.add_argument("--purge", action="store_true", help="down: also delete DIR (data included)")
    a = ap.parse_args(argv)
    st = Stack.load(a.dir)
    if a.command in ("up", "down"):
        return {"up": up, "down": down}[a.command](a, st)
    if st is None:
        _say(f"no stack recorded in {Path(a.dir).absolute()}: run cluster/local.sh up")
        return 1
    if a.command == "env":
        sys.stdout.write(st.exports())
        return 0 if st.alive() else 1
    ok = st.alive()  # status
    _say(f"stack in {st.dir}: {'up' if ok else 'NOT fully running'}; processes: {len(st.processes())}")
    return 0 if ok else 1
