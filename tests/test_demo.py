"""The demo: its table and its 3-turn chat, end to end on a small world (the accuracy figures
themselves are measured by `make demo`, not here)."""
import pytest

from engine.checkpoint import load_checkpoint
from engine.config import DEMO_PRESETS, GPTConfig
from engine.data import ATTRIBUTES
from engine.demo import results_table, run_demo


def test_the_table_has_a_row_per_question_type_and_turn_and_a_column_per_half():
    results = {"qa_accuracy_finetune_half": 0.96, "qa_accuracy_held_out_half": 0.5, "end_of_turn_rate": 0.995,
               "qa_accuracy_by_type_finetune_half": {a: 0.96 for a in ATTRIBUTES},
               "qa_accuracy_by_type_held_out_half": {a: i / 10 for i, a in enumerate(ATTRIBUTES)},
               "multi_turn_accuracy_finetune_half": {"turn_1": 0.9, "turn_2": 0.8, "turn_3": 0.7},
               "multi_turn_accuracy_held_out_half": {"turn_1": 0.6, "turn_2": 0.5, "turn_3": 0.25}}
    lines = results_table(results).splitlines()
    assert "fine-tuned people" in lines[0] and "held-out people" in lines[0]
    rows = {line[:32].strip(): line[32:].split() for line in lines[1:-1]}
    assert rows["major (single turn)"] == ["96.0%", "30.0%"]
    assert rows["all types (single turn)"] == ["96.0%", "50.0%"]
    assert rows["3-turn chats, turn 3"] == ["70.0%", "25.0%"]
    assert len(rows) == len(ATTRIBUTES) + 1 + 3
    assert lines[-1].endswith("99.5%")


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_the_demo_runs_end_to_end_and_prints_its_table_and_a_3_turn_chat(tmp_path, capsys, preset):
    results = run_demo(tmp_path / "demo", pretrain_steps=4, finetune_steps=2, backend="torch", device="cpu", n_people=10,
                       preset=preset)
    out = capsys.readouterr().out
    assert set(results["qa_accuracy_by_type_held_out_half"]) == set(ATTRIBUTES)
    assert 0.0 <= results["end_of_turn_rate"] <= 1.0
    chat = out[out.index("== 5."):out.index("times:")]
    assert chat.count("user> ") == 3 and chat.count("assistant> ") == 3
    assert "3-turn chats, turn 2" in out and "held-out people" in out
    assert "and 1200 replayed biographies" in out  # fine-tuning keeps reading about everyone
    assert f"pretraining a {preset} model" in out
    model, _, _, _ = load_checkpoint(tmp_path / "demo" / "finetune")
    assert model.config.arch == GPTConfig.from_preset(preset).arch
