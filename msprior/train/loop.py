"""The training function run by every Ray Train worker: a plain function over a plain dict.

It knows the model only through `build_prior(model_cfg, facts)`, `prior.loss(batch)` and
`prior.logits(batch)`. Ray appears at the edges: the table's arrays in (object references, read
zero-copy from the object store), `ray.train.report` (metrics + checkpoint) out,
`ray.train.get_checkpoint()` to resume. Only rank 0 logs to MLflow and sends progress lines to the
driver.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from msprior.config import Config, scaled_lr
from msprior.checkpoint import CHECKPOINT_FILE, save_checkpoint
from msprior.train.data import WindowSampler, worker_parts
from msprior.train.schedule import make_optimizer, make_scheduler

TOPK = (1, 3, 5, 10)


class LossModule(torch.nn.Module):
    """`forward(batch) = prior.loss(batch)`, so DDP's hooks (which wrap forward) sync the gradients."""

    def __init__(self, prior: torch.nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prior.loss(batch)


def shard_kwargs(cfg: Config, manifest: Dict) -> Dict[str, Any]:
    cond = cfg.model.conditioning
    feats = ((manifest.get("conditioning") or {}).get("features") or {}).get("size", 0)
    return dict(num_quantizers=int(manifest["rave"]["num_quantizers"]), conditioning=cond,
                cond_ratio=cfg.model.cond_ratio, cond_features=int(feats or 0))


def to_device(batch: Dict[str, np.ndarray], device: torch.device) -> Dict[str, torch.Tensor]:
    pin = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v)
        out[k] = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: List[Dict[str, torch.Tensor]], autocast) -> Dict[str, float]:
    """Validation cross-entropy (nats), perplexity and top-k accuracy, summed over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 + len(TOPK), dtype=torch.float64)  # ce, count, top-k hits
    for b in batches:
        with autocast():
            logits = model.logits(b)
        logits = logits.float()  # [B, T, Q, V]
        target = b["rave"][:, 1:]
        v = logits.shape[-1]
        sums[0] += F.cross_entropy(logits.reshape(-1, v), target.reshape(-1), reduction="sum").item()
        sums[1] += target.numel()
        kmax = min(max(TOPK), v)
        hits = (logits.topk(kmax, dim=-1).indices == target.unsqueeze(-1)).cumsum(-1)  # [B, T, Q, k]
        for i, k in enumerate(TOPK):
            sums[2 + i] += hits[..., min(k, kmax) - 1].sum().item()
    if dist.is_initialized():
        dev = next(model.parameters()).device  # nccl reduces CUDA tensors only
        sums = sums.to(dev)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    ce = (sums[0] / sums[1]).item()
    out = {"val_loss": ce, "val_ppl": math.exp(min(ce, 50.0))}
    for i, k in enumerate(TOPK):
        out[f"val_top{k}"] = (sums[2 + i] / sums[1]).item()
    return out


class CompiledLoss:
    """`module(batch)` through torch.compile when `train.compile` asks for it, falling back to eager
    with one printed line when it cannot compile (no C compiler / Triton, an unsupported Python, a
    model the compiler rejects). Compilation is lazy, so the fallback also covers the first call's
    forward and backward. `auto` compiles on CUDA, except the GRU family: there the cuDNN GRU is a
    graph break and the compiled step measured slower than eager (bench/gpu.py)."""

    def __init__(self, module: torch.nn.Module, prior: torch.nn.Module, mode: str, device: torch.device):
        self.eager = module
        self.fn: Any = module
        self.pending = False  # the first compiled call has not succeeded yet
        self.prior = prior
        auto = device.type == "cuda" and getattr(prior, "family", "") != "gru"
        if mode == "true" or (mode == "auto" and auto):
            try:
                self.fn = torch.compile(module)
                self.pending = True
            except Exception as e:  # noqa: BLE001  any failure means: train eagerly
                self._fallback(e)

    def _fallback(self, e: BaseException) -> None:
        print(f"msprior: torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
              "training eagerly (train.compile=false silences this)", flush=True)
        self.fn, self.pending = self.eager, False

    def forward_backward(self, batch: Dict[str, torch.Tensor], autocast) -> torch.Tensor:
        """loss.backward() of one batch; returns the (detached) loss, without a host sync."""
        if self.pending:
            try:
                loss = self._run(self.fn, batch, autocast)
                self.pending = False
                return loss
            except Exception as e:  # noqa: BLE001
                self._fallback(e)
                for p in self.prior.parameters():
                    p.grad = None
        return self._run(self.fn, batch, autocast)

    @staticmethod
    def _run(fn, batch, autocast) -> torch.Tensor:
        with autocast():
            loss = fn(batch)
        loss.backward()
        return loss.detach()


def _no_buffer_sync() -> Dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer sync (`broadcast_buffers` is deprecated in newer torch)."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _maybe_fail(fault: Optional[Dict], rank: int, step: int) -> None:
    """Test hook: raise once on `fault["rank"]` at `fault["step"]` (a marker file makes it once).

    `fault["remove"]` (a folder, e.g. the latent table) is deleted first: the restarted workers
    must then go on from the object store alone. `fault["kill"]`: SIGKILL the worker process
    instead of raising.
    """
    if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
        open(fault["marker"], "w").close()
        if fault.get("remove"):
            shutil.rmtree(fault["remove"])
        if fault.get("kill"):  # the worker process dies as in an OOM kill or a lost node
            import signal

            # Ray Train's controller collects reports every few seconds: a checkpoint reported
            # just before a death can be lost (the restart then starts from the one before)
            time.sleep(fault.get("delay_s", 0))
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (test hook)")


def train_loop_per_worker(loop_cfg: Dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from msprior.model import DatasetFacts, build_prior
    from msprior.train import tracking

    cfg = Config.from_dict(loop_cfg["config"])
    manifest = loop_cfg["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP threads to the (fractional) CPU request; use this node's cores instead.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda" and loop_cfg.get("bf16", True)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    facts = DatasetFacts.from_manifest(manifest)
    prior = build_prior(cfg.model, facts, codebooks=loop_cfg.get("codebooks")).to(device)
    ema = copy.deepcopy(prior).requires_grad_(False) if cfg.train.ema > 0 else None
    optim_cfg = dataclasses.replace(cfg.optim, lr=scaled_lr(cfg.optim, world))  # the global batch grows with W
    # fused AdamW on CUDA: one kernel for all parameters, and no host sync in the step
    optimizer = make_optimizer([p for p in prior.parameters() if p.requires_grad], optim_cfg,
                               fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, optim_cfg)

    step, best, bad = 0, math.inf, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # --resume, or a restart after a worker failure (FailureConfig)
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)
        prior.load_state_dict(state.get("raw_model", state["model"]))
        if ema is not None:
            ema.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, bad = state["step"], state["best_val_loss"], state.get("bad_validations", 0)
    start_step = step

    module: torch.nn.Module = LossModule(prior)
    if world > 1:
        # Streaming caches are non-persistent buffers: nothing to sync at each forward.
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, **_no_buffer_sync())
    step_fn = CompiledLoss(module, prior, cfg.train.compile, device)

    # Data: this worker's groups of training chunks (object store, zero-copy); the validation
    # windows the driver drew once, split across ranks (the same set for any number of workers).
    kw = shard_kwargs(cfg, manifest)
    local_bs = cfg.train.batch_size  # per worker: the global batch is world x batch_size
    parts = worker_parts(loop_cfg["train_parts"], rank, world)
    # seeded by (seed, rank, step): a resumed run draws fresh windows, each rank its own
    sampler = WindowSampler(parts, cfg.model.seq_len, kw["conditioning"], kw["cond_ratio"],
                            seed=np.random.SeedSequence([cfg.train.seed, rank, step]).generate_state(1)[0])
    val_batches = [to_device({k: v.copy() for k, v in b.items()}, device)  # own (writable) copies
                   for b in ray.get(loop_cfg["val_batches"])[rank::world]]

    client = tracking.client(loop_cfg["tracking_uri"]) if rank == 0 and loop_cfg.get("mlflow_run_id") else None
    run_id = loop_cfg.get("mlflow_run_id")
    progress = loop_cfg.get("progress")  # a ray.util.queue.Queue owned by the driver, or None
    fault = loop_cfg.get("fault")
    max_steps, val_every, log_every = cfg.train.max_steps, cfg.train.val_every, cfg.train.log_every
    seq_q = cfg.model.seq_len * kw["num_quantizers"]  # tokens (frames x quantizers) per window

    def send(kind: str, m: Dict[str, Any]) -> None:
        if rank == 0 and progress is not None:
            progress.actor.put_nowait.remote({"kind": kind, "max_steps": max_steps, **m})  # fire and forget

    raw_params = [p for p in prior.parameters()]
    ema_params = [p for p in ema.parameters()] if ema is not None else []
    loss_sum, loss_n = torch.zeros((), device=device), 0
    t_log, cpu_log, step_log = time.perf_counter(), time.process_time(), step
    last: Dict[str, float] = {}
    if step == start_step and start_step > 0:
        send("resume", {"step": step})
    stop = step >= max_steps
    module.train()
    while not stop:
        batch = to_device(sampler.sample(local_bs), device)
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn.forward_backward(batch, autocast)
        if cfg.optim.grad_clip > 0:  # computed on the device: no host sync
            torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, raw_params, 1.0 - cfg.train.ema)
        step += 1
        loss_sum += loss  # stays on the device; read (.item()) at log intervals only
        loss_n += 1
        _maybe_fail(fault, rank, step)

        if step % log_every == 0 or step % val_every == 0 or step >= max_steps:
            now, cpu_now = time.perf_counter(), time.process_time()
            dt = max(now - t_log, 1e-9)
            last = {"train_loss": (loss_sum / max(loss_n, 1)).item(), "lr": scheduler.get_last_lr()[0],
                    # all ranks run the same number of steps: global = local x world
                    "tokens_per_s": (step - step_log) * local_bs * world * seq_q / dt,
                    "steps_per_s": (step - step_log) / dt,
                    # per CPU-second of this process (all threads): overhead without other jobs' noise
                    "tokens_per_cpu_s": (step - step_log) * local_bs * seq_q / max(cpu_now - cpu_log, 1e-9)}
            loss_sum.zero_()
            loss_n, t_log, cpu_log, step_log = 0, now, cpu_now, step
            if client is not None:
                tracking.log_metrics(client, run_id, last, step)
            send("train", {"step": step, **last})

        if step % val_every == 0 or step >= max_steps:
            metrics = evaluate(ema if ema is not None else prior, val_batches, autocast)
            improved = metrics["val_loss"] < best
            best, bad = (metrics["val_loss"], 0) if improved else (best, bad + 1)
            stop = step >= max_steps or (cfg.train.patience > 0 and bad >= cfg.train.patience)
            report = {**last, **metrics, "step": step, "best_val_loss": best, "start_step": start_step,
                      "early_stopped": float(stop and step < max_steps)}
            if client is not None:
                tracking.log_metrics(client, run_id, {**metrics, "best_val_loss": best}, step)
            send("val", report)
            tmp = None
            checkpoint = None
            if rank == 0:
                tmp = tempfile.mkdtemp(prefix="msprior-ckpt-")
                state = {
                    "model": (ema if ema is not None else prior).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "val_loss": metrics["val_loss"],
                    "best_val_loss": best,
                    "bad_validations": bad,
                    "config": cfg.to_dict(),
                    "manifest": manifest,
                }
                if ema is not None:
                    state["raw_model"] = prior.state_dict()
                save_checkpoint(tmp, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # a barrier over all workers; Ray copies rank 0's directory to the run's storage
            ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            t_log, cpu_log = time.perf_counter(), time.process_time()  # validation is not training throughput
