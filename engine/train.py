"""The training loop, shared by pretraining and fine-tuning (engine/jobs.py sets both up).

A job hands the loop a model, a TrainConfig, its Batches (where micro-batches and the
validation loss come from) and its Run (the folder it writes, and the state to resume from).
The loop does the rest: AdamW with decay and no-decay groups, warmup + cosine learning rate,
gradient accumulation and clipping, bf16 autocast on CUDA, periodic validation, a progress
bar, metrics.jsonl, atomic checkpoints, exact resume, and a checkpoint on Ctrl-C. Under
torchrun the same loop trains data-parallel (DDP, or FSDP2; engine/distributed.py) on the same
global batch.
"""
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine import distributed
from engine.checkpoint import save_checkpoint
from engine.config import TrainConfig
from engine.devices import autocast_for
from engine.errors import InputError, Interrupted
from engine.model import GPT


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


@contextlib.contextmanager
def sigint_flag(second_aborts: bool = True):
    """Turn Ctrl-C into a flag the loop checks between steps (a second Ctrl-C aborts at once,
    unless second_aborts is False: under torchrun, whose workers get the terminal's SIGINT and
    the one torchrun forwards, and which kills them itself if they take too long)."""
    flag = {"set": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["set"] and second_aborts:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag["set"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Batches:
    """Where a job's data comes from. micro(step, index) -> (x, y, loss_mask or None) on the CPU,
    index being the global micro-batch index (a pure function: the same batch on any number of
    processes and after a resume); val_loss(model) -> the validation loss."""

    micro: Callable
    val_loss: Callable


@dataclass
class Run:
    """The run folder the loop writes (checkpoints, metrics.jsonl), what goes beside the weights
    in each checkpoint, and the trainer state to resume from (None: start at step 0)."""

    out_dir: Path
    tokenizer: object
    info: dict = field(default_factory=dict)  # run.json: what was trained on what
    resume_state: dict | None = None


def train(model: GPT, cfg: TrainConfig, batches: Batches, run: Run, ctx: distributed.Dist = distributed.Dist(),
          progress: bool = True) -> dict:
    """Train from step 0 (or the resumed step) to cfg.max_steps; return the last metrics (the same
    on every rank). ctx: this process's place in a torchrun job (every rank calls train with the
    same weights). Raises Interrupted after saving a checkpoint when Ctrl-C was pressed."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, grad_accum=cfg.grad_accum or ctx.world_size)  # what the checkpoint records too
    micros = distributed.micro_batches(cfg.grad_accum, ctx.rank, ctx.world_size)
    device = next(model.parameters()).device
    model.ops_for(device).deterministic = cfg.deterministic
    model = distributed.wrap(model, ctx)
    optimizer = make_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)
    step = restore(optimizer, run.resume_state, device)
    log = open(run.out_dir / "metrics.jsonl" if ctx.is_main else os.devnull, "a")  # only rank 0 logs
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and ctx.is_main), desc="train", unit="step",
               dynamic_ncols=True)
    metrics = {}
    with sigint_flag(second_aborts=not ctx.enabled) as interrupted, log, bar:
        model.train()
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens, grad_norm = optimizer_step(model, optimizer, batches, step, micros, cfg.grad_clip)
            step += 1
            # one collective: the job's loss and tokens, and whether any rank saw Ctrl-C
            loss_sum, tokens, stop = ctx.all_sum([loss_sum, tokens, float(interrupted["set"])])
            interrupted["set"] = stop > 0
            metrics = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                model.eval()
                metrics["val_loss"] = batches.val_loss(distributed.local_module(model))
                model.train()
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            **({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
            if step % cfg.save_every == 0 or step == cfg.max_steps or interrupted["set"]:
                save(model, optimizer, cfg, step, run, ctx)
            if interrupted["set"]:
                raise Interrupted(f"interrupted at step {step}; checkpoint saved to {run.out_dir / f'step-{step:07d}'}")
    return metrics


def optimizer_step(model, optimizer, batches: Batches, step: int, micros: range, grad_clip: float):
    """Forward and backward over this rank's micro-batches, then one AdamW step.
    -> (summed loss, tokens seen by this rank, global gradient norm before clipping)."""
    device = next(model.parameters()).device
    autocast = autocast_for(device)
    loss_sum, tokens = 0.0, 0
    for n, micro in enumerate(micros):
        x, y, mask = batches.micro(step, micro)
        x, y = x.to(device), y.to(device)
        mask = mask.to(device) if mask is not None else None
        with distributed.grad_sync(model, last=n == len(micros) - 1):
            with autocast:
                _, loss = model(x, y, loss_mask=mask, return_logits=False)  # the logits never exist
            (loss / len(micros)).backward()  # DDP / FSDP2 then average over the ranks
        loss_sum += loss.item()
        tokens += x.numel()
    # DDP's gradients are already reduced and FSDP2's norm is over DTensors: both global
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, float(distributed.full_tensor(grad_norm))


def restore(optimizer, state: dict | None, device: torch.device) -> int:
    """Load a resumed run's optimizer and RNG states; -> the step to continue from (0: a new run)."""
    if state is None:
        return 0
    distributed.load_optimizer_state(optimizer, state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    return state["step"]


def save(model, optimizer, cfg: TrainConfig, step: int, run: Run, ctx: distributed.Dist):
    """A checkpoint of the whole job at `step`, written by rank 0 (every rank must call it: under
    FSDP2 the full weights are gathered from the shards)."""
    full_model, optimizer_state = distributed.full_state(model, optimizer, ctx)
    if not ctx.is_main:
        return
    state = {"optimizer": optimizer_state, "step": step, "rng_cpu": torch.get_rng_state(), "train_config": asdict(cfg)}
    if next(model.parameters()).device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(run.out_dir, step, full_model, run.tokenizer, state, run.info)
