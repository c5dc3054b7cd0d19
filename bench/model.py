"""Model benchmark (CPU): training throughput and streamed-generation latency of a config.

    python bench/model.py [--config decoder_only] [--batch 8] [--quantizers 8] [--vocab 1024]
    python bench/model.py --compare HEAD~1 [--rounds 3]   # training before/after, same run

`--compare REF` extracts commit REF of this repository (git archive) into a temporary folder and
times the training step of both trees in alternating subprocesses (this tree's bench script, each
tree's msprior package), so that both see the same machine load; it prints the ratio.

Prints
  * training tokens/s (frames x quantizers per second, forward + backward + AdamW step) at a fixed
    batch of seq_len-frame windows, all threads;
  * the latency of one streamed generation step (one frame through the KV cache / GRU state, then
    the skip predictor samples its Q tokens) on ONE thread, median and p99, at the start of a stream
    and once the cache is full, against the baseline measured in the same run: the same step without
    a cache (recomputing the seq_len-frame prefix), as a ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from msprior.config import load_config
from msprior.model import DatasetFacts, build_prior


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def make_batch(cfg, args):
    T, Q = cfg.model.seq_len, args.quantizers
    batch = {"rave": torch.randint(0, args.vocab, (args.batch, T + 1, Q))}
    Tc = -(-T // cfg.model.cond_ratio)
    if cfg.model.conditioning == "tokens":
        batch["tokens"] = torch.randint(0, 64, (args.batch, Tc))
    elif cfg.model.conditioning == "features":
        batch["features"] = torch.randn(args.batch, Tc, 16)
    return batch


def train_step_s(prior, batch, steps: int) -> tuple:
    """Median (wall, process CPU) seconds of one training step (forward + backward + AdamW), the
    first one apart. CPU time (all threads) is the robust figure on a machine shared with others."""
    opt = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], lr=1e-4)
    prior.train()
    times, cpu = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = prior.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def compare(args) -> None:
    """Training step of this tree vs commit `args.compare`, alternating subprocesses."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = tempfile.mkdtemp(prefix="msprior-bench-")
    archive = subprocess.run(["git", "-C", here, "archive", args.compare, "msprior", "configs"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--train_only", "--config", args.config,
           "--batch", str(args.batch), "--quantizers", str(args.quantizers), "--vocab", str(args.vocab),
           "--train_steps", str(args.train_steps)]
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, root in (("before", old), ("after", here)):
            env = {**os.environ, "PYTHONPATH": root}
            out = subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, text=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    tokens = args.batch * load_config(args.config).model.seq_len * args.quantizers
    med = {}
    for label, rs in runs.items():
        wall = statistics.median(r["step_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        med[label] = (wall, cpu)
        print(f"{label:6s} ({args.compare if label == 'before' else 'this tree'}): median {wall:.3f} s/step wall "
              f"{[round(r['step_s'], 2) for r in rs]}, {cpu:.3f} CPU-s/step {[round(r['cpu_s'], 2) for r in rs]} "
              f"-> {tokens / wall:,.0f} tokens/s")
    print(f"training speed after / before: {med['before'][0] / med['after'][0]:.2f}x wall, "
          f"{med['before'][1] / med['after'][1]:.2f}x per CPU-second (>= 1 is not slower)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="decoder_only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quantizers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--train_steps", type=int, default=5)
    ap.add_argument("--gen_steps", type=int, default=300)
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--compare", default="", help="a git commit: time training before (it) and after (this tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        return compare(args)

    cfg = load_config(args.config, args.override)
    facts = DatasetFacts(args.quantizers, args.vocab, cond_ratio=cfg.model.cond_ratio, cond_vocab=64, cond_features=16)
    torch.manual_seed(0)
    prior = build_prior(cfg.model, facts)
    batch = make_batch(cfg, args)
    if args.train_only:
        wall, cpu = train_step_s(prior, batch, args.train_steps)
        print(json.dumps({"step_s": wall, "cpu_s": cpu}))
        return
    params = sum(p.numel() for p in prior.parameters())
    T, Q = cfg.model.seq_len, args.quantizers
    Tc = -(-T // cfg.model.cond_ratio)
    print(f"config={args.config} params={params / 1e6:.1f}M batch={args.batch} seq_len={T} Q={Q} V={args.vocab} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    # --- training throughput ---
    step_s, _ = train_step_s(prior, batch, args.train_steps)
    print(f"train: {step_s:.2f} s/step  {args.batch * T * Q / step_s:,.0f} tokens/s "
          f"(original MSPrior reference on this machine kind: ~12 s/step at batch 8, Q=8 -> "
          f"{12.0 / step_s:.1f}x)")

    # --- streamed generation latency, one thread ---
    torch.set_num_threads(1)
    prior.eval()
    prior.prepare_stream()  # the embedding rows the sampler gathers: what an export streams with
    cond_frame = None
    if cfg.model.conditioning == "tokens":
        cond_frame = torch.zeros(1, 1, dtype=torch.long)
    elif cfg.model.conditioning == "features":
        cond_frame = torch.zeros(1, 1, 16)

    def gen_step(frame):
        h = prior.stream_context(frame, cond_frame)
        return prior.predict(h[:, -1], 1.0)[0].unsqueeze(1)

    with torch.inference_mode():
        prior.init_stream(1)
        frame = torch.zeros(1, 1, Q, dtype=torch.long)
        start, full = [], []
        for i in range(args.gen_steps + T):
            t0 = time.perf_counter()
            frame = gen_step(frame)
            dt = (time.perf_counter() - t0) * 1e3
            (start if i < args.gen_steps // 2 else full).append(dt) if (i < args.gen_steps // 2 or i >= T) else None
        # baseline: no cache, recompute a seq_len-frame prefix for every generated frame
        prefix = torch.randint(0, args.vocab, (1, T, Q))
        cond = None
        if cfg.model.conditioning == "tokens":
            cond = torch.zeros(1, Tc, dtype=torch.long)
        elif cfg.model.conditioning == "features":
            cond = torch.zeros(1, Tc, 16)
        base = []
        for _ in range(max(10, args.gen_steps // 20)):
            t0 = time.perf_counter()
            prior.sample(prefix, cond, 1.0)
            base.append((time.perf_counter() - t0) * 1e3)
    med_full = statistics.median(full)
    print(f"stream step, 1 thread: start median {statistics.median(start):.2f} ms p99 {percentile(start, 99):.2f} ms | "
          f"cache full median {med_full:.2f} ms p99 {percentile(full, 99):.2f} ms")
    print(f"baseline without cache ({T}-frame recompute): median {statistics.median(base):.2f} ms -> "
          f"cache speedup {statistics.median(base) / med_full:.1f}x")


if __name__ == "__main__":
    main()
