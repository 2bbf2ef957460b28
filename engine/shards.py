"""Token shards: text and conversations of any size, tokenised in parallel into fixed-size shard
files once, then streamed back by memmap (what `llm-engine tokenize` writes, and what pretrain
and finetune read).

A shard set is a folder:

    index.json        what was tokenised with what (the sources with their sizes and mtimes, the
                      tokenizer's hash, the settings) and every shard's token and document counts
    tokenizer.json    the tokenizer the ids are of (+ tokenizer_config.json for a Jinja template)
    shard-000000.bin  the tokens of the first piece of the input, ...

A shard holds the tokens of one fixed-size piece of the input: `shard_bytes` (default 16 MB) of
a .txt or .jsonl file cut at a line end, or a run of a .parquet file's row groups. A shard is
then a function of its piece alone: workers write shards independently, in any order, each
streaming its piece in ~1 MB batches (memory stays bounded whatever the corpus), and an
interrupted run redoes only the shards that are missing. (Fixed in input bytes, not in tokens:
a shard of tokens would depend on every piece before it.)

A shard file, little-endian:

    header  64 bytes: magic b"LLMSHARD", version, bytes per token (2: uint16, 4: uint32),
            tokens, documents, flags (1: conversations), bad lines skipped, the key of the piece
            and settings it was made from
    tokens  [tokens] uint16|uint32   ids; every document starts with BOS (the renderer's, for chats)
    starts  [documents] int64        where each document that starts in this shard starts
    mask    [tokens] uint8           conversations only: 1 where the loss counts (the assistant)
    val     [documents] uint8        conversations only: 1 for a held-out conversation

Documents: a .txt file is one document (BOS, then the file), cut into pieces only where the
tokenizer's pre-tokenizer splits anyway (after a newline followed by a printable ASCII
character), so the ids are those of encoding the whole file at once; a .jsonl line or a
.parquet row is one document ("text", or the field --text-field names; "messages" for
conversations).
"""
import functools
import glob
import itertools
import hashlib
import json
import multiprocessing
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.errors import InputError

SUFFIXES = (".txt", ".jsonl", ".parquet")
SHARD_BYTES = 16 * 2**20  # input bytes per shard: ~4M tokens of English text
BATCH_BYTES = 2**20  # text a worker encodes per call: bounds its memory
MIN_WORKER_BYTES = 4 * 2**20  # by default, a worker process (~1 s to start) per this much input at least
TOKENIZER_SAMPLE_BYTES = 32 * 2**20  # what a tokenizer is trained on: this much, spread over the files
VAL_FRACTION = 0.1  # pretraining's validation tokens: the last 10% of the stream, in whole documents...
VAL_MAX_TOKENS = 2**24  # ...but at most 16M tokens
CACHE_ENV = "LLM_ENGINE_CACHE"  # where pretrain and finetune keep the shards they make (default ~/.cache/llm-engine)

MAGIC, VERSION = b"LLMSHARD", 1
HEADER = struct.Struct("<8sIIQQIIQ")  # magic, version, itemsize, tokens, docs, flags, lines skipped, key
HEADER_BYTES = 64
CHAT_FLAG = 1


# ---------------------------------------------------------------------------------------------
# Sources: what --data names
# ---------------------------------------------------------------------------------------------


def list_sources(data) -> list[Path]:
    """--data as files: a file, a folder (its .txt/.jsonl/.parquet files, recursively) or a glob;
    sorted, so the data and its order are the same on every run."""
    data = str(data)
    if any(c in data for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
        if not paths:
            raise InputError(f"--data: the pattern {data} matches no files")
    elif Path(data).is_dir():
        paths = sorted(p for p in Path(data).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not paths:
            raise InputError(f"--data: folder {data} holds no {', '.join(SUFFIXES)} files")
    elif Path(data).is_file():
        paths = [Path(data)]
    else:
        raise InputError(f"--data: {data} does not exist")
    for p in paths:
        if p.suffix not in SUFFIXES:
            raise InputError(f"--data: {p} is not one of {', '.join(SUFFIXES)}")
        if p.suffix == ".parquet":
            _pyarrow()
    return paths


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("--data: reading .parquet needs pyarrow: pip install 'llm-engine[parquet]' (or pip install pyarrow)") from None
    return pq


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """What the ids depend on: the vocabulary and merges, and a Jinja chat template if any."""
    return _hash([tokenizer.hf.to_str(), tokenizer.chat_template, tokenizer.special_tokens])


# ---------------------------------------------------------------------------------------------
# Pieces: the input cut into shard-sized parts (one shard each)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    path: str
    start: int  # byte offset (.txt, .jsonl) or first row group (.parquet)
    end: int  # exclusive
    size: int  # input bytes, for the progress bar


def _find_cut(data, start: int, text: bool, newline) -> int:
    """The first index >= start (and >= 1) where a piece may begin, or -1: after a newline; for
    .txt also before a printable ASCII character, where the byte-level pre-tokenizer splits
    anyway, so no token spans the cut. data: bytes (newline b"\n") or str (newline "\n")."""
    i = max(start, 1) - 1
    while (i := data.find(newline, i)) != -1 and i + 1 < len(data):
        if not text or 0x21 <= ord(data[i + 1 : i + 2]) <= 0x7E:
            return i + 1
        i += 1
    return -1


def _next_cut(f, pos: int, size: int, text: bool) -> int:
    """The first cut at or after pos in file f, or the file's size."""
    while pos < size:
        f.seek(pos - 1)
        window = f.read(1 << 16)
        if (i := _find_cut(window, 1, text, b"\n")) != -1:
            return pos - 1 + i
        pos += len(window) - 1
    return size


def plan_pieces(paths: list[Path], shard_bytes: int | None = None) -> list[Piece]:
    """The input in pieces of about shard_bytes (default SHARD_BYTES), each file on its own."""
    pieces, shard_bytes = [], shard_bytes or SHARD_BYTES
    for path in paths:
        if path.suffix == ".parquet":
            groups = _pyarrow().ParquetFile(path).metadata
            if groups.num_rows == 0:
                raise InputError(f"--data: {path} is empty (no rows)")
            start, size = 0, 0
            for g in range(groups.num_row_groups):
                size += groups.row_group(g).total_byte_size
                if size >= shard_bytes or g == groups.num_row_groups - 1:
                    pieces.append(Piece(str(path), start, g + 1, size))
                    start, size = g + 1, 0
            continue
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"--data: {path} is empty")
        start = 0
        with open(path, "rb") as f:
            while start < size:
                end = _next_cut(f, start + shard_bytes, size, path.suffix == ".txt")
                pieces.append(Piece(str(path), start, end, end - start))
                start = end
    return pieces


def _cuts(text: str, size: int) -> list[str]:
    """A .txt piece's text in parts of about `size` characters, cut where _find_cut allows."""
    parts, start = [], 0
    while len(text) - start > size and (end := _find_cut(text, start + size, True, "\n")) != -1:
        parts.append(text[start:end])
        start = end
    return parts + [text[start:]]


# ---------------------------------------------------------------------------------------------
# Reading documents: one piece's texts or conversations, errors naming file:line
# ---------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Line:
    """"file, line N" of a byte offset, for error messages: counted only when one is formatted."""

    path: Path
    offset: int

    def __str__(self):
        with open(self.path, "rb") as f:
            line = f.read(self.offset).count(b"\n") + 1
        return f"{self.path}, line {line}"


def check_conversation(obj, where) -> list[dict]:
    """A {"messages": [{"role", "content"}, ...]} object -> its messages; errors name `where`."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise InputError(f'{where}: missing "messages" (expected {{"messages": [...]}})')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise InputError(f"{where}: message {i} has unknown role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise InputError(f"{where}: message {i} ({m['role']}) has empty content")
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: conversation does not end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def document(obj, chat: bool, text_field: str, where):
    """One .jsonl line's or .parquet row's document: its messages (chat) or its text."""
    if chat:
        return check_conversation(obj, where)
    if not isinstance(obj, dict) or text_field not in obj:
        raise InputError(f'{where}: missing the "{text_field}" field (--text-field names the field that holds the text)')
    if not isinstance(obj[text_field], str):
        raise InputError(f'{where}: "{text_field}" is {type(obj[text_field]).__name__}, not a string')
    return obj[text_field]


class Skipped:
    """--skip-bad-lines: counts the bad lines skipped; without it, the first one raises."""

    def __init__(self, skip: bool):
        self.skip, self.count = skip, 0

    def __call__(self, err: InputError):
        if not self.skip:
            raise err
        self.count += 1


def read_piece(piece: Piece, chat: bool, text_field: str, skipped: Skipped):
    """Yield the piece's documents in batches of about BATCH_BYTES: texts, or conversations
    (lists of messages) with chat. A .txt piece is part of one document, yielded in parts."""
    path = Path(piece.path)
    if path.suffix == ".parquet":
        yield from _parquet_batches(piece, chat, text_field, skipped)
        return
    with open(path, "rb") as f:
        f.seek(piece.start)
        raw = f.read(piece.end - piece.start)
    if path.suffix == ".txt":
        if chat:
            raise InputError(f'--data: {path}: conversations come as .jsonl or .parquet with a "messages" field, not .txt')
        yield _cuts(_decode_lines(raw, piece, skipped), BATCH_BYTES)
        return
    batch, batch_bytes, offset = [], 0, piece.start
    for line in raw.split(b"\n"):
        where, offset = Line(path, offset), offset + len(line) + 1
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise InputError(f"{where}: cannot be read as UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
            batch.append(document(obj, chat, text_field, where))
        except InputError as err:
            skipped(err)
            continue
        batch_bytes += len(line)
        if batch_bytes >= BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


def _decode_lines(raw: bytes, piece: Piece, skipped: Skipped) -> str:
    """A .txt piece as text; a line that is not UTF-8 raises naming file:line (or is skipped)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    good, offset = [], piece.start
    for line in raw.splitlines(keepends=True):
        try:
            good.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            skipped(InputError(f"{Line(Path(piece.path), offset)}: cannot be read as UTF-8 ({err.reason} at byte {err.start} of the line)"))
        offset += len(line)
    return "".join(good)


def _parquet_batches(piece: Piece, chat: bool, text_field: str, skipped: Skipped):
    """A run of row groups, one batch each; errors name the file and the row."""
    file = _pyarrow().ParquetFile(piece.path)
    column = "messages" if chat else text_field
    if column not in file.schema_arrow.names:
        raise InputError(f'{piece.path}: no column "{column}" (it has {file.schema_arrow.names}'
                         f'{"" if chat else "; --text-field names the column that holds the text"})')
    first_row = sum(file.metadata.row_group(g).num_rows for g in range(piece.start))
    for g in range(piece.start, piece.end):
        batch = []
        for row, value in enumerate(file.read_row_group(g, columns=[column]).column(column).to_pylist(), first_row):
            try:
                batch.append(document({column: value}, chat, column, f"{piece.path}, row {row}"))
            except InputError as err:
                skipped(err)
        first_row += file.metadata.row_group(g).num_rows
        yield batch


# ---------------------------------------------------------------------------------------------
# Writing: one shard per piece, in worker processes
# ---------------------------------------------------------------------------------------------

VAL_CONVERSATIONS = 0.05  # the share of conversations held out for the validation loss


def is_val_conversation(messages: list[dict], val_fraction: float = VAL_CONVERSATIONS) -> bool:
    """Held out by a hash of the first message: branches of one conversation tree stay together."""
    return zlib.crc32(messages[0]["content"].encode()) % 1000 < val_fraction * 1000


def encode_piece(tokenizer, piece: Piece, chat: bool, text_field: str, skipped: Skipped) -> dict:
    """One piece -> the arrays of its shard: tokens, starts (and mask, val for conversations).
    Documents are read and encoded BATCH_BYTES at a time; only the piece's ids are kept."""
    tokens, starts, masks, vals, n = [], [], [], [], 0
    for batch in read_piece(piece, chat, text_field, skipped):
        if chat:
            rendered = tokenizer.render_conversations(batch)
            vals += [is_val_conversation(conv) for conv in batch]
            masks.append(np.fromiter(itertools.chain.from_iterable(m for _, m in rendered), np.uint8))
            docs = [ids for ids, _ in rendered]
        elif piece.path.endswith(".txt"):  # parts of one document, which starts at the file's first byte
            docs = tokenizer.encode_batch(batch)
            if n == 0 and piece.start == 0:
                docs[0] = [tokenizer.bos_id, *docs[0]]
                starts.append(0)
        else:
            docs = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(batch)]
        lengths = [len(ids) for ids in docs]
        if not piece.path.endswith(".txt"):
            starts += (n + np.cumsum([0] + lengths[:-1])).tolist()
        tokens.append(np.fromiter(itertools.chain.from_iterable(docs), np.uint32, sum(lengths)))
        n += sum(lengths)
    if n == 0:
        raise InputError(f"--data: {piece.path} (bytes {piece.start}-{piece.end}) holds no text: it would make an empty shard")
    arrays = {"tokens": np.concatenate(tokens), "starts": np.asarray(starts, dtype=np.int64)}
    if chat:
        arrays |= {"mask": np.concatenate(masks), "val": np.asarray(vals, dtype=np.uint8)}
    return arrays


def write_shard(path: Path, arrays: dict, vocab_size: int, key: int, skipped: int = 0):
    """The shard file (written beside and renamed: an interrupted write leaves no shard)."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens, starts = arrays["tokens"], arrays["starts"]
    flags = CHAT_FLAG if "mask" in arrays else 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, len(tokens), len(starts), flags, skipped, key).ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype).tobytes())
        f.write(starts.tobytes())
        if flags & CHAT_FLAG:
            f.write(arrays["mask"].tobytes())
            f.write(arrays["val"].tobytes())
    os.replace(tmp, path)


_worker = {}  # a worker process's tokenizer and settings (set by _start_worker)


def _start_worker(tokenizer, settings: dict, threads: int):
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # tokenizers' thread pool, made at its first use
    _worker.update(settings, tokenizer=tokenizer)


def _make_shard(job) -> tuple[int, int, int, int]:
    """(index, piece, path, key) -> (index, tokens, documents, lines skipped)."""
    i, piece, path, key = job
    w = _worker
    skipped = Skipped(w["skip_bad_lines"])
    arrays = encode_piece(w["tokenizer"], piece, w["kind"] == "chat", w["text_field"], skipped)
    write_shard(path, arrays, w["tokenizer"].vocab_size, key, skipped.count)
    return i, len(arrays["tokens"]), len(arrays["starts"]), skipped.count


def tokenize(data, out, tokenizer, chat: bool = False, text_field: str = "text", skip_bad_lines: bool = False,
             workers: int = 0, shard_bytes: int | None = None, progress: bool = True) -> "ShardSet":
    """--data (file, folder, glob; or a list of paths) -> a shard set in folder `out`.

    workers: processes, each with one tokenizer thread (0: one per CPU, fewer for a small input;
    with one, this process encodes, with the tokenizer's own threads). Shards already in `out`
    for the same piece of the same input and settings are kept, so an interrupted run resumes;
    a complete set for the same files (sizes, mtimes) and settings is returned as it is."""
    out, shard_bytes = Path(out), shard_bytes or SHARD_BYTES
    paths = data if isinstance(data, list) else list_sources(data)
    settings = {"format": VERSION, "kind": "chat" if chat else "text", "text_field": text_field,
                "skip_bad_lines": skip_bad_lines, "shard_bytes": shard_bytes, "tokenizer": tokenizer_hash(tokenizer)}
    sources = [_stat(p) for p in paths]
    if (out / "index.json").is_file():
        index = read_index(out)
        if index["settings"] == settings and index.get("sources") == sources and all(
                (h := peek_header(out / s["file"])) and (h["tokens"], h["docs"]) == (s["tokens"], s["documents"])
                for s in index["shards"]):
            return ShardSet(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    tokenizer.save_config(out)
    pieces = plan_pieces(paths, shard_bytes)
    stat_of = {s["path"]: s for s in sources}
    keys = [int(_hash([settings, stat_of[str(Path(p.path).resolve())], p.start, p.end])[:16], 16) for p in pieces]
    files = [out / f"shard-{i:06d}.bin" for i in range(len(pieces))]
    for stale in set(out.glob("shard-*.bin*")) - set(files):  # of an earlier input or setting
        stale.unlink()
    counts = {i: (h["tokens"], h["docs"], h["skipped"]) for i, f in enumerate(files) if (h := peek_header(f)) and h["key"] == keys[i]}
    todo = [(i, pieces[i], files[i], keys[i]) for i in range(len(pieces)) if i not in counts]
    todo_bytes = sum(pieces[i].size for i, *_ in todo)
    workers = min(workers or min(os.cpu_count() or 1, todo_bytes // MIN_WORKER_BYTES), len(todo))
    if counts and progress:
        print(f"{out}: {len(counts)} of {len(pieces)} shards were already written; tokenising the rest")
    bar = tqdm(total=sum(p.size for p in pieces), initial=sum(pieces[i].size for i in counts), unit="B", unit_scale=True,
               desc=f"tokenize ({workers} worker{'s' * (workers != 1)})", disable=not progress, dynamic_ncols=True)
    worker_settings = {k: settings[k] for k in ("kind", "text_field", "skip_bad_lines")}
    with bar:
        if workers <= 1:  # here, with the tokenizer's own threads: no process to start
            _worker.update(worker_settings, tokenizer=tokenizer)
            results = map(_make_shard, todo)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (tokenizer, worker_settings, 1))
            results = pool.imap_unordered(_make_shard, todo)
        try:
            for i, tokens, docs, skipped in results:
                counts[i] = (tokens, docs, skipped)
                bar.update(pieces[i].size)
        finally:
            if workers > 1:
                pool.terminate()
    index = {"settings": settings, "sources": sources, "vocab_size": tokenizer.vocab_size,
             "tokens": sum(c[0] for c in counts.values()), "documents": sum(c[1] for c in counts.values()),
             "skipped_lines": sum(c[2] for c in counts.values()),
             "shards": [{"file": f.name, "source": p.path, "start": p.start, "end": p.end, "tokens": counts[i][0],
                         "documents": counts[i][1]} for i, (f, p) in enumerate(zip(files, pieces))]}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return ShardSet(out)


# ---------------------------------------------------------------------------------------------
# Reading: shard sets, the token stream, the conversations
# ---------------------------------------------------------------------------------------------


def peek_header(path: Path) -> dict | None:
    """A shard file's header, or None when the file is missing or not a complete shard."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        magic, version, itemsize, tokens, docs, flags, skipped, key = HEADER.unpack(raw)
    except (OSError, struct.error):
        return None
    header = {"version": version, "itemsize": itemsize, "tokens": tokens, "docs": docs, "chat": bool(flags & CHAT_FLAG),
              "skipped": skipped, "key": key}
    if magic != MAGIC or version != VERSION or itemsize not in (2, 4) or path.stat().st_size != shard_bytes_of(header):
        return None
    return header


def shard_bytes_of(h: dict) -> int:
    return HEADER_BYTES + h["tokens"] * h["itemsize"] + h["docs"] * 8 + (h["tokens"] + h["docs"]) * h["chat"]


@dataclass
class Shard:
    tokens: np.ndarray  # [tokens] uint16 | uint32
    starts: np.ndarray  # [docs] int64
    mask: np.ndarray | None  # [tokens] uint8
    val: np.ndarray | None  # [docs] uint8


def open_shard(path: str, tokens: int, docs: int, chat: bool) -> Shard:
    """A shard file as views of one memmap; its header must match itself and the index."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError:
        raw = b""
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise InputError(f"{path}: not a token shard (missing, or no {MAGIC.decode()} header)")
    magic, version, itemsize, n, d, flags, _, _ = HEADER.unpack(raw)
    header = {"itemsize": itemsize, "tokens": n, "docs": d, "chat": bool(flags & CHAT_FLAG)}
    if version != VERSION or itemsize not in (2, 4):
        raise InputError(f"{path}: shard format version {version} with {itemsize}-byte tokens; expected version {VERSION}, 2 or 4 bytes")
    if n == 0:
        raise InputError(f"{path}: empty shard (its header says 0 tokens)")
    if Path(path).stat().st_size != shard_bytes_of(header):
        raise InputError(f"{path}: the header says {n} tokens and {d} documents ({shard_bytes_of(header)} bytes), "
                         f"the file has {Path(path).stat().st_size} bytes: truncated or not this header's shard")
    if (n, d, header["chat"]) != (tokens, docs, chat):
        raise InputError(f"{path}: the header says {n} tokens, {d} documents{', conversations' * header['chat']}; "
                         f"index.json says {tokens}, {docs}{', conversations' * chat}: the shard does not belong to this index")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    at = np.cumsum([HEADER_BYTES, n * itemsize, d * 8, n * chat, d * chat])
    return Shard(tokens=mm[at[0] : at[1]].view(np.uint16 if itemsize == 2 else np.uint32),
                 starts=mm[at[1] : at[2]].view(np.int64),
                 mask=mm[at[2] : at[3]] if chat else None, val=mm[at[3] : at[4]] if chat else None)


def read_index(folder: Path) -> dict:
    path = Path(folder) / "index.json"
    try:
        index = json.loads(path.read_text())
        assert isinstance(index["shards"], list) and isinstance(index["settings"], dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise InputError(f"{path}: not a shard index ({type(err).__name__}: {err})") from None
    return index


class ShardSet:
    """A folder written by tokenize: its index, tokenizer and shards (opened on first use)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.chat = self.index["settings"]["kind"] == "chat"
        self.counts = [(s["tokens"], s["documents"]) for s in self.index["shards"]]
        self._open = functools.lru_cache(maxsize=128)(open_shard)  # a memmap (a file descriptor) per open shard
        if not self.counts:
            raise InputError(f"{self.folder / 'index.json'}: lists no shards")
        for s in self.index["shards"]:
            if not (self.folder / s["file"]).is_file():
                raise InputError(f"{self.folder / s['file']}: missing (index.json lists it); run llm-engine tokenize "
                                 "again to remake it")

    def __len__(self) -> int:
        return len(self.counts)

    def shard(self, i: int) -> Shard:
        return self._open(str(self.folder / self.index["shards"][i]["file"]), *self.counts[i], self.chat)

    def tokenizer(self):
        from engine.files import read_tokenizer

        return read_tokenizer(self.folder / "tokenizer.json")

    def check_tokenizer(self, tokenizer, what: str):
        if self.index["settings"]["tokenizer"] != tokenizer_hash(tokenizer):
            raise InputError(f"--data {self.folder}: tokenised with another tokenizer than {what}'s; "
                             f"run llm-engine tokenize --tokenizer with {what}'s tokenizer.json")


class TokenStream:
    """The shards' tokens as one stream: len() and slices [a:b] (read from the memmaps across
    shard boundaries), which is all token_batch asks of a token array."""

    def __init__(self, shards: ShardSet, start: int = 0, stop: int | None = None):
        self.shards = shards
        self.offsets = np.cumsum([0] + [t for t, _ in shards.counts])  # [shards + 1]
        self.start, self.stop = start, self.offsets[-1] if stop is None else stop

    def __len__(self) -> int:
        return int(self.stop - self.start)

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, step = s.indices(len(self))
        if step != 1:
            raise IndexError("a token stream is read in contiguous slices")
        a, b = a + self.start, b + self.start
        parts, i = [], int(np.searchsorted(self.offsets, a, side="right")) - 1
        while a < b:
            end = min(b, self.offsets[i + 1])
            parts.append(self.shards.shard(i).tokens[a - self.offsets[i] : end - self.offsets[i]])
            a, i = end, i + 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def split(self, val_fraction: float = VAL_FRACTION, max_val: int = VAL_MAX_TOKENS) -> tuple["TokenStream", "TokenStream"]:
        """(train, val): val is the stream's tail, about val_fraction of it but at most max_val
        tokens, in whole documents: it begins at the document start nearest that many tokens from
        the end (no document is both trained on and validated on); failing one within half to
        twice that size, at the nearest shard boundary (a long .txt file's pieces); failing that
        too (one document in one shard), at the token. A function of the shard set alone: every
        process, and every resumed run, gets the same split."""
        n_val = max(min(int(len(self) * val_fraction), max_val), 2)
        if len(self) - n_val < 2:
            raise InputError(f"--data {self.shards.folder}: only {len(self)} tokens, too few to train on")
        cut, lo, hi = self.stop - n_val, max(self.stop - 2 * n_val, self.start + 2), self.stop - max(n_val // 2, 2)
        first, last = (int(np.searchsorted(self.offsets, x, side="right")) - 1 for x in (lo, hi))
        for bounds in ([self.offsets[i] + self.shards.shard(i).starts for i in range(first, last + 1)], [self.offsets]):
            bounds = np.concatenate(bounds)
            if len(bounds := bounds[(bounds >= lo) & (bounds <= hi)]):
                cut = int(bounds[np.argmin(np.abs(bounds - cut))])
                break
        return TokenStream(self.shards, self.start, cut), TokenStream(self.shards, cut, self.stop)


class Conversations:
    """A chat shard set's rendered conversations, train or val: c[i] -> (ids, loss_mask) as
    int64 arrays, exactly what Tokenizer.render_conversation gives, in the files' order."""

    def __init__(self, shards: ShardSet, val: bool):
        if not shards.chat:
            raise InputError(f"--data {shards.folder}: holds text, not conversations (tokenize --chat makes those)")
        self.shards = shards
        rows = []  # (shard, start, end) of each conversation of this split
        for i in range(len(shards)):
            sh = shards.shard(i)
            ends = np.append(sh.starts[1:], len(sh.tokens))
            keep = sh.val == val
            rows.append(np.stack([np.full(int(keep.sum()), i), sh.starts[keep], ends[keep]], axis=1))
        self.rows = np.concatenate(rows)
        if val and not len(self.rows):  # nothing hashed into val: the last conversation, as conversation_split does
            sh = shards.shard(len(shards) - 1)
            self.rows = np.array([[len(shards) - 1, sh.starts[-1], len(sh.tokens)]])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, a, b = (int(v) for v in self.rows[i])
        sh = self.shards.shard(s)
        return sh.tokens[a:b].astype(np.int64), sh.mask[a:b].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# What pretrain and finetune call: tokenise on first use, reuse afterwards
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llm-engine")


def is_shard_set(data) -> bool:
    return Path(str(data)).is_dir() and (Path(str(data)) / "index.json").is_file()


def sample_texts(paths: list[Path], chat: bool, text_field: str, skip_bad_lines: bool):
    """What a tokenizer is trained on: about TOKENIZER_SAMPLE_BYTES of the input, each file's share in
    proportion to its size, read from its start (whole lines; for conversations, their messages)."""
    total = sum(p.stat().st_size for p in paths)
    for path in paths:
        share = max(1, TOKENIZER_SAMPLE_BYTES * path.stat().st_size // max(total, 1))
        for batch in read_piece(plan_pieces([path], share)[0], chat, text_field, Skipped(skip_bad_lines)):
            for doc in batch:
                yield from [m["content"] for m in doc] if chat else [doc]


def train_tokenizer(data, vocab_size: int, chat: bool = False, text_field: str = "text", skip_bad_lines: bool = False):
    """Byte-level BPE trained on sample_texts (TOKENIZER_SAMPLE_BYTES of --data)."""
    from engine.tokenizer import Tokenizer

    paths = data if isinstance(data, list) else list_sources(data)
    return Tokenizer.train(sample_texts(paths, chat, text_field, skip_bad_lines), vocab_size)


def prepare(data, tokenizer=None, vocab_size: int | None = None, chat: bool = False, text_field: str = "text",
            skip_bad_lines: bool = False, workers: int = 0, progress: bool = True) -> ShardSet:
    """The shard set pretrain and finetune read. --data a tokenize output folder: as it is (its
    tokenizer must be `tokenizer`, when given). Raw files: tokenised on first use into
    cache_dir()/shards/<key> and reused from there, the key being the files (paths, sizes,
    mtimes), the tokenizer and the settings; without a tokenizer, one of vocab_size tokens is
    trained on a sample of the files (and cached under the same kind of key)."""
    from engine.tokenizer import Tokenizer

    if is_shard_set(data):
        shards = ShardSet(data)
        if shards.chat != chat:
            raise InputError(f"--data {data}: holds {'conversations' if shards.chat else 'text'}; "
                             f"{'finetune needs conversations (tokenize --chat)' if chat else 'pretrain needs text'}")
        if tokenizer is not None:
            shards.check_tokenizer(tokenizer, "the model")
        return shards
    paths = list_sources(data)
    stats = [_stat(p) for p in paths]
    if tokenizer is None:
        path = cache_dir() / "tokenizers" / f"{_hash([stats, vocab_size, chat, text_field, skip_bad_lines, TOKENIZER_SAMPLE_BYTES])[:16]}.json"
        if path.is_file():
            tokenizer = Tokenizer.load(path)
        else:
            tokenizer = train_tokenizer(paths, vocab_size, chat, text_field, skip_bad_lines)
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
    key = _hash([stats, tokenizer_hash(tokenizer), chat, text_field, skip_bad_lines])[:16]
    return tokenize(paths, cache_dir() / "shards" / key, tokenizer, chat, text_field, skip_bad_lines, workers, progress=progress)
