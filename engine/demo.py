"""`make demo`: pretrain -> fine-tune -> eval -> chat answers on the built-in world.

Shows what each stage does: the pretrained model has read biographies and continues text;
the fine-tuned one answers questions, including about people it only read about.
"""
import shutil
import textwrap
import time
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.data import World
from engine.devices import pick_device
from engine.evaluate import evaluate, qa_answers
from engine.jobs import finetune, pretrain
from engine.train import TrainConfig


def run_demo(out="runs/demo", pretrain_steps: int = 600, finetune_steps: int = 200, backend="auto", device="auto", n_people: int = 100):
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    print("== 1. pretraining on biographies of the built-in world ==")
    pretrain("builtin", out / "pretrain", "tiny", TrainConfig(max_steps=pretrain_steps, lr=2e-3, warmup_steps=30, eval_every=100, save_every=pretrain_steps),
             backend, device, n_people=n_people, block_size=128)
    t1 = time.perf_counter()
    print("\n== 2. fine-tuning on questions about half of the people ==")
    finetune(out / "pretrain", "builtin", out / "finetune", TrainConfig(max_steps=finetune_steps, lr=1e-4, warmup_steps=10, eval_every=50, save_every=finetune_steps),
             backend, device)
    t2 = time.perf_counter()

    print("\n== 3. evaluation ==")
    results = {name: evaluate(out / name, device=device, backend=backend) for name in ("pretrain", "finetune")}
    t3 = time.perf_counter()
    print(f"{'':28}{'pretrained':>12}{'fine-tuned':>12}")
    for key, label in [("val_loss", "val loss (own data)"), ("qa_accuracy_finetune_half", "QA acc, fine-tuned people"),
                       ("qa_accuracy_held_out_half", "QA acc, held-out people")]:
        print(f"{label:28}{results['pretrain'][key]:>12.3f}{results['finetune'][key]:>12.3f}")

    print("\n== 4. the same questions to both models ==")
    seen, held_out = World(n_people=n_people).split()
    pairs = World.qa_pairs(seen[:2])[:3] + World.qa_pairs(held_out[:2])[:3]
    dev = pick_device(device)
    answers = {}
    for name in ("pretrain", "finetune"):
        model, tokenizer, _, _ = load_checkpoint(out / name, device=dev, backend=backend)
        answers[name] = qa_answers(model, tokenizer, [q for q, _ in pairs])
    for i, (q, gold) in enumerate(pairs):
        tag = "fine-tuned person" if i < 3 else "held-out person"
        print(f"\nQ ({tag}): {q}   [truth: {gold}]")
        print(textwrap.indent(f"pretrained: {answers['pretrain'][i]!r}\nfine-tuned: {answers['finetune'][i]!r}", "  "))
    print(f"\ntimes: pretrain {t1 - t0:.0f} s, fine-tune {t2 - t1:.0f} s, eval {t3 - t2:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print(f"talk to it: llm-engine chat --ckpt {out / 'finetune'}")
    return results
