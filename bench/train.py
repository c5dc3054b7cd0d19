"""Training throughput: our Ray Train loop (1 worker) vs a plain single-process PyTorch loop.

Same model (a shipped config, default `decoder_only`), same fixed batch, same windows from the same
synthetic latent table, CPU. Throughput = frames x quantizers per second of training steps (the
first `--warmup` steps and validation excluded on both sides). Prints both and the ratio
(goal >= 0.9: Ray, DDP wrapping, the data path and logging cost at most 10%).

    python bench/train.py                      # decoder_only, batch 4, 2 warm-up + 8 timed steps
    python bench/train.py --config recurrent --batch_size 8 --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The same threading as a Ray Train worker: Ray exports OMP_NUM_THREADS=<CPU request, at least 1>
# and our loop then sets torch's intra-op threads to the node's cores. On a loaded machine the
# OpenMP settings alone moved the plain loop's tokens per CPU-second by ~1.5x: match them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(os.cpu_count() or 1)

from msprior.config import load_config  # noqa: E402
from msprior.model import DatasetFacts, build_prior  # noqa: E402
from msprior.data.reader import frames_from_arrow, open_table, read_split  # noqa: E402
from msprior.data.windows import WindowSampler  # noqa: E402
from msprior.train.loop import LossModule, to_device  # noqa: E402
from msprior.train.schedule import make_optimizer, make_scheduler  # noqa: E402


def plain_loop(cfg, manifest, batches, warmup):
    """The baseline: the textbook loop over pre-built tensors, no Ray, no DDP, no logging.

    Returns the seconds of each interval of `warmup` steps after the first (the same intervals our
    loop logs `tokens_per_s` over)."""
    torch.manual_seed(cfg.train.seed)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(manifest))
    opt = make_optimizer([p for p in prior.parameters() if p.requires_grad], cfg.optim)
    sched = make_scheduler(opt, cfg.optim)
    model = LossModule(prior).train()
    marks, cpu = [], []
    for i, b in enumerate(batches):
        if i % warmup == 0:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
        loss = model(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    marks.append(time.perf_counter())
    cpu.append(time.process_time())
    return ([b - a for a, b in zip(marks[1:-1], marks[2:])], [b - a for a, b in zip(cpu[1:-1], cpu[2:])])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="decoder_only")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (a multiple of --warmup)")
    ap.add_argument("--quantizers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    assert args.steps % args.warmup == 0, "--steps must be a multiple of --warmup (log intervals)"

    from tests._train_data import write_synthetic_table

    work = tempfile.mkdtemp(prefix="msprior-bench-")
    write_synthetic_table(f"{work}/table", num_files=4, chunks_per_file=2, frames=344,
                          quantizers=args.quantizers, vocab=args.vocab)
    total = args.warmup + args.steps
    overrides = ["data.val_fraction=0.25", "train.val_batches=1", f"train.log_every={args.warmup}"]
    cfg = load_config(args.config, overrides + [f"train.batch_size={args.batch_size}", f"train.max_steps={total}",
                                                f"train.val_every={total}"])
    table = open_table(f"{work}/table", cfg.data.val_fraction, cfg.data.seed, cfg.model.conditioning)
    frames = frames_from_arrow(read_split(table, val=False), DatasetFacts.from_manifest(table.manifest).num_quantizers,
                              table.cond)
    sampler = WindowSampler(frames, cfg.model.seq_len, table.cond, seed=0)
    batches = [to_device(sampler.sample(args.batch_size), torch.device("cpu")) for _ in range(total)]
    tokens_per_step = args.batch_size * cfg.model.seq_len * args.quantizers
    print(f"config {args.config}: batch {args.batch_size} x seq_len {cfg.model.seq_len} x Q {args.quantizers}, "
          f"V {args.vocab}; {args.warmup} warm-up + {args.steps} timed steps; torch threads {torch.get_num_threads()}",
          flush=True)

    per_interval = args.warmup * tokens_per_step
    wall, cpu = plain_loop(cfg, table.manifest, batches, args.warmup)
    rates, cpu_rates = [per_interval / t for t in wall], [per_interval / t for t in cpu]
    print(f"plain PyTorch loop : {_hmean(rates):8.0f} tokens/s (best interval {max(rates):.0f}), "
          f"{_hmean(cpu_rates):.0f} tokens/CPU-s", flush=True)

    import ray

    from msprior.train import train, tracking

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    uri = f"sqlite:///{work}/mlflow.db"
    s = train(cfg, f"{work}/table", "bench", num_workers=1, storage_path=f"{work}/runs", tracking_uri=uri,
              progress=False)
    client = tracking.client(uri)

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(s["mlflow_run_id"], key), key=lambda m: m.step)
                if m.step > args.warmup]

    ours, ours_cpu = history("tokens_per_s"), history("tokens_per_cpu_s")
    print(f"Ray Train loop (1w): {_hmean(ours):8.0f} tokens/s (best interval {max(ours):.0f}), "
          f"{_hmean(ours_cpu):.0f} tokens/CPU-s", flush=True)
    ray.shutdown()

    # the machine may be shared: bracket our run with two baselines
    wall, cpu = plain_loop(cfg, table.manifest, batches, args.warmup)
    rates2, cpu_rates2 = [per_interval / t for t in wall], [per_interval / t for t in cpu]
    print(f"plain PyTorch loop : {_hmean(rates2):8.0f} tokens/s (best interval {max(rates2):.0f}), "
          f"{_hmean(cpu_rates2):.0f} tokens/CPU-s (again)")
    print(f"ratio ours / plain : wall {_hmean(ours) / _hmean(rates + rates2):.3f} mean, "
          f"{max(ours) / max(rates + rates2):.3f} best interval; "
          f"CPU {_hmean(ours_cpu) / _hmean(cpu_rates + cpu_rates2):.3f}  (goal >= 0.9)")


def _hmean(rates):
    """Overall rate of intervals holding equal token counts."""
    return len(rates) / sum(1.0 / r for r in rates)


if __name__ == "__main__":
    main()
