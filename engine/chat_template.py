"""A Hugging Face chat template (Jinja), rendered as transformers renders it, and the loss mask
of its assistant turns.

A Hugging Face folder's `tokenizer_config.json` may hold a `chat_template` (or the folder a
`chat_template.jinja`): a Jinja program that turns `messages` into the text the model was
trained on (Llama-3's `<|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|>`, Qwen's
ChatML `<|im_start|>user\\n…<|im_end|>\\n`, ...). `render` runs it in the environment
transformers' `apply_chat_template` uses (a sandbox with trim_blocks, lstrip_blocks, the
loopcontrols extension, {% generation %} blocks, its tojson filter, raise_exception, strftime_now,
its guarded dict and namespace) with the same
variables (messages, tools=None, documents=None, add_generation_prompt, and the tokenizer's
special tokens: bos_token, eos_token, ...), so the text is the same character for character.
Nothing here imports transformers.

Tokens: the rendered text is encoded as transformers encodes it (add_special_tokens=False; the
template's own control tokens, e.g. "<|im_start|>", become their ids), with one exception
taken from transformers' `sanitize_control_tokens`: a special token's text inside a message
(a user typing "<|im_end|>") stays text. Messages are marked before rendering (the token
wrapped in two private-use characters) and the marked pieces are encoded as plain text.

The loss mask (`encode`, what fine-tuning trains on) covers each assistant turn's tokens, from
the end of its generation prompt to its end-of-turn token included, found by rendering prefixes:

  1. the whole conversation renders to T;
  2. for assistant message i, messages[:i] with add_generation_prompt=True renders to P_i, which
     must be a prefix of T (the reply starts where the prompt the model is given ends): the
     turn starts at len(P_i);
  3. it ends after the first special token T holds after the message's content (searched from
     where the content is found after len(P_i), so a content that itself mentions the token
     can't end it early): Llama-3's <|eot_id|>, ChatML's <|im_end|>. The newline ChatML writes
     after <|im_end|> is not trained on: generation stops at the token.

A token counts when its characters overlap a turn's span. A template for which step 2 fails
(one that renders the history differently once a reply follows it) raises InputError: its
assistant turns can't be told apart from the prompt reliably.
"""
import json
import re
from datetime import datetime
from functools import lru_cache

from engine.errors import InputError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # private-use: around a control token typed inside a message
PROBE = "\U000f0002"  # stands for a reply's content when finding the end-of-turn token


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The Jinja template in transformers' chat environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    class TemplateDict:  # dict() without the class behind it (no attribute walk out of the sandbox)
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # a namespace() that refuses underscore-prefixed names
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates can't set {name!r} on a namespace")

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise InputError(f"chat_template: not a valid Jinja template (line {err.lineno}: {err.message})") from None


class ChatTemplate:
    """A Jinja chat template and the special tokens it is rendered with (name -> text, e.g.
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})."""

    def __init__(self, source: str, special_tokens: dict | None = None):
        if not isinstance(source, str) or not source.strip():
            raise InputError("chat_template must be a non-empty string")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKEN_KEYS and isinstance(v, str)}
        compile_template(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt=...) gives."""
        try:
            return compile_template(self.source).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as err:  # raise_exception() in the template, a sandbox refusal, or an error in it: bad input
            raise InputError(f"chat_template: {type(err).__name__}: {err}") from None

    # ---- tokens ----
    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False, with_mask: bool = True):
        """(ids, loss_mask) of a conversation; mask 1 on assistant turns (see the module docstring).
        With add_generation_prompt the mask is all zeros (a prompt has no reply yet)."""
        control = tokenizer.control_tokens()
        marked = [_mark(m, control) for m in messages]
        text = self.render(marked, add_generation_prompt)
        spans = self._assistant_spans(marked, text, control) if with_mask and not add_generation_prompt else []
        ids, mask = [], []
        for start, piece, as_text in _pieces(text, control):
            encoding = tokenizer.encode_markup(piece, as_text)
            ids += encoding.ids
            mask += [int(any(start + a < e and start + b > s for s, e in spans)) for a, b in encoding.offsets]
        return ids, mask

    def _assistant_spans(self, marked: list[dict], text: str, control) -> list[tuple[int, int]]:
        # a special token the template wrote, not one typed in a message (those are marked)
        tokens = "|".join(map(re.escape, sorted(control, key=len, reverse=True)))
        specials = re.compile(f"(?<!{MARK_START})(?:{tokens})") if control else None
        spans = []
        for i, m in enumerate(marked):
            if m["role"] != "assistant":
                continue
            prompt = self.render(marked[:i], add_generation_prompt=True)
            if not text.startswith(prompt):
                raise InputError(f"chat_template: the prompt for assistant message {i} (messages before it, then the "
                                 "generation prompt) does not render as the start of the whole conversation, so its "
                                 "reply can't be located for the loss mask")
            start = len(prompt)
            content = m.get("content") if isinstance(m.get("content"), str) else ""
            at = text.find(content, start) if content else -1
            after = at + len(content) if at >= 0 else start
            found = specials.search(text, after) if specials else None
            end = found.end() if found else len(self.render(marked[: i + 1]))
            spans.append((start, end))
        return spans

    def end_of_turn(self, control) -> str | None:
        """The special token that ends an assistant turn: the first one after a reply's content."""
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}])
        except InputError:
            return None
        after = text.find(PROBE)
        if after < 0:
            return None
        found = [(text.find(t, after), t) for t in control if text.find(t, after) >= 0]
        return min(found)[1] if found else None


def _mark(message: dict, control) -> dict:
    """The message with every control token inside its strings wrapped in the private-use marks
    (marks already in a string are dropped first, so none can be forged)."""
    pattern = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True)))) if control else None

    def mark(s):
        if not isinstance(s, str):
            return s
        s = s.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, s) if pattern else s

    return {k: mark(v) for k, v in message.items()}


def _pieces(text: str, control):
    """(offset, piece, as_text): the rendered text cut at the marks; marked tokens are text."""
    pattern = re.compile(f"{MARK_START}(.*?){MARK_END}|[{MARK_START}{MARK_END}]", re.S)
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield pos, text[pos : m.start()], False
        if m.group(1):
            yield m.start(1), m.group(1), True
        pos = m.end()
    if pos < len(text):
        yield pos, text[pos:], False


def read_hf_chat_template(folder):
    """(template source or None, special tokens) from a Hugging Face folder: chat_template.jinja,
    or tokenizer_config.json's chat_template (a string, or a list of {name, template} of which
    "default" is taken), and its bos_token, eos_token, ... (strings or {"content": ...})."""
    from pathlib import Path

    from engine.files import read_json

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    source = None
    if (folder / "chat_template.jinja").is_file():
        try:
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{folder / 'chat_template.jinja'}: not readable UTF-8 text ({err})") from None
    elif "chat_template" in config:
        source = config["chat_template"]
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            raise InputError(f"{config_path}: chat_template must be a string or a list with a 'default' template")
    if source is not None:
        where = folder / "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else config_path
        try:
            ChatTemplate(source, special)
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    return source, special
