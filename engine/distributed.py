"""Data-parallel training over torch.distributed: DDP by default, FSDP2 with --fsdp.

torchrun (`python -m torch.distributed.run`) starts one process per device and tells each its
RANK, WORLD_SIZE and LOCAL_RANK; without it (or with one process) everything here is a no-op
and the loop runs exactly as a single process.

What stays the same whatever the world size:
- the global batch: a step is cfg.grad_accum micro-batches with global indices
  0..grad_accum-1, and a micro-batch is a pure function of (seed, step, index) (engine/data.py);
  rank r takes indices r, r + W, r + 2W, ... so W ranks do grad_accum / W each (the default,
  grad_accum = 0, stands for W: one per rank, so that global batch does grow with W);
- the gradient: each rank scales its loss by 1 / (its micro-batches) and DDP / FSDP2 average
  over ranks, which is the single-process mean over all grad_accum micro-batches;
- checkpoints: rank 0 writes full, unsharded weights and the optimizer state in the
  single-process form (integer-keyed, full tensors), so N ranks resume on M.

A rank that dies: torchrun stops the others and names the failed rank; a peer stuck in a
collective gives up after LLM_ENGINE_DIST_TIMEOUT seconds (default 300, long enough for rank 0
to write a large checkpoint while the others wait). Checkpoints are written atomically
(engine/checkpoint.py), so the last complete one survives.
"""
import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.distributed.tensor import DTensor, distribute_tensor

from engine.checkpoint import retie
from engine.errors import InputError
from engine.model import GPT

TIMEOUT_ENV = "LLM_ENGINE_DIST_TIMEOUT"

# The blocks hand views (a sublayer's output, the branch not yet added to the stream) to the next block and never modify them
# in place, which is the case FSDP2's warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that prints, logs and writes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj):
        """Rank 0's obj on every rank (also a barrier: the others wait until rank 0 gets here)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a process it did not start."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device: torch.device, fsdp: bool = False):
    """-> (Dist, device). Under torchrun with more than one process: joins the job (NCCL on
    CUDA, gloo on the CPU) and puts this process on cuda:LOCAL_RANK; leaves it on success."""
    rank, world_size, local_rank = torchrun_env()
    if world_size == 1:
        yield Dist(fsdp=fsdp), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        yield Dist(rank, world_size, local_rank, fsdp), device
    except InputError:  # not a bug: rank 0 prints it as one line (engine/cli.py), no traceback
        raise
    except Exception as err:  # torchrun's failure summary then shows the error beside the rank
        ErrorHandler().record_exception(err)
        raise
    # Not on errors (a dead peer could make this hang). The barrier keeps every rank in the group
    # until rank 0 has written the last checkpoint: a peer that quits early can abort gloo.
    dist.barrier()
    dist.destroy_process_group()


def micro_batches(grad_accum: int, rank: int, world_size: int) -> range:
    """The global micro-batch indices of this rank's share of one optimizer step."""
    if grad_accum % world_size:
        raise InputError(f"--grad-accum {grad_accum} (micro-batches per step for the whole job) must be divisible "
                         f"by the world size {world_size}, or 0 for one per process")
    return range(rank, grad_accum, world_size)


def wrap(model: torch.nn.Module, ctx: Dist) -> torch.nn.Module:
    """DDP, or FSDP2 with one shard group per block plus the root (embeddings, the head, ln_f).
    Every rank must hold the same weights first (same seed or the same checkpoint)."""
    if not ctx.enabled:
        return model
    if not ctx.fsdp:
        device_ids = [ctx.local_rank] if next(model.parameters()).device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def local_module(model: torch.nn.Module) -> torch.nn.Module:
    """What to run without gradients: DDP's inner module (no collectives); FSDP2 stays itself
    (its forward gathers the weights, so every rank must call it)."""
    return getattr(model, "module", model)


def grad_sync(model: torch.nn.Module, last: bool):
    """Reduce gradients across ranks only on a step's last micro-batch (wrap forward and backward)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_tensor(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def owning_its_storage(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it when t is a view into a larger buffer. FSDP2 gathers a dimension that
    does not split evenly over the ranks (an odd vocabulary on 2) into a padded buffer and hands
    back a view of it; moving to the CPU copies only GPU tensors, so on the CPU the view stays.
    safetensors refuses to save such a view and torch.save would write the padding too."""
    covers_storage = t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    return t if covers_storage else t.clone()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Dist):
    """(plain model with the full weights, optimizer state in single-process form) on rank 0,
    (None, None) elsewhere. Every rank must call it: under FSDP2 it gathers the shards."""
    sharded = ctx.enabled and ctx.fsdp
    if not (sharded or ctx.is_main):
        return None, None
    state = optimizer.state_dict()  # integer-keyed in parameter order; DTensor shards under FSDP2
    state["state"] = {i: {k: owning_its_storage(full_tensor(v).cpu()) for k, v in s.items()} for i, s in state["state"].items()}
    if not sharded:
        return local_module(model), state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None, None
    with torch.device("meta"):
        plain = GPT(model.config, backend=model.backend)
    plain.load_state_dict({name: owning_its_storage(w) for name, w in weights.items()}, assign=True)
    retie(plain)  # assign=True loaded two copies of a tied table; an untied head stays its own
    return plain, state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """Load a single-process optimizer state; under FSDP2 each rank keeps its shard of every
    per-parameter tensor (all ranks read the same file, so any rank's copy is the source)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(value, p):
        if isinstance(p, DTensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    per_param = {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({**state, "state": per_param})
