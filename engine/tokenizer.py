"""Byte-level BPE (HF `tokenizers`), the chat special tokens, and the chat template.

A tokenizer read from a Hugging Face folder whose tokenizer_config.json holds a Jinja
`chat_template` renders conversations with that template instead (engine/chat_template.py:
the same text and tokens as transformers' apply_chat_template, and the loss mask of its
assistant turns); everything below is the built-in template, used otherwise.

Built-in chat template, one conversation:

    <|endoftext|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|><|user|>…

Fine-tuning counts the loss on the assistant contents and their <|end|> only: the model
learns to answer and to stop, never to imitate the user.
Text inside messages is always encoded as plain text, so a user who types "<|end|>" gets
the characters, not the control token.
"""
import itertools
import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.errors import InputError

BOS = "<|endoftext|>"  # starts every document and conversation (GPT-2's only special token)
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"  # ends every turn
SPECIAL_TOKENS = [BOS, *ROLE_TOKENS.values(), END]

# GPT-2's pre-tokenizer regex (what ByteLevel(use_regex=True) splits text with before BPE) for
# ASCII text, where its classes are ASCII ones: \p{L} [A-Za-z], \p{N} [0-9], \s [\t\n\v\f\r ].
# The stdlib re runs it; encode_batch's fast path (Tokenizer._encode_ascii) is built on it.
_WS = r"\t\n\x0b\x0c\r "
ASCII_PRETOKENS = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
WORD_CACHE_SIZE = 2**18  # pre-tokens whose ids encode_batch remembers (~40 MB at most); emptied when full


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_ASCII_BYTE_LEVEL = str.maketrans({b: c for c, b in _byte_level_alphabet().items() if b < 128})  # byte -> its BPE character


class Tokenizer:
    def __init__(self, hf: HFTokenizer, chat_template: str | None = None, special_tokens: dict | None = None):
        """chat_template: a Hugging Face Jinja chat template (None: the built-in one);
        special_tokens: tokenizer_config.json's bos_token, eos_token, ... (name -> text)."""
        from engine.chat_template import ChatTemplate

        self.hf = hf
        self.hf.encode_special_tokens = True  # text is text: "<|end|>" typed by a user is not a control token
        self.special_ids = {t: i for t in SPECIAL_TOKENS if (i := hf.token_to_id(t)) is not None}
        self.special_tokens = dict(special_tokens or {})
        self.template = ChatTemplate(chat_template, self.special_tokens) if chat_template is not None else None
        self._token_bytes = None
        self._stop_ids = None
        self._words = None  # encode_batch's fast path: pre-token -> ids (False: this tokenizer has none)

    def __reduce__(self):  # pickled as its JSON (tokenize's worker processes get it so)
        return Tokenizer, (self.hf, self.chat_template, self.special_tokens)

    # ---- building, saving, loading ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> "Tokenizer":
        """Byte-level BPE with the chat special tokens; vocab_size counts them too."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise InputError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """From a tokenizer.json file, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"no tokenizer.json at {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises plain Exception on a malformed file
            raise InputError(f"{path} is not a tokenizer.json the tokenizers library can read: {err}") from err
        return cls(hf)

    def save(self, path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.hf.encode_special_tokens = False  # saved files stay usable by plain HF tooling
        try:
            self.hf.save(str(path))
        finally:  # also when the save fails: "<|end|>" typed by a user must stay text
            self.hf.encode_special_tokens = True
        return path

    def save_config(self, folder) -> Path | None:
        """tokenizer_config.json beside tokenizer.json when there is a Jinja chat template or
        special tokens to keep (as a Hugging Face folder holds them); None when there is none."""
        if self.template is None and not self.special_tokens:
            return None
        path = Path(folder) / "tokenizer_config.json"
        config = {**self.special_tokens, **({"chat_template": self.chat_template} if self.template is not None else {})}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return path

    # ---- plain text ----
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """The token that starts a document: tokenizer_config.json's bos_token where a Hugging
        Face folder names one in the vocabulary, else <|endoftext|>."""
        bos = self.special_tokens.get("bos_token")
        if bos is not None and self.hf.token_to_id(bos) is not None:
            return self.hf.token_to_id(bos)
        if BOS not in self.special_ids:
            raise InputError(f"this tokenizer has no {BOS} and its tokenizer_config.json names no bos_token")
        return self.special_ids[BOS]

    @property
    def end_id(self) -> int:
        return self.special_ids[END]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """[encode(t) for t in texts], faster: the tokenizers library's encode_batch (on all cores),
        or, for a byte-level BPE tokenizer such as Tokenizer.train makes, _encode_ascii on the
        ASCII texts (~5x the library's speed on one core: how tokenize's workers encode)."""
        if self._words is None:
            self._words = {} if self._has_ascii_fast_path() else False
        if self._words is False:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        out = [self._encode_ascii(t) if t.isascii() else None for t in texts]
        others = [t for t, ids in zip(texts, out) if ids is None]
        if others:
            others = iter(e.ids for e in self.hf.encode_batch(others, add_special_tokens=False))
            out = [next(others) if ids is None else ids for ids in out]
        return out

    def _has_ascii_fast_path(self) -> bool:
        """Whether _encode_ascii gives encode's ids: no normalizer, GPT-2's ByteLevel pre-tokenizer
        with its regex and no prefix space, a BPE model without dropout (same ids every time), and
        no added token that is not special (those would be split out of the text)."""
        config = json.loads(self.hf.to_str())
        pre, model = config.get("pre_tokenizer") or {}, config.get("model") or {}
        return (config.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex")
                and not pre.get("add_prefix_space") and model.get("type") == "BPE" and model.get("dropout") is None
                and all(t.get("special") for t in config.get("added_tokens", [])))

    def _encode_ascii(self, text: str) -> list[int]:
        """encode(text) of an ASCII text: split by ASCII_PRETOKENS, as the library's pre-tokenizer
        splits it, each pre-token's ids from the word cache, or from the BPE model itself (on its
        byte-level characters) the first time."""
        words, cache = ASCII_PRETOKENS.findall(text), self._words
        if missing := set(words).difference(cache):
            if len(cache) + len(missing) > WORD_CACHE_SIZE:
                cache.clear()
                missing = set(words)
            for word in missing:
                cache[word] = [t.id for t in self.hf.model.tokenize(word.translate(_ASCII_BYTE_LEVEL))]
        return list(itertools.chain.from_iterable(map(cache.__getitem__, words)))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The raw bytes each id stands for (b"" for special tokens): what stop strings match on.
        Built once per vocabulary (every generate call with stop strings asks for it)."""
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        return self._token_bytes

    def _build_token_bytes(self) -> list[bytes]:
        alphabet = _byte_level_alphabet()
        vocab = self.hf.get_vocab(with_added_tokens=True)
        out = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token not in self.special_ids and i < len(out):
                out[i] = bytes(alphabet[c] for c in token if c in alphabet)
        return out

    # ---- chat template ----
    @property
    def chat_template(self) -> str | None:
        """The Hugging Face Jinja chat template this tokenizer renders conversations with, or None (built-in)."""
        return self.template.source if self.template is not None else None

    @property
    def has_chat(self) -> bool:
        """Whether conversations can be rendered: a Jinja template, or the built-in chat tokens."""
        return self.template is not None or self.has_chat_tokens

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end an assistant reply: <|end|> (built-in), or a Jinja template's
        end-of-turn token (the first special token after a reply's content: <|eot_id|>,
        <|im_end|>) and tokenizer_config.json's eos_token."""
        if self.template is None:
            self._check_chat()
            return (self.end_id,)
        if self._stop_ids is None:  # rendered once per tokenizer
            names = [self.template.end_of_turn(self.control_tokens()), self.special_tokens.get("eos_token")]
            ids = [self.hf.token_to_id(n) for n in names if n is not None]
            self._stop_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        if not self._stop_ids:
            raise InputError("the chat template ends a reply with no special token and tokenizer_config.json names "
                             "no eos_token: there is nothing to stop generation at")
        return self._stop_ids

    def control_tokens(self) -> list[str]:
        """The special tokens' texts (what a chat template writes as markup)."""
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]

    def encode_markup(self, text: str, as_text: bool = False):
        """The tokenizers Encoding (ids, offsets) of a rendered chat template's text: its special
        tokens' texts become their ids, as transformers encodes it; as_text: they stay text."""
        self.hf.encode_special_tokens = as_text
        try:
            return self.hf.encode(text, add_special_tokens=False)
        finally:
            self.hf.encode_special_tokens = True

    @property
    def has_chat_tokens(self) -> bool:
        return all(t in self.special_ids for t in SPECIAL_TOKENS)

    def add_chat_tokens(self) -> list[str]:
        """Append the chat special tokens this tokenizer lacks (e.g. GPT-2's); returns them.
        The model's vocabulary must grow to match (GPT.resize_vocab)."""
        missing = [t for t in SPECIAL_TOKENS if t not in self.special_ids]
        self.hf.add_special_tokens(missing)
        self.special_ids = {t: self.hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self._token_bytes = None
        return missing

    def _check_chat(self):
        if not self.has_chat_tokens:
            missing = [t for t in SPECIAL_TOKENS if t not in self.special_ids]
            raise InputError(f"this tokenizer has no chat tokens {missing}; train one with engine.tokenizer.Tokenizer.train")

    def render_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): mask is 1 exactly on assistant contents and their <|end|> (with a
        Jinja template: on each assistant turn through its end-of-turn token)."""
        if self.template is not None:
            return self.template.encode(self, messages)
        self._check_chat()
        ids, mask = [self.bos_id], [0]
        for m in messages:
            role, content = m["role"], m["content"]
            if role not in ROLE_TOKENS:
                raise InputError(f"unknown role {role!r}; expected one of {list(ROLE_TOKENS)}")
            body = self.encode(content) + [self.end_id]
            train = 1 if role == "assistant" else 0
            ids += [self.special_ids[ROLE_TOKENS[role]]] + body
            mask += [0] + [train] * len(body)
        return ids, mask

    def render_conversations(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        """render_conversation of each, the built-in template's message contents encoded in one
        encode_batch call (one call per message is most of the time of rendering many)."""
        if self.template is not None:
            return [self.render_conversation(c) for c in conversations]
        self._check_chat()
        bodies = iter(self.encode_batch([m["content"] for c in conversations for m in c]))
        out = []
        for conv in conversations:
            ids, mask = [self.bos_id], [0]
            for m in conv:
                if m["role"] not in ROLE_TOKENS:
                    raise InputError(f"unknown role {m['role']!r}; expected one of {list(ROLE_TOKENS)}")
                body = next(bodies) + [self.end_id]
                ids += [self.special_ids[ROLE_TOKENS[m["role"]]]] + body
                mask += [0] + [int(m["role"] == "assistant")] * len(body)
            out.append((ids, mask))
        return out

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, then <|assistant|>: the model writes the reply and its <|end|>
        (with a Jinja template: rendered with add_generation_prompt=True)."""
        if self.template is not None:
            return self.template.encode(self, messages, add_generation_prompt=True, with_mask=False)[0]
        ids, _ = self.render_conversation(messages)
        return ids + [self.special_ids[ROLE_TOKENS["assistant"]]]
