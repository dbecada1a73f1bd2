"""Where a model computes, and moving a batch there.

The collate functions build every batch on the CPU, and per-row values kept between steps (cached reference
log-probs, labels, margins) live on the CPU too. A task's forward moves what it feeds the model to
:func:`model_device` with :func:`to_device`, and brings back to the CPU whatever it keeps on rows. The device is
always read from the model, never assumed, so the same code runs on the CPU, CUDA or MPS.

``model_device`` is the device the model *computes* on. That is the device of its parameters, except under
FSDP2 with CPU offload, where the shards rest on the CPU between uses and are moved to the accelerator for each
forward: :func:`alignkit.train.strategy.shard` records the compute device with :func:`remember` for every module
of a sharded model (so the policy inside an actor-critic, or the base model under a peft wrapper, answer too).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_COMPUTE: "weakref.WeakKeyDictionary[nn.Module, torch.device]" = weakref.WeakKeyDictionary()


def remember(model: nn.Module, device: torch.device) -> None:
    """Record that ``model`` and every module inside it compute on ``device`` (whatever their parameters say)."""
    for m in model.modules():
        _COMPUTE[m] = torch.device(device)


def model_device(model) -> torch.device:
    """The device ``model`` computes on: as recorded by :func:`remember`, else that of its first parameter (the
    local shard's device for a DTensor), else of its first buffer, else the CPU."""
    if isinstance(model, nn.Module):
        dev = _COMPUTE.get(model)
        if dev is not None:
            return dev
    for t in model.parameters():
        return _local(t).device
    for t in model.buffers():
        return _local(t).device
    return torch.device("cpu")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def to_device(batch, device):
    """``batch`` with every tensor in it moved to ``device`` (dicts, lists and tuples are rebuilt; anything else,
    such as a count, is kept as it is). Tensors already there are not copied."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def on_model(batch, model):
    """``to_device(batch, model_device(model))``: what a task's forward does with a collated batch."""
    return to_device(batch, model_device(model))
