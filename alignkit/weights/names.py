"""How the weight sync names tensors, on both ends (torch only, so a receiving process imports no model code).

A state dict lists a tied tensor under each of its names; the sync sends it once, under the first, and calls the
others aliases. LoRA adapters are named as peft saves them: the adapter's name dropped from the path.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def tensor_table(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s state-dict tensors (parameters and persistent buffers, the live objects) under their first
    name, in state-dict order, and its tied aliases (alias -> first name)."""
    table: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
            table[name] = t
    return table, tied


def fresh_names(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The names (tied aliases dropped) and aliases of a fresh transformers model of ``model``'s class and config:
    no peft or FSDP2 wrapper shows in them. Built on the meta device, so nothing is allocated. Any other module
    is named by its own state dict."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "post_init"):
        with torch.device("meta"):
            model = type(model)(copy.deepcopy(config))
    table, tied = tensor_table(model)
    return list(table), tied


def adapter_paths(model: nn.Module) -> dict[str, str]:
    """peft's saved name (``get_peft_model_state_dict``) of each LoRA tensor of ``model``'s active adapter ->
    its attribute path in ``model``, in parameter order."""
    if not hasattr(model, "peft_config"):
        raise ValueError("LoRA adapters were asked of a model without adapters (not a peft model)")
    active = list(model.active_adapters) if hasattr(model, "active_adapters") else [model.active_adapter]
    if len(active) != 1:
        raise NotImplementedError(f"the adapter sync sends one adapter; {len(active)} are active: {active}")
    adapter = active[0]
    if getattr(model.peft_config[adapter], "modules_to_save", None):
        raise NotImplementedError("the adapter sync sends LoRA tensors only; this adapter also trains whole "
                                  "modules (modules_to_save): send merged weights instead")
    paths = {}
    for path, _ in model.named_parameters():
        if "lora_" in path and (f".{adapter}." in path or path.endswith(f".{adapter}")):
            paths[path.replace(f".{adapter}", "")] = path  # peft's rule for the names it saves
    if not paths:
        raise ValueError(f"adapter {adapter!r} has no LoRA tensors")
    return paths
