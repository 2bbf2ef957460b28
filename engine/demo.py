"""`make demo`: pretrain -> fine-tune -> eval -> chat answers on the built-in world.

Shows what each stage does: the pretrained model has read biographies and continues text;
the fine-tuned one answers questions, including about people it only read about, over
several turns.
"""
import shutil
import textwrap
import time
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.data import ATTRIBUTES, World
from engine.devices import pick_device
from engine.evaluate import evaluate, qa_answers, replay_chats
from engine.jobs import finetune, pretrain
from engine.train import TrainConfig

HALVES = {"finetune_half": "fine-tuned people", "held_out_half": "held-out people"}


def results_table(results: dict) -> str:
    """The fine-tuned model's figures on the built-in world (evaluate's keys), one row per
    question type and per turn, one column per half of the people."""
    rows = [(f"{a} (single turn)", "qa_accuracy_by_type_{}", a) for a in ATTRIBUTES]
    rows += [("all types (single turn)", "qa_accuracy_{}", None)]
    rows += [(f"3-turn chats, turn {t}", "multi_turn_accuracy_{}", f"turn_{t}") for t in (1, 2, 3)]
    lines = [f"{'exact-match accuracy':32}" + "".join(f"{label:>20}" for label in HALVES.values())]
    for label, key, sub in rows:
        cells = [results[key.format(half)] if sub is None else results[key.format(half)][sub] for half in HALVES]
        lines.append(f"{label:32}" + "".join(f"{cell:>20.1%}" for cell in cells))
    lines.append(f"replies that end their turn (T=0.8, top-p 0.95, 3 seeds): {results['end_of_turn_rate']:.1%}")
    return "\n".join(lines)


def run_demo(out="runs/demo", pretrain_steps: int = 600, finetune_steps: int = 400, backend="auto", device="auto",
             n_people: int = 100, preset: str = "tiny"):
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"== 1. pretraining a {preset} model on biographies of the built-in world ==")
    pretrain("builtin", out / "pretrain", preset, TrainConfig(max_steps=pretrain_steps, lr=2e-3, warmup_steps=30, eval_every=100, save_every=pretrain_steps),
             backend, device, n_people=n_people, block_size=128)
    t1 = time.perf_counter()
    print("\n== 2. fine-tuning on conversations about half of the people (and biographies of everyone) ==")
    finetune(out / "pretrain", "builtin", out / "finetune", TrainConfig(max_steps=finetune_steps, lr=1e-3, warmup_steps=20, eval_every=100, save_every=finetune_steps),
             backend, device)
    t2 = time.perf_counter()

    print("\n== 3. evaluation ==")
    pretrained = evaluate(out / "pretrain", device=device, backend=backend, chat=False)
    tuned = evaluate(out / "finetune", device=device, backend=backend)
    t3 = time.perf_counter()
    print(f"val loss: pretrained {pretrained['val_loss']:.3f} (biographies), fine-tuned {tuned['val_loss']:.3f} (answers)")
    print(results_table(tuned))

    world = World(n_people=n_people)
    seen, held_out = world.split()
    dev = pick_device(device)
    models = {name: load_checkpoint(out / name, device=dev, backend=backend)[:2] for name in ("pretrain", "finetune")}
    print("\n== 4. the same questions to both models ==")
    pairs = World.qa_pairs(seen[:2])[:3] + World.qa_pairs(held_out[:2])[:3]
    answers = {name: qa_answers(model, tokenizer, [q for q, _ in pairs]) for name, (model, tokenizer) in models.items()}
    for i, (q, gold) in enumerate(pairs):
        tag = "fine-tuned person" if i < 3 else "held-out person"
        print(f"\nQ ({tag}): {q}   [truth: {gold}]")
        print(textwrap.indent(f"pretrained: {answers['pretrain'][i]!r}\nfine-tuned: {answers['finetune'][i]!r}", "  "))

    print("\n== 5. a 3-turn chat about held-out people with the fine-tuned model ==")
    gold = world.eval_chats(held_out)[0]
    for message, truth in zip(replay_chats(*models["finetune"], [gold])[0], gold):
        mark = "" if message["role"] != "assistant" else "   [exact]" if message == truth else f"   [truth: {truth['content']}]"
        print(f"{message['role']:>9}> {message['content']}{mark}")
    print(f"\ntimes: pretrain {t1 - t0:.0f} s, fine-tune {t2 - t1:.0f} s, eval {t3 - t2:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print(f"talk to it: llm-engine chat --ckpt {out / 'finetune'}")
    return tuned
