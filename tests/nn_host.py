"""A Python emulation of how nn~ (acids-ircam/nn_tilde, src/backend/backend.cpp) drives a model.

It loads the file with `torch.jit.load` ONLY (it never imports msprior) and reproduces the backend:
  * methods from `get_methods()`, each with its `<method>_params` = [in_ch, in_ratio, out_ch, out_ratio];
  * `perform`: per-channel audio buffers of n_vec samples, channel-major (buffer c * B + b is channel
    c of stream b) -> (B, in_ch, n_vec / in_ratio) by taking the LAST sample of each in_ratio block;
    the output is upsampled by sample-and-hold (`repeat_interleave(out_ratio)`), stream-major, and
    must have exactly n_vec samples, else it is refused;
  * attributes from `get_attributes()` ("none" ignored), typed by `<attr>_params`; setters get the
    message's strings converted like the backend does (parsing_utils.cpp: bool is false only for "0"
    and "false", int via stoi, float via stof, str untouched) and a non-zero return is a failure;
    getters must return a list (or a tuple).
  * Pd hands a number in a `set` message over as `std::to_string(float)`: `set listen 0` arrives as
    "0.000000" (`pd_arg` below).

Run as a script (`python nn_host.py REPORT.json MODEL.ts [MODEL.ts ...]`) it drives each model
through the checks of tests/test_export.py and a 60 s stream in 4096-sample buffers, toggling
temperature / listen / reset between buffers like a patch, and writes a JSON report.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Dict, List

import numpy as np
import torch


class HostError(RuntimeError):
    pass


def to_bool(s: str) -> bool:  # parsing_utils.cpp: anything but "0" and "false" is TRUE
    return not (s == "0" or s == "false")


def pd_arg(value) -> str:
    """A `set` argument as nn~'s Pd frontend passes it on: a float atom becomes std::to_string."""
    return f"{float(value):.6f}" if isinstance(value, (int, float)) else str(value)


def to_int(s: str) -> int:  # std::stoi: leading integer
    m = re.match(r"\s*[+-]?\d+", s)
    if not m:
        raise HostError(f"stoi: {s!r}")
    return int(m.group())


def to_float(s: str) -> float:  # std::stof
    return float(s)


CACHE_SUFFIXES = ("k_cache", "v_cache", "pos_cache", "state", "last", "last_cond")


class Host:
    def __init__(self, path: str):
        self.model = torch.jit.load(path, map_location="cpu")
        self.model.eval()

    # -- methods --------------------------------------------------------------------------------
    def methods(self) -> List[str]:
        return list(self.model.get_methods())

    def params(self, method: str = "forward") -> List[int]:
        if method not in self.methods():
            raise HostError(f"no method {method}")
        return [int(v) for v in getattr(self.model, f"{method}_params")]

    def perform(self, buffers: np.ndarray, n_batches: int, method: str = "forward") -> np.ndarray:
        """buffers [n_batches * in_ch, n_vec] float32 -> [n_batches * out_ch, n_vec]."""
        in_dim, in_ratio, out_dim, out_ratio = self.params(method)
        n_vec = buffers.shape[1]
        x = torch.from_numpy(np.ascontiguousarray(buffers, dtype=np.float32)).reshape(1, -1, n_vec)
        x = x.reshape(in_dim, n_batches, -1, in_ratio).select(-1, -1).permute(1, 0, 2)
        with torch.inference_mode():
            y = getattr(self.model, method)(x)
        y = y.repeat_interleave(out_ratio).reshape(n_batches, out_dim, -1)
        if y.shape[0] * y.shape[1] != n_batches * out_dim:
            raise HostError(f"bad out_buffer size: {tuple(y.shape)}")
        if y.shape[2] != n_vec:
            raise HostError(f"model output size is not consistent, expected {n_vec} samples, got {y.shape[2]}")
        return y.reshape(n_batches * out_dim, n_vec).numpy()

    # -- attributes -----------------------------------------------------------------------------
    def attributes(self) -> List[str]:
        return [a for a in self.model.get_attributes() if a != "none"]

    def types(self, attr: str) -> List[int]:
        return [int(v) for v in getattr(self.model, f"{attr}_params")]

    def get(self, attr: str) -> list:
        value = getattr(self.model, f"get_{attr}")()
        if not isinstance(value, (list, tuple)):  # Backend::get_attribute: toList, else toTuple
            raise HostError(f"get_{attr} returned {type(value).__name__}, not a list (nn~ 1.6's get breaks)")
        return list(value)

    def get_string(self, attr: str) -> str:  # Backend::get_attribute_as_string
        out = []
        for t, v in zip(self.types(attr), self.get(attr)):
            out.append(("true" if v else "false") if t == 0 else str(v) if t in (1, 3) else f"{float(v):.6f}")
        return " ".join(out)

    def set(self, attr: str, *args: str) -> int:
        """Returns the setter's code (nn~ reports non-zero as 'setter for <attr> failed')."""
        conv = {0: to_bool, 1: to_int, 2: to_float, 3: str}
        values = [conv[t](a) for t, a in zip(self.types(attr), args)]
        return int(getattr(self.model, f"set_{attr}")(*values))

    def state_numel(self) -> int:
        return sum(b.numel() for n, b in self.model.named_buffers() if n.endswith(CACHE_SUFFIXES))


# --- the checks, as a patch would exercise them ---------------------------------------------------


def _signal(rng: np.random.Generator, m, n_batches: int, n_vec: int) -> np.ndarray:
    """Per-channel audio-rate buffers holding one value per RAVE frame (what a [nn~ rave encode] sends),
    channel-major as nn~ hands them to the backend."""
    q, ratio = int(m.num_quantizers), int(m.ratio)
    frames = n_vec // ratio
    if bool(m.continuous):
        lat = rng.standard_normal((n_batches, q, frames))
    else:
        lat = rng.integers(0, int(m.vocab_size), (n_batches, q, frames))
    c = int(m.cond_channels)
    if c and bool(m.cond_tokens):
        cond = rng.integers(0, int(m.cond_vocab), (n_batches, c, frames))
    else:
        cond = rng.standard_normal((n_batches, c, frames))
    held = np.concatenate([lat, cond], 1).astype(np.float32).repeat(ratio, axis=2)
    if n_vec % ratio:
        held = np.concatenate([held, held[:, :, -1:].repeat(n_vec % ratio, 2)], 2)
    return held.transpose(1, 0, 2).reshape((q + c) * n_batches, n_vec)


def check_model(path: str, seconds: float = 60.0, n_vec: int = 4096, seed: int = 0) -> Dict:
    rng = np.random.default_rng(seed)
    host = Host(path)
    m = host.model
    r: Dict = {"path": path}
    r["methods"] = host.methods()
    r["forward_params"] = host.params("forward")
    r["input_labels"] = list(m.forward_input_labels)
    r["output_labels"] = list(m.forward_output_labels)
    r["attributes"] = host.attributes()
    r["types"] = {a: host.types(a) for a in r["attributes"]}
    r["getters"] = {a: host.get(a) for a in r["attributes"]}
    r["strings"] = {a: host.get_string(a) for a in r["attributes"]}
    codes = {}
    for attr, value in [("temperature", "0.5"), ("temperature", "-1.000000"), ("temperature", "0.000000"),
                        ("listen", "1.000000"), ("listen", "0.000000"), ("listen", "true"), ("listen", "bogus"),
                        ("listen", "false"), ("listen", "1"), ("listen", "0"), ("reset", "0.000000"),
                        ("learn_context", pd_arg(1)), ("learn_context", "false")]:
        codes[f"{attr}={value}"] = [host.set(attr, value), host.get(attr)]
    r["setters"] = codes
    r["set_sample_rate"] = int(m.set_sample_rate(48000))
    q, ratio, batch = int(m.num_quantizers), int(m.ratio), int(m.batch_size)
    in_ch, out_ch = r["forward_params"][0], r["forward_params"][2]

    # listen passes the latents through unchanged (per channel, the held value of each frame)
    host.set("reset", "true")
    host.set("listen", "true")
    x = _signal(rng, m, batch, n_vec)
    y = host.perform(x, batch)
    xin = x.reshape(in_ch, batch, n_vec).transpose(1, 0, 2)[:, :q]
    yout = y.reshape(batch, out_ch, n_vec)
    r["listen_passthrough"] = bool(np.array_equal(xin, yout[:, :q]))
    r["listen_perplexity_finite"] = bool(np.isfinite(yout[:, q]).all() and (yout[:, q] >= 1.0 - 1e-4).all())

    # reset restores the initial state: the same buffers after a reset give the same outputs
    def scenario(h: Host) -> List[np.ndarray]:
        outs = []
        torch.manual_seed(seed)  # continuous exports dither inside the bin with torch.rand
        h.set("temperature", "0.000000")
        h.set("listen", "true")
        for buf in (xa, xb):
            outs.append(h.perform(buf, batch))
        h.set("listen", "false")
        outs.append(h.perform(xb, batch))
        return outs

    xa, xb = _signal(rng, m, batch, n_vec), _signal(rng, m, batch, n_vec)
    host.set("reset", "true")
    state0 = host.state_numel()
    first = scenario(host)
    host.perform(_signal(rng, m, batch, n_vec), batch)  # more history, then reset
    r["reset_code"] = host.set("reset", "1.000000")
    again = scenario(host)
    r["reset_restores"] = all(np.array_equal(a, b) for a, b in zip(first, again))
    # set_sample_rate's warm-up runs the model: it must leave a fresh stream, as a load without it
    r["warm_up_keeps_state"] = all(np.array_equal(a, b) for a, b in zip(first, scenario(Host(path))))
    r["first_buffers_ms"] = first_buffers(path, n_vec, int(m.sr))

    # batch: fewer streams than the export's batch size; the exact output length is checked by perform
    r["batch1_shape"] = list(host.perform(_signal(rng, m, 1, n_vec), 1).shape)
    r["batchN_shape"] = list(host.perform(_signal(rng, m, batch, n_vec), batch).shape)

    # a 60 s stream in n_vec buffers, toggling attributes between buffers as a patch would
    host.set("reset", "true")
    sr = int(m.sr)
    n_buffers = math.ceil(seconds * sr / n_vec)
    states, times, toggles = set(), [], 0
    finite = True
    for i in range(n_buffers):
        if i % 7 == 3:
            toggles += host.set("listen", "1.000000" if (i // 7) % 2 else "0.000000") == 0
        if i % 11 == 5:
            toggles += host.set("temperature", f"{rng.uniform(0.0, 1.5):.6f}") == 0
        if i % 97 == 50:
            toggles += host.set("reset", "1.000000") == 0
        t0 = time.perf_counter()
        out = host.perform(_signal(rng, m, batch, n_vec), batch)
        times.append(time.perf_counter() - t0)
        finite &= bool(np.isfinite(out).all())
        states.add(host.state_numel())
    r["stream"] = {"buffers": n_buffers, "seconds": n_buffers * n_vec / sr, "frames": n_buffers * (n_vec // ratio),
                   "finite": finite, "toggles": toggles, "state_numel": sorted(states), "state_numel_start": state0,
                   "ms_per_buffer_median": 1000 * float(np.median(times)),
                   "ms_per_buffer_max": 1000 * float(np.max(times))}
    return r


def first_buffers(path: str, n_vec: int, sr: int, count: int = 10) -> Dict[str, List[float]]:
    """Wall ms of the first `count` generate-mode buffers after a load (with `set_sample_rate`, as
    nn~ calls it on load) and after a reset: TorchScript's warm-up must not land in them. Recorded,
    not asserted (no timing assertions in tests); bench/realtime.py reports them against a buffer."""
    host = Host(path)
    host.model.set_sample_rate(sr)
    host.set("listen", "false")  # exports start listening, as the original's
    rng = np.random.default_rng(0)
    out: Dict[str, List[float]] = {}
    for phase in ("load", "reset"):
        if phase == "reset":
            host.set("reset", "true")
        times = []
        for _ in range(count):
            x = _signal(rng, host.model, 1, n_vec)
            t0 = time.perf_counter()
            host.perform(x, 1)
            times.append(1000 * (time.perf_counter() - t0))
        out[phase] = times
    return out


def main(argv: List[str]) -> int:
    report_path, *models = argv
    torch.set_num_threads(1)
    reports = [check_model(p) for p in models]
    out = {"reports": reports, "msprior_imported": any(k == "msprior" or k.startswith("msprior.") for k in sys.modules),
           "torch_version": torch.__version__}
    with open(report_path, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
