"""The training function run by every Ray Train worker, over one typed `LoopInputs`.

It knows the model only through `build_prior(model_cfg, facts)`, `prior.loss(batch)` and
`prior.logits(batch)`. Ray appears at the edges: the table's arrays in (object references, read
zero-copy from the object store), `ray.train.report` (metrics + checkpoint) out,
`ray.train.get_checkpoint()` to resume. Only rank 0 logs to MLflow and sends progress lines to the
driver.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from msprior import devices
from msprior.config import scaled_lr
from msprior.checkpoint import CHECKPOINT_FILE, save_checkpoint
from msprior.model import DatasetFacts
from msprior.train import ddp, quality
from msprior.train.inputs import LoopInputs
from msprior.train.uploads import Uploads
from msprior.data.windows import TrainWindows
from msprior.train.schedule import make_optimizer, make_scheduler, warmup_for

TOPK = (1, 3, 5, 10)


class LossModule(torch.nn.Module):
    """`forward(batch) = prior.loss(batch)`, so DDP's hooks (which wrap forward) sync the gradients."""

    def __init__(self, prior: torch.nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prior.loss(batch)


def to_device(batch: Dict[str, np.ndarray], device: torch.device) -> Dict[str, torch.Tensor]:
    pin = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v)
        out[k] = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: List[Dict[str, torch.Tensor]], autocast) -> Dict[str, float]:
    """Validation cross-entropy (nats) per quantizer and mean, perplexity and top-k accuracy, summed
    over all ranks. `val_ce_q<i>` is `prior.quantizer_losses`' measure (msprior.train.quality)."""
    was_training = model.training
    model.eval()
    nq = int(model.num_quantizers)  # not from a batch: a rank may hold no validation batch
    sums = torch.zeros(nq + 1 + len(TOPK), dtype=torch.float64)  # ce per quantizer, count, top-k hits
    for b in batches:
        with autocast():
            logits = model.logits(b)
        logits = logits.float()  # [B, T, Q, V]
        target = b["rave"][:, 1:]
        v = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, v), target.reshape(-1), reduction="none")
        sums[:nq] += ce.view(-1, nq).sum(dim=0).double().cpu()
        sums[nq] += target.numel()
        kmax = min(max(TOPK), v)
        hits = (logits.topk(kmax, dim=-1).indices == target.unsqueeze(-1)).cumsum(-1)  # [B, T, Q, k]
        for i, k in enumerate(TOPK):
            sums[nq + 1 + i] += hits[..., min(k, kmax) - 1].sum().item()
    if dist.is_initialized():
        dev = next(model.parameters()).device  # nccl reduces CUDA tensors only
        sums = sums.to(dev)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    per_q = sums[:nq] * nq / sums[nq]  # every quantizer predicts count / Q tokens
    ce = per_q.mean().item()
    out = {"val_loss": ce, "val_ppl": math.exp(min(ce, 50.0))}
    out.update({f"val_ce_q{q}": per_q[q].item() for q in range(nq)})
    for i, k in enumerate(TOPK):
        out[f"val_top{k}"] = (sums[nq + 1 + i] / sums[nq]).item()
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


class Worker:
    """One Ray Train worker, complete once built: model, optimizer and schedule, restored from the
    run's checkpoint (if any), wrapped for DDP, with its data. Then one method per step of
    training: a train step, validation, checkpoint."""

    def __init__(self, inputs: LoopInputs):
        import ray.train
        import ray.train.torch

        from msprior.model import build_prior

        self.inputs, self.cfg, self.manifest = inputs, inputs.config, inputs.manifest
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # the CPUs Ray assigned this worker (--cpus_per_worker, msprior.train.run.worker_cpus), never
        # the host's cores: the rest of the node belongs to other workers, trials and the fills
        torch.set_num_threads(devices.assigned_threads())
        # Ray Train places a worker on CUDA or the CPU; MPS (one worker, macOS) is msprior.devices' choice
        self.device = devices.torch_device("mps") if inputs.mps else ray.train.torch.get_device()
        self.bf16 = devices.bf16_ok(self.device)  # bf16 autocast where the device supports it
        torch.manual_seed(self.cfg.train.seed)  # same initial weights on every rank
        facts = DatasetFacts.from_manifest(self.manifest)
        self.prior = build_prior(self.cfg.model, facts, codebooks=inputs.codebooks).to(self.device)
        self.ema = copy.deepcopy(self.prior).requires_grad_(False) if self.cfg.train.ema > 0 else None
        self.raw_params = list(self.prior.parameters())
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        # peak lr and warm-up follow the workers (the global batch grows with W) and the run's
        # length (msprior.train.schedule); fused AdamW on CUDA: one kernel, no host sync in the step
        self.optimizer = make_optimizer([p for p in self.prior.parameters() if p.requires_grad], self.cfg.optim,
                                        fused=self.device.type == "cuda", world=self.world)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps, world=self.world)
        self.step, self.best, self.bad = 0, math.inf, 0
        self.uploads = Uploads(self.rank, inputs.fault)
        if self.rank == 0 and inputs.run_lease:  # fenced again when the upload starts (it may wait)
            from msprior.train.run_lease import check_writer

            self.uploads.before_upload = lambda name: check_writer(inputs.run_lease, name)
        self._restore(ray.train.get_checkpoint())
        self.data()
        if self.start_step == 0 and self.cfg.train.unigram_bias:
            self._unigram_bias()
        self._wrap()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else torch.autocast("cpu", enabled=False)

    def _restore(self, ckpt) -> None:
        """--resume, or a restart after a worker failure (FailureConfig): weights, optimizer, step."""
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=self.device, weights_only=True)
            self.prior.load_state_dict(state.get("raw_model", state["model"]))
            if self.ema is not None:
                self.ema.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.best, self.bad = state["step"], state["best_val_loss"], state.get("bad_validations", 0)
        self.start_step = self.step

    def _unigram_bias(self) -> None:
        """A fresh run's output biases at the log unigram of the training tokens the ranks hold
        (`Prior.init_output_bias`), counted on each rank and summed over the ranks, so every rank
        starts from the same weights."""
        vocab = DatasetFacts.from_manifest(self.manifest).vocab_size
        counts = torch.from_numpy(quality.sampler_counts(self.sampler.sampler, vocab))
        if dist.is_initialized():
            counts = counts.to(self.device)  # nccl reduces CUDA tensors only
            dist.all_reduce(counts)
        self.prior.init_output_bias(counts)
        if self.ema is not None:
            self.ema.load_state_dict(self.prior.state_dict())

    def _wrap(self) -> None:
        """The loss as a module (DDP across workers, gradients compressed as configured), compiled
        when the config asks."""
        self.compression = ddp.compression_for(self.cfg.train.grad_compression, self.device)
        self.module = ddp.wrap(LossModule(self.prior), self.compression)
        self.step_fn = CompiledLoss(self.module, self.prior, self.cfg.train.compile, self.device)

    def data(self) -> None:
        """This worker's training windows (its stratum of the table, read through the node cache:
        msprior.data.windows.TrainWindows) and its share of the validation windows the driver had
        cut once (the same set for any number of workers)."""
        import ray

        cfg, rank, world = self.cfg, self.rank, self.world
        facts = DatasetFacts.from_manifest(self.manifest)
        self.local_bs = cfg.train.batch_size  # per worker: the global batch is world x batch_size
        self.seq_q = cfg.model.seq_len * facts.num_quantizers  # tokens (frames x quantizers) per window
        # seeded by (seed, rank, step): a resumed run draws fresh windows, each rank its own
        self.sampler = TrainWindows(self.inputs.train_data, rank, world, cfg.model.seq_len,
                                    seed=np.random.SeedSequence([cfg.train.seed, rank, self.step]).generate_state(1)[0])
        every = ray.get(self.inputs.val_batches)
        self.val_batches = [to_device({k: v.copy() for k, v in b.items()}, self.device)  # own (writable) copies
                            for b in every[rank::world]]
        # the generation check (rank 0): validation tokens' histogram, windows that seed the streams
        self.val_counts = quality.target_counts(every, facts.vocab_size)
        self.gen_batch = to_device({k: v[:quality.GEN_STREAMS].copy() for k, v in every[0].items()}, self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step on a fresh batch of windows; the loss stays on the device."""
        batch = to_device(self.sampler.sample(self.local_bs), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_fn.forward_backward(batch, self.autocast)
        if self.cfg.optim.grad_clip > 0:  # computed on the device: no host sync
            torch.nn.utils.clip_grad_norm_(self.prior.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.raw_params, 1.0 - self.cfg.train.ema)
        self.step += 1
        return loss

    def validate(self) -> Dict[str, Any]:
        """Validation metrics, early-stopping state; returns the report (with `stop`)."""
        model = self.ema if self.ema is not None else self.prior
        metrics = evaluate(model, self.val_batches, self.autocast)
        if self.rank == 0:  # samples through the streaming path: the other ranks wait at the report
            metrics.update(quality.generation_check(model, [self.gen_batch], model.vocab_size, self.val_counts))
        improved = metrics["val_loss"] < self.best
        self.best, self.bad = (metrics["val_loss"], 0) if improved else (self.best, self.bad + 1)
        t = self.cfg.train
        stop = self.step >= t.max_steps or (t.patience > 0 and self.bad >= t.patience)
        return {**metrics, "step": self.step, "best_val_loss": self.best, "start_step": self.start_step,
                "early_stopped": float(stop and self.step < t.max_steps), "stop": stop}

    def checkpoint(self, report: Dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint to a local folder; every rank reports (a barrier). The
        upload to the run folder goes on in the background (msprior.train.uploads)."""
        tmp = None
        if self.rank == 0:
            from msprior.train.run_lease import check_writer  # a run taken over writes nothing more

            check_writer(self.inputs.run_lease, f"checkpoint_{self.step:08d}")
            tmp = tempfile.mkdtemp(prefix="msprior-ckpt-")
            state = {"model": (self.ema if self.ema is not None else self.prior).state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "step": self.step, "val_loss": report["val_loss"], "best_val_loss": self.best,
                     "bad_validations": self.bad, "config": self.cfg.to_dict(), "manifest": self.manifest}
            if self.ema is not None:
                state["raw_model"] = self.prior.state_dict()
            save_checkpoint(tmp, state)
        self.uploads.report(report, tmp, f"checkpoint_{self.step:08d}", self.step)

    def due(self) -> tuple:
        """(validate, checkpoint) at this step: every val_every and every checkpoint_every (a
        checkpoint validates too: it carries its own val_loss), and both at the last step."""
        t, last = self.cfg.train, self.step >= self.cfg.train.max_steps
        ckpt = last or self.step % (t.checkpoint_every or t.val_every) == 0
        return ckpt or self.step % t.val_every == 0, ckpt


class Logger:
    """Rank 0's metrics: MLflow, and progress lines for the driver (a Ray queue), at log intervals."""

    def __init__(self, w: Worker):
        from msprior.train import tracking

        self.w, self.tracking = w, tracking
        self.run_id = w.inputs.mlflow_run_id
        self.client = tracking.client(w.inputs.tracking_uri) if w.rank == 0 and self.run_id else None
        self.progress = w.inputs.progress  # a ray.util.queue.Queue owned by the driver, or None
        self.loss_sum, self.loss_n = torch.zeros((), device=w.device), 0
        self.last: Dict[str, float] = {}
        self.restart_clock()
        if self.client is not None:  # the warm-up this run's length and workers gave; DDP's bytes per step
            o = w.cfg.optim
            warmup = warmup_for(o.warmup_steps, w.cfg.train.max_steps, scaled_lr(o, w.world) / o.lr, o.warmup_start)
            grad = ddp.grad_bytes(w.prior, w.compression) if w.world > 1 else 0
            tracking.log_metrics(self.client, self.run_id, {"lr_warmup_steps": warmup, "grad_bytes_per_step": grad,
                                                              "torch_threads": torch.get_num_threads()},
                                 w.step)

    def restart_clock(self) -> None:  # validation is not training throughput
        self.t, self.cpu, self.step = time.perf_counter(), time.process_time(), self.w.step

    def send(self, kind: str, m: Dict[str, Any]) -> None:
        if self.w.rank == 0 and self.progress is not None:  # fire and forget
            self.progress.actor.put_nowait.remote({"kind": kind, "max_steps": self.w.cfg.train.max_steps, **m})

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss  # stays on the device; read (.item()) at log intervals only
        self.loss_n += 1

    def train(self) -> None:
        w, now, cpu_now = self.w, time.perf_counter(), time.process_time()
        dt, steps = max(now - self.t, 1e-9), w.step - self.step
        self.last = {"train_loss": (self.loss_sum / max(self.loss_n, 1)).item(), "lr": w.scheduler.get_last_lr()[0],
                     # all ranks run the same number of steps: global = local x world
                     "tokens_per_s": steps * w.local_bs * w.world * w.seq_q / dt, "steps_per_s": steps / dt,
                     # per CPU-second of this process (all threads): overhead without other jobs' noise
                     "tokens_per_cpu_s": steps * w.local_bs * w.seq_q / max(cpu_now - self.cpu, 1e-9)}
        self.loss_sum.zero_()
        self.loss_n = 0
        self.restart_clock()
        if self.client is not None:
            self.tracking.log_metrics(self.client, self.run_id, self.last, w.step)
        self.send("train", {"step": w.step, **self.last})

    def checkpointed(self, seconds: float) -> None:
        """What a checkpoint cost the training loop (write it locally, wait for the previous upload)."""
        if self.client is not None:
            self.tracking.log_metrics(self.client, self.run_id, {"checkpoint_s": seconds}, self.w.step)

    def val(self, report: Dict[str, Any]) -> None:
        if self.client is not None:
            metrics = {k: v for k, v in report.items() if k.startswith(("val_", "top", "gen_"))}
            self.tracking.log_metrics(self.client, self.run_id, {**metrics, "best_val_loss": report["best_val_loss"]},
                                      self.w.step)
        self.send("val", report)


def train_loop_per_worker(inputs: LoopInputs) -> None:
    w = Worker(inputs)
    log = Logger(w)
    if w.start_step > 0:
        log.send("resume", {"step": w.step})
    t = w.cfg.train
    stop = w.step >= t.max_steps
    w.module.train()
    while not stop:
        log.add(w.train_step())
        if inputs.fault is not None:
            inputs.fault.fire(w.rank, w.step)
        validate, ckpt = w.due()
        if w.step % t.log_every == 0 or validate:
            log.train()
        if validate:
            report = w.validate()
            stop = report.pop("stop")
            report = {**log.last, **report}
            log.val(report)
            if ckpt or stop:  # an early stop keeps its last state
                t0 = time.perf_counter()
                w.checkpoint(report)
                log.checkpointed(time.perf_counter() - t0)
            else:
                w.uploads.report(report)
            log.restart_clock()
