"""Readers of untrusted files that need no torch (JSON objects, tokenizers): what tokenize's
processes read. Every way a file can be wrong becomes an InputError naming the file; the
checkpoint and Hugging Face readers (engine/checkpoint.py) build on these."""
import json
from pathlib import Path

from engine.errors import InputError
from engine.tokenizer import Tokenizer


def reason(err: Exception) -> str:
    """The gist of a library's error about a bad file, on one line."""
    text = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def require_file(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: missing")


def read_json(path) -> dict:
    """A JSON object from a file."""
    path = Path(path)
    require_file(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path}: not valid JSON ({reason(err)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tokenizer(path) -> Tokenizer:
    """tokenizer.json, with the chat template and special tokens of a tokenizer_config.json (or
    chat_template.jinja) beside it, as a Hugging Face folder or a checkpoint fine-tuned from one holds them."""
    from engine.chat_template import read_hf_chat_template

    path = Path(path)
    require_file(path)
    try:
        tokenizer = Tokenizer.load(path)
    except Exception as err:  # the tokenizers library raises a plain Exception for a bad file
        raise InputError(f"{path}: not a tokenizer the tokenizers library reads ({reason(err)})") from None
    template, special = read_hf_chat_template(path.parent)
    if template is None and not special:
        return tokenizer
    return Tokenizer(tokenizer.hf, template, special)
