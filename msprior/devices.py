"""Where a command computes: one function (`choose`), its answer printed once.

Order: CUDA (bf16 autocast where the card supports it), then Apple MPS (single-process training only:
Ray Train's DDP has no MPS backend), then the CPU. The flags keep the original MSPrior's meaning:

    (no flag)      what the machine (or the Ray cluster) has
    --gpu N        CUDA device N for single-process work (a local Ray started by this command sees
                   only that card); for the workers of a Ray cluster it means "on GPUs"
    --gpu -1, --cpu  the CPU, whatever the machine has

The library also takes `gpu=True` / `gpu=False` (older callers, sweeps): GPUs / the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional, Union

from msprior.errors import UserError

CPU = -1  # --gpu -1: the CPU

GPU_HELP = ("GPU to use: an index (the original's meaning) for single-process work, 'on GPUs' for Ray "
            "workers; -1 = CPU. Default: a GPU when there is one. A bare --gpu means --gpu 0.")
CPU_HELP = "Compute on the CPU even where a GPU is found (same as --gpu -1)."


class DeviceError(UserError):
    """A device flag the machine cannot honour; one line."""


@dataclass(frozen=True)
class Machine:
    """What a command can compute on: CUDA devices (a Ray cluster's GPUs), MPS, bf16 support."""

    cuda: int = 0
    mps: bool = False
    bf16: Optional[bool] = None  # None: not known here (remote Ray workers decide for themselves)
    name: str = ""
    where: str = "on this machine"

    @classmethod
    def probe(cls) -> "Machine":
        """This process's machine, through torch."""
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return cls(cuda=n, mps=mps, bf16=bool(n and torch.cuda.is_bf16_supported()),
                   name=torch.cuda.get_device_name(0) if n else "")

    @classmethod
    def of_ray(cls, want: Optional[Dict[str, float]] = None, count: int = 0,
               enough: Optional[float] = None) -> "Machine":
        """The running Ray cluster's GPUs; MPS only when the cluster is this (macOS) machine.

        `count` bundles of `want` (e.g. {"GPU": 1, "msprior_train": 1}: an explicit --gpu) on a cluster
        this command joined (RAY_ADDRESS) that has fewer GPUs now: ask its autoscaler for them and wait
        up to MSPRIOR_GPU_WAIT_S (default 600 s) for the nodes, since an autoscaling cluster idles at
        0 GPU nodes and `cluster_resources()` counts only the nodes that are up. The wait ends at
        `enough` GPUs (default: all of them; preprocess's encoders share what there is)."""
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0) + 1e-9)
        enough = count * want["GPU"] if enough is None and count and want and want.get("GPU") else enough
        if count and want and want.get("GPU") and gpus < enough:
            gpus = _wait_for_gpus(want, count, gpus, enough)
        here = len(ray.nodes()) == 1 and (gpus or sys.platform == "darwin")  # torch only when it can tell
        local = cls.probe() if here else cls()
        return cls(cuda=gpus, mps=local.mps, bf16=local.bf16 if local.cuda else None, name=local.name,
                   where="in the Ray cluster")


@dataclass(frozen=True)
class Device:
    """The choice: `kind` cuda / mps / cpu, the CUDA index a single process asked for, and why."""

    kind: str
    index: Optional[int] = None
    bf16: Optional[bool] = None
    why: str = ""

    @property
    def gpu(self) -> bool:
        return self.kind == "cuda"

    def describe(self) -> str:
        if self.kind == "cuda":
            name = f"cuda:{self.index}" if self.index is not None else "CUDA GPUs"
            prec = {True: ", bf16 autocast", False: ", fp32 (no bf16 on this card)"}.get(self.bf16, ", bf16 where supported")
            return f"{name}{prec}"
        return {"mps": "Apple MPS", "cpu": "CPU"}[self.kind]


RESOURCES_HELP = ("Custom Ray resources per {what}, NAME=AMOUNT[,NAME=AMOUNT] (e.g. msprior_train=1: only "
                  "the nodes that advertise it, cluster/README.md's pools).")


def parse_resources(text: Optional[str], flag: str) -> Dict[str, float]:
    """`--worker_resources msprior_train=1,x=0.5` -> {"msprior_train": 1.0, "x": 0.5}; one line on a typo.
    CPU, GPU and memory have their own flags: they are refused here."""
    out: Dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, amount = item.partition("=")
        name = name.strip()
        try:
            value = float(amount) if eq else -1.0
        except ValueError:
            value = -1.0
        if not name or value <= 0 or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise DeviceError(f"{flag} {text!r}: give NAME=AMOUNT pairs of custom resources with AMOUNT > 0, "
                              "comma-separated (CPU, GPU and memory have their own flags)")
        out[name] = value
    return out


def normalise(gpu: Union[None, bool, int], cpu: bool = False) -> Optional[int]:
    """None (choose), CPU (-1) or a GPU index; bools are the library's older spelling."""
    if cpu or gpu is False:
        return CPU
    if gpu is True:
        return 0
    if gpu is not None and gpu < CPU:
        raise DeviceError(f"--gpu {gpu}: give a device index >= 0, or -1 for the CPU")
    return gpu


def choose(gpu: Union[None, bool, int] = None, cpu: bool = False, machine: Optional[Machine] = None,
           workers: int = 1, mps: bool = True) -> Device:
    """The device of a command: CUDA, then MPS (`mps` allowed and a single worker), then CPU.

    `machine` defaults to this process's (`Machine.probe()`); for Ray, pass `Machine.of_ray()`.
    An explicit --gpu on a machine without one, or more workers than GPUs, is a one-line error;
    without a flag the choice falls back to the CPU and says why.
    """
    g = normalise(gpu, cpu)
    if g == CPU:
        return Device("cpu", why="--cpu" if cpu else "--gpu -1")
    m = machine or Machine.probe()
    if g is not None:
        if m.cuda < 1:
            raise DeviceError(f"--gpu {g}: no CUDA GPU {m.where}; "
                              "drop --gpu (or pass --gpu -1) to run on the CPU")
        if m.cuda < workers:
            raise DeviceError(f"--gpu: {workers} workers need {workers} GPUs, there are {m.cuda}: lower --num_workers")
        return Device("cuda", index=g if workers == 1 else None, bf16=m.bf16, why=f"--gpu {g}")
    if m.cuda >= workers:
        return Device("cuda", index=0 if workers == 1 else None, bf16=m.bf16, why=f"found {m.name or 'a GPU'}")
    if m.cuda:
        return Device("cpu", why=f"{m.cuda} GPU(s) for {workers} workers: lower --num_workers to use them")
    if m.mps and mps and workers == 1:
        return Device("mps", why="found")
    return Device("cpu", why="no GPU found")


def pin_local_gpu(gpu: Union[None, bool, int], workers: int = 1) -> bool:
    """--gpu N for single-process work: before this command starts a local Ray, make card N the only
    one it sees (Ray hands its workers the cards it sees). True when it did."""
    g = normalise(gpu)
    if g is None or g < 0 or workers != 1 or os.environ.get("RAY_ADDRESS") or _ray_running():
        return False
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        if g >= len(visible):
            raise DeviceError(f"--gpu {g}: CUDA_VISIBLE_DEVICES shows {len(visible)} device(s) (0..{len(visible) - 1})")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[g]
        return True
    n = Machine.probe().cuda
    if n and g >= n:
        raise DeviceError(f"--gpu {g}: this machine has {n} CUDA device(s) (0..{n - 1})")
    if n:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(g)
    return bool(n)


GPU_WAIT_S = 600.0  # MSPRIOR_GPU_WAIT_S: how long an explicit --gpu waits for an autoscaler's GPU nodes


def _wait_for_gpus(want: Dict[str, float], count: int, have: int, need: float) -> int:
    """Ask the autoscaler for `count` x `want` and wait for the GPUs to join; the GPUs there are then.
    Only on a cluster this command joined: a Ray this command started has no autoscaler."""
    import ray
    from ray.autoscaler.sdk import request_resources

    address = os.environ.get("RAY_ADDRESS")
    wait_s = float(os.environ.get("MSPRIOR_GPU_WAIT_S", GPU_WAIT_S))
    if address in (None, "", "local") or wait_s <= 0:
        return have
    from msprior import console

    console.echo(f"waiting up to {wait_s:.0f} s for {need:g} GPU(s) of {dict(want)} x {count} "
                 f"(the cluster has {have}; the autoscaler adds nodes; MSPRIOR_GPU_WAIT_S sets the wait)")
    request_resources(bundles=[dict(want)] * count)
    deadline = time.monotonic() + wait_s
    bundles = math.ceil(need / want["GPU"] - 1e-9)  # the bundles the wait ends at (preprocess: 1)
    needs = {k: v * bundles for k, v in want.items()}  # a pool's slots too (msprior_train)

    def short() -> bool:
        total = ray.cluster_resources()
        return any(total.get(k, 0.0) < v - 1e-9 for k, v in needs.items())

    while short() and time.monotonic() < deadline:
        time.sleep(2.0)
    have = int(ray.cluster_resources().get("GPU", 0) + 1e-9)
    if short():
        raise DeviceError(f"--gpu: {needs} asked, the Ray cluster at {address} has {have} GPU(s) after waiting "
                          f"{wait_s:.0f} s for its autoscaler: check the cluster's GPU node types and limits, "
                          "raise MSPRIOR_GPU_WAIT_S, or drop --gpu")
    return have


def _ray_running() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:  # pragma: no cover (ray is a dependency)
        return False


def assigned_threads(explicit: int = 0) -> int:
    """Torch threads for this Ray worker: `explicit`, else the CPUs Ray assigned it (rounded, at
    least 1). Never os.cpu_count(): that is the host's cores, not this worker's share (KubeRay's
    limits, other workers and the table's fills on the node)."""
    if explicit:
        return explicit
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    except Exception:  # outside a Ray worker (a test calling the class directly)
        cpus = 1.0
    return max(1, int(round(cpus)))


def torch_device(kind: str):
    """The worker-side torch device for a `Device.kind` other than Ray Train's own choice."""
    import torch

    return torch.device(kind)


def bf16_ok(device) -> bool:
    """bf16 autocast on this CUDA device (Ampere and newer); fp32 elsewhere."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


_announced = set()


def announce(device: Device, what: str, echo=None) -> None:
    """Print the choice once per command and process: `train: device CUDA GPUs, ... (found)`."""
    if what in _announced:
        return
    _announced.add(what)
    line = f"{what}: device {device.describe()} ({device.why})"
    if echo is None:
        from msprior import console

        echo = console.echo
    echo(line)
