"""Drawing one set of samples across processes (torchrun, accelerate launch): each process draws its shard of the
items (whole batches) and every process gets them all back, so rank 0 alone writes and measures.

Item i is drawn from its own seed in the same batch whatever the process, so n items over N processes equal, bit
for bit, n items in one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


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


def shard(n: int, rank: int, world: int, batch: int = 1) -> range:
    """Process `rank`'s items of `n`, in whole batches of `batch` (the last may be shorter): the contiguous batches
    [ceil(B * rank / world), ceil(B * (rank + 1) / world)) of the B batches, so rank 0 always has the first. Every
    batch is then the batch one process would draw, so the split changes no bit of any item (kernels may round
    differently at another batch size). A process may get no items when there are fewer batches than processes."""
    batches = -(-n // batch)
    first, last = -(-batches * rank // world), -(-batches * (rank + 1) // world)
    return range(min(first * batch, n), min(last * batch, n))


def gather_shards(x: Tensor | None, n: int, batch: int = 1) -> Tensor:
    """Every process's shard `x` of `n` items (`shard(n, rank, world, batch)`; None for an empty one), concatenated
    in rank order on every process. Shards are padded to the largest one, so all_gather moves tensors of one fixed
    size; the item shape and dtype come from rank 0, which always holds the first batch."""
    rank, world = process_group()
    if world == 1 and x is not None:
        return x
    sizes = [len(shard(n, r, world, batch)) for r in range(world)]
    meta: list[Any] = [None] * world
    dist.all_gather_object(meta, (tuple(x.shape[1:]), x.dtype) if x is not None else None)
    item_shape, dtype = meta[0]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(sizes), *item_shape), dtype=dtype, device=device)
    if x is not None:
        padded[: len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:size].cpu() for p, size in zip(parts, sizes)])
