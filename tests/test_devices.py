"""The device choice (msprior.devices.choose) and the flags that steer it, as the original MSPrior's
users type them: no flag, `--gpu N`, a bare `--gpu`, `--gpu -1`, `--cpu`.

The CPU path runs here on the real machine (no GPU); CUDA and MPS machines are described to the
function (its only input), and the real CUDA path runs where a GPU is lent (`test_on_cuda_*`).
"""

from __future__ import annotations

import pytest

from msprior import cli, devices
from msprior.devices import CPU, Device, DeviceError, Machine, choose

H100 = Machine(cuda=1, bf16=True, name="NVIDIA H100")
T4 = Machine(cuda=1, bf16=False, name="Tesla T4")
M2 = Machine(cuda=0, mps=True)
LAPTOP = Machine()
CLUSTER = Machine(cuda=4, where="in the Ray cluster")  # bf16 unknown: the workers decide


def test_no_flag_takes_what_the_machine_has_in_order_cuda_mps_cpu():
    assert choose(machine=H100) == Device("cuda", 0, True, "found NVIDIA H100")
    assert choose(machine=Machine(cuda=1, mps=True, bf16=True)).kind == "cuda"  # CUDA before MPS
    assert choose(machine=M2).kind == "mps"
    assert choose(machine=LAPTOP) == Device("cpu", why="no GPU found")


def test_bf16_only_where_the_card_supports_it():
    assert choose(machine=H100).describe() == "cuda:0, bf16 autocast"
    assert choose(machine=T4).bf16 is False and "fp32" in choose(machine=T4).describe()
    assert choose(machine=CLUSTER, workers=2).describe() == "CUDA GPUs, bf16 where supported"


def test_mps_is_for_one_process_only():
    """Ray Train's DDP has no MPS backend, and preprocessing's encoders are Ray actors."""
    assert choose(machine=M2, workers=2).kind == "cpu"
    assert choose(machine=M2, mps=False).kind == "cpu"


def test_gpu_index_is_the_originals_index_for_one_process_and_means_gpus_for_workers():
    assert choose(3, machine=Machine(cuda=4, bf16=True)) == Device("cuda", 3, True, "--gpu 3")
    assert choose(0, machine=CLUSTER, workers=4) == Device("cuda", None, None, "--gpu 0")
    assert choose(True, machine=H100).index == 0  # the library's older gpu=True


def test_cpu_is_forced_by_minus_one_cpu_or_gpu_false_whatever_the_machine():
    for kw in ({"gpu": -1}, {"cpu": True}, {"gpu": False}, {"gpu": 2, "cpu": True}):
        assert choose(machine=H100, **kw).kind == "cpu", kw


def test_an_explicit_gpu_the_machine_lacks_is_one_line():
    with pytest.raises(DeviceError, match=r"--gpu 0: no CUDA GPU on this machine; drop --gpu"):
        choose(0, machine=M2)
    with pytest.raises(DeviceError, match="in the Ray cluster"):
        choose(1, machine=Machine(where="in the Ray cluster"))
    with pytest.raises(DeviceError, match="4 workers need 4 GPUs, there are 1"):
        choose(0, machine=H100, workers=4)
    with pytest.raises(DeviceError, match="-1 for the CPU"):
        choose(-3, machine=H100)


def test_without_a_flag_too_few_gpus_for_the_workers_fall_back_to_the_cpu_and_say_why():
    d = choose(machine=H100, workers=2)
    assert d.kind == "cpu" and "lower --num_workers" in d.why


def test_this_machine_is_probed_for_real():
    import torch

    m = Machine.probe()
    assert m.cuda == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if not m.cuda and not m.mps:
        assert choose() == Device("cpu", why="no GPU found")


def test_pin_local_gpu_narrows_cuda_visible_devices_for_a_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(devices, "_ray_running", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert devices.pin_local_gpu(1) and devices.os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    with pytest.raises(DeviceError, match="shows 3 device"):
        devices.pin_local_gpu(3)
    assert not devices.pin_local_gpu(1, workers=2)  # Ray workers: --gpu means "on GPUs"
    assert not devices.pin_local_gpu(None) and not devices.pin_local_gpu(CPU)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # joining a cluster: its cards are its own
    assert not devices.pin_local_gpu(1)
    assert devices.os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"


def test_the_choice_is_printed_once_per_command():
    lines = []
    d = choose(machine=H100)
    devices.announce(d, "test-once", echo=lines.append)
    devices.announce(d, "test-once", echo=lines.append)
    assert lines == ["test-once: device cuda:0, bf16 autocast (found NVIDIA H100)"]


# --- the flags, through the real command-line parser -------------------------------------------


def _parsed(monkeypatch, argv):
    import msprior.data as data
    import msprior.train.run as run

    seen = []

    def fake(req, *a, **kw):
        seen.append(req)
        raise SystemExit(0)

    monkeypatch.setattr(run, "run_training", fake)
    monkeypatch.setattr(data, "preprocess", fake)  # what `msprior preprocess` calls
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0, argv
    return seen[-1]


TRAIN = ["train", "--db_path", "t", "--name", "n"]
PRE = ["preprocess", "--audio", "a", "--out_path", "o", "--rave", "r.ts"]


@pytest.mark.parametrize("head", [TRAIN, PRE], ids=["train", "preprocess"])
@pytest.mark.parametrize("flags, gpu, cpu", [
    ([], None, False),                  # no flag: what the machine has
    (["--gpu", "1"], 1, False),         # the original's index
    (["--gpu"], 0, False),              # this tool's older bare switch
    (["--gpu", "--num_workers", "1"], 0, False),
    (["--gpu", "-1"], -1, False),       # the CPU
    (["--gpu=-1"], -1, False),
    (["--cpu"], None, True),
])
def test_device_flags_parse(monkeypatch, head, flags, gpu, cpu):
    req = _parsed(monkeypatch, head + flags)
    assert (req.gpu, req.cpu) == (gpu, cpu)
    assert choose(req.gpu, req.cpu, machine=LAPTOP if gpu is None else Machine(cuda=2, bf16=True)).kind == \
        ("cpu" if cpu or gpu == -1 else "cuda" if gpu is not None else "cpu")


def test_a_non_integer_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(TRAIN + ["--gpu", "cuda:0"])
    assert e.value.code == 2  # click's usage error: "cuda:0" is not an integer after the bare --gpu


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_on_cuda_no_flag_picks_the_gpu_and_bf16_where_supported():
    import torch

    d = choose()
    assert d.kind == "cuda" and d.index == 0 and d.bf16 == torch.cuda.is_bf16_supported()
    assert devices.bf16_ok(torch.device("cuda", 0)) == torch.cuda.is_bf16_supported()
