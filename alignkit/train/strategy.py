"""How a model is laid out over the processes of a run: ``strategy=ddp`` (every process holds all the weights and
the gradients are summed) or ``strategy=fsdp2`` (PyTorch's ``fully_shard``: each process holds 1/N of the
weights, gradients and optimizer state, and gathers a layer's weights only while it computes with them).

The loop's semantics are the same under both: each micro-batch's summed loss is divided by the whole step's
normaliser (counted over all micro-batches and processes), so the gradients of the processes are **summed**,
never averaged. FSDP2 averages by default; :func:`shard` sets every FSDP unit to sum (the setters act per unit:
set on the root alone, the layers' gradients would come out 1/N).

FSDP2 layout: every decoder layer (the classes a transformers model lists in ``_no_split_modules``) is a unit,
and a :class:`Root` around the whole model is the last one, holding what is left (embeddings, final norm, head,
value head). alignkit calls into a model through several entry points (the trunk, then the head in chunks), so
the root's forward is a trampoline, ``root(fn, *args)`` runs ``fn(*args)``: :func:`call` is how the loop and the
rollout source run a task's forward under FSDP2's hooks, and it is a plain call for a model that is not sharded.
Algorithm code never sees any of this.

A sharded forward is a collective (each unit's weights are all-gathered), so every process must make the same
sequence of calls; the loop evens out micro-batch counts with :func:`filler_loss` calls where processes hold
different numbers of rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from alignkit.errors import ConfigError
from alignkit.models.device import remember
from alignkit.train import dist

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2")


class Root(nn.Module):
    """The outermost FSDP2 unit around ``module``; its forward runs any function (module docstring)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.active = False

    def forward(self, fn: Callable, *args, **kwargs):
        self.active = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.active = False


_ROOTS: "weakref.WeakKeyDictionary[nn.Module, Root]" = weakref.WeakKeyDictionary()


def root_of(model) -> Root | None:
    """The FSDP2 :class:`Root` around ``model``, or None when ``model`` is not sharded."""
    return _ROOTS.get(model)


def is_sharded(model) -> bool:
    """Whether ``model`` is sharded with FSDP2, or is part of a sharded model (the policy of an actor-critic)."""
    return _find_root(model) is not None


def call(model, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, under the FSDP2 root's hooks when ``model`` is sharded (module docstring)."""
    root = _ROOTS.get(model)
    if root is None or root.active:  # inside the root's own call (e.g. LoRA's reference pass), weights are gathered
        return fn(*args, **kwargs)
    return root(fn, *args, **kwargs)


def device(name: str = "auto") -> torch.device:
    """The device of this process: ``auto`` takes CUDA (the local rank's card) when there is one, then MPS,
    then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps, but torch.backends.mps.is_available() is False")
    return torch.device(name)


@dataclass
class MicroBatch:
    rows: list
    filler: bool = False  # a weightless pass made only so that every process joins the same collectives


class Layout:
    """What the loop asks of the strategy: the device, autocast, even micro-batch counts, gradient sync."""

    def __init__(self, name: str, dev: torch.device, precision: str, mixed_precision: bool,
                 keep_casts: bool = True):
        self.name, self.device, self.precision, self.mixed_precision = name, dev, precision, mixed_precision
        self.keep_casts = keep_casts

    @property
    def sharded(self) -> bool:
        return self.name == "fsdp2"

    def autocast(self):
        """bf16 autocast for ``precision=bf16``, unless FSDP2 already computes in bf16 (its mixed precision).

        Without :attr:`keep_casts` autocast does not cache the bf16 copies of the weights. The cache keeps every
        weight's copy until the forward ends, which saves a second cast of a weight used twice; under gradient
        checkpointing the copies are not saved for the backward (it recasts them), so the cache would only hold a
        bf16 copy of the whole model at the end of the forward (257 MiB on SmolLM2-135M).
        """
        if self.precision == "bf16" and not self.mixed_precision:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=self.keep_casts)
        return contextlib.nullcontext()

    def even_out(self, batches: list[list], spare: list):
        """The micro-batches of this process, followed under FSDP2 by filler passes (over ``spare``) up to the
        largest count of any process: a sharded forward and backward are collectives."""
        most = len(batches)
        if self.sharded and dist.world() > 1:  # agreed before any pass: the passes themselves are collectives
            most = int(dist.all_reduce_max(torch.tensor([len(batches)], dtype=torch.int64)).item())
        if most > len(batches) and not spare:
            raise RuntimeError("a process holds no row to join the others' micro-batches with")
        for mb in batches:
            yield MicroBatch(mb)
        for _ in range(most - len(batches)):
            yield MicroBatch(spare[:1], filler=True)

    def sync_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the processes' gradients (ddp); FSDP2 has already reduce-scattered them in backward."""
        if self.sharded or dist.world() == 1:
            return
        for p in params:
            if p.grad is None:  # this process had no rows (e.g. dynamic sampling kept none): add zeros
                p.grad = torch.zeros_like(p)
            dist.all_reduce_sum(p.grad)


def prepare(model: nn.Module, cfg) -> Layout:
    """Put ``model`` on this process's device and lay it out as ``cfg.strategy`` says (in place); the
    :class:`Layout` answers the loop's questions. Calling it again on a prepared model changes nothing."""
    name = getattr(cfg, "strategy", "ddp")
    dev = place(model, getattr(cfg, "device", "auto"))
    mixed = name == "fsdp2" and cfg.precision == "bf16" and dev.type == "cuda"
    if name == "fsdp2":
        shard(model, mixed_precision=mixed, cpu_offload=getattr(cfg, "cpu_offload", False))
    return Layout(name, dev, cfg.precision, mixed, keep_casts=not getattr(cfg, "gradient_checkpointing", False))


def place(model: nn.Module, name: str = "auto") -> torch.device:
    """Move an unsharded ``model`` to this process's device (:func:`device`) and return the device. Every part is
    moved, not only when the first parameter is elsewhere: a model assembled from placed and new parts (the RL
    policy, placed before its rollout engine is built, inside a new actor-critic) must not leave a part behind."""
    dev = device(name)
    if model not in _ROOTS:
        model.to(dev)  # tensors already there are not copied
    return dev


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own: the decoder layers (``_no_split_modules`` classes) of
    every transformers model inside ``model`` (a policy, a critic backbone, a reward backbone)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, *, mixed_precision: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all processes and return it (see the module docstring).

    ``mixed_precision``: bf16 parameters in forward and backward, fp32 gradient reduction (FSDP2's
    ``MixedPrecisionPolicy``). ``cpu_offload``: parameters, gradients and optimizer state live on the CPU between
    uses (``CPUOffloadPolicy``; the optimizer step runs there).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    if model in _ROOTS:
        return model
    units = shard_units(model)
    if not units:
        raise ConfigError(f"strategy=fsdp2: {type(model).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by; use strategy=ddp for this model")
    if not torch.distributed.is_initialized():
        dist.init_single()  # FSDP2 at world size 1, without torchrun
    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (dist.world(),))  # the mesh's device type, never guessed (pytorch #132471)
    kw: dict = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in units:
        fully_shard(unit, **kw)
    root = Root(model)
    fully_shard(root, **kw)
    for m in root.modules():  # per unit: set on the root alone, the layers would still average
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(1.0)
    _ROOTS[model] = root
    remember(root, dev)  # the compute device, which CPU offload hides from the parameters (models/device.py)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Within this context every parameter of a sharded ``model`` holds its whole value as a plain tensor (each
    FSDP unit all-gathered, then sharded again on exit): for code that reads the weights outside a forward pass,
    such as the rollout engine's weight refresh. A collective; nothing happens for a model that is not sharded."""
    root = _find_root(model)
    if root is None:
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict on the CPU, gathered from the shards (a collective: every process calls it;
    the main process gets the tensors, the others an empty dict). Unsharded models give their own."""
    root = _find_root(model)
    if root is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = _prefix(root, model)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unsharded(model: nn.Module):
    """``model`` itself when it is not sharded; else (a collective) a plain copy with the whole weights on the
    main process's CPU (built on the meta device, so nothing is initialised twice) and None on the others.
    peft models keep their adapters (so they can be merged or saved as an adapter)."""
    if _find_root(model) is None:
        return model
    import copy

    sd = full_state_dict(model)
    if dist.rank() != 0:
        return None
    buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers()}
    with torch.device("meta"):
        if hasattr(model, "peft_config"):
            from peft import get_peft_model

            base = model.get_base_model()
            net = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(model.peft_config["default"]))
        else:
            net = type(model)(copy.deepcopy(model.config))
    net.load_state_dict({**sd, **{k: v for k, v in buffers.items() if k not in sd}}, strict=False, assign=True)
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state misses {missing[:3]}")
    for name, buf in buffers.items():  # non-persistent buffers (rotary frequencies) are in no state dict
        mod_path, _, attr = name.rpartition(".")
        net.get_submodule(mod_path)._buffers[attr] = buf
    if hasattr(net, "tie_weights"):
        net.tie_weights()
    if hasattr(model, "generation_config") and hasattr(net, "generation_config"):
        net.generation_config = copy.deepcopy(model.generation_config)
    return net.train(model.training)


def full_parameters(model: nn.Module):
    """``(name, tensor)`` for each parameter of ``model`` with its whole value (a shard's ``full_tensor()``: a
    collective, so every process iterates to the end)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        yield name, p.full_tensor() if isinstance(p, DTensor) else p


def unit_of(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The FSDP2 unit whose ``unshard()`` gathers ``module``'s own parameters: ``module`` itself or its nearest
    enclosing unit (a decoder layer, else the :class:`Root` around the sharded model that holds ``model``); None
    when ``model`` is not sharded. Unsharding one unit at a time is how a reader of the weights (the weight
    sync's source) keeps at most one layer whole."""
    from torch.distributed.fsdp import FSDPModule

    root = _find_root(model)
    if root is None:
        return None
    names = {m: name for name, m in root.named_modules()}
    if module not in names:
        raise ValueError(f"{type(module).__name__} is not inside the sharded model")
    parts = names[module].split(".") if names[module] else []
    for i in range(len(parts), -1, -1):  # the module itself, then its parents, up to the root
        unit = root.get_submodule(".".join(parts[:i]))
        if isinstance(unit, FSDPModule):
            return unit
    return root


def _find_root(model) -> Root | None:
    for inner, root in list(_ROOTS.items()):
        if inner is model or any(m is model for m in inner.modules()):
            return root
    return None


def _prefix(root: Root, model) -> str:
    for name, m in root.named_modules():
        if m is model:
            return name + "." if name else ""
    raise ValueError("model is not inside this root")
