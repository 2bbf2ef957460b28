"""Pretraining and fine-tuning: one loop, two batch sources.

Pretraining draws random windows of a token stream; fine-tuning draws whole conversations
with a loss mask on the assistant tokens. Everything else is shared: AdamW with decay and
no-decay groups, warmup + cosine learning rate, gradient accumulation and clipping, bf16
autocast on CUDA, periodic validation, a progress bar, metrics.jsonl, atomic checkpoints,
exact resume, and a checkpoint on Ctrl-C. Under torchrun the same loop trains data-parallel
(DDP, or FSDP2 with fsdp=True; engine/distributed.py) on the same global batch.
"""
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine import distributed
from engine.checkpoint import save_checkpoint
from engine.devices import pick_device
from engine.errors import InputError
from engine.model import GPT


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 0  # micro-batches per optimizer step for the whole job; 0 = one per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum < 0:
            raise InputError(f"--grad-accum must be >= 0 (0 = one micro-batch per process), got {self.grad_accum}")
        if self.lr <= 0:
            raise InputError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise InputError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")


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


class Interrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is safely written."""


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


def train(
    model: GPT,
    cfg: TrainConfig,
    batch_fn: Callable,
    out_dir,
    tokenizer,
    eval_fn: Callable | None = None,
    resume_state: dict | None = None,
    run_info: dict | None = None,
    progress: bool = True,
    ctx: distributed.Dist = distributed.Dist(),
) -> dict:
    """Run the loop from step 0 (or resume_state['step']) to cfg.max_steps.

    batch_fn(step, micro) -> (x, y, loss_mask or None) on the CPU, micro being the global
    micro-batch index; eval_fn(model) -> val loss. ctx: this process's place in a torchrun job
    (every rank calls train with the same model weights). Returns the last metrics (the same on
    every rank). Raises Interrupted after saving when Ctrl-C was pressed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, grad_accum=cfg.grad_accum or ctx.world_size)  # what the checkpoint records too
    micros = distributed.micro_batches(cfg.grad_accum, ctx.rank, ctx.world_size)
    device = next(model.parameters()).device
    model = distributed.wrap(model, ctx)
    optimizer = make_optimizer(model, cfg)
    step = 0
    torch.manual_seed(cfg.seed)
    if resume_state is not None:
        distributed.load_optimizer_state(optimizer, resume_state["optimizer"])
        step = resume_state["step"]
        torch.set_rng_state(resume_state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resume_state:
            torch.cuda.set_rng_state(resume_state["rng_cuda"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    log = open(out_dir / "metrics.jsonl" if ctx.is_main else os.devnull, "a")  # only rank 0 logs

    def checkpoint():
        full_model, optimizer_state = distributed.full_state(model, optimizer, ctx)  # every rank takes part
        if not ctx.is_main:
            return None
        state = {"optimizer": optimizer_state, "step": step, "rng_cpu": torch.get_rng_state(), "train_config": asdict(cfg)}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return save_checkpoint(out_dir, step, full_model, tokenizer, state, run_info)

    metrics = {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and ctx.is_main), desc="train", unit="step", dynamic_ncols=True)
    with sigint_flag(second_aborts=not ctx.enabled) as interrupted:
        model.train()
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens = 0.0, 0
            for n, micro in enumerate(micros):
                x, y, mask = batch_fn(step, micro)
                x, y = x.to(device), y.to(device)
                mask = mask.to(device) if mask is not None else None
                with distributed.grad_sync(model, last=n == len(micros) - 1):
                    with autocast:
                        _, loss = model(x, y, loss_mask=mask)
                    (loss / len(micros)).backward()  # DDP / FSDP2 then average over the ranks
                loss_sum += loss.item()
                tokens += x.numel()
            # DDP's gradients are already reduced and FSDP2's norm is over DTensors: both global
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # one collective: the job's loss and tokens, and whether any rank saw Ctrl-C
            loss_sum, tokens, stop = ctx.all_sum([loss_sum, tokens, float(interrupted["set"])])
            interrupted["set"] = stop > 0
            dt = time.perf_counter() - t0
            metrics = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "grad_norm": float(distributed.full_tensor(grad_norm)),
                       "tokens_per_s": tokens / dt}
            if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                model.eval()
                metrics["val_loss"] = eval_fn(distributed.local_module(model))
                model.train()
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", **({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
            if step % cfg.save_every == 0 or step == cfg.max_steps or interrupted["set"]:
                checkpoint()
            if interrupted["set"]:
                bar.close()
                log.close()
                raise Interrupted(f"interrupted at step {step}; checkpoint saved to {out_dir / f'step-{step:07d}'}")
    bar.close()
    log.close()
    return metrics


@torch.no_grad()
def mean_loss(model: GPT, batches) -> float:
    """Average loss over an iterable of (x, y, mask) batches, in eval mode."""
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    for x, y, mask in batches:
        with autocast:
            _, loss = model(x.to(device), y.to(device), loss_mask=None if mask is None else mask.to(device))
        losses.append(loss.item())
    return sum(losses) / len(losses)


def text_val_loss(model: GPT, tokens, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean loss over `batches` fixed random windows of a token stream (the same ones every call)."""
    from engine.data import token_batch

    T = min(model.config.block_size, len(tokens) - 1)
    return mean_loss(model, ((*token_batch(tokens, batch_size, T, seed, -1, i), None) for i in range(batches)))


def chat_val_loss(model: GPT, rendered, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean assistant-token loss over `batches` fixed random batches of rendered conversations."""
    from engine.data import conversation_batch

    return mean_loss(model, (conversation_batch(rendered, batch_size, model.config.block_size, seed, -1, i) for i in range(batches)))


# ---------------------------------------------------------------------------------------------
# The two jobs: what `llm-engine pretrain` and `llm-engine finetune` run.
# ---------------------------------------------------------------------------------------------


def pretrain(data: str, out, preset: str = "tiny", cfg: TrainConfig | None = None, backend: str = "auto",
             device: str = "auto", resume: bool = False, vocab_size: int | None = None, n_people: int = 100,
             block_size: int | None = None, progress: bool = True, fsdp: bool = False) -> dict:
    """Tokenizer + token memmaps (once per run folder, by rank 0), then the training loop.
    Under torchrun every rank runs this; fsdp=True shards with FSDP2 instead of DDP."""
    from engine.checkpoint import load_checkpoint, read_run_info
    from engine.config import GPTConfig
    from engine.data import World, read_corpus, read_tokens, token_batch, tokenize_documents
    from engine.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    out = Path(out)
    cfg = cfg or TrainConfig(max_steps=200)
    with distributed.process_group(pick_device(device), fsdp) as (ctx, dev):
        state = None
        if resume:
            model, tokenizer, state, folder = load_checkpoint(out, device=dev, backend=backend, with_trainer_state=True)
            run_info = read_run_info(folder)
            if ctx.is_main:
                print(f"resuming from {folder} (step {state['step']})")
        else:
            if any(out.glob("step-*")):
                raise InputError(f"--out {out} already holds checkpoints: pass --resume to continue, or choose another folder")
            world = World(n_people=n_people) if data == "builtin" else None
            config = GPTConfig.from_preset(preset, **({"block_size": block_size} if block_size else {}))
            tokenizer = None
            if ctx.is_main:  # the others wait in the broadcast until the token files are written
                docs = world.documents() if world else read_corpus(data)
                texts = docs + [turn["content"] for conv in world.conversations() for turn in conv] if world else docs
                tokenizer = Tokenizer.train(texts, vocab_size or config.vocab_size)
                tokenize_documents(docs, tokenizer, 0.1, out / "data")
            shared = ctx.broadcast(tokenizer.hf.to_str() if ctx.is_main else None)
            tokenizer = tokenizer or Tokenizer(HFTokenizer.from_str(shared))
            config.vocab_size = tokenizer.vocab_size
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            model = GPT(config, backend=backend).to(dev)
            run_info = {"kind": "pretrain", "data": data, "world": world.to_dict() if world else None, "preset": preset}
        train_tokens, val_tokens = read_tokens(out / "data" / "train.bin"), read_tokens(out / "data" / "val.bin")
        T = min(model.config.block_size, len(val_tokens) - 1)

        def batch_fn(step, micro):
            return (*token_batch(train_tokens, cfg.batch_size, T, cfg.seed, step, micro), None)

        def eval_fn(m):
            return text_val_loss(m, val_tokens, cfg.batch_size, cfg.eval_batches, cfg.seed)

        if ctx.is_main:
            print(f"pretraining {model.num_params() / 1e6:.2f}M parameters on {len(train_tokens):,} tokens ({data}), {dev}, "
                  f"backend {model.backend}{describe(ctx)}")
        return train(model, cfg, batch_fn, out, tokenizer, eval_fn, state, run_info, progress, ctx)


def describe(ctx: distributed.Dist) -> str:
    return f", {ctx.world_size} ranks ({'FSDP2' if ctx.fsdp else 'DDP'})" if ctx.enabled else ""


def conversation_split(convs: list[list[dict]], val_fraction: float = 0.05):
    """Train/val by the first user message: branches of one conversation tree stay together."""
    import zlib

    def is_val(conv):
        return zlib.crc32(conv[0]["content"].encode()) % 1000 < val_fraction * 1000

    val = [c for c in convs if is_val(c)]
    return [c for c in convs if not is_val(c)], val or convs[-1:]


def load_init(init=None, hf=None, device="cpu", backend="auto"):
    """The starting point of fine-tuning: our checkpoint (--init) or a Hugging Face GPT-2 folder
    (--hf), whose tokenizer gets the chat tokens it lacks (and the model the rows for them)."""
    from engine.checkpoint import load_source

    model, tokenizer, info, folder = load_source(init, hf, device, backend)
    if hf is None:
        return model, tokenizer, {**info, "init": str(folder)}
    if tokenizer is None:
        raise InputError(f"--hf {hf}: the folder has no tokenizer.json; fine-tuning needs one")
    if tokenizer.add_chat_tokens():
        model.resize_vocab(max(model.config.vocab_size, tokenizer.vocab_size))
    return model.to(device), tokenizer, {"init": str(hf), "hf": True}


def finetune(init, data: str, out, cfg: TrainConfig | None = None, backend: str = "auto", device: str = "auto",
             resume: bool = False, progress: bool = True, hf=None, fsdp: bool = False) -> dict:
    """Start from a pretrained checkpoint (init) or HF folder (hf) and train on conversations,
    assistant tokens only. Under torchrun every rank runs this; fsdp=True shards with FSDP2."""
    from engine.checkpoint import load_checkpoint, read_run_info
    from engine.data import World, conversation_batch, load_conversations

    out = Path(out)
    cfg = cfg or TrainConfig(max_steps=100, lr=1e-4)
    with distributed.process_group(pick_device(device), fsdp) as (ctx, dev):
        state = None
        if resume:
            model, tokenizer, state, folder = load_checkpoint(out, device=dev, backend=backend, with_trainer_state=True)
            run_info = read_run_info(folder)
            if ctx.is_main:
                print(f"resuming from {folder} (step {state['step']})")
        else:
            if any(out.glob("step-*")):
                raise InputError(f"--out {out} already holds checkpoints: pass --resume to continue, or choose another folder")
            torch.manual_seed(cfg.seed)  # rows added for the chat tokens start the same on every rank
            model, tokenizer, base = load_init(init, hf, dev, backend)
            run_info = {**base, "kind": "finetune", "finetune_data": data}
        if data == "builtin":
            if not run_info.get("world"):
                raise InputError("finetune --data builtin needs an --init checkpoint pretrained on the built-in world (--data builtin)")
            convs = World(**run_info["world"]).conversations()
        else:
            convs = load_conversations(data)
        train_convs, val_convs = conversation_split(convs)
        rendered = [tokenizer.render_conversation(c) for c in train_convs]
        val_rendered = [tokenizer.render_conversation(c) for c in val_convs]
        T = model.config.block_size

        def batch_fn(step, micro):
            return conversation_batch(rendered, cfg.batch_size, T, cfg.seed, step, micro)

        def eval_fn(m):
            return chat_val_loss(m, val_rendered, cfg.batch_size, cfg.eval_batches, cfg.seed)

        if ctx.is_main:
            print(f"fine-tuning on {len(train_convs)} conversations ({len(val_convs)} held out for val), {dev}, "
                  f"backend {model.backend}{describe(ctx)}")
        return train(model, cfg, batch_fn, out, tokenizer, eval_fn, state, run_info, progress, ctx)


# ---------------------------------------------------------------------------------------------
# Evaluation: validation loss, and question answering on the built-in world.
# ---------------------------------------------------------------------------------------------


def qa_answers(model, tokenizer, questions: list[str], batch_size: int = 64, max_new_tokens: int = 24) -> list[str]:
    """Greedy chat replies to one-turn questions."""
    from engine.generate import generate
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.end_id,))
    prompts = [tokenizer.render_prompt([{"role": "user", "content": q}]) for q in questions]
    answers = []
    for i in range(0, len(prompts), batch_size):
        answers += [c.text.strip() for c in generate(model, tokenizer, prompts[i : i + batch_size], params)]
    return answers


def qa_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Exact-match accuracy of greedy answers."""
    answers = qa_answers(model, tokenizer, [q for q, _ in pairs])
    return sum(a == gold for a, (_, gold) in zip(answers, pairs)) / len(pairs)


def evaluate(ckpt=None, device: str = "auto", backend: str = "auto", batch_size: int = 16, batches: int = 20, hf=None, data=None) -> dict:
    """Val loss, on `data` (a text file or a conversations .jsonl) when given, else on the
    checkpoint's own kind of data; on the built-in world, QA accuracy on the fine-tuning half
    and on the held-out half."""
    from engine.checkpoint import load_source
    from engine.data import World, load_conversations, read_corpus, read_tokens, token_stream

    model, tokenizer, info, folder = load_source(ckpt, hf, pick_device(device), backend)
    results = {"hf": str(hf)} if hf is not None else {"checkpoint": str(folder), "kind": info.get("kind", "unknown")}
    if tokenizer is None and data is not None:
        raise InputError(f"--hf {hf}: the folder has no tokenizer.json to read --data with")

    def chat_loss(convs):
        return chat_val_loss(model, [tokenizer.render_conversation(c) for c in convs], batch_size, batches)

    if data is not None and str(data).endswith(".jsonl"):
        results["val_loss"] = chat_loss(load_conversations(data))
    elif data is not None:
        results["val_loss"] = text_val_loss(model, token_stream(read_corpus(data), tokenizer), batch_size, batches)
    elif info.get("kind") == "finetune":
        convs = World(**info["world"]).conversations() if info.get("finetune_data") == "builtin" else load_conversations(info["finetune_data"])
        results["val_loss"] = chat_loss(conversation_split(convs)[1])
    elif info and (folder.parent / "data" / "val.bin").is_file():
        results["val_loss"] = text_val_loss(model, read_tokens(folder.parent / "data" / "val.bin"), batch_size, batches)
    if info.get("world"):
        seen, held_out = World(**info["world"]).split()
        results["qa_accuracy_finetune_half"] = qa_accuracy(model, tokenizer, World.qa_pairs(seen))
        results["qa_accuracy_held_out_half"] = qa_accuracy(model, tokenizer, World.qa_pairs(held_out))
    return results
