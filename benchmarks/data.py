"""Training data at scale: how fast text and conversations become shards, in how much memory,
and what streaming from them costs a training step.

    python benchmarks/data.py [--toy] [--mb 1024] [--scaling-mb 128] [--chats 100000] [--out DIR]

Everything is generated (seeded): --mb MB of English-like text as .jsonl documents of ~4 KB
(words from a Zipf-distributed made-up vocabulary, with punctuation), and --chats conversations
of 2-4 turns (a system message in 30%), ~1.2 KB each. A 8192-token tokenizer is trained once on
tokenize's sample. Each measurement runs in its own process: wall time, CPU time of the process
and all its children (getrusage), and peak RSS of the process tree summed over its processes
(sampled every 50 ms from /proc):

    startup            `python -c "import engine.shards"`: what tokenize's every worker process pays first (no torch)
    tokenize_default   `llm-engine tokenize` with its defaults (one worker process per CPU), all --mb
    tokenize_1w        one worker with one tokenizer thread (RAYON_NUM_THREADS=1), the first --scaling-mb MB
    tokenize_2w        two workers, one tokenizer thread each, the same text
    tokenize_default_s the defaults on that same text
    encode_batch       a plain loop of the tokenizers library's encode_batch (1 MB batches, its own threads on
                       every core; not Tokenizer.encode_batch, whose ASCII fast path runs on one), same text
    chats_first        conversations ready for the first step: finetune's prepare (render + shards into an
                       empty cache), the train/val views, one batch
    chats_second       the same again (the cache now holds the shards)
    step_data          one micro-batch of 8x256 from the shards (token_batch) beside one tiny-preset CPU
                       optimizer step on it (step_ms), as a share of the step

Writes data.csv and data.md into the results folder.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import results_dir, write_csv  # noqa: E402

COLUMNS = ["name", "mb", "wall_s", "cpu_s", "mb_per_s", "peak_rss_mb", "note"]


def tree_rss_mb(pid: int) -> float:
    """Resident MB of a process and all its descendants, from /proc."""
    children, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total / 2**20


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; -> wall_s, cpu_s (it and its children), peak_rss_mb (of the tree), stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak[0]), "stdout": out}


def vocabulary(rng, n=4000) -> tuple[list[str], np.ndarray]:
    """Made-up words (syllables) with Zipf frequencies; some end a clause or a sentence."""
    syllables = "ka lo mi te ra an ver sto pli gen ma tu er in on de ba ri so na lu".split()
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(n)]
    words = [w + rng.choice(["", "", "", "", "", "", ",", "."]) for w in words]
    p = 1.0 / np.arange(1, n + 1)
    return words, p / p.sum()


def write_text(path: Path, mb: int, seed: int = 0) -> Path:
    """~mb MB of .jsonl documents {"text": ...} of ~4 KB."""
    rng = np.random.default_rng(seed)
    words, p = vocabulary(rng)
    written = 0
    with open(path, "w") as f:
        while written < mb * 2**20:
            ids = rng.choice(len(words), size=(256, 650), p=p)
            lines = "".join(json.dumps({"text": " ".join(words[i] for i in doc)}) + "\n" for doc in ids)
            f.write(lines)
            written += len(lines)
    return path


def write_chats(path: Path, n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    words, p = vocabulary(rng)

    def sentence(k):
        return " ".join(words[i] for i in rng.choice(len(words), size=k, p=p)).capitalize()

    with open(path, "w") as f:
        for _ in range(n):
            chat = [{"role": "system", "content": sentence(12)}] if rng.random() < 0.3 else []
            for _ in range(rng.integers(2, 5)):
                chat += [{"role": "user", "content": sentence(int(rng.integers(5, 25)))},
                         {"role": "assistant", "content": sentence(int(rng.integers(15, 60)))}]
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


def head(src: Path, dst: Path, mb: int) -> Path:
    """The first whole lines of src, about mb MB."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(mb * 2**20))
        g.write(f.readline())
    return dst


ENCODE_LOOP = """
import sys, json
from engine.tokenizer import Tokenizer
tok = Tokenizer.load(sys.argv[2])
batch, size, n = [], 0, 0
for line in open(sys.argv[1]):
    batch.append(json.loads(line)["text"]); size += len(line)
    if size >= 2**20:
        n += sum(len(e.ids) for e in tok.hf.encode_batch(batch, add_special_tokens=False)); batch, size = [], 0
n += sum(len(e.ids) for e in tok.hf.encode_batch(batch, add_special_tokens=False))
print(n)
"""

CHATS_READY = """
import sys, time
from engine.checkpoint import read_tokenizer
from engine.data import conversation_batch
from engine.shards import Conversations, prepare
t0, c0 = time.perf_counter(), time.process_time()
shards = prepare(sys.argv[1], read_tokenizer(sys.argv[2]), chat=True, progress=False)
train, val = Conversations(shards, val=False), Conversations(shards, val=True)
x, y, mask = conversation_batch(train, 8, 256, 0, 0, 0)
print(len(train), len(val), f"{time.perf_counter() - t0:.2f}", f"{time.process_time() - c0:.2f}")
"""


def step_data_share(shard_dir: Path, reps: int) -> dict:
    """token_batch from the shards vs one tiny-preset optimizer step on its batch (8x256, CPU)."""
    import torch

    from engine.config import GPTConfig
    from engine.data import token_batch
    from engine.model import GPT
    from engine.shards import ShardSet, TokenStream
    from engine.train import Batches, TrainConfig, make_optimizer, optimizer_step

    stream = TokenStream(ShardSet(shard_dir)).split()[0]
    model = GPT(GPTConfig.from_preset("tiny", block_size=256, vocab_size=8192), backend="torch")
    optimizer = make_optimizer(model, TrainConfig(max_steps=1))
    data_s, step_s = [], []
    batches = Batches(micro=lambda step, micro: (*token_batch(stream, 8, 256, 0, step, micro), None), val_loss=None)
    for step in range(reps + 1):
        t0 = time.perf_counter()
        batches.micro(step, 0)
        t1 = time.perf_counter()
        optimizer_step(model, optimizer, batches, step, range(1), 1.0)  # draws its batch again, inside
        t2 = time.perf_counter()
        if step:  # the first is warmup
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
    data_ms, step_ms = 1e3 * float(np.median(data_s)), 1e3 * float(np.median(step_s))
    return {"data_ms": round(data_ms, 3), "step_ms": round(step_ms, 1), "share_percent": round(100 * data_ms / step_ms, 3),
            "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="MB of text for tokenize_default (default 1024)")
    parser.add_argument("--scaling-mb", type=int, default=128, help="MB of text for the 1- vs 2-worker and encode_batch runs (default 128)")
    parser.add_argument("--chats", type=int, default=100_000, help="conversations (default 100000)")
    parser.add_argument("--toy", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>-<date>)")
    parser.add_argument("--work", default=None, help="folder for the generated data and shards (default a temporary one)")
    args = parser.parse_args(argv)
    if args.toy:
        args.mb, args.scaling_mb, args.chats = 8, 4, 2000
    work = Path(args.work or tempfile.mkdtemp(prefix="data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []

    def row(name, mb, m, note=""):
        rows.append({"name": name, "mb": round(mb, 1), "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
                     "mb_per_s": round(mb / m["wall_s"], 2) if mb else "", "peak_rss_mb": m["peak_rss_mb"], "note": note})
        print(rows[-1], flush=True)

    text = work / "text.jsonl"
    if not text.is_file() or text.stat().st_size < args.mb * 2**20:
        write_text(text, args.mb)
    small = head(text, work / f"text-{args.scaling_mb}mb.jsonl", args.scaling_mb)
    mb, small_mb = text.stat().st_size / 2**20, small.stat().st_size / 2**20
    tok = work / "tokenizer.json"
    if not tok.is_file():
        from engine.shards import train_tokenizer

        train_tokenizer(str(text), 8192).save(tok)

    def tokenize(name, data, data_mb, workers, env=None, note=""):
        out = work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        m = measured([py, "-m", "engine", "tokenize", "--data", str(data), "--out", str(out), "--tokenizer", str(tok),
                      "--workers", str(workers)], env)
        row(name, data_mb, m, note or m["stdout"].strip().splitlines()[-1].split(": ", 1)[-1])
        return out

    row("startup", 0, measured([py, "-c", "import engine.shards"]), "python -c 'import engine.shards': in each worker process")
    one = {"RAYON_NUM_THREADS": "1"}
    tokenize("tokenize_1w", small, small_mb, 1, one, "1 worker, 1 tokenizer thread")
    tokenize("tokenize_2w", small, small_mb, 2, one, "2 workers, 1 tokenizer thread each")
    tokenize("tokenize_default_s", small, small_mb, 0, note="defaults")
    m = measured([py, "-c", ENCODE_LOOP, str(small), str(tok)])
    row("encode_batch", small_mb, m, f"{int(m['stdout'])} tokens; the tokenizers library's encode_batch, its own threads")
    full = tokenize("tokenize_default", text, mb, 0)

    chats = work / "chats.jsonl"
    if not chats.is_file():
        write_chats(chats, args.chats)
    chats_mb = chats.stat().st_size / 2**20
    cache = {"LLM_ENGINE_CACHE": str(work / "cache")}
    subprocess.run(["rm", "-rf", str(work / "cache")], check=True)
    for name in ("chats_first", "chats_second"):
        m = measured([py, "-c", CHATS_READY, str(chats), str(tok)], cache)
        n_train, n_val, wall, cpu = m["stdout"].split()
        row(name, chats_mb, m, f"{n_train} train + {n_val} val conversations; after the imports {wall} s wall, {cpu} s CPU of this process")

    share = step_data_share(full, reps=3 if args.toy else 10)
    rows.append({"name": "step_data", "mb": "", "wall_s": "", "cpu_s": "", "mb_per_s": "", "peak_rss_mb": "",
                 "note": f"data {share['data_ms']} ms of a {share['step_ms']} ms step ({share['share_percent']}%), "
                         f"{share['threads']} torch threads"})
    print(rows[-1])

    out = results_dir(args.out)
    write_csv(rows, out / "data.csv")
    load = os.getloadavg()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "data.md").write_text(f"# benchmarks/data.py\n\n{os.cpu_count()} CPUs, load average at the end {load[0]:.1f} / "
                                 f"{load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out / 'data.csv'} and {out / 'data.md'}")


if __name__ == "__main__":
    main()
