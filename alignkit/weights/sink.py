"""The engine's end of the weight sync: write received tensors into a model by name, and remember their version.

:func:`apply_weights` writes every received ``(name, tensor)`` into the target module's tensor of that name
with ``copy_`` under ``no_grad``, and fails loudly (:class:`WeightSyncError`) on a name the target does not
have, a name received twice, a shape that differs, or a dtype that differs other than between two floating
types, then (after the last tensor) on any of the target's tensors that was not written. Floating tensors are
cast to the target's dtype by ``copy_`` (an fp32 trainer feeding a bf16 engine copy), so bit-equality holds
only where the dtypes agree.

The target's names are those of its own state dict, tied aliases dropped (:func:`alignkit.weights.names.
tensor_table`): a plain transformers model takes a merged or plain sync; a peft model takes an adapter sync
(its LoRA tensors under peft's saved names). A target that ties weights the source does not (or the reverse)
fails by name instead of keeping one of them stale.

:class:`WeightSink` holds an engine's model and the version of the weights it holds; :meth:`WeightSink.require`
is the check an engine makes before generating for a caller that expects a version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from alignkit.weights.names import adapter_paths, tensor_table


class WeightSyncError(RuntimeError):
    """A sync did not match its target: a tensor missing, unexpected, repeated, or of another shape or dtype."""


class WeightVersionError(RuntimeError):
    """An engine was asked for weights of one version while it holds another (or none complete)."""


@dataclass
class ApplyReport:
    tensors: int  # how many tensors were written
    bytes: int  # how many bytes, in the target's dtypes
    seconds: float
    version: int | None = None


def target_table(target: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a sync writes in ``target``, by the names a sync sends (module docstring)."""
    from alignkit.train import strategy

    if strategy.is_sharded(target):
        raise NotImplementedError("a sync writes into an unsharded engine model, not an FSDP2-sharded one")
    if hasattr(target, "peft_config"):
        return {name: target.get_parameter(path) for name, path in adapter_paths(target).items()}
    return tensor_table(target)[0]


def apply_weights(target: nn.Module, pairs: Iterable[tuple[str, torch.Tensor]]) -> ApplyReport:
    """Write ``pairs`` into ``target`` by name (module docstring); the report counts what was written. On an
    error the target is left partly written: its holder must not use it (:class:`WeightSink` forgets its
    version)."""
    began = time.perf_counter()
    table = target_table(target)
    _, aliases = tensor_table(target)
    written: set[str] = set()
    nbytes = 0
    with torch.no_grad():
        for name, tensor in pairs:
            dst = table.get(name)
            if dst is None:
                why = f" (the target ties it to {aliases[name]!r})" if name in aliases else ""
                raise WeightSyncError(f"unexpected tensor {name!r}: the target has no such tensor{why}")
            if name in written:
                raise WeightSyncError(f"tensor {name!r} received twice")
            if tuple(tensor.shape) != tuple(dst.shape):
                raise WeightSyncError(f"tensor {name!r}: shape {tuple(tensor.shape)} received, the target's is "
                                      f"{tuple(dst.shape)}")
            if tensor.dtype != dst.dtype and not (tensor.is_floating_point() and dst.is_floating_point()):
                raise WeightSyncError(f"tensor {name!r}: dtype {tensor.dtype} received, the target's is {dst.dtype}")
            dst.copy_(tensor)
            written.add(name)
            nbytes += dst.numel() * dst.element_size()
    missing = [name for name in table if name not in written]
    if missing:
        raise WeightSyncError(f"{len(missing)} of the target's {len(table)} tensors were not received, e.g. "
                              f"{missing[:5]}: the target holds a mix of old and new weights")
    return ApplyReport(len(written), nbytes, time.perf_counter() - began)


class WeightSink:
    """An engine's model and the weight version it holds.

    :meth:`load` applies a sync (``(version, pairs)``, what a receiver's ``receive()`` returns) and records the
    version only once every tensor is written; :meth:`receive` does both from ``receiver``. ``after`` runs after
    each complete load (refresh what the engine derives from its weights: a cast copy, prepacked layers).
    """

    def __init__(self, target: nn.Module, receiver=None, *, after: Callable[[nn.Module], None] | None = None):
        self.target, self.receiver, self.after = target, receiver, after
        self.version: int | None = None  # None: no complete sync yet, or the last one failed

    def receive(self) -> ApplyReport:
        if self.receiver is None:
            raise ValueError("this sink has no receiver: call load(version, pairs)")
        version, pairs = self.receiver.receive()
        return self.load(version, pairs)

    def load(self, version: int, pairs: Iterable[tuple[str, torch.Tensor]]) -> ApplyReport:
        self.version = None
        try:
            report = apply_weights(self.target, pairs)
        finally:
            close = getattr(pairs, "close", None)
            if close is not None:  # a transport's stream: tell the sender if it ended early
                close()
        if self.after is not None:
            self.after(self.target)
        self.version = report.version = int(version)
        return report

    def require(self, version: int) -> None:
        """Raise :class:`WeightVersionError` unless the sink holds weights of ``version``, complete."""
        if self.version is None:
            raise WeightVersionError(f"generation asked for weights version {version}, but the engine holds no "
                                     "complete weights (no sync yet, or the last one failed)")
        if int(version) != self.version:
            raise WeightVersionError(f"generation asked for weights version {version}, but the engine holds "
                                     f"version {self.version}: a weight sync was missed or is late")
