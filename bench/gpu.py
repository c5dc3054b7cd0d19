"""GPU training benchmark: ms/step, tokens/s, MFU and peak memory of one training step.

Needs torch (and PyYAML, which msprior.config reads) only: no Ray, MLflow or storage, so it runs on
a bare GPU machine. For each config (decoder_only, recurrent) and mode it times one step
(forward + backward + AdamW; fused AdamW on CUDA) on a fixed batch:

  fp32    fp32 weights, TF32 matmuls (what the original MSPrior's trainer runs)
  bf16    bf16 autocast, eager
  compile bf16 autocast + torch.compile of the loss (the training loop's default on CUDA)
  compile-ro / compile-ma   the same with mode reduce-overhead (CUDA graphs) / max-autotune-no-cudagraphs
  compile-nodrop            `compile` with dropout 0: what the 1% dropouts cost (a diagnostic)
  loop    the training loop's own step (msprior.train.loop.CompiledLoss, train.compile=auto, grad
          clipping, fused AdamW, lr schedule), Ray and data loading apart

and the original MSPrior (acids-msprior 1.1.3) on the same shapes. Its package imports gin,
cached_conv and pytorch_lightning, so `OriginalPrior` below re-implements its layer stack
faithfully (post-norm ALiBi layers with biased q/kv projections, ReLU feed-forward, 16 individual
predictors with a 2-layer FiLM MLP each, log-softmax x one-hot loss; GRU variant: one 8-layer GRU).

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one fp32 step on the meta device (the model
FLOPs, the same count for every mode); MFU = FLOPs per step / time / the bf16 matmul peak measured
in this run (8192^3 bf16 matmuls). Tokens = frames x quantizers.
The Ray Train path is not benched here (no Ray on a bare GPU machine): bench/train.py compares it
with a plain loop on CPU.

    python bench/gpu.py                       # on a GPU: 16 quantizers x 1024, batch 64
    python bench/gpu.py --device cpu --tiny   # a tiny shape on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from msprior.config import load_config  # noqa: E402  (yaml + torch only)
from msprior.model import DatasetFacts, build_prior  # noqa: E402

TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=8", "model.head_dim=8", "model.seq_len=32"]


# --- the original MSPrior's layer stack (acids-msprior 1.1.3, msprior/attention.py) -------------


class OriginalAlibiAttention(nn.Module):
    """Its MultiHeadAlibiAttention outside streaming: einsum scores + cached ALiBi/causal bias."""

    def __init__(self, n_head: int, max_seq_len: int):
        super().__init__()
        self.n_head = n_head
        bias = (torch.arange(max_seq_len)[None] - torch.arange(max_seq_len)[:, None]).float()
        bias.masked_fill_(bias > 0, -float("inf"))
        m = torch.cumprod(torch.ones(n_head) * 2 ** (-8 / n_head), -1)[:, None, None]
        self.register_buffer("bias", bias[None] * m)

    def split(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.n_head, -1).permute(0, 2, 1, 3)

    def forward(self, q, k, v):
        q, k, v = self.split(q), self.split(k), self.split(v)
        att = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
        t, s = att.shape[-2:]
        att = torch.softmax(att + self.bias[..., -t:, -s:], -1)
        out = torch.einsum("bhts,bhsd->bhtd", att, v).permute(0, 2, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)


class OriginalLayer(nn.Module):
    """Its TransformerLayer (post-norm, decoder only)."""

    def __init__(self, dim: int, heads: int, head_dim: int, seq_len: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.q_linear = nn.Linear(dim, heads * head_dim)
        self.kv_linear = nn.Linear(dim, 2 * heads * head_dim)
        self.attention = OriginalAlibiAttention(heads, seq_len)
        self.post_attention_linear = nn.Linear(heads * head_dim, dim)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        k, v = self.kv_linear(x).chunk(2, -1)
        x = self.attention_norm(x + self.drop(self.post_attention_linear(self.attention(self.q_linear(x), k, v))))
        return self.feed_forward_norm(x + self.drop(self.feed_forward(x)))


class OriginalPredictor(nn.Module):
    """Its MultivariatePredictor: one IndividualPredictor per quantizer, run one after the other."""

    def __init__(self, dim: int, q: int, v: int, dropout: float):
        super().__init__()
        self.v = v
        self.films = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2 * dim))
                                    for _ in range(q - 1)])
        self.heads = nn.ModuleList([nn.Sequential(nn.GELU(), nn.Linear(dim, v)) for _ in range(q)])
        self.drop = nn.Dropout(dropout)

    def forward(self, context, targets, embedder):
        logits, embedded = [], torch.zeros_like(context)
        for i, head in enumerate(self.heads):
            c = context
            if i > 0:
                scale, bias = self.films[i - 1](self.drop(embedded)).chunk(2, -1)
                c = context * scale + bias
            logits.append(head(c))
            if i < len(self.heads) - 1:
                embedded = embedded + embedder(targets[..., i] + i * self.v)
        return torch.stack(logits, -2)


class OriginalPrior(nn.Module):
    def __init__(self, family: str, dim: int, layers: int, heads: int, head_dim: int, seq_len: int,
                 q: int, v: int, dropout: float = 0.01):
        super().__init__()
        self.embedder = nn.Embedding(q * v, dim)
        self.q, self.v = q, v
        if family == "gru":
            self.net = nn.ModuleList([nn.GRU(dim, dim, layers, dropout=dropout, batch_first=True)])
        else:
            self.net = nn.ModuleList([OriginalLayer(dim, heads, head_dim, seq_len, dropout) for _ in range(layers)])
        self.predictor = OriginalPredictor(dim, q, v, dropout)

    def loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        rave = batch["rave"].long()
        x, y = rave[:, :-1], rave[:, 1:]
        h = self.embedder(x + torch.arange(self.q, device=x.device) * self.v).sum(-2)
        for layer in self.net:
            h = layer(h)[0] if isinstance(layer, nn.GRU) else layer(h)
        logits = torch.log_softmax(self.predictor(h, y, self.embedder), -1)
        return -(logits * F.one_hot(y, self.v).float()).sum(-1).mean()


# --- measurement ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, tiny: bool) -> float:
    """bf16 matmul FLOP/s measured now (fp32 on CPU, whose bf16 is no peak)."""
    n = 1024 if tiny or device.type == "cpu" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def make_batch(b: int, t: int, q: int, v: int, device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"rave": torch.randint(0, v, (b, t + 1, q), generator=g).to(device)}


def build(kind: str, cfg_name: str, args, device: torch.device, overrides=()) -> nn.Module:
    cfg = load_config(cfg_name, (TINY if args.tiny else []) + list(overrides))
    m = cfg.model
    torch.manual_seed(0)
    if kind == "original":
        return OriginalPrior(m.family, m.dim, m.num_layers, m.num_heads, m.head_dim, m.seq_len,
                             args.quantizers, args.vocab).to(device)
    return build_prior(m, DatasetFacts(args.quantizers, args.vocab)).to(device)


def count_flops(kind: str, cfg_name: str, args) -> int:
    """Model FLOPs of one training step (forward + backward + AdamW), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with torch.device(meta):
        model = build(kind, cfg_name, args, meta)
    batch = make_batch(args.batch, args.seq_len, args.quantizers, args.vocab, torch.device("cpu"))
    batch = {k: v.to(meta) for k, v in batch.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        model.loss(batch).backward()
        opt.step()
    return counter.get_total_flops()


COMPILE_MODES = {"compile": "default", "compile-ro": "reduce-overhead", "compile-ma": "max-autotune-no-cudagraphs",
                 "compile-nodrop": "default"}


def loop_step_fn(model: nn.Module, cfg_name: str, device: torch.device) -> Callable[[Dict], torch.Tensor]:
    """The training loop's own step (msprior.train.loop, Ray apart): CompiledLoss with
    train.compile=auto, bf16 autocast on CUDA, grad clipping, fused AdamW, the lr schedule."""
    from msprior.train.loop import CompiledLoss, LossModule
    from msprior.train.schedule import make_optimizer, make_scheduler

    optim = load_config(cfg_name).optim
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optim, fused=device.type == "cuda")
    sched = make_scheduler(opt, optim)
    fn = CompiledLoss(LossModule(model), model, "auto", device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = fn.forward_backward(batch, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        return loss

    return step


def step_fn(model: nn.Module, mode: str, device: torch.device) -> Callable[[Dict], torch.Tensor]:
    """One training step of `mode`; returns the detached loss (no host sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    bf16 = mode != "fp32"
    loss_fn: Callable = model.loss
    if mode in COMPILE_MODES:
        loss_fn = torch.compile(model.loss, mode=COMPILE_MODES[mode])

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def profile(step, batch, rows: int = 25) -> None:
    """The GPU kernels of 3 steps, by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            step(batch)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def time_steps(step, batch, device: torch.device, warmup: int, steps: int) -> float:
    """Median ms per step over `steps` steps after `warmup` (the first compiles)."""
    for _ in range(warmup):
        step(batch)
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000.0


def gru_alone(args, device: torch.device, bf16: bool) -> Optional[float]:
    """ms of the 8-layer GRU's forward + backward alone (cuDNN on CUDA)."""
    d = 64 if args.tiny else 512
    gru = nn.GRU(d, d, 2 if args.tiny else 8, batch_first=True).to(device)
    x = torch.randn(args.batch, args.seq_len, d, device=device, requires_grad=True)

    def step(_):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y, _ = gru(x)
        y.float().sum().backward()

    return time_steps(step, None, device, 2, 5 if args.tiny else 10)


def run_one(kind: str, cfg_name: str, mode: str, args, device, flops: int, peak: float) -> Dict:
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 mode = fp32/TF32
    torch.backends.cudnn.allow_tf32 = True
    model = build(kind, cfg_name, args, device, ["model.dropout=0"] if mode == "compile-nodrop" else []).train()
    batch = make_batch(args.batch, args.seq_len, args.quantizers, args.vocab, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    warm = args.warmup + (2 if mode in COMPILE_MODES or mode == "loop" else 0)
    step = loop_step_fn(model, cfg_name, device) if mode == "loop" else step_fn(model, mode, device)
    ms = time_steps(step, batch, device, warm, args.steps)
    if args.profile and mode == args.profile and device.type == "cuda":
        profile(step, batch)
    tokens = args.batch * args.seq_len * args.quantizers
    row = {"model": kind, "config": cfg_name, "mode": mode, "ms_per_step": ms,
           "tokens_per_s": tokens / ms * 1000.0, "tflop_per_step": flops / 1e12,
           "mfu": flops / (ms / 1000.0) / peak, "wall_s": time.perf_counter() - t0,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")}
    print(f"{kind:9s} {cfg_name:13s} {mode:8s} {ms:8.2f} ms/step {row['tokens_per_s'] / 1e6:8.3f} M tokens/s "
          f"MFU {100 * row['mfu']:5.1f}%  peak {row['peak_mem_gib']:5.1f} GiB  ({row['wall_s']:.0f} s incl. warm-up)",
          flush=True)
    return row


PLAN = [  # (model, config, modes), in this order: the slowest compile last
    ("original", "decoder_only", ["fp32", "bf16"]),
    ("msprior", "decoder_only", ["fp32", "bf16", "compile", "loop", "compile-ro", "compile-nodrop"]),
    ("original", "recurrent", ["fp32"]),
    ("msprior", "recurrent", ["fp32", "bf16", "compile", "loop"]),
    ("msprior", "decoder_only", ["compile-ma"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (checks the script on CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--quantizers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated model:config:mode entries to run")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--profile", default="", help="print the CUDA kernel table of this mode (e.g. compile)")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.tiny else 64)
    args.quantizers = args.quantizers or (4 if args.tiny else 16)
    args.vocab = args.vocab or (64 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.seq_len = 32 if args.tiny else 256
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_peak(device, args.tiny)
    print(f"device {name}, torch {torch.__version__}, matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'fp32'}, measured now); batch {args.batch} x {args.seq_len} "
          f"frames x {args.quantizers} quantizers, vocabulary {args.vocab}", flush=True)
    if device.type == "cuda":
        print(f"GRU alone (8 x 512, fwd+bwd): bf16 {gru_alone(args, device, True):.2f} ms, "
              f"fp32/TF32 {gru_alone(args, device, False):.2f} ms", flush=True)
    only = {tuple(s.split(":")) for s in args.only.split(",") if s}
    rows: List[Dict] = []
    for kind, cfg_name, modes in PLAN:
        modes = [m for m in modes if not only or (kind, cfg_name, m) in only]
        flops = count_flops(kind, cfg_name, args) if modes else 0
        for mode in modes:
            try:
                rows.append(run_one(kind, cfg_name, mode, args, device, flops, peak))
            except Exception as e:  # noqa: BLE001  one failing mode must not lose the others' figures
                print(f"{kind} {cfg_name} {mode}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": name, "torch": torch.__version__, "peak_flops": peak, "rows": rows}, f, indent=1)
    base = [r for r in rows if r["model"] == "original" and r["config"] == "decoder_only" and r["mode"] == "fp32"]
    if base:
        for r in rows:
            if r["config"] == "decoder_only":
                print(f"  {r['model']} {r['mode']}: {r['tokens_per_s'] / base[0]['tokens_per_s']:.2f}x the original's fp32 tokens/s")


if __name__ == "__main__":
    main()
