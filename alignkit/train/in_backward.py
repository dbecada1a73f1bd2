"""The optimizer step inside the backward pass (``optimizer_in_backward=true``).

Each trainable parameter gets a post-accumulate-grad hook (torch's ``register_post_accumulate_grad_hook``
pattern): as soon as autograd has written the parameter's whole gradient for the backward pass, the hook takes
torch's own AdamW step for that one parameter and frees the gradient. The gradients of the whole model never
exist at once: at most the few a backward node produces together do, instead of 4 bytes per parameter (0.5 GB on
SmolLM2-135M) held from the end of backward to the step.

The update is the plain step's: the loop's AdamW holds one parameter group per parameter, and the hook steps
the group of the parameter it was called for (the fused kernel computes each tensor on its own, so the grouping
changes no number). Its state, learning rates and checkpoints are that one optimizer's, so the LR scheduler and
``checkpoint.save``/``load`` work on it unchanged.

What it changes:
- only the last micro-batch of a step is *armed*: earlier ones accumulate their gradients as usual, and the last
  one's backward steps each parameter once its sum is complete (the same update; the memory saving is then only
  that of the last backward). :meth:`finish` steps any parameter the last backward did not reach;
- no clipping by the global gradient norm, which is only known once every gradient exists (the config refuses
  ``max_grad_norm > 0``); the norm is still measured, from each gradient before its step;
- a non-finite gradient cannot be caught before the other parameters have moved: the fused kernel skips the
  update of each parameter whose own gradient is not finite (its ``found_inf``, without a device sync), the
  others are updated, and the loop counts the step as bad. A non-finite *loss* is caught before its backward,
  which then never runs, so such a step makes no update at all.

On the CPU (Linux, glibc) it also pins glibc's mmap threshold at its initial 128 KiB (:func:`pin_mmap_threshold`).
glibc raises the threshold to the size of each mmapped block freed, up to 32 MiB, so after the first gradients are
freed the later tensors up to that size come from the heap, which freed memory does not leave: on SmolLM2-135M's
SFT step (bf16, checkpointing) that kept the peak RSS at 3.0 GB, the plain step's, instead of 2.3 GB.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from alignkit.errors import ConfigError


def per_parameter_groups(params: list[torch.Tensor]) -> list[dict]:
    """One AdamW parameter group per parameter, so that one of them can be stepped alone."""
    return [{"params": [p]} for p in params]


class OptimizerInBackward:
    """Steps ``optimizer`` (torch's AdamW over :func:`per_parameter_groups`) one parameter at a time from each
    parameter's post-accumulate-grad hook while :attr:`armed`; :meth:`finish` ends the step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.armed = False
        self._group_of: dict[torch.Tensor, int] = {}
        for i, group in enumerate(optimizer.param_groups):
            if len(group["params"]) != 1:
                raise ValueError("optimizer_in_backward needs one parameter group per parameter")
            self._group_of[group["params"][0]] = i
        self._fused = all(g.get("fused") for g in optimizer.param_groups)
        self._sq: torch.Tensor | None = None  # the step's summed squared gradients, on the parameters' device
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]
        if any(p.device.type == "cpu" for p in self._group_of):
            pin_mmap_threshold()

    def _hook(self, p: torch.Tensor) -> None:
        if self.armed:
            self._step(p)

    def _step(self, p: torch.Tensor) -> None:
        # the norm in one fused pass: squaring into a temporary first cost as much as the AdamW step itself
        sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()
        self._sq = sq if self._sq is None else self._sq + sq.to(self._sq.device)
        opt = self.optimizer
        groups = opt.param_groups
        opt.param_groups = [groups[self._group_of[p]]]
        if self._fused:  # the kernel leaves the parameter and its moments alone when its gradient is not finite
            opt.found_inf = (~torch.isfinite(sq)).float()
        try:
            if self._fused or bool(torch.isfinite(sq)):
                opt.step()
        finally:
            opt.param_groups = groups
            opt.found_inf = None
        p.grad = None

    def finish(self) -> float:
        """End the step: step every parameter still holding a gradient (one the armed backward did not reach),
        disarm, and return the global gradient norm measured before the updates (NaN or inf if any was not)."""
        for p in self._group_of:
            if p.grad is not None:
                self._step(p)
        self.armed = False
        sq, self._sq = self._sq, None
        return float(sq.sqrt()) if sq is not None else 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned to the system when freed, and stop
    glibc from raising that threshold (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` would); for the
    whole process. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def check_supported(cfg, world: int) -> None:
    """Refuse what :class:`OptimizerInBackward` cannot do (what :meth:`TrainConfig.validate` cannot see)."""
    if world > 1:
        raise ConfigError(f"optimizer_in_backward=true runs in one process (this run has {world}): each "
                          "parameter would have to be all-reduced inside the backward pass; leave it off with torchrun "
                          "or learners")
