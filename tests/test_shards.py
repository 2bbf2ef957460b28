"""Token shards: the same ids as tokenising in memory, whatever the pieces and workers; resumed
tokenising; exact training resume across shard boundaries; conversations as the renderer
makes them; every bad input named through the CLI."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import cli, shards
from engine.data import World, batch_generator, conversation_batch, conversation_split, load_conversations, token_batch, token_stream
from engine.distributed import micro_batches
from engine.errors import InputError
from engine.shards import Conversations, ShardSet, TokenStream, tokenize
from engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def texts(n, seed):
    """n generated documents of a few lines, with odd characters (tabs, runs of newlines, non-ASCII)."""
    rng = random.Random(seed)
    words = "the a model token shard Ünïcode 数据 tab\tbed  two-spaces end. new\n\nline 42 don't".split(" ")
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(texts(200, 0) + [m["content"] for c in World(n_people=10).conversations() for m in c], 400)


def write_chats(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.mark.parametrize("shard_bytes", [97, 1000, 10**6])
def test_text_shards_hold_the_ids_of_tokenising_in_memory(tmp_path, tok, shard_bytes):
    """.txt files cut anywhere the pieces fall, and .jsonl documents with another text field."""
    docs = texts(30, 1)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs[:10]))
    (tmp_path / "in" / "sub" / "b.txt").write_text("\n".join(docs[10:20]) + "\n")
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n\n" for i, d in enumerate(docs[20:])))
    got = tokenize(str(tmp_path / "in"), tmp_path / "out", tok, text_field="body", shard_bytes=shard_bytes, progress=False)
    # sorted: a.txt, c.jsonl, sub/b.txt; a .txt file is one document, a .jsonl line is one
    want = token_stream(["\n\n".join(docs[:10]), *docs[20:], "\n".join(docs[10:20]) + "\n"], tok)
    stream = TokenStream(got)
    assert len(stream) == len(want) and np.array_equal(stream[:], want)
    assert got.index["documents"] == 12 and (len(got) == 3 if shard_bytes == 10**6 else len(got) > 3)  # >= 1 shard a file
    for a, b in [(0, 5), (len(want) - 3, len(want)), (17, 17 + 211)]:  # slices across shard boundaries
        assert np.array_equal(stream[a:b], want[a:b])
    train, val = stream.split(0.1)
    assert np.array_equal(np.concatenate([train[:], val[:]]), want)  # how it is cut: the next test


def split_of(tmp_path, tok, files: dict, shard_bytes: int, fraction: float = 0.1):
    """-> (whole stream, train, val, shard boundaries) of tokenize over files {name: text}."""
    folder = tmp_path / f"in-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    got = tokenize(str(folder), folder / "out", tok, shard_bytes=shard_bytes, progress=False)
    stream = TokenStream(got)
    train, val = stream.split(fraction)
    assert np.array_equal(np.concatenate([train[:], val[:]]), stream[:])
    return stream[:], train, val, np.cumsum([t for t, _ in got.counts])


def test_the_validation_split_is_by_document_else_by_shard(tmp_path, tok):
    """val is the tail in whole documents, about the fraction asked; a single long document is
    cut at a shard boundary; a document in a single shard, at the token (nothing else to cut at)."""
    docs = texts(60, 7)
    whole, train, val, _ = split_of(tmp_path, tok, {"d.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in docs)}, 700, 0.2)
    starts = np.flatnonzero(whole == tok.bos_id)
    assert len(train) in starts and 0.1 <= len(val) / len(whole) <= 0.4
    assert np.array_equal(val[:], token_stream(docs[-(len(starts) - np.searchsorted(starts, len(train))):], tok))
    whole, train, val, ends = split_of(tmp_path, tok, {"a.txt": "\n".join(docs)}, 300, 0.2)  # one document, many shards
    assert len(ends) > 5 and len(train) in ends and 0.1 <= len(val) / len(whole) <= 0.4
    whole, train, val, ends = split_of(tmp_path, tok, {"a.txt": "\n".join(docs[:5])}, 10**6)  # one document, one shard
    assert len(ends) == 1 and len(val) == int(0.1 * len(whole))


def test_a_glob_and_parquet_shards_and_two_worker_processes(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = texts(40, 2)
    for i in range(2):
        pq.write_table(pa.table({"text": docs[20 * i : 20 * i + 20]}), tmp_path / f"part{i}.parquet", row_group_size=3)
    (tmp_path / "part2.txt").write_text(docs[0])
    got = tokenize(str(tmp_path / "part*.parquet"), tmp_path / "out", tok, workers=2, shard_bytes=200, progress=False)
    assert len(got) > 4 and np.array_equal(TokenStream(got)[:], token_stream(docs, tok))


def test_tokenize_workers_do_not_import_torch():
    """What a worker process imports (the CLI, as the llm-engine script's spawned copies import
    it; the shards; the tokenizer it is sent) leaves torch out: ~3 s and 220 MB a process."""
    code = "import sys, engine.cli, engine.shards, engine.tokenizer; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_the_tokenize_command_does_not_import_torch(tmp_path):
    """Nor does `llm-engine tokenize` itself (its parser, the tokenizer's training and reading, the CLI's error handling)."""
    (tmp_path / "a.txt").write_text("\n".join(texts(20, 3)))
    code = ("import sys; from engine import cli; cli.main(['tokenize', '--data', sys.argv[1], '--out', sys.argv[2], "
            "'--vocab-size', '300', '--workers', '0']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt"), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert out.strip().endswith("False"), out[-500:]


def test_an_interrupted_tokenize_redoes_only_the_missing_shards(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text("\n".join(texts(60, 3)))
    first = tokenize(tmp_path / "a.txt", tmp_path / "out", tok, shard_bytes=300, progress=False)
    files = sorted((tmp_path / "out").glob("shard-*.bin"))
    want, n = TokenStream(first)[:], len(files)
    assert n > 4
    files[1].unlink()  # never written
    files[2].write_bytes(files[2].read_bytes()[:-3])  # killed mid-write (a leftover that is no shard)
    (tmp_path / "out" / "index.json").unlink()  # the index comes last
    made = []
    real = shards._make_shard
    monkeypatch.setattr(shards, "_make_shard", lambda job: made.append(job[0]) or real(job))
    again = tokenize(tmp_path / "a.txt", tmp_path / "out", tok, shard_bytes=300, progress=False)
    assert made == [1, 2] and np.array_equal(TokenStream(again)[:], want)
    made.clear()
    tokenize(tmp_path / "a.txt", tmp_path / "out", tok, shard_bytes=300, progress=False)  # complete: nothing to do
    assert made == []
    files[3].write_bytes(files[3].read_bytes()[:-1])  # damaged after the index was written: remade too
    again = tokenize(tmp_path / "a.txt", tmp_path / "out", tok, shard_bytes=300, progress=False)
    assert made == [3] and np.array_equal(TokenStream(again)[:], want)


def test_pretrain_and_finetune_tokenise_once_and_reuse_the_shards(tmp_path, tok, monkeypatch):
    monkeypatch.setenv(shards.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("\n".join(texts(50, 4)))
    made = []
    monkeypatch.setattr(shards, "plan_pieces", lambda *a, real=shards.plan_pieces: made.append(1) or real(*a))
    first = shards.prepare(tmp_path / "a.txt", vocab_size=300, progress=False)
    n = len(made)  # the tokenizer's sample, then the shards
    assert n == 2 and shards.prepare(tmp_path / "a.txt", vocab_size=300, progress=False).folder == first.folder
    assert shards.prepare(tmp_path / "a.txt", first.tokenizer(), progress=False).folder == first.folder  # --resume
    assert len(made) == n  # neither the tokenizer nor the shards were made again
    (tmp_path / "a.txt").write_text("changed")  # another file: another key
    assert shards.prepare(tmp_path / "a.txt", first.tokenizer(), progress=False).folder != first.folder


def test_exact_resume_and_one_or_two_processes_across_shard_boundaries(tmp_path, tok):
    from engine.jobs import pretrain
    from engine.train import TrainConfig

    (tmp_path / "a.txt").write_text("\n".join(texts(80, 5)))
    data = tokenize(tmp_path / "a.txt", tmp_path / "shards", tok, shard_bytes=400, progress=False)
    stream = TokenStream(data).split()[0]
    assert len(data) > 5
    # a micro-batch is a pure function of (seed, step, global index): two processes (ranks 0, 1
    # of grad_accum 2) draw exactly the windows of one process, and windows cross shards
    ranks = [micro_batches(2, rank, 2) for rank in (0, 1)]
    assert [i for r in ranks for i in r] == list(micro_batches(2, 0, 1)) == [0, 1]
    in_memory = stream[:].astype(np.int64)
    for step in range(3):
        for micro in range(2):
            for a, b in zip(token_batch(stream, 8, 32, 0, step, micro), token_batch(in_memory, 8, 32, 0, step, micro)):
                assert a.equal(b)
    ends = np.cumsum([t for t, _ in data.counts])
    starts = [s for step in range(3) for m in range(2) for s in torch.randint(len(stream) - 32, (8,), generator=batch_generator(0, step, m)).tolist()]
    assert any(((s < ends) & (ends < s + 33)).any() for s in starts)  # some windows straddle a shard boundary

    def run(out, resume=False):
        cfg = TrainConfig(max_steps=4, batch_size=8, eval_every=2, eval_batches=1, save_every=2)
        pretrain(str(data.folder), out, "tiny", cfg, backend="torch", device="cpu", resume=resume, block_size=32, progress=False)
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    straight = run(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "step-0000004")  # as if stopped after the checkpoint at step 2
    resumed = run(tmp_path / "resumed", resume=True)[4:]
    assert [(m["loss"], m.get("val_loss")) for m in resumed] == [(m["loss"], m.get("val_loss")) for m in straight[2:]]


def test_conversation_shards_hold_what_the_renderer_makes(tmp_path, tok):
    convs = World(n_people=10, multi_turn_chats=60).conversations()
    write_chats(tmp_path / "chats.jsonl", convs)
    got = tokenize(tmp_path / "chats.jsonl", tmp_path / "out", tok, chat=True, shard_bytes=2000, progress=False)
    assert len(got) > 2
    assert tok.render_conversations(convs) == [tok.render_conversation(c) for c in convs]  # the batched fast path
    for split, want in zip((False, True), conversation_split(load_conversations(tmp_path / "chats.jsonl"))):
        view = Conversations(got, val=split)
        assert len(view) == len(want) > 0
        for (ids, mask), conv in zip(view, want):
            assert (ids.tolist(), mask.tolist()) == tok.render_conversation(conv)
    rendered = [tok.render_conversation(c) for c in conversation_split(convs)[0]]
    for a, b in zip(conversation_batch(Conversations(got, False), 4, 24, 0, 5, 1), conversation_batch(rendered, 4, 24, 0, 5, 1)):
        assert a.equal(b)


def test_real_conversations_too(tmp_path, tok, shared_file):
    real = shared_file("conversations.jsonl")  # long, unicode, system turns
    got = tokenize(real, tmp_path / "real", tok, chat=True, progress=False)
    want = conversation_split(load_conversations(real))[0]
    assert [(i.tolist(), m.tolist()) for i, m in Conversations(got, False)] == tok.render_conversations(want)


def test_finetune_streams_conversation_shards(tmp_path, tok):
    from engine import GPT, GPTConfig
    from engine.checkpoint import save_checkpoint
    from engine.jobs import finetune
    from engine.train import TrainConfig

    save_checkpoint(tmp_path / "base", 0, GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)), tok, {"step": 0})
    write_chats(tmp_path / "chats.jsonl", World(n_people=10, multi_turn_chats=20).conversations())
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_every=2, eval_batches=1, save_every=2)
    metrics = finetune(tmp_path / "base", str(tmp_path / "chats.jsonl"), tmp_path / "ft", cfg, backend="torch", device="cpu", progress=False)
    assert metrics["step"] == 2 and np.isfinite(metrics["val_loss"])
    other = Tokenizer.train(["something else entirely"] * 3, 300)
    text = tokenize(tmp_path / "chats.jsonl", tmp_path / "other", other, chat=True, progress=False)
    with pytest.raises(InputError, match="tokenised with another tokenizer than the model's"):
        finetune(tmp_path / "base", str(text.folder), tmp_path / "ft2", cfg, backend="torch", device="cpu", progress=False)


def tokenize_cli(capsys, tmp_path, data, *extra):
    code = cli.main(["tokenize", "--data", str(data), "--out", str(tmp_path / "out"), "--vocab-size", "300", "--workers", "1", *extra])
    return code, capsys.readouterr()


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "a.jsonl, line 2: cannot be read as UTF-8"),
    (b'{"text": "fine"}\n\n{"txt": "x"}\n', 'a.jsonl, line 3: missing the "text" field'),
    (b'{"text": "fine"}\n{"text": 3}\n', 'a.jsonl, line 2: "text" is int, not a string'),
    (b'{"text": "fine"}\n{"text": \n', "a.jsonl, line 2: bad JSON"),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
def test_bad_lines_are_named_with_file_and_line_or_skipped_and_counted(tmp_path, capsys, content, message):
    (tmp_path / "a.jsonl").write_bytes(content * 3)
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.jsonl")
    assert code == 2 and message in out.err and str(tmp_path) in out.err, out.err
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.jsonl", "--skip-bad-lines")
    assert code == 0 and "3 documents in 1 shard, skipped 3 bad lines" in out.out, out.out + out.err


def test_bad_utf8_in_a_text_file_names_its_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\nthr\xffee\nfour\n")
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.txt")
    assert code == 2 and f"{tmp_path / 'a.txt'}, line 3: cannot be read as UTF-8" in out.err
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.txt", "--skip-bad-lines")
    assert code == 0 and "skipped 1 bad lines" in out.out
    tok = ShardSet(tmp_path / "out").tokenizer()
    assert tok.decode(TokenStream(ShardSet(tmp_path / "out"))[:].tolist()) == "one\ntwo\nfour\n"


@pytest.mark.parametrize("line,message", [
    ('{"turns": []}', 'missing "messages"'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "message 0 (user) has empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "conversation does not end with an assistant turn"),
])
def test_malformed_conversations_are_named_through_the_cli(tmp_path, capsys, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]})
    (tmp_path / "c.jsonl").write_text(f"{good}\n{good}\n{line}\n")
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "c.jsonl", "--chat")
    assert code == 2 and f"c.jsonl, line 3: {message}" in out.err, out.err


def test_empty_and_unreadable_inputs_are_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "empty.txt")
    assert code == 2 and f"{tmp_path / 'empty.txt'} is empty" in out.err
    (tmp_path / "blank.jsonl").write_text("\n\n")
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "blank.jsonl")
    assert code == 2 and "blank.jsonl (bytes 0-2) holds no text: it would make an empty shard" in out.err
    code, out = tokenize_cli(capsys, tmp_path, str(tmp_path / "nothing*.txt"))
    assert code == 2 and "matches no files" in out.err
    (tmp_path / "a.txt").write_text("text\n")
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.txt", "--chat")
    assert code == 2 and 'a.txt: conversations come as .jsonl or .parquet with a "messages" field' in out.err
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # pyarrow not installed
    code, out = tokenize_cli(capsys, tmp_path, tmp_path / "a.parquet")
    assert code == 2 and "reading .parquet needs pyarrow: pip install 'llm-engine[parquet]'" in out.err


def test_a_shard_that_does_not_match_its_header_or_index_is_named(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(texts(40, 6)))
    assert tokenize_cli(capsys, tmp_path, tmp_path / "a.txt", "--shard-mb", "1")[0] == 0
    shard = tmp_path / "out" / "shard-000000.bin"
    raw = shard.read_bytes()

    def pretrain_error(content):
        shard.write_bytes(content)
        code = cli.main(["pretrain", "--data", str(tmp_path / "out"), "--out", str(tmp_path / "run"), "--max-steps", "1",
                         "--block-size", "8", "--batch-size", "2", "--device", "cpu"])
        assert code == 2
        return capsys.readouterr().err

    assert f"{shard}: the header says" in pretrain_error(raw[:-2]) and "truncated or not this header's shard" in pretrain_error(raw[:-2])
    header = bytearray(raw)
    header[16:24] = (0).to_bytes(8, "little")  # 0 tokens
    assert f"{shard}: empty shard" in pretrain_error(bytes(header))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    index["shards"][0]["tokens"] -= 1
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    assert "does not belong to this index" in pretrain_error(raw)
    assert "not a token shard" in pretrain_error(b"nonsense" * 10)
