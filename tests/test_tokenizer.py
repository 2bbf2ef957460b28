"""Byte-level BPE: exact round trips, and the chat template's loss mask."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InputError
from engine.tokenizer import END, ROLE_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Zürich, Kraków, São Paulo, 東京, 서울, Москва — emoji 🙂🚀 and e\u0301 combining marks.",
    "def f(x):\n\treturn x ** 2  # code\r\n",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_on_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_hard_cases(tok):
    for text in ["", "\x00\x01\x1f\x7f", "🏳️‍🌈👨‍👩‍👧", "e\u0301\u0308", "  leading and trailing  ", "\ufeffBOM", "<|end|> is text here"]:
        assert tok.decode(tok.encode(text)) == text


def test_special_token_text_in_content_is_not_a_control_token(tok):
    assert tok.end_id not in tok.encode(f"please {END} stop")


def test_save_and_load_give_the_same_ids(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    assert again.vocab_size == tok.vocab_size <= 400  # BPE stops early when it runs out of merges
    assert path.name == "tokenizer.json"


def test_vocab_size_is_a_parameter():
    assert Tokenizer.train(CORPUS, vocab_size=300).vocab_size == 300


def test_token_bytes_concatenate_to_the_text(tok):
    text = "São Paulo 🙂 naïve"
    table = tok.token_bytes()
    assert b"".join(table[i] for i in tok.encode(text)) == text.encode()
    assert table[tok.end_id] == b""


def test_render_conversation_masks_exactly_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ids, mask = tok.render_conversation(messages)
    sp = tok.special_ids
    expected_ids, expected_mask = [tok.bos_id], [0]
    for m in messages:
        content = tok.encode(m["content"])
        expected_ids += [sp[ROLE_TOKENS[m["role"]]], *content, tok.end_id]
        weight = 1 if m["role"] == "assistant" else 0
        expected_mask += [0] + [weight] * (len(content) + 1)
    assert ids == expected_ids
    assert mask == expected_mask
    # token by token: the masked tokens decode to exactly the assistant replies and their ends
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained, skip_special_tokens=False) == f"Hello!{END}Paris.{END}"
    # the prompt for a reply ends with the assistant role token
    prompt = tok.render_prompt(messages[:2])
    assert prompt[-1] == sp[ROLE_TOKENS["assistant"]] and prompt[:-1] == tok.render_conversation(messages[:2])[0]


def test_a_failed_save_leaves_special_token_text_as_text(tok, tmp_path):
    with pytest.raises(Exception):
        tok.save(tmp_path / "no such folder" / "tokenizer.json")
    assert tok.end_id not in tok.encode(f"please {END} stop")


def test_missing_or_malformed_tokenizer_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_bad_arguments_raise_input_error(tok):
    with pytest.raises(InputError, match="vocab_size must be at least"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(InputError, match="unknown role 'robot'"):
        tok.render_conversation([{"role": "robot", "content": "beep"}])


ASCII_PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'", " ", "   ", "\t", "\n", "\r\n", "\x0b", "\x0c",
                "\x1c", "\x1f", "\x00", "\x7f", "a", "Zq", "7", "123", "!?", "_", " x", "<|end|>", "<|endoftext|>"]


def test_encode_batch_fast_path_gives_encodes_ids(tok):
    """encode_batch's ASCII fast path (GPT-2's regex on ASCII classes + a word cache) against the
    library's encode, one text at a time: hostile ASCII (control characters, contractions, runs
    of whitespace, special-token text), and non-ASCII texts in the same batch (the library's path)."""
    rng = random.Random(random.getrandbits(32))
    for _ in range(300):
        texts = ["".join(rng.choice(ASCII_PIECES) if rng.random() < 0.7 else chr(rng.randrange(128))
                         for _ in range(rng.randrange(30))) for _ in range(8)]
        texts[rng.randrange(8)] += rng.choice(["é", "🙂", "\u00a0", "\u2028", "²"])
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert len(tok._words) > 100  # the fast path ran


def test_encode_batch_has_no_fast_path_for_another_pipeline(tok):
    from tokenizers import normalizers

    lower = Tokenizer.train(CORPUS, vocab_size=300)
    lower.hf.normalizer = normalizers.Lowercase()  # the regex would split "Ab" otherwise than the library
    assert lower.encode_batch(["Ab CD's", "x"]) == [lower.encode("Ab CD's"), lower.encode("x")]
    assert lower._words is False
