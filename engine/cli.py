"""`llm-engine` (also `python -m engine`): pretrain, finetune, tokenize, generate, chat, eval, export, demo, profile.

Bad input (engine.errors.InputError) is printed as one line and exits 2; any other exception
is a bug and keeps its traceback.
"""
import argparse
import json
import os
import signal
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from engine.config import DEMO_PRESETS, PRESETS, TrainConfig
from engine.errors import InputError, Interrupted

# The presets by family, for --preset's help: "tiny, small, gpt2, ... (GPT-2); llama-tiny, ... (Llama family)"
PRESET_HELP = "; ".join(f"{', '.join(n for n, p in PRESETS.items() if p.get('arch', 'gpt2') == arch)} ({family})"
                        for arch, family in (("gpt2", "GPT-2"), ("llama", "Llama family: Llama, SmolLM2, Qwen3")))

TRAIN_HELP = {
    "max_steps": "optimizer steps to train for (the schedule's length)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step for the whole job, split over the torchrun processes; "
                  "0 = one per process, so the global batch is --batch-size x the number of processes",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine decay)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices and embeddings",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "eval_every": "steps between validation losses",
    "eval_batches": "batches per validation",
    "save_every": "steps between checkpoints (one is also written at the end and on Ctrl-C)",
    "seed": "seed of the data order and of the weights' initialisation",
    "deterministic": "triton backend: bitwise-repeatable attention gradients (a separate dQ pass); "
                     "--no-deterministic adds dQ with atomics instead (two fewer matmuls)",
}


TORCHRUN_GRACE_S = 30  # how long a non-zero rank waits for rank 0 to report the same bad input


def report_bad_input(line: str):
    """Print the one-line error before the caller exits 2. Under torchrun every process meets
    the same bad input and only rank 0 prints it. The others stay until torchrun stops them
    (which it does once rank 0 has exited) and then exit 2: had one exited first, torchrun would
    stop rank 0, perhaps before it had printed. A rank not stopped within TORCHRUN_GRACE_S met
    the error alone, and prints it itself."""
    from engine.distributed import torchrun_env

    rank, _, _ = torchrun_env()
    if rank != 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        time.sleep(TORCHRUN_GRACE_S)
        line = f"rank {rank}: {line}"
    print(line, file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse; under torchrun a bad command line is one line from rank 0 (report_bad_input)."""

    def error(self, message):
        from engine.distributed import torchrun_env  # here: importing the CLI (tokenize's workers do) needs no torch

        if torchrun_env()[1] == 1:
            super().error(message)  # usage, then the error; exits 2
        report_bad_input(f"{self.prog}: error: {message}")
        self.exit(2)


def add_train_flags(p, defaults: dict):
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default)
        if isinstance(f.default, bool):  # --flag / --no-flag
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default,
                           help=TRAIN_HELP[f.name] + f" (default {'on' if default else 'off'})")
            continue
        required = f.name == "max_steps" and default is f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.name != "max_steps" else int,
                       default=None if required else default, required=required,
                       help=TRAIN_HELP[f.name] + ("" if required else f" (default {default})"))


def add_data_flags(p, text_field: bool):
    if text_field:
        p.add_argument("--text-field", default="text", metavar="NAME", help="the .jsonl field / .parquet column that holds the text (default text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) lines that are not UTF-8, not JSON, or lack the "
                   "field or a well-formed conversation, instead of stopping at the first with its file and line")


def add_runtime_flags(p):
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "torch", "triton"],
                   help="ops implementation: auto = triton on CUDA, torch elsewhere (default auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto: cuda when available")


def add_model_source(p, flag="--ckpt"):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(flag, dest="ckpt", metavar="DIR", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    g.add_argument("--hf", metavar="PATH", help="a local Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (config.json + weights; "
                   "its tokenizer_config.json's chat template, if any, renders chats)")


def add_sampling_flags(p, max_new_tokens=256, top_p=1.0):
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus: smallest set with this much mass (default {top_p}; 1.0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: fresh each run)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default {max_new_tokens})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--compile", action="store_true", help="on a GPU: compile the prefill (torch.compile, once per "
                   "model) and decode from a CUDA graph (static-shape steps); on the CPU the same steps run eagerly")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llm-engine", description="Pretrain, fine-tune and run GPT-style language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a model from scratch on raw text", description="Train a tokenizer and a model (GPT-2 or Llama family, by --preset) from scratch on raw text.")
    p.add_argument("--data", required=True, metavar="PATH|builtin", help=
                   "text: a .txt, .jsonl or .parquet file, a folder of them or a glob (quoted); a folder `llm-engine tokenize` "
                   "wrote; or 'builtin' (the synthetic world). Files are tokenised on first use into $LLM_ENGINE_CACHE "
                   "(default ~/.cache/llm-engine) and reused from there")
    add_data_flags(p, text_field=True)
    p.add_argument("--preset", default="tiny", help=f"model shape: {PRESET_HELP} (default tiny)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, metrics.jsonl, token files")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    p.add_argument("--n-people", type=int, default=100, help="people in the built-in world (default 100)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP")
    add_train_flags(p, {})
    add_runtime_flags(p)

    p = sub.add_parser("finetune", help="fine-tune a pretrained model into an assistant", description="Fine-tune on conversations; the loss counts assistant tokens only.")
    add_model_source(p, flag="--init")
    p.add_argument("--data", required=True, metavar="PATH|builtin", help=
                   'conversations: .jsonl (or .parquet) of {"messages": [...]}, a file, a folder or a glob (quoted); a folder '
                   '`llm-engine tokenize --chat` wrote; or builtin (the world the --init model was pretrained on). Files are '
                   "rendered and tokenised on first use into $LLM_ENGINE_CACHE and reused from there")
    add_data_flags(p, text_field=False)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder for the fine-tuned checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP")
    add_train_flags(p, {"lr": 1e-4, "warmup_steps": 10})
    add_runtime_flags(p)

    p = sub.add_parser("tokenize", help="tokenise text or conversations into token shards", description=(
        "Tokenise .txt/.jsonl/.parquet files of any size into fixed-size token shards (uint16/uint32 ids; for "
        "conversations also the loss mask and the held-out split) in worker processes, each streaming its ~16 MB "
        "piece of the input: memory stays bounded. Writes DIR/index.json, DIR/tokenizer.json and DIR/shard-*.bin. "
        "Run again after an interruption: finished shards are kept. pretrain/finetune --data DIR read the result."))
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt, .jsonl or .parquet file, a folder of them, or a glob (quoted)")
    p.add_argument("--out", required=True, metavar="DIR", help="the shard folder to write (or to finish)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json, or a folder holding one (a checkpoint, a Hugging Face folder)")
    g.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this many tokens on a sample of --data "
                   "(32 MB spread over the files; kept as DIR/tokenizer.json and reused when run again)")
    p.add_argument("--chat", action="store_true", help='the files hold conversations ({"messages": [...]}), for finetune')
    p.add_argument("--workers", type=int, default=0, help="worker processes, one tokenizer thread each (default 0: one per CPU, "
                   "fewer when there is less than 4 MB of input per worker; 1: in this process)")
    p.add_argument("--shard-mb", type=int, default=16, help="input megabytes per shard (default 16, about 4M tokens of English)")
    add_data_flags(p, text_field=True)

    p = sub.add_parser("generate", help="continue a prompt", description="Stream a continuation of --prompt.")
    add_model_source(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="treat --prompt as a user message in the chat template")
    add_sampling_flags(p)
    add_runtime_flags(p)

    p = sub.add_parser("chat", help="talk to a fine-tuned model", description=(
        "Multi-turn chat. Reads one user message per line from stdin (a pipe works); /reset starts over, /quit ends. "
        "The defaults (temperature 0.8, top-p 0.95, at most 64 new tokens) give varied but sound replies: top-p 0.95 "
        "drops the improbable tail tokens where a small model's reply derails instead of ending its turn, and 64 "
        "tokens is four times the demo world's longest answer. --temperature 0 gives the single most likely reply "
        "(what `eval` scores)."))
    add_model_source(p)
    p.add_argument("--system", default=None, help="an optional system message")
    add_sampling_flags(p, max_new_tokens=64, top_p=0.95)
    add_runtime_flags(p)

    p = sub.add_parser("eval", help="validation loss and QA accuracy", description=(
        "Validation loss; on the built-in world also, for both halves of the people, the exact-match accuracy of "
        "greedy answers per question type and turn by turn over 200 fixed three-turn chats, and the share of "
        "replies sampled at temperature 0.8 / top-p 0.95 (3 seeds) that end their turn within 48 tokens."))
    add_model_source(p)
    p.add_argument("--data", default=None, metavar="PATH", help="loss on this text file/folder or conversations .jsonl instead of the run's own val data")
    add_runtime_flags(p)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (GPT-2, Llama, Qwen2, Qwen3)", description="Write config.json, model.safetensors and tokenizer.json that transformers.AutoModelForCausalLM.from_pretrained loads: a GPT2LMHeadModel, or for a Llama-family checkpoint (e.g. --preset llama-tiny) a LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True, metavar="HF_FOLDER", help="the folder to write (must not exist or be empty)")

    p = sub.add_parser("demo", help="pretrain -> fine-tune -> eval -> chat on the built-in world", description="The whole life of a small LLM on the built-in world, in a few minutes on a CPU.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the two runs go (default runs/demo)")
    p.add_argument("--pretrain-steps", type=int, default=600, help="(default 600)")
    p.add_argument("--finetune-steps", type=int, default=400, help="(default 400)")
    p.add_argument("--preset", default="tiny", choices=DEMO_PRESETS,
                   help="tiny: a GPT-2 (LayerNorm, learned positions, GELU); llama-tiny: the Llama family "
                        "(RMSNorm, rotary positions, SwiGLU, grouped-query attention). Default tiny, the one measured in the README")
    add_runtime_flags(p)

    p = sub.add_parser("profile", help="trace training or decode steps with torch.profiler", description="Run N training or decode steps under torch.profiler: writes OUT/trace.json (Chrome trace, opens in Perfetto) and prints the top-15 kernels; NVTX ranges per block and phase on CUDA (for Nsight Systems).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", metavar="DIR", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    g.add_argument("--hf", metavar="PATH", help="a local Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder")
    g.add_argument("--preset", help=f"a freshly initialised model of this shape: {PRESET_HELP}")
    p.add_argument("--mode", default="train", choices=["train", "decode"], help="training steps or decode steps (default train)")
    p.add_argument("--steps", type=int, default=5, help="training steps, or tokens to generate (default 5)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="training context, or prompt length when decoding (default: block size / 16)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for trace.json")
    add_runtime_flags(p)
    return parser


def train_config(args):
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def load_model(args):
    """--ckpt or --hf -> (model, tokenizer)."""
    from engine.checkpoint import load_source
    from engine.devices import pick_device

    model, tokenizer, _, _ = load_source(args.ckpt, args.hf, pick_device(args.device), args.backend)
    if tokenizer is None:
        raise InputError(f"--hf {args.hf}: no tokenizer.json in the folder; generation needs one")
    return model, tokenizer


def sampling_params(args, **extra):
    from engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), **extra)


def cmd_generate(args):
    from engine.generate import stream

    model, tokenizer = load_model(args)
    if args.chat:
        prompt = tokenizer.render_prompt([{"role": "user", "content": args.prompt}])
        params = sampling_params(args, stop_token_ids=tokenizer.stop_ids)
    else:
        prompt, params = args.prompt, sampling_params(args)
        print(args.prompt, end="", flush=True)
    for piece in stream(model, tokenizer, prompt, params, compile=args.compile):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args):
    from engine.generate import stream

    model, tokenizer = load_model(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tokenizer.render_prompt(history)
        room = model.config.block_size - len(prompt)
        if room < 1:
            print("[the conversation is longer than the model's context; /reset to start over]", flush=True)
            history.pop()
            continue
        params = sampling_params(args, stop_token_ids=tokenizer.stop_ids)
        params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in stream(model, tokenizer, prompt, params, compile=args.compile):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_eval(args):
    from engine.evaluate import evaluate

    print(json.dumps(evaluate(args.ckpt, device=args.device, backend=args.backend, hf=args.hf, data=args.data), indent=2))


def cmd_tokenize(args):
    from engine.files import read_tokenizer
    from engine.shards import tokenize, train_tokenizer
    from engine.tokenizer import Tokenizer

    if args.workers < 0 or args.shard_mb < 1:
        raise InputError(f"--workers must be >= 0 and --shard-mb >= 1, got {args.workers} and {args.shard_mb}")
    out = Path(args.out)
    if args.tokenizer:
        path = Path(args.tokenizer)
        tokenizer = read_tokenizer(path / "tokenizer.json" if path.is_dir() else path)
    elif (out / "tokenizer.json").is_file() and Tokenizer.load(out / "tokenizer.json").vocab_size == args.vocab_size:
        tokenizer = Tokenizer.load(out / "tokenizer.json")  # trained by an earlier, interrupted run
        print(f"using {out / 'tokenizer.json'} ({args.vocab_size} tokens), trained by an earlier run")
    else:
        print(f"training a {args.vocab_size}-token BPE tokenizer on a sample of {args.data}")
        tokenizer = train_tokenizer(args.data, args.vocab_size, args.chat, args.text_field, args.skip_bad_lines)
    shards = tokenize(args.data, out, tokenizer, args.chat, args.text_field, args.skip_bad_lines, args.workers,
                      args.shard_mb * 2**20)
    index = shards.index
    skipped = f", skipped {index['skipped_lines']} bad lines" if index["skipped_lines"] else ""
    print(f"{out}: {index['tokens']:,} tokens, {index['documents']:,} {'conversations' if shards.chat else 'documents'} "
          f"in {len(shards)} shard{'s' * (len(shards) != 1)}{skipped}")


def cmd_profile(args):
    from engine.profile import profile

    if args.preset:
        from engine.config import GPTConfig
        from engine.model import GPT
        from engine.devices import pick_device

        model = GPT(GPTConfig.from_preset(args.preset), backend=args.backend).to(pick_device(args.device))
    else:
        model, _ = load_model(args)
    profile(model, args.mode, args.steps, args.out, args.batch_size, args.seq_len)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            from engine.jobs import pretrain

            pretrain(args.data, args.out, args.preset, train_config(args), args.backend, args.device, args.resume,
                     args.vocab_size, args.n_people, args.block_size, fsdp=args.fsdp, text_field=args.text_field,
                     skip_bad_lines=args.skip_bad_lines)
        elif args.command == "finetune":
            from engine.jobs import finetune

            finetune(args.ckpt, args.data, args.out, train_config(args), args.backend, args.device, args.resume, hf=args.hf,
                     fsdp=args.fsdp, skip_bad_lines=args.skip_bad_lines)
        elif args.command == "tokenize":
            cmd_tokenize(args)
        elif args.command == "generate":
            cmd_generate(args)
        elif args.command == "chat":
            cmd_chat(args)
        elif args.command == "eval":
            cmd_eval(args)
        elif args.command == "export":
            from engine.checkpoint import load_checkpoint
            from engine.hf import export

            model, tokenizer, _, _ = load_checkpoint(args.ckpt)
            print(f"wrote {export(model, tokenizer, args.out)}")
        elif args.command == "demo":
            from engine.demo import run_demo

            run_demo(args.out, args.pretrain_steps, args.finetune_steps, args.backend, args.device, preset=args.preset)
        elif args.command == "profile":
            cmd_profile(args)
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except InputError as err:
        report_bad_input(f"llm-engine {args.command}: error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
