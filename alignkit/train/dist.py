"""torch.distributed glue: one process works unchanged; under torchrun every rank joins a process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity in one process."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def finish() -> None:
    """Wait for every rank (e.g. rank 0 writing the final model), then leave the process group cleanly."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
