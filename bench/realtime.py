"""Realtime latency of the nn~ export: one `forward` call on a one-frame buffer, generate mode.

Default config (decoder_only: 8 x 512 ALiBi layers, seq_len 256) with the reference data shape of
16 quantizers x 1024 tokens, random weights (latency does not depend on training), one CPU thread,
TorchScript as nn~ runs it. Reports median / p99 ms (wall clock and thread CPU time: on a shared,
loaded machine the CPU time is the figure that estimates an idle machine's latency) at the start of a stream and after `--steps`
streamed frames (the KV cache is full after 256: the cost must stay flat), fp32 and int8, against
the audio one frame covers. Baseline of the ratios: fp32 at the start of the stream, same run.
Also: the split between the transformer step (stream_context) and the 16-step predictor (predict),
the fp32 memory-bandwidth floor (bytes of weights read per frame / measured read bandwidth) and the
ratio to it, and the first buffers after load and after `reset` through the emulated nn~ host
(tests/nn_host.py: torch.jit.load, `set_sample_rate` on load as nn~ calls it, 4096-sample buffers),
whose worst must stay within one buffer's duration (TorchScript profiles and optimises a method on
its first calls: the export's `warm_up` does that at `set_sample_rate`; shown with and without).

    .venv/bin/python bench/realtime.py [--steps 10000] [--samples 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from unittest import mock

import numpy as np
import torch

from msprior.config import load_config
from msprior.export.run import LoadedRun, build_scripted, quantize_int8, save_scripted
from msprior.model import DatasetFacts, build_prior, input_major_linears

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from nn_host import Host, _signal  # noqa: E402  (the emulated nn~ host: torch.jit.load only)

warnings.filterwarnings("ignore")


def manifest(q: int, v: int, ratio: int, sr: int) -> dict:
    return {"rave": {"sr": sr, "ratio": ratio, "num_quantizers": q, "vocab_size": v, "continuous": False,
                     "resolution": None, "sha256": "-"}, "conditioning": None}


def timed(fn, n: int) -> np.ndarray:
    """[n, 2] ms: wall clock and this thread's CPU time (the latter is robust to a loaded machine)."""
    out = np.empty((n, 2))
    for i in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        out[i] = time.perf_counter() - t0, time.thread_time() - c0
    return out * 1000.0


def stats(ms: np.ndarray) -> str:
    return (f"wall median {np.median(ms[:, 0]):6.2f} p99 {np.percentile(ms[:, 0], 99):6.2f} ms, "
            f"cpu median {np.median(ms[:, 1]):6.2f} p99 {np.percentile(ms[:, 1], 99):6.2f} ms")


def bandwidth_gbs() -> float:
    """Single-thread streaming read bandwidth (GB/s): sum over a 256 MiB tensor."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    ms = np.min(timed(lambda: x.sum(), 5)[:, 0])
    return x.numel() * 4 / (ms / 1000) / 1e9


def gemv_gbs() -> float:
    """What PyTorch's own batch-1 fp32 matrix-vector product reads on one thread (GB/s): x @ W over
    30 distinct [512, 2048] input-major weights (120 MB, more than the last-level cache)."""
    ws = [torch.randn(512, 2048) for _ in range(30)]
    x = torch.randn(1, 512)
    with torch.inference_mode():
        ms = np.min(timed(lambda: [x @ w for w in ws], 5)[:, 0])
    return sum(w.numel() * 4 for w in ws) / (ms / 1000) / 1e9


def frame_weight_bytes(prior) -> int:
    """fp32 bytes of weights one generated frame reads: every parameter but the embedding table, of
    which streaming gathers 2Q rows (the frame's input, the predictor's running sum)."""
    table = prior.embedding.table.weight
    n = sum(p.numel() for p in prior.parameters()) - table.numel()
    return 4 * (n + 2 * prior.num_quantizers * table.shape[1])


def first_buffers(path: str, warm: bool, sr: int, n_vec: int = 4096, count: int = 10) -> dict:
    """ms (cpu, wall) of the first `count` buffers after load and after a reset, generate mode."""
    host = Host(path)
    if warm:
        host.model.set_sample_rate(sr)  # nn~: once on load, on the loading thread
    host.set("listen", "false")  # generate (exports start listening, the original's default)
    rng = np.random.default_rng(0)
    out = {}
    for phase in ("load", "reset"):
        if phase == "reset":
            host.set("reset", "true")
        x = _signal(rng, host.model, 1, n_vec)
        out[phase] = timed(lambda: host.perform(x, 1), count)
    return out


def report_first_buffers(paths: dict, sr: int, ratio: int) -> None:
    """Worst of the first 10 buffers after load and after reset, with and without the warm-up."""
    buffer_ms = 1000.0 * 4096 / sr
    print(f"\nfirst 10 buffers of 4096 samples ({4096 // ratio} frames, {buffer_ms:.1f} ms of audio), "
          "emulated nn~ host, generate mode, worst cpu / wall ms:")
    with torch.inference_mode():
        for label, path in paths.items():
            for warm in (False, True):
                fb = first_buffers(path, warm, sr)
                cells = [f"after {k}: {v[:, 1].max():6.1f} / {v[:, 0].max():6.1f}" for k, v in fb.items()]
                worst = max(v[:, 1].max() for v in fb.values())
                print(f"  {label} {'with' if warm else 'without'} set_sample_rate warm-up: {' | '.join(cells)} "
                      f"-> worst cpu {worst / buffer_ms:.2f} buffers")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="decoder_only")
    ap.add_argument("--quantizers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--ratio", type=int, default=2048)
    ap.add_argument("--sr", type=int, default=44100)
    ap.add_argument("--steps", type=int, default=10_000, help="frames streamed before the second measurement")
    ap.add_argument("--samples", type=int, default=300, help="timed calls per measurement")
    ap.add_argument("--override", action="append", default=[],
                    help="config override, repeatable (e.g. model.predictor=linear_film: the previous predictor)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    cfg = load_config(args.config, args.override)
    man = manifest(args.quantizers, args.vocab, args.ratio, args.sr)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(man)).eval()
    n_params = sum(p.numel() for p in prior.parameters())
    frame_ms = 1000.0 * args.ratio / args.sr
    print(f"config {args.config} {' '.join(args.override)}: {n_params / 1e6:.1f} M params, Q={args.quantizers}, V={args.vocab}, "
          f"1 thread, torch {torch.__version__}; one frame = {args.ratio} samples at {args.sr} Hz = {frame_ms:.1f} ms "
          f"(1024 samples at 44.1 kHz: 23.2 ms)")

    # weights read per generated frame (embedding and FiLM rows are gathered, not streamed)
    fp32_bytes = frame_weight_bytes(prior)
    bw = bandwidth_gbs()
    floor_ms = fp32_bytes / bw / 1e6
    gemv = gemv_gbs()
    print(f"fp32 weights read per frame {fp32_bytes / 1e6:.0f} MB; read bandwidth {bw:.1f} GB/s "
          f"-> fp32 floor {floor_ms:.2f} ms/frame; PyTorch's batch-1 matrix-vector product reads "
          f"{gemv:.1f} GB/s -> {fp32_bytes / gemv / 1e6:.2f} ms/frame")

    # where the time goes (eager modules, one frame): transformer step vs the per-quantizer predictor
    with torch.inference_mode():
        for label, p in (("fp32", prior), ("int8", quantize_int8(prior))):
            p.init_stream(1)
            x = torch.zeros(1, 1, args.quantizers, dtype=torch.long)
            ctx = timed(lambda: p.stream_context(x, None), 100)
            h = p.stream_context(x, None)[:, -1]
            pred = timed(lambda: p.predict(h, 1.0, None), 100)
            print(f"eager {label}: stream_context {stats(ctx)} | predict (Q={args.quantizers}) {stats(pred)}")

    loaded = LoadedRun(prior, cfg, man, {})
    results, paths = {}, {}
    tmp = tempfile.mkdtemp(prefix="msprior-realtime-")
    variants = (("fp32 [out,in]", None, False), ("fp32", None, True), ("int8", "int8", True))
    for label, quant, input_major in variants:  # "[out,in]": the export before input-major weights
        with mock.patch("msprior.export.run.input_major_linears", input_major_linears if input_major else id):
            m = build_scripted(loaded, batch_size=1, quantize=quant)
        if label != "fp32 [out,in]":
            paths[label] = save_scripted(m, os.path.join(tmp, f"{label}.ts"), {})
        m.set_temperature(1.0)
        m.set_listen("false")  # exports start listening (the original's default)
        x = torch.zeros(1, args.quantizers, 1)  # one frame, generate mode
        with torch.inference_mode():
            m.set_sample_rate(args.sr)  # warm-up, as nn~ triggers it on load
            start = timed(lambda: m(x), args.samples)
            t0 = time.perf_counter()
            for _ in range(args.steps - args.samples):
                m(x)
            mid = time.perf_counter() - t0
            late = timed(lambda: m(x), args.samples)
        results[label] = (start, late)
        print(f"scripted {label}: start {stats(start)} | after {args.steps} steps {stats(late)} "
              f"({mid:.0f} s in between)")

    base = np.median(results["fp32 [out,in]"][0][:, 1])
    print("\nsummary (ratios of CPU-time medians against fp32 [out,in] at stream start, same run):")
    for label, (start, late) in results.items():
        for when, ms in (("start", start), (f"after {args.steps}", late)):
            wall, cpu = np.median(ms[:, 0]), np.median(ms[:, 1])
            print(f"  {label:>13} {when:>12}: cpu median {cpu:6.2f} ms ({cpu / base:4.2f}x), p99 {np.percentile(ms[:, 1], 99):6.2f}"
                  f" | wall median {wall:6.2f} p99 {np.percentile(ms[:, 0], 99):6.2f} ms"
                  f" | cpu = {100 * cpu / frame_ms:4.1f}% of a {frame_ms:.1f} ms frame, {100 * cpu / 23.22:4.1f}% of 23.2 ms")
    fp32_cpu = max(np.median(ms[:, 1]) for ms in results["fp32"])
    int8_cpu = max(np.median(ms[:, 1]) for ms in results["int8"])
    print(f"  fp32 / bandwidth floor: {fp32_cpu:.2f} / {floor_ms:.2f} ms = {fp32_cpu / floor_ms:.2f}x (target <= 1.3x); "
          f"/ PyTorch's matrix-vector speed: {fp32_cpu / (fp32_bytes / gemv / 1e6):.2f}x")
    before = max(np.median(ms[:, 1]) for ms in results["fp32 [out,in]"])
    print(f"  fp32 input-major vs [out,in] weights: {before / fp32_cpu:.2f}x faster")
    print(f"  int8 per frame: {int8_cpu:.2f} ms (target <= 3 ms)")

    report_first_buffers(paths, args.sr, args.ratio)
    print("export sizes: " + ", ".join(f"{k} {os.path.getsize(v) / 1e6:.0f} MB" for k, v in paths.items()))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
