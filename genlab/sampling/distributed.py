"""Drawing one set of samples across processes (torchrun, accelerate launch): each process draws its shard of the
items and every process gets them all back, so the split changes no item and rank 0 alone writes and measures.

Item i is drawn from its own seed whatever the process, so n items over N processes equal n items in one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from genlab.errors import GenlabError


def process_group() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group that torchrun or accelerate launch describe in the environment (WORLD_SIZE > 1,
    MASTER_ADDR, MASTER_PORT, RANK): nccl with one GPU per local rank, else gloo. Returns (rank, world size);
    (0, 1) in a single process."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return process_group()


def local_device(choice: str = "auto") -> str:
    """`auto`: this process's GPU (LOCAL_RANK under torchrun / accelerate launch) when there is one, else the CPU."""
    if choice != "auto":
        return choice
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def end() -> None:
    """Leave the process group (left to interpreter exit, gloo's threads can abort a process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> range:
    """Process `rank`'s items of `n`: the contiguous range [n * rank // world, n * (rank + 1) // world)."""
    if n < world:
        raise GenlabError(f"{n} items over {world} processes: draw at least one item per process")
    return range(n * rank // world, n * (rank + 1) // world)


def gather_shards(x: Tensor, n: int) -> Tensor:
    """Every process's shard `x` of `n` items ((len(shard), ...) tensors in rank order), concatenated on every
    process. Shards are padded to the largest one, so all_gather moves tensors of one fixed size."""
    rank, world = process_group()
    if world == 1:
        return x
    size = -(-n // world)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = x.new_zeros((size, *x.shape[1:]), device=device)
    padded[: len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: len(shard(n, r, world))].cpu() for r, p in enumerate(parts)])
