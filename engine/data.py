"""Training data: the built-in synthetic world, text corpora as token memmaps, conversations,
and the batches drawn from them (files given as --data become shards: engine/shards.py).

Batches are a pure function of (seed, step, micro-batch index): resuming needs only the step,
and a global batch is the same whatever the number of processes that share it.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.shards import Skipped, is_val_conversation, list_sources, plan_pieces, read_piece

# ---------------------------------------------------------------------------------------------
# The built-in world: people with five facts each, described in many ways, asked about in chat.
# ---------------------------------------------------------------------------------------------

FIRST = """Anna Ben Clara David Elena Felix Greta Hugo Iris Jonas Karin Leo Mira Nils Olga Paul Rosa
Simon Tara Umar Vera Walter Yara Zoe Aaron Bianca Carl Dora Emil Fiona Gustav Helen Ivan Julia Kai
Lena Marco Nora Oscar Petra""".split()
LAST = """Smith Novak Berg Costa Duarte Eklund Fischer Garcia Horvat Ito Jensen Kowalski Laine Moreau
Nakamura Okafor Petrov Quinn Rossi Silva Tanaka Ulrich Varga Weber Xu Yilmaz Zimmer Alder Brandt
Carver""".split()
MONTHS = "January February March April May June July August September October November December".split()
CITIES = """Lisbon Oslo Kyoto Lagos Lima Dublin Vienna Seattle Hanoi Nairobi Krakow Porto Quito Tunis
Bergen Cairo Denver Essen Turin Zagreb""".split()
UNIVERSITIES = [f"{c} {kind}" for c, kind in zip(
    "Harrow Linden Marlow Northgate Oakridge Pembury Queensbury Redfield Stanton Westbrook".split(),
    ["University", "Institute of Technology", "College", "University", "State University"] * 2)]
MAJORS = """Physics Chemistry Biology Mathematics History Economics Philosophy Linguistics Geology
Astronomy Architecture Medicine Music Law Statistics""".split()
EMPLOYERS = """Acme Corp|Blue Harbor Bank|Cobalt Systems|Delta Freight|Evergreen Foods|Falcon Aerospace|
Granite Insurance|Helix Pharma|Ion Energy|Juniper Media|Kestrel Robotics|Lumen Optics""".replace("\n", "").split("|")

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")

# Several phrasings per fact: the model must learn the fact, not one sentence.
SENTENCES = {
    "birth_date": ["{name} was born on {v}.", "{name} came into the world on {v}.",
                   "The birthday of {name} is {v}.", "{name} celebrates a birthday on {v}."],
    "birth_city": ["{name} was born in {v}.", "{name} is a native of {v}.",
                   "{name} spent the early years of life in {v}.", "The hometown of {name} is {v}."],
    "university": ["{name} studied at {v}.", "{name} graduated from {v}.",
                   "{name} received an education at {v}.", "{name} is an alumnus of {v}."],
    "major": ["{name} majored in {v}.", "{name} completed a degree in {v}.",
              "{name} focused on {v} at university.", "{name} chose {v} as a field of study."],
    "employer": ["{name} works for {v}.", "{name} is employed by {v}.",
                 "{name} has a job at {v}.", "{name} earns a living at {v}."],
}
# {who}: the full name, or "he"/"she" in a follow-up about the person the chat is already about
QUESTIONS = {
    "birth_date": "When was {who} born?",
    "birth_city": "Where was {who} born?",
    "university": "Which university did {who} attend?",
    "major": "What did {who} study?",
    "employer": "Who does {who} work for?",
}
# the first names that take "she" in a follow-up question
FEMALE_FIRST = set("""Anna Clara Elena Greta Iris Karin Mira Olga Rosa Tara Vera Yara Zoe Bianca Dora Fiona Helen
Julia Lena Nora Petra""".split())
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer questions about people in one sentence.",
                  "You know the biographies of many people. Answer briefly."]
# One sentence per line: a sentence then starts with the name as an answer does ("Nora Berg was
# ...", no space before "Nora": another token than " Nora" mid-text), so pretraining teaches the
# model to write every name's line-start form by copying it from the text before, not only the
# names the fine-tuning answers happen to use.
SENTENCE_SEPARATOR = "\n"
SYSTEM_PROMPT_SHARE = 0.3  # chats that open with a system message
SWITCH_SHARE = 0.4  # later turns that ask about another person by name instead of saying he/she


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str


@dataclass(frozen=True)
class World:
    """A seeded synthetic world. The first half of the people is for fine-tuning, the second
    half is held out: their facts appear only in pretraining documents."""

    n_people: int = 100
    seed: int = 0
    bios_per_person: int = 6
    multi_turn_chats: int = 1000  # 2-4 turn fine-tuning chats, beside one single-turn chat per fact
    finetune_bios: int = 1200  # biographies (of everyone) replayed among the fine-tuning chats, loss on every token

    def __post_init__(self):
        for name in ("n_people", "seed", "bios_per_person", "multi_turn_chats", "finetune_bios"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise InputError(f"World.{name} must be an integer, got {getattr(self, name)!r}")
        if not 2 <= self.n_people <= len(FIRST) * len(LAST):  # two: one to fine-tune on, one held out
            raise InputError(f"n_people must be between 2 and {len(FIRST) * len(LAST)}, got {self.n_people}")
        if self.bios_per_person < 1:
            raise InputError(f"bios_per_person must be at least 1, got {self.bios_per_person}")
        for name in ("multi_turn_chats", "finetune_bios"):
            if getattr(self, name) < 0:
                raise InputError(f"World.{name} must be at least 0, got {getattr(self, name)}")

    def people(self) -> list[Person]:
        rng = random.Random(self.seed)
        names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], self.n_people)
        return [
            Person(
                name=name,
                birth_date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2005)}",
                birth_city=rng.choice(CITIES),
                university=rng.choice(UNIVERSITIES),
                major=rng.choice(MAJORS),
                employer=rng.choice(EMPLOYERS),
            )
            for name in names
        ]

    def split(self) -> tuple[list[Person], list[Person]]:
        people = self.people()
        half = len(people) // 2
        return people[:half], people[half:]

    def documents(self) -> list[str]:
        """bios_per_person biographies per person, each with random phrasings and sentence order."""
        rng = random.Random(self.seed + 1)
        docs = []
        for _ in range(self.bios_per_person):
            docs += [biography(p, rng) for p in self.people()]
        rng.shuffle(docs)
        return docs

    @staticmethod
    def qa_pairs(people: list[Person]) -> list[tuple[str, str]]:
        """(question, answer) for every fact of every person, attribute by attribute."""
        return [qa_pair(p, a) for p in people for a in ATTRIBUTES]

    def conversations(self) -> list[list[dict]]:
        """The fine-tuning chats, all about the fine-tuning half: one single-turn chat per fact,
        then multi_turn_chats chats of 2-4 turns (follow-ups with he/she, switches to another
        person, sometimes a system message)."""
        seen = self.split()[0]
        single = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in self.qa_pairs(seen)]
        rng = random.Random(self.seed + 2)
        return single + [multi_turn_chat(seen, rng.randint(2, 4), rng) for _ in range(self.multi_turn_chats)]

    def replay_documents(self) -> list[str]:
        """finetune_bios biographies of all the people, drawn like the pretraining ones (another
        seed): mixed into fine-tuning so that learning to answer about one half does not pull
        what the model knows, and the names it writes, toward that half."""
        rng = random.Random(self.seed + 3)
        people = self.people()
        return [biography(people[i % len(people)], rng) for i in range(self.finetune_bios)]

    def eval_chats(self, people: list[Person], n_chats: int = 200, n_turns: int = 3, seed: int = 1234) -> list[list[dict]]:
        """Fixed multi-turn chats about `people` for evaluation, drawn like the fine-tuning ones."""
        rng = random.Random(seed)
        return [multi_turn_chat(people, n_turns, rng) for _ in range(n_chats)]

    def to_dict(self) -> dict:
        return {"n_people": self.n_people, "seed": self.seed, "bios_per_person": self.bios_per_person,
                "multi_turn_chats": self.multi_turn_chats, "finetune_bios": self.finetune_bios}


def biography(person: Person, rng: random.Random) -> str:
    """Every fact of a person, each in a random phrasing, in random order, one sentence per line."""
    sentences = [rng.choice(SENTENCES[a]).format(name=person.name, v=getattr(person, a)) for a in ATTRIBUTES]
    rng.shuffle(sentences)
    return SENTENCE_SEPARATOR.join(sentences)


def qa_pair(person: Person, attribute: str, who: str | None = None) -> tuple[str, str]:
    """(question, answer) about one fact; who: how the question names the person (default the
    full name). The answer is always a whole sentence with the full name, in a pretraining
    phrasing ("Anna Smith was born in Lisbon."): answering then runs through the same path as
    reading did, which is what lets the model answer about people it was never asked about."""
    question = QUESTIONS[attribute].format(who=who or person.name)
    return question, SENTENCES[attribute][0].format(name=person.name, v=getattr(person, attribute))


def pronoun(person: Person) -> str:
    return "she" if person.name.split()[0] in FEMALE_FIRST else "he"


def multi_turn_chat(people: list[Person], n_turns: int, rng: random.Random) -> list[dict]:
    """A chat of n_turns questions and answers: each later turn either follows up on the same
    person ("When was she born?", a fact not asked yet) or switches to another one by name."""
    chat = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < SYSTEM_PROMPT_SHARE else []
    asked = set()
    for turn in range(n_turns):
        follow_up = turn > 0 and len(asked) < len(ATTRIBUTES) and rng.random() >= SWITCH_SHARE
        if not follow_up:
            person, asked = rng.choice(people), set()
        attribute = rng.choice([a for a in ATTRIBUTES if a not in asked])
        asked.add(attribute)
        question, answer = qa_pair(person, attribute, pronoun(person) if follow_up else None)
        chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return chat


# ---------------------------------------------------------------------------------------------
# Text corpora -> token memmaps
# ---------------------------------------------------------------------------------------------


def read_corpus(path) -> list[str]:
    """A .txt file, or a folder of .txt files (sorted, recursively): one document each."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--data: {path} does not exist")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"--data: folder {path} holds no .txt files")
    docs = [_read_utf8(f) for f in files]
    if not any(d.strip() for d in docs):
        raise InputError(f"--data: {path} holds no text")
    return docs


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--data: cannot read {path} as UTF-8 text ({err})") from None


def write_tokens(tokens: np.ndarray, path: Path, vocab_size: int) -> Path:
    """tokens -> <path>.bin (uint16 when the vocab fits, else uint32) + <path>.json header."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.astype(dtype).tofile(path.with_suffix(".bin"))
    header = {"dtype": np.dtype(dtype).name, "num_tokens": int(tokens.size), "vocab_size": vocab_size}
    path.with_suffix(".json").write_text(json.dumps(header))
    return path.with_suffix(".bin")


def read_tokens(path) -> np.ndarray:
    """The memmap written by write_tokens (path: the .bin), which must match its header."""
    path, header_path = Path(path), Path(path).with_suffix(".json")
    try:
        header = json.loads(header_path.read_text())
        dtype, num_tokens = np.dtype(header["dtype"]), header["num_tokens"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise InputError(f"{header_path}: not a token-file header ({type(err).__name__}: {err})") from None
    if dtype not in (np.uint16, np.uint32) or not isinstance(num_tokens, int) or num_tokens < 2:
        raise InputError(f"{header_path}: expected a uint16 or uint32 dtype and at least 2 tokens, got {header}")
    if not path.is_file() or path.stat().st_size != num_tokens * dtype.itemsize:
        raise InputError(f"{path}: missing or not the {num_tokens} {dtype} tokens its header says")
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def token_stream(docs: list[str], tokenizer) -> np.ndarray:
    """Documents -> one token stream, each document preceded by BOS."""
    return np.fromiter((t for doc in tokenizer.encode_batch(docs) for t in (tokenizer.bos_id, *doc)), dtype=np.int64)


def tokenize_documents(docs: list[str], tokenizer, val_fraction: float, out_dir: Path) -> dict:
    """Documents -> BOS-separated token stream, split by tokens into train/val memmaps."""
    stream = token_stream(docs, tokenizer)
    n_val = max(int(len(stream) * val_fraction), 2)
    if len(stream) - n_val < 2:
        raise InputError(f"--data: only {len(stream)} tokens, too few to train on")
    write_tokens(stream[:-n_val], out_dir / "train", tokenizer.vocab_size)
    write_tokens(stream[-n_val:], out_dir / "val", tokenizer.vocab_size)
    return {"train": out_dir / "train.bin", "val": out_dir / "val.bin"}


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The RNG of one micro-batch: resuming at a step, or splitting a step over processes,
    draws exactly the same data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + micro)


def token_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int):
    """Random windows of block_size+1 tokens -> (x, y) of [B, T]; a pure function of its arguments."""
    if len(tokens) <= block_size:
        raise InputError(f"the data has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    g = batch_generator(seed, step, micro)
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=g).tolist()
    windows = torch.from_numpy(np.stack([tokens[s : s + block_size + 1].astype(np.int64) for s in starts]))
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------

def load_conversations(data, skip_bad_lines: bool = False) -> list[list[dict]]:
    """All the conversations of .jsonl/.parquet files of {"messages": [{"role", "content"}, ...]}
    (a file, folder or glob), in memory; errors name the file and line. (Training streams them
    from shards instead: engine/shards.py.)"""
    pieces = plan_pieces(list_sources(data))
    convs = [conv for piece in pieces for batch in read_piece(piece, True, "messages", Skipped(skip_bad_lines)) for conv in batch]
    if not convs:
        raise InputError(f"--data: {data} holds no conversations")
    return convs


def finetune_conversations(data: str, world: dict | None) -> list[list[dict]]:
    """What a fine-tuning run trains on: a conversations .jsonl, or "builtin" (the conversations of
    `world`, the built-in world its --init checkpoint was pretrained on)."""
    if data != "builtin":
        return load_conversations(data)
    if not world:
        raise InputError("finetune --data builtin needs an --init checkpoint pretrained on the built-in world (--data builtin)")
    return World(**world).conversations()


def replay_items(data: str, world: dict | None, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Plain text mixed into fine-tuning, as (ids, loss_mask) items beside the rendered chats:
    for "builtin", the world's replayed biographies (BOS + text, loss on every text token)."""
    if data != "builtin" or not world:
        return []
    return [([tokenizer.bos_id, *ids], [0] + [1] * len(ids)) for ids in tokenizer.encode_batch(World(**world).replay_documents())]


def conversation_split(convs: list[list[dict]], val_fraction: float = 0.05):
    """Train/val by the first message (is_val_conversation): branches of one conversation tree
    stay together. The shards of conversations hold the same split."""
    val = [c for c in convs if is_val_conversation(c, val_fraction)]
    return [c for c in convs if not is_val_conversation(c, val_fraction)], val or convs[-1:]


def conversation_batch(rendered, batch_size: int, block_size: int, seed: int, step: int, micro: int):
    """Random conversations, right-padded to the longest (cut at block_size + 1 tokens).
    rendered: a list of (ids, loss_mask), or shards.Conversations (the same, read from shards).

    Returns x, y, loss_mask of [B, T]: y is x shifted by one; the mask is the render's mask of
    each target token, 0 on padding. Right padding is invisible to the real tokens (causal).
    """
    g = batch_generator(seed, step, micro)
    picks = torch.randint(len(rendered), (batch_size,), generator=g).tolist()
    rows = [(ids[: block_size + 1], mask[: block_size + 1]) for ids, mask in (rendered[i] for i in picks)]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(batch_size, T, dtype=torch.long)
    y = torch.full((batch_size, T), -1, dtype=torch.long)
    mask = torch.zeros(batch_size, T, dtype=torch.long)
    for b, (ids, m) in enumerate(rows):
        n = len(ids) - 1
        x[b, :n] = torch.as_tensor(ids[:-1])
        y[b, :n] = torch.as_tensor(ids[1:])
        mask[b, :n] = torch.as_tensor(m[1:])
    return x, y, mask
