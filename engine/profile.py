"""`llm-engine profile`: a few training or decode steps under torch.profiler.

    llm-engine profile --preset gpt2 --mode train --steps 5 --out prof/
    nsys profile -t cuda,nvtx llm-engine profile --ckpt runs/x --mode decode --steps 32 --out prof/

Writes <out>/trace.json (a Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing)
and prints the 15 kernels (on the CPU: ops) that took the most time. Each step is cut into
phases, recorded with torch.profiler.record_function so they show up in the trace on any device:
training steps into "forward", "backward", "optimizer"; decode into "prefill", then per step
"forward" and "sampling". On CUDA the same phases and every transformer block ("block.<i>")
are also NVTX ranges, so an Nsight Systems timeline reads the same way. One untraced step runs
first, so compilation, autotuning and allocator warm-up stay out of the trace. On the CPU a
decode step's "forward" is one C++ call (engine/cpu_decode.py), opaque to torch.profiler: use
--backend reference to see that step's ops one by one.
"""
import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from engine.devices import autocast_for
from engine.errors import InputError
from engine.generate import decode_steps
from engine.model import GPT
from engine.sampling import SamplingParams
from engine.train import TrainConfig, make_optimizer


@contextlib.contextmanager
def phase(name: str, nvtx: bool):
    """A named range in the profiler trace, and in Nsight Systems' NVTX row on CUDA."""
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def add_block_ranges(model: GPT) -> list:
    """NVTX range "block.<i>" around every transformer block's forward (CUDA only); returns the
    hook handles. Backward kernels show up under autograd's own ranges."""
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: torch.cuda.nvtx.range_push(f"block.{i}")))
        handles.append(block.register_forward_hook(lambda m, a, o: torch.cuda.nvtx.range_pop()))
    return handles


def train_steps(model: GPT, batch_size: int, seq_len: int, nvtx: bool):
    """A function running one training step per call on fixed random tokens."""
    device = next(model.parameters()).device
    model.train()
    optimizer = make_optimizer(model, TrainConfig(max_steps=1))
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1)).to(device)
    autocast = autocast_for(device)

    def step():
        with phase("forward", nvtx), autocast:
            _, loss = model(x[:, :-1], x[:, 1:])
        with phase("backward", nvtx):
            loss.backward()
        with phase("optimizer", nvtx):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def decode_run(model: GPT, batch_size: int, prompt_len: int, new_tokens: int, nvtx: bool):
    """A function generating new_tokens tokens per call with engine.generate.decode_steps, its
    phases ("prefill", then per step "sampling" and "forward") named in the trace."""
    cfg = model.config
    if prompt_len + new_tokens > cfg.block_size:
        raise InputError(f"--seq-len ({prompt_len}) + --steps ({new_tokens}) exceeds the model's context of {cfg.block_size} tokens")
    prompts = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len)).tolist()
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=b, max_new_tokens=new_tokens) for b in range(batch_size)]

    def run():
        for _ in decode_steps(model, prompts, params, phase=lambda name: phase(name, nvtx)):
            pass
    return run


def top_table(prof, cuda: bool, n: int = 15) -> str:
    """The n kernels (CUDA) or ops (CPU, self time) with the most total time, as a text table."""
    rows = []
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):  # our phases, autograd's and the optimizer's ranges
            continue
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total  # renamed in torch 2.4
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    what = "kernel" if cuda else "op (self CPU time)"
    lines = [f"{'ms':>10} {'%':>6} {'calls':>7}  {what}"]
    for us, count, key in rows[:n]:
        lines.append(f"{us / 1e3:10.3f} {100 * us / total:6.1f} {count:7d}  {key[:100]}")
    return "\n".join(lines)


def profile(model: GPT, mode: str, steps: int, out, batch_size: int = 4, seq_len: int | None = None) -> Path:
    """Trace `steps` training steps or `steps` decode steps (one generation) of model; write
    out/trace.json and print the top-15 table. Returns the trace's path."""
    if mode not in ("train", "decode"):
        raise InputError(f"--mode must be train or decode, got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise InputError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if mode == "train":
        seq_len = seq_len or model.config.block_size
        if seq_len > model.config.block_size:
            raise InputError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
        run, repeat = train_steps(model, batch_size, seq_len, cuda), steps
    else:
        run, repeat = decode_run(model, batch_size, seq_len or 16, steps, cuda), 1
    handles = add_block_ranges(model) if cuda else []
    try:
        run()  # warm-up, untraced
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(repeat):
                with record_function(f"step.{i}"):
                    run()
                if cuda:
                    torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    print(top_table(prof, cuda))
    print(f"wrote {trace} (open it in https://ui.perfetto.dev)")
    return trace
