"""torch.distributed glue: one process works unchanged; under torchrun every rank joins a process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend())


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where there is CUDA (so device=cpu works on a GPU machine)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_single() -> None:
    """A process group of this one process (for code that needs one, e.g. FSDP2, when not run by torchrun)."""
    if not dist.is_initialized():
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity in one process."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place; the identity in one process."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def finish() -> None:
    """Wait for every rank (e.g. rank 0 writing the final model), then leave the process group cleanly."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
