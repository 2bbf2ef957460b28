"""Hugging Face chat templates (Jinja) against transformers' apply_chat_template, the assistant
loss mask they give fine-tuning, and the commands on a Hugging Face folder that has one.

The folders are made here: a small byte-level BPE with the family's control tokens, a
randomly initialised LlamaForCausalLM or Qwen3ForCausalLM (save_pretrained), and a chat
template written for these tests in the Llama-3 style or the Qwen (ChatML) style. Nothing is
downloaded.
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine import hf  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML as Qwen2.5 writes it: a default system message when the chat has none.
CHATML = """{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen3's habit: the reply after the last user message carries an (empty) thinking block, the
# earlier ones don't, so a history renders differently once a reply follows it. The
# {% generation %} tags let transformers compute its own assistant mask to compare with.
QWEN3 = """{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if loop.last %}
                {{- '<think>\\n\\n</think>\\n\\n' }}
            {%- endif %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
FAMILIES = {  # name -> (template, control tokens, bos, eos, end of turn, HF model prefix)
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "Llama"),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", "Qwen3"),
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", "Qwen3"),
}
TEXTS = ["Where was Ada born? Ada was born in Paris.", "Who does Ben work for? Ben works for Acme Corp.",
         "You are a helpful assistant. Answer briefly.", "What did Clara study? Clara majored in Physics."]
CHATS = [
    [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "Ada was born in Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who does Ben work for?"},
     {"role": "assistant", "content": " Ben works for Acme Corp.\n"}, {"role": "user", "content": "And Clara?"},
     {"role": "assistant", "content": "Clara majored in Physics."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Where was Ada born?"}],
]


def tokenizer_json(family, vocab_size=400):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=FAMILIES[family][1],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw


def make_folder(family, folder, seed=0):
    """A Hugging Face folder: a tiny random model, its tokenizer and the family's chat template."""
    from transformers import PreTrainedTokenizerFast

    template, _, bos, eos, _, prefix = FAMILIES[family]
    raw = tokenizer_json(family)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, chat_template=template)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=raw.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=family != "llama3",
        bos_token_id=raw.token_to_id(bos) if bos else None, eos_token_id=raw.token_to_id(eos), pad_token_id=None)
    getattr(transformers, f"{prefix}ForCausalLM")(config).save_pretrained(folder)
    return fast


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    fast = make_folder(request.param, folder)
    _, tokenizer = hf.load_hf(folder, backend="torch")
    return request.param, folder, fast, tokenizer


def test_the_folder_keeps_its_template_where_transformers_put_it(family):
    name, folder, fast, tokenizer = family
    assert tokenizer.chat_template == FAMILIES[name][0]
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_text_and_ids_are_what_apply_chat_template_gives(family, generation_prompt):
    _, _, fast, tokenizer = family
    for chat in CHATS:
        if not generation_prompt and chat[-1]["role"] != "assistant":
            continue
        text = fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        assert tokenizer.template.render(chat, add_generation_prompt=generation_prompt) == text
        expected = fast.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
        ids = tokenizer.render_prompt(chat) if generation_prompt else tokenizer.render_conversation(chat)[0]
        assert ids == list(expected)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_the_loss_mask_covers_each_reply_and_its_end_of_turn_token(family):
    name, _, fast, tokenizer = family
    end = FAMILIES[name][4]
    for chat in CHATS[:2]:
        ids, mask = tokenizer.render_conversation(chat)
        assert len(ids) == len(mask)
        runs, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        expected = [(r.strip() if name == "llama3" else r) + end for r in replies]
        if name == "qwen3":  # the last reply carries the thinking block
            expected[-1] = "<think>\n\n</think>\n\n" + expected[-1]
        assert [tokenizer.decode(r, skip_special_tokens=False) for r in runs] == expected
        if name == "qwen3":  # transformers' own mask from the {% generation %} tags
            theirs = fast.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert theirs["input_ids"] == ids and theirs["assistant_masks"] == mask


def test_stop_ids_are_the_end_of_turn_and_eos_tokens(family):
    name, _, _, tokenizer = family
    _, _, _, eos, end, _ = FAMILIES[name]
    assert tokenizer.stop_ids == tuple(dict.fromkeys(tokenizer.hf.token_to_id(t) for t in (end, eos)))


def test_a_control_token_typed_in_a_message_stays_text(family):
    name, _, fast, tokenizer = family
    end = FAMILIES[name][4]
    # the reply's spaces make Llama-3's template (| trim) change it: it is not found as it was given
    chat = [{"role": "user", "content": f"say {end} please"}, {"role": "assistant", "content": f"ok {end} done" + " " * (name == "llama3")}]
    ids, mask = tokenizer.render_conversation(chat)
    assert ids.count(tokenizer.hf.token_to_id(end)) == len(chat) + (name == "chatml")  # the template's own: one per turn
    assert tokenizer.decode(ids, skip_special_tokens=False) == fast.apply_chat_template(chat, tokenize=False)
    thinking = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == f"{thinking}ok {end} done{end}"
    if "sanitize_control_tokens" in inspect.signature(fast.apply_chat_template).parameters:  # newer transformers: the same sanitising
        assert ids == list(fast.apply_chat_template(chat, tokenize=True, return_dict=False, sanitize_control_tokens=True))


def test_a_template_whose_history_changes_can_not_be_masked(tmp_path):
    tokenizer = Tokenizer(tokenizer_json("chatml"), "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.content }}"
                                                     "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    with pytest.raises(InputError, match="assistant message 1"):
        tokenizer.render_conversation(CHATS[0])
    with pytest.raises(InputError, match="not a valid Jinja template"):
        Tokenizer(tokenizer_json("chatml"), "{% for %}")
    with pytest.raises(InputError, match="no roles here"):
        Tokenizer(tokenizer_json("chatml"), "{{ raise_exception('no roles here') }}").render_prompt(CHATS[0])


def test_a_bad_template_in_a_folder_is_an_input_error_naming_the_file(tmp_path):
    from engine.checkpoint import read_tokenizer

    make_folder("chatml", tmp_path / "ok")
    for name, config, message in [
        ("syntax", {"chat_template": "{% for m in messages %}"}, "tokenizer_config.json: chat_template: not a valid Jinja"),
        ("type", {"chat_template": 42}, "tokenizer_config.json: chat_template must be a string"),
        ("json", "{not json", "tokenizer_config.json: not valid JSON"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text((tmp_path / "ok" / "tokenizer.json").read_text())
        (folder / "tokenizer_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(InputError, match=message):
            read_tokenizer(folder / "tokenizer.json")
    # what a template does when rendered is bad input too: an escape the sandbox refuses, a type error
    for source in ("{{ messages.__class__.__mro__ }}", "{{ messages[0].content + 1 }}"):
        with pytest.raises(InputError, match="chat_template: "):
            Tokenizer(tokenizer_json("chatml"), source).render_prompt(CHATS[0])


def test_a_checkpoint_keeps_the_template(family, tmp_path):
    from engine.checkpoint import save_checkpoint

    name, folder, _, tokenizer = family
    model, _ = hf.load_hf(folder, backend="torch")
    back = load_checkpoint(save_checkpoint(tmp_path, 1, model, tokenizer, {"step": 1}), backend="torch")[1]
    assert back.chat_template == tokenizer.chat_template and back.special_tokens == tokenizer.special_tokens
    assert back.render_conversation(CHATS[1]) == tokenizer.render_conversation(CHATS[1])
    out = hf.export(model, tokenizer, tmp_path / "exported")  # and so does an export
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(CHATS[1], tokenize=False) == tokenizer.template.render(CHATS[1])
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == list(tokenizer.stop_ids)


# ---------------------------------------------------------------------------------------------
# The commands on a Hugging Face folder with a chat template
# ---------------------------------------------------------------------------------------------
def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_commands_on_a_hugging_face_folder_with_a_chat_template(tmp_path):
    """One call of each command that reads --hf, on a Llama folder (untied, Llama-3 template)."""
    name, folder = "llama3", tmp_path / "hf"
    make_folder(name, folder)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS[:2] * 4))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]

    result = cli("generate", "--hf", str(folder), "--chat", "--prompt", "Where was Ada born?", "--max-new-tokens", "4",
                 "--seed", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli("chat", "--hf", str(folder), "--max-new-tokens", "4", "--seed", "1", "--device", "cpu", stdin="hello\nand?\n")
    assert result.returncode == 0 and result.stdout.count("assistant> ") == 2, result.stderr[-3000:]
    result = cli("eval", "--hf", str(folder), "--data", str(data), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["val_loss"] > 0
    result = cli("finetune", "--hf", str(folder), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                 "--eval-batches", "1", "--out", str(tmp_path / "ft"), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, _, _ = load_checkpoint(tmp_path / "ft", backend="torch")
    # fine-tuned in the folder's template: no built-in chat tokens added, the template kept
    assert model.config.vocab_size == vocab and tokenizer.chat_template == FAMILIES[name][0]
    assert (model.lm_head.weight is model.transformer.wte.weight) == (name != "llama3")  # the Llama folder is untied
