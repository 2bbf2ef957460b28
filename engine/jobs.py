"""The two jobs, what `llm-engine pretrain` and `llm-engine finetune` run: each turns its data
into Batches, opens (or resumes) its run folder, and hands both to the loop in engine/train.py.

Pretraining draws random windows of a token stream; fine-tuning draws whole conversations with
a loss mask on the assistant tokens. Files given as --data are tokenised once into shards
(engine/shards.py: on first use, into a cache keyed on the files and the tokenizer) and streamed
from there; the built-in world is made in memory and written to the run folder. Under torchrun
every rank runs the job; rank 0 alone prepares files and prints.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from engine import distributed
from engine.checkpoint import load_checkpoint, load_source, read_run_info
from engine.config import GPTConfig
from engine.data import (World, conversation_batch, conversation_split, finetune_conversations, read_tokens,
                         replay_items, token_batch, tokenize_documents, write_tokens)
from engine.devices import pick_device
from engine.errors import InputError
from engine.evaluate import chat_val_loss, text_val_loss
from engine.model import GPT
from engine.shards import Conversations, ShardSet, TokenStream, prepare
from engine.tokenizer import Tokenizer
from engine.train import Batches, Run, TrainConfig, train


def open_run(out, resume: bool, device, backend: str, ctx: distributed.Dist, start):
    """-> (model, Run). resume: the newest checkpoint in `out` with its trainer state and run.json.
    Otherwise `out` must hold no checkpoint yet and start() -> (model, tokenizer, run_info)
    makes the new run's starting point."""
    out = Path(out)
    if resume:
        model, tokenizer, state, folder = load_checkpoint(out, device=device, backend=backend, with_trainer_state=True)
        if ctx.is_main:
            print(f"resuming from {folder} (step {state['step']})")
        return model, Run(out, tokenizer, read_run_info(folder), state)
    if any(out.glob("step-*")):
        raise InputError(f"--out {out} already holds checkpoints: pass --resume to continue, or choose another folder")
    model, tokenizer, info = start()
    return model, Run(out, tokenizer, info)


def describe(ctx: distributed.Dist) -> str:
    return f", {ctx.world_size} ranks ({'FSDP2' if ctx.fsdp else 'DDP'})" if ctx.enabled else ""


# ----------------------------------------------------------------------------- pretraining


def pretrain(data: str, out, preset: str = "tiny", cfg: TrainConfig | None = None, backend: str = "auto",
             device: str = "auto", resume: bool = False, vocab_size: int | None = None, n_people: int = 100,
             block_size: int | None = None, progress: bool = True, fsdp: bool = False, text_field: str = "text",
             skip_bad_lines: bool = False) -> dict:
    """Tokenizer + token files (by rank 0), then the training loop. data: .txt/.jsonl/.parquet
    files (a file, folder or glob; .jsonl and .parquet hold the text in `text_field`), a folder
    `llm-engine tokenize` wrote, or "builtin" (the synthetic world of n_people people).
    Under torchrun every rank runs this; fsdp=True shards with FSDP2 instead of DDP."""
    out = Path(out)
    cfg = cfg or TrainConfig(max_steps=200)
    options = {"text_field": text_field, "skip_bad_lines": skip_bad_lines}
    with distributed.process_group(pick_device(device), fsdp) as (ctx, dev):
        def start():
            config = GPTConfig.from_preset(preset, **({"block_size": block_size} if block_size else {}))
            tokenizer, info = prepare_text(data, out / "data", vocab_size or config.vocab_size, n_people, ctx, options)
            config.vocab_size = tokenizer.vocab_size
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            return GPT(config, backend=backend).to(dev), tokenizer, {**info, "preset": preset}

        model, run = open_run(out, resume, dev, backend, ctx, start)
        if data == "builtin":
            train_tokens = read_tokens(out / "data" / "train.bin")
        else:  # the shards' stream less its val tail (the tail is the run's val.bin)
            train_tokens = TokenStream(shared_shards(ctx, lambda: prepare(data, run.tokenizer, **options))).split()[0]
        val_tokens = read_tokens(out / "data" / "val.bin")
        T = min(model.config.block_size, len(val_tokens) - 1)
        batches = Batches(
            micro=lambda step, micro: (*token_batch(train_tokens, cfg.batch_size, T, cfg.seed, step, micro), None),
            val_loss=lambda m: text_val_loss(m, val_tokens, cfg.batch_size, cfg.eval_batches, cfg.seed),
        )
        if ctx.is_main:
            print(f"pretraining {model.num_params() / 1e6:.2f}M parameters on {len(train_tokens):,} tokens ({data}), {dev}, "
                  f"backend {model.backend}{describe(ctx)}")
        return train(model, cfg, batches, run, ctx, progress)


def prepare_text(data: str, folder: Path, vocab_size: int, n_people: int, ctx: distributed.Dist, options: dict):
    """Rank 0 trains the tokenizer and writes the token files: for "builtin", train.bin and
    val.bin in folder; for files, their shards (engine/shards.py) and val.bin, the shards' tail.
    Every rank gets the tokenizer. -> (tokenizer, run info: the data and, for "builtin", the world)."""
    world = World(n_people=n_people) if data == "builtin" else None
    tokenizer = None
    if ctx.is_main and world:  # the others wait in the broadcast until the token files are written
        docs = world.documents()
        # the built-in world's tokenizer also learns the conversations' words, for fine-tuning
        tokenizer = Tokenizer.train(docs + [turn["content"] for conv in world.conversations() for turn in conv], vocab_size)
        tokenize_documents(docs, tokenizer, 0.1, folder)
    elif ctx.is_main:
        shards = prepare(data, vocab_size=vocab_size, **options)
        tokenizer = shards.tokenizer()
        write_tokens(TokenStream(shards).split()[1][:], folder / "val", tokenizer.vocab_size)
    shared = ctx.broadcast(tokenizer.hf.to_str() if ctx.is_main else None)
    tokenizer = tokenizer or Tokenizer(HFTokenizer.from_str(shared))
    return tokenizer, {"kind": "pretrain", "data": data, "world": world.to_dict() if world else None}


def shared_shards(ctx: distributed.Dist, make) -> ShardSet:
    """The shard set make() returns on rank 0 (which tokenises, if needed, while the others wait)."""
    return ShardSet(ctx.broadcast(str(make().folder) if ctx.is_main else None))


# ----------------------------------------------------------------------------- fine-tuning


def finetune(init, data: str, out, cfg: TrainConfig | None = None, backend: str = "auto", device: str = "auto",
             resume: bool = False, progress: bool = True, hf=None, fsdp: bool = False, skip_bad_lines: bool = False) -> dict:
    """Start from a pretrained checkpoint (init) or HF folder (hf) and train on conversations,
    assistant tokens only. data: .jsonl/.parquet files of {"messages": [...]} (a file, folder or
    glob), a folder `llm-engine tokenize --chat` wrote, or "builtin" (the world of the init).
    Under torchrun every rank runs this; fsdp=True shards with FSDP2."""
    out = Path(out)
    cfg = cfg or TrainConfig(max_steps=100, lr=1e-4)
    with distributed.process_group(pick_device(device), fsdp) as (ctx, dev):
        def start():
            torch.manual_seed(cfg.seed)  # rows added for the chat tokens start the same on every rank
            model, tokenizer, base = load_init(init, hf, dev, backend)
            return model, tokenizer, {**base, "kind": "finetune", "finetune_data": data}

        model, run = open_run(out, resume, dev, backend, ctx, start)
        if data == "builtin":  # in memory, with the world's biographies replayed
            train_convs, val_convs = conversation_split(finetune_conversations(data, run.info.get("world")))
            replayed = replay_items(data, run.info.get("world"), run.tokenizer)
            rendered = run.tokenizer.render_conversations(train_convs) + replayed
            val_rendered = run.tokenizer.render_conversations(val_convs)
        else:  # rendered once into shards (ids and loss mask), streamed from there
            shards = shared_shards(ctx, lambda: prepare(data, run.tokenizer, chat=True, skip_bad_lines=skip_bad_lines))
            rendered, val_rendered, replayed = Conversations(shards, val=False), Conversations(shards, val=True), []
        T = model.config.block_size
        batches = Batches(
            micro=lambda step, micro: conversation_batch(rendered, cfg.batch_size, T, cfg.seed, step, micro),
            val_loss=lambda m: chat_val_loss(m, val_rendered, cfg.batch_size, cfg.eval_batches, cfg.seed),
        )
        if ctx.is_main:
            print(f"fine-tuning on {len(rendered) - len(replayed)} conversations ({len(val_rendered)} held out for val)"
                  f"{f' and {len(replayed)} replayed biographies' if replayed else ''}, {dev}, "
                  f"backend {model.backend}{describe(ctx)}")
        return train(model, cfg, batches, run, ctx, progress)


def load_init(init=None, hf=None, device="cpu", backend="auto"):
    """The starting point of fine-tuning: our checkpoint (--init) or a Hugging Face folder (--hf).
    A folder with a Jinja chat template (tokenizer_config.json) is fine-tuned in that template;
    one without gets the built-in chat tokens it lacks (and the model the rows for them)."""
    model, tokenizer, info, folder = load_source(init, hf, device, backend)
    if hf is None:
        return model, tokenizer, {**info, "init": str(folder)}
    if tokenizer is None:
        raise InputError(f"--hf {hf}: the folder has no tokenizer.json; fine-tuning needs one")
    if tokenizer.template is None and tokenizer.add_chat_tokens():  # a folder's own chat template is kept
        model.resize_vocab(max(model.config.vocab_size, tokenizer.vocab_size))
    return model.to(device), tokenizer, {"init": str(hf), "hf": True}
