"""Training: the loss falls, resume is exact, Ctrl-C saves, crashes never leave a valid-looking
checkpoint, fine-tuning reads real conversations."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine.data
import engine.jobs
from engine import checkpoint
from engine.data import conversation_split
from engine.jobs import finetune, pretrain
from engine.train import TrainConfig

SMALL = dict(vocab_size=512, block_size=64)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def small_pretrain(data, out, steps, **kw):
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=steps, save_every=kw.pop("save_every", steps))
    return pretrain(data, out, "tiny", cfg, backend="torch", device="cpu", progress=False, block_size=64, vocab_size=512, **kw)


def test_loss_falls_on_the_builtin_world(tmp_path):
    small_pretrain("builtin", tmp_path, 40, n_people=20)
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5


def test_loss_falls_on_shakespeare(tmp_path, shared_file):
    text = shared_file("tinyshakespeare.txt").read_text()[:100_000]
    (tmp_path / "shakespeare.txt").write_text(text)
    small_pretrain(str(tmp_path / "shakespeare.txt"), tmp_path / "run", 30)
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5  # nats
    header = json.loads((tmp_path / "run" / "data" / "val.json").read_text())
    assert header["dtype"] == "uint16"


def test_interrupted_run_resumes_to_the_same_losses(tmp_path, monkeypatch):
    small_pretrain("builtin", tmp_path / "straight", 10, n_people=10)

    real_batch = engine.jobs.token_batch

    def interrupt_at_step_4(tokens, batch_size, block_size, seed, step, micro):
        if step == 4:  # Ctrl-C arrives in the middle of step 5
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(tokens, batch_size, block_size, seed, step, micro)

    monkeypatch.setattr(engine.jobs, "token_batch", interrupt_at_step_4)
    with pytest.raises(Exception, match="interrupted at step 5"):
        small_pretrain("builtin", tmp_path / "resumed", 10, n_people=10)
    assert checkpoint.find_checkpoint(tmp_path / "resumed").name == "step-0000005"
    monkeypatch.setattr(engine.jobs, "token_batch", real_batch)
    small_pretrain("builtin", tmp_path / "resumed", 10, n_people=10, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_a_crash_during_save_leaves_no_valid_looking_checkpoint(tmp_path, monkeypatch):
    small_pretrain("builtin", tmp_path, 4, n_people=10, save_every=2)
    assert checkpoint.find_checkpoint(tmp_path).name == "step-0000004"
    model, tok, state, _ = checkpoint.load_checkpoint(tmp_path, with_trainer_state=True)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)  # dies after the weights, before the trainer state
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 6, model, tok, state)
    assert any(p.name.startswith(".tmp-step-0000006") for p in tmp_path.iterdir())  # the debris exists...
    assert checkpoint.find_checkpoint(tmp_path).name == "step-0000004"  # ...and is never picked up
    # a step folder with a file missing is not a checkpoint either
    (tmp_path / "step-0000009").mkdir()
    (tmp_path / "step-0000009" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-0000004"


def test_checkpoints_load_without_running_code(tmp_path):
    small_pretrain("builtin", tmp_path, 2, n_people=10)
    model, tok, state, folder = checkpoint.load_checkpoint(tmp_path, with_trainer_state=True)
    assert state["step"] == 2 and set(state) >= {"optimizer", "rng_cpu", "step"}
    again, _, _, _ = checkpoint.load_checkpoint(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_ctrl_c_on_the_command_line_saves_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", "pretrain", "--data", "builtin", "--n-people", "10", "--out", str(out),
           "--max-steps", "100000", "--batch-size", "4", "--block-size", "64", "--vocab-size", "400", "--save-every", "100000", "--backend", "torch", "--device", "cpu"]
    # PYTHONFAULTHANDLER: a child that does not stop prints every thread's stack when it gets SIGABRT
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # seen once in CI (2026-11-30), not reproduced: say where it stood
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"still running 120 s after Ctrl-C; metrics lines: "
                    f"{(out / 'metrics.jsonl').read_text().count(chr(10))}; its stacks:\n{err[-6000:]}")
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err
    assert checkpoint.find_checkpoint(out).name.startswith("step-")


BAD_CONVERSATIONS = [
    ("{not json", "line 1: bad JSON"),
    ('{"turns": []}', 'line 1: missing "messages"'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "message 0 (user) has empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "does not end with an assistant turn"),
]


@pytest.mark.parametrize("line,message", BAD_CONVERSATIONS)
def test_malformed_conversations_get_their_documented_error(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("line 1", "line 2").replace("(", r"\(").replace(")", r"\)")) as err:
        engine.data.load_conversations(path)
    assert str(path) in str(err.value)


def test_conversation_batches_train_only_on_assistant_tokens():
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.train(["what is two plus two? four. hello"], vocab_size=300)
    rendered = [tok.render_conversation([{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."}])]
    x, y, mask = engine.data.conversation_batch(rendered, 2, 64, 0, 0, 0)
    for b in range(2):
        trained = [int(t) for t, m in zip(y[b], mask[b]) if m]
        assert tok.decode(trained, skip_special_tokens=False) == "four.<|end|>"
        assert (y[b][mask[b] == 0] != -1).sum() == len(rendered[0][0]) - 1 - len(trained)


def test_finetune_runs_on_real_conversations(tmp_path, shared_file):
    conversations = shared_file("conversations.jsonl")
    text = shared_file("tinyshakespeare.txt").read_text()[:50_000]
    (tmp_path / "text.txt").write_text(text)
    small_pretrain(str(tmp_path / "text.txt"), tmp_path / "base", 2)
    cfg = TrainConfig(max_steps=3, batch_size=4, eval_every=3, eval_batches=2, save_every=3)
    metrics = finetune(tmp_path / "base", str(conversations), tmp_path / "chat", cfg, backend="torch", device="cpu", progress=False)
    assert metrics["step"] == 3
    assert checkpoint.read_run_info(checkpoint.find_checkpoint(tmp_path / "chat"))["kind"] == "finetune"
    # the reported val loss is the saved model's cross-entropy on the held-out conversations'
    # assistant tokens, recomputed here from the formula
    model, tok, _, _ = checkpoint.load_checkpoint(tmp_path / "chat")
    held_out = [tok.render_conversation(c) for c in conversation_split(engine.data.load_conversations(conversations))[1]]
    batch_losses = []
    for i in range(cfg.eval_batches):
        x, y, mask = engine.data.conversation_batch(held_out, cfg.batch_size, model.config.block_size, cfg.seed, -1, i)
        with torch.no_grad():
            logits = model.eval()(x)[0]
        counted = mask.bool() & (y != -1)
        batch_losses.append(torch.nn.functional.cross_entropy(logits[counted], y[counted]).item())
    assert metrics["val_loss"] == pytest.approx(sum(batch_losses) / len(batch_losses), rel=1e-5)


def test_eval_reports_val_loss_and_qa_accuracy(tmp_path):
    from engine.evaluate import evaluate

    small_pretrain("builtin", tmp_path / "run", 10, n_people=10)
    own = evaluate(tmp_path / "run", device="cpu", backend="torch", batches=2)
    assert own["kind"] == "pretrain"
    assert 0 < own["val_loss"] < math.log(512)  # 10 steps already beat guessing uniformly over the vocabulary
    assert own["qa_accuracy_finetune_half"] == own["qa_accuracy_held_out_half"] == 0.0  # an untrained chat
    (tmp_path / "other.txt").write_text("Some other text entirely, for the --data path. " * 50)
    other = evaluate(tmp_path / "run", device="cpu", backend="torch", batches=2, data=tmp_path / "other.txt")
    assert other["val_loss"] > own["val_loss"]  # text unlike the training data costs more


def test_eval_reports_every_world_figure_of_an_untrained_chat(tmp_path):
    from engine.data import ATTRIBUTES
    from engine.evaluate import evaluate

    small_pretrain("builtin", tmp_path / "run", 2, n_people=10)
    results = evaluate(tmp_path / "run", device="cpu", backend="torch", batches=1)
    for half in ("finetune_half", "held_out_half"):
        assert results[f"qa_accuracy_by_type_{half}"] == {a: 0.0 for a in ATTRIBUTES}
        assert results[f"multi_turn_accuracy_{half}"] == {"turn_1": 0.0, "turn_2": 0.0, "turn_3": 0.0}
    assert 0.0 <= results["end_of_turn_rate"] < 0.5  # an untrained model rarely picks <|end|> by chance
    assert "end_of_turn_rate" not in evaluate(tmp_path / "run", device="cpu", backend="torch", batches=1, chat=False)


class ScriptedChat:
    """Stands in for chat_replies: answers a question that names the person with the world's
    answer, and anything else ("he"/"she") with "I don't know."; records what it was shown."""

    def __init__(self, world):
        self.gold = {q: a for q, a in world.qa_pairs(world.people())}
        self.shown, self.params = [], []

    def __call__(self, model, tokenizer, chats, params):
        from types import SimpleNamespace

        self.shown += [list(chat) for chat in chats]
        self.params += params
        return [SimpleNamespace(text=self.gold.get(chat[-1]["content"], "I don't know."),
                                finish_reason="stop_token" if p.seed is None or p.seed % 4 else "length")
                for chat, p in zip(chats, params)]


def test_multi_turn_accuracy_scores_each_turn_of_chats_that_continue_from_the_models_own_replies(monkeypatch):
    from types import SimpleNamespace

    import engine.evaluate
    from engine.data import World

    world = World(n_people=20, seed=0)
    scripted = ScriptedChat(world)
    monkeypatch.setattr(engine.evaluate, "chat_replies", scripted)
    model = SimpleNamespace(config=SimpleNamespace(block_size=10_000))
    tokenizer = SimpleNamespace(render_prompt=lambda messages: [0] * len(messages), stop_ids=(7,))
    chats = world.eval_chats(world.split()[1], n_chats=50)
    accuracies = engine.evaluate.multi_turn_accuracy(model, tokenizer, chats)

    def names_the_person(question):
        return not {"he", "she"} & set(question.rstrip("?").split())

    users = [[m["content"] for m in chat if m["role"] == "user"] for chat in chats]
    assert accuracies == [sum(names_the_person(u[t]) for u in users) / 50 for t in range(3)]
    assert accuracies[0] == 1.0 and 0 < accuracies[1] < 1
    # the third turn is asked after the model's own second reply, not the gold one
    third_turn_prompts = [shown for shown in scripted.shown if sum(m["role"] == "user" for m in shown) == 3]
    assert len(third_turn_prompts) == 50
    assert any(m["content"] == "I don't know." for shown in third_turn_prompts for m in shown)


def test_end_of_turn_rate_samples_every_question_with_three_seeds(monkeypatch):
    from types import SimpleNamespace

    import engine.evaluate
    from engine.data import World

    world = World(n_people=10, seed=0)
    scripted = ScriptedChat(world)
    monkeypatch.setattr(engine.evaluate, "chat_replies", scripted)
    questions = [q for q, _ in world.qa_pairs(world.people())]
    model = SimpleNamespace(config=SimpleNamespace(block_size=10_000))
    tokenizer = SimpleNamespace(render_prompt=lambda messages: [0] * len(messages), stop_ids=(7,))
    rate = engine.evaluate.end_of_turn_rate(model, tokenizer, questions)
    seeds = [p.seed for p in scripted.params]
    assert len(set(seeds)) == len(seeds) == 3 * len(questions)
    assert all(p.temperature == 0.8 and p.top_p == 0.95 and p.stop_token_ids == (7,) and p.max_new_tokens == 48
               for p in scripted.params)
    assert rate == sum(s % 4 != 0 for s in seeds) / len(seeds)
