"""The trainer's end of the weight sync: its model's whole tensors, named as a fresh Hugging Face model names them.

:class:`ModuleSource` yields ``(name, tensor)`` in a fixed order, for a plain transformers model, a peft LoRA
model, and either of them sharded with FSDP2 (:func:`alignkit.train.strategy.shard`).

Names. With ``lora="merged"`` (and for a model without adapters) the names are the state-dict keys of a fresh
``AutoModelForCausalLM`` of the model's class and config (built on the meta device, so nothing is allocated),
in that state dict's order: no peft prefix (``base_model.model.``) or ``base_layer.``, no FSDP2 wrapper.
Persistent buffers are included, as in a state dict; non-persistent ones (rotary frequencies) are not.

Tied weights travel once. A state dict lists a tied tensor under every name (``model.embed_tokens.weight`` and
``lm_head.weight``); the source sends it under the first of them and lists the others in :attr:`ModuleSource.tied`
(alias -> name sent). A receiver whose model ties them writes both at once; one that keeps a separate copy
must write the alias from the tied name itself (:func:`alignkit.weights.sink.apply_weights` refuses a target
whose tying differs from the source's, naming the missing alias, rather than leaving a stale head).

LoRA. ``lora="merged"``: each adapted weight is ``W + sum over active adapters of scaling * B @ A``, computed
by :func:`alignkit.rl.rollout.merged_parameter` (the rollout engine's own merge) and cast to ``W``'s dtype (a
no-op in fp32), for an engine that cannot take adapters. ``lora="adapters"``: only the active adapter's
``lora_A``/``lora_B`` tensors, under the names peft saves them with (``get_peft_model_state_dict``: the
adapter name dropped), for an engine that loads adapters over a base it already holds.

FSDP2. A sharded parameter is a DTensor and gathering it (``full_tensor()``) is a collective, so the source must
be iterated to the end on **every** rank of the trainer, in the same order. Only the sending rank (``rank``,
default 0) yields the tensors; the others run the same gathers and yield nothing (:func:`alignkit.weights.push`
does both). A plain parameter is gathered alone, in the dtype of the master weights. A LoRA layer's merge
needs its base weight and adapters whole at once, so for it the source unshards the layer's FSDP unit (one
unit at a time, resharded when the next name lies in another unit) and merges the gathered tensors; under
FSDP2's bf16 mixed precision (CUDA) the unit gathers in bf16, so the merge is computed from bf16 weights and
then cast to the master dtype (not tested: the CPU runs have no mixed precision).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from alignkit.models.logprobs import unwrap
from alignkit.rl.rollout import merged_parameter
from alignkit.train import dist, strategy
from alignkit.weights.names import adapter_paths, fresh_names

LORA_MODES = ("merged", "adapters")


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver can allocate before any data arrives."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class ModuleSource:
    """The named whole tensors of ``model`` (module docstring): iterate it on every trainer rank.

    ``lora``: ``"merged"`` or ``"adapters"`` for a peft model (``"merged"`` is the model itself without adapters).
    ``rank``: the process that keeps the tensors (:attr:`keeps` is true there). :attr:`tied` maps each tied
    alias, which is not sent, to the name its tensor is sent under.
    """

    def __init__(self, model: nn.Module, lora: str = "merged", *, rank: int = 0):
        if lora not in LORA_MODES:
            raise ValueError(f"lora must be one of {LORA_MODES}, not {lora!r}")
        self.model, self.lora, self.rank = model, lora, rank
        self.base = unwrap(model)
        self.keeps = dist.rank() == rank
        self.sharded = strategy.is_sharded(model)
        self.tied: dict[str, str] = {}
        if lora == "adapters":  # name -> attribute path in the peft model
            self._paths = adapter_paths(model)
        else:  # the names are the paths in the unwrapped model
            names, self.tied = fresh_names(self.base)
            self._paths = {name: name for name in names}
        self._units = {}  # under FSDP2: the unit to unshard for each adapted weight's merge
        if self.sharded and lora == "merged":
            for name in self._paths:
                module, _ = self._owner(name)
                if hasattr(module, "get_base_layer"):
                    self._units[name] = strategy.unit_of(model, module)
        self._meta = {name: TensorMeta(name, tuple(t.shape), t.dtype) for name, t in
                      ((name, self._stored(name)) for name in self._paths)}

    def metadata(self) -> list[TensorMeta]:
        """Name, shape and dtype of every tensor, in iteration order, read without gathering anything."""
        return list(self._meta.values())

    def names(self) -> list[str]:
        return list(self._paths)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.keeps and not self.sharded:
            return  # nothing to gather, nothing to keep
        unit = None  # the FSDP unit held unsharded for the LoRA layers' merge
        try:
            with torch.no_grad():
                for name in self._paths:
                    module, attr = self._owner(name)
                    adapted = self.lora == "merged" and hasattr(module, "get_base_layer")
                    wanted = self._units.get(name) if adapted else None
                    if wanted is not unit:  # any other read sees the shards, never a unit's gathered copy
                        if unit is not None:
                            unit.reshard()
                        unit = wanted
                        if unit is not None:
                            unit.unshard()  # a collective: every rank reaches it in the same order
                    if adapted:
                        value = self._merged(name, module, attr) if self.keeps else None
                    else:
                        value = _whole(self._stored(name))  # a collective when sharded
                    if self.keeps:
                        yield name, value.detach()
        finally:
            if unit is not None:
                unit.reshard()

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        mod_path, _, attr = self._paths[name].rpartition(".")
        return (self.model if self.lora == "adapters" else self.base).get_submodule(mod_path), attr

    def _stored(self, name: str) -> torch.Tensor:
        """The tensor as the model stores it: a DTensor when sharded; an adapted layer's base weight."""
        module, attr = self._owner(name)
        if self.lora == "merged" and hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        return getattr(module, attr)

    def _merged(self, name: str, module: nn.Module, attr: str) -> torch.Tensor:
        """The merged weight (under FSDP2, computed inside its unsharded unit)."""
        value = merged_parameter(self.base, name)
        if self.sharded and value is getattr(module.get_base_layer(), attr):  # nothing merged: the unit's
            value = value.clone()  # gathered memory is freed at reshard
        return value.to(self._meta[name].dtype)


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
