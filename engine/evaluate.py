"""Evaluation: validation losses (for the training loop and `llm-engine eval`) and question
answering on the built-in world (exact-match accuracy of greedy chat replies)."""
import torch

from engine.checkpoint import load_source
from engine.data import (ATTRIBUTES, World, conversation_batch, conversation_split, finetune_conversations,
                         load_conversations, qa_pair, read_corpus, read_tokens, token_batch, token_stream)
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


GREEDY_TOKENS = 24  # the longest answer is 16 tokens
END_OF_TURN_TOKENS = 48  # a sampled reply that has not ended by then has run on past its answer
END_OF_TURN_SEEDS = (0, 1, 2)


def chat_replies(model, tokenizer, chats: list[list[dict]], params: list[SamplingParams], batch_size: int = 128):
    """One Completion per chat: the assistant's next reply."""
    prompts = [tokenizer.render_prompt(chat) for chat in chats]
    return [c for i in range(0, len(prompts), batch_size)
            for c in generate(model, tokenizer, prompts[i : i + batch_size], params[i : i + batch_size])]


def greedy(tokenizer) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS, stop_token_ids=tokenizer.stop_ids)


def qa_answers(model, tokenizer, questions: list[str]) -> list[str]:
    """Greedy chat replies to one-turn questions."""
    chats = [[{"role": "user", "content": q}] for q in questions]
    return [c.text.strip() for c in chat_replies(model, tokenizer, chats, [greedy(tokenizer)] * len(chats))]


def accuracy_by_type(model, tokenizer, people) -> dict:
    """Exact-match accuracy per question type (attribute), and over all of them."""
    pairs = [(a, *qa_pair(p, a)) for a in ATTRIBUTES for p in people]
    answers = qa_answers(model, tokenizer, [q for _, q, _ in pairs])
    hits = {a: 0 for a in ATTRIBUTES}
    for (attribute, _, gold), answer in zip(pairs, answers):
        hits[attribute] += answer == gold
    return {**{a: n / len(people) for a, n in hits.items()}, "all": sum(hits.values()) / len(pairs)}


def replay_chats(model, tokenizer, chats: list[list[dict]]) -> list[list[dict]]:
    """The chats with every assistant turn replaced by the model's greedy reply to the chat so
    far, its own earlier replies included (as in `llm-engine chat`). A chat that has grown too
    long to leave a reply room in the model's context gets empty replies from then on."""
    replayed = [[] for _ in chats]
    for t in range(max(len(chat) for chat in chats)):
        answering = [i for i, chat in enumerate(chats) if t < len(chat) and chat[t]["role"] == "assistant"]
        fits = [i for i in answering
                if len(tokenizer.render_prompt(replayed[i])) + GREEDY_TOKENS <= model.config.block_size]
        replies = chat_replies(model, tokenizer, [replayed[i] for i in fits], [greedy(tokenizer)] * len(fits))
        reply_of = {i: "" for i in answering} | {i: r.text.strip() for i, r in zip(fits, replies)}
        for i, chat in enumerate(chats):
            if t < len(chat):
                replayed[i].append({"role": chat[t]["role"], "content": reply_of.get(i, chat[t]["content"])})
    return replayed


def multi_turn_accuracy(model, tokenizer, chats: list[list[dict]]) -> list[float]:
    """Exact-match accuracy of the replayed chats' replies, turn by turn (the first reply, the
    second, ...); chats hold the questions and the gold answers."""
    n_turns = max(sum(m["role"] == "assistant" for m in chat) for chat in chats)
    per_turn = [[] for _ in range(n_turns)]
    for chat, replayed in zip(chats, replay_chats(model, tokenizer, chats)):
        answers = [(gold["content"], reply["content"]) for gold, reply in zip(chat, replayed) if gold["role"] == "assistant"]
        for turn, (gold, reply) in enumerate(answers):
            per_turn[turn].append(gold == reply)
    return [sum(hits) / len(hits) for hits in per_turn]


def end_of_turn_rate(model, tokenizer, questions: list[str], temperature=0.8, top_p=0.95, seeds=END_OF_TURN_SEEDS) -> float:
    """The share of sampled replies that end with the end-of-turn token within END_OF_TURN_TOKENS
    (or what the model's context leaves after the longest question), one reply per question
    and seed."""
    chats = [[{"role": "user", "content": q}] for q in questions]
    room = model.config.block_size - max(len(tokenizer.render_prompt(chat)) for chat in chats)
    ended = 0
    for seed in seeds:
        params = [SamplingParams(temperature=temperature, top_p=top_p, seed=seed * len(chats) + i, stop_token_ids=tokenizer.stop_ids,
                                 max_new_tokens=min(END_OF_TURN_TOKENS, room)) for i in range(len(chats))]
        ended += sum(c.finish_reason == "stop_token" for c in chat_replies(model, tokenizer, chats, params))
    return ended / (len(chats) * len(seeds))


def world_metrics(model, tokenizer, world: World) -> dict:
    """What the built-in world measures of a chat model, for both halves of the people:
    single-turn accuracy per question type, 2nd/3rd-turn accuracy of 200 three-turn chats, and
    the end-of-turn rate of sampled replies to every single-turn question."""
    results = {"end_of_turn_rate": end_of_turn_rate(model, tokenizer, [q for q, _ in World.qa_pairs(world.people())])}
    for half, people in zip(("finetune_half", "held_out_half"), world.split()):
        by_type = accuracy_by_type(model, tokenizer, people)
        turns = multi_turn_accuracy(model, tokenizer, world.eval_chats(people))
        results[f"qa_accuracy_{half}"] = by_type.pop("all")
        results[f"qa_accuracy_by_type_{half}"] = by_type
        results[f"multi_turn_accuracy_{half}"] = {f"turn_{t}": acc for t, acc in enumerate(turns, 1)}
    return results


def evaluate(ckpt=None, device: str = "auto", backend: str = "auto", batch_size: int = 16, batches: int = 20, hf=None, data=None,
             chat: bool = True) -> dict:
    """Val loss, on `data` (a text file or a conversations .jsonl) when given, else on the
    checkpoint's own kind of data; on the built-in world (unless chat is False) world_metrics:
    QA accuracy on the fine-tuning half and on the held-out half, per question type and over
    several turns, and the end-of-turn rate."""

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
    if info.get("world") and chat:
        results.update(world_metrics(model, tokenizer, World(**info["world"])))
    return results
