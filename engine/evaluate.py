"""Evaluation: validation losses (for the training loop and `llm-engine eval`) and question
answering on the built-in world (exact-match accuracy of greedy chat replies)."""
import torch

from engine.checkpoint import load_source
from engine.data import (World, conversation_batch, conversation_split, finetune_conversations, load_conversations,
                         read_corpus, read_tokens, token_batch, token_stream)
from engine.devices import autocast_for, pick_device
from engine.errors import InputError
from engine.generate import generate
from engine.model import GPT
from engine.sampling import SamplingParams


@torch.no_grad()
def mean_loss(model: GPT, batches) -> float:
    """Average loss over an iterable of (x, y, mask) batches, in eval mode."""
    device = next(model.parameters()).device
    autocast = autocast_for(device)
    losses = []
    for x, y, mask in batches:
        with autocast:
            _, loss = model(x.to(device), y.to(device), loss_mask=None if mask is None else mask.to(device))
        losses.append(loss.item())
    return sum(losses) / len(losses)


def text_val_loss(model: GPT, tokens, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean loss over `batches` fixed random windows of a token stream (the same ones every call)."""
    T = min(model.config.block_size, len(tokens) - 1)
    return mean_loss(model, ((*token_batch(tokens, batch_size, T, seed, -1, i), None) for i in range(batches)))


def chat_val_loss(model: GPT, rendered, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean assistant-token loss over `batches` fixed random batches of rendered conversations."""
    return mean_loss(model, (conversation_batch(rendered, batch_size, model.config.block_size, seed, -1, i) for i in range(batches)))


def qa_answers(model, tokenizer, questions: list[str], batch_size: int = 64, max_new_tokens: int = 24) -> list[str]:
    """Greedy chat replies to one-turn questions."""
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
        results["val_loss"] = chat_loss(conversation_split(finetune_conversations(info["finetune_data"], info.get("world")))[1])
    elif info and (folder.parent / "data" / "val.bin").is_file():
        results["val_loss"] = text_val_loss(model, read_tokens(folder.parent / "data" / "val.bin"), batch_size, batches)
    if info.get("world"):
        seen, held_out = World(**info["world"]).split()
        results["qa_accuracy_finetune_half"] = qa_accuracy(model, tokenizer, World.qa_pairs(seen))
        results["qa_accuracy_held_out_half"] = qa_accuracy(model, tokenizer, World.qa_pairs(held_out))
    return results
