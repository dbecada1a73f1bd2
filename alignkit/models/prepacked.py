"""Linear layers with weights prepacked for oneDNN, for bf16 decoding on CPU.

A decode step multiplies a few rows by every weight matrix, so it is bound by reading the weights. Given a plain
weight, torch's CPU ``F.linear`` reorders it into oneDNN's blocked layout on every call; prepacking does that once
(when the weights change) and the matmul then reads the packed copy. On SmolLM2-135M at batch 8 the trunk's
linears run 1.25-1.32x faster and the head 1.6x, with outputs equal to ``F.linear``'s bit for bit
(``bench/decode_parts.py``; the tests check the equality). Packing costs time when the weights change: refreshing
the rollout copy of SmolLM2-135M takes about 4x as long with it (124-217 ms against 32-44).

The two ops used (``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``) are the ones
``torch.compile`` uses for frozen CPU linears. They are private, so :func:`prepack_available` checks them once on
a small matrix against ``F.linear`` and everything falls back to plain layers when they are missing or disagree.

Under ``torch.compile`` the packed weight is an opaque oneDNN tensor that the compiler cannot trace (it has no
fake version), so a layer is called through the custom op ``alignkit::prepacked_linear``, which takes the input
and the layer's key in a registry of live layers and has a fake implementation giving the output's shape: the
compiled graph treats the matmul as one opaque call and fuses what lies between, and the op reads the layer's
current packed weight at run time, so a compiled graph follows :meth:`PrepackedLinear.load` without recompiling.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch import Tensor, nn

_LAYERS: weakref.WeakValueDictionary[int, PrepackedLinear] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("alignkit::prepacked_linear", mutates_args=())
def prepacked_linear(x: Tensor, key: int) -> Tensor:
    """``_LAYERS[key](x)``: a prepacked layer as an op ``torch.compile`` can place in a graph."""
    layer = _LAYERS[key]
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")


@prepacked_linear.register_fake
def _(x: Tensor, key: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[key].out_features))


class PrepackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose bf16 weight is kept packed for oneDNN; :meth:`load` sets the weight."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features, self.batch_hint = in_features, out_features, batch_hint
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.packed: Tensor | None = None
        self.key = next(_KEYS)  # this layer in the registry the compiled op reads
        _LAYERS[self.key] = self

    @torch.no_grad()
    def load(self, weight: Tensor) -> None:
        """Pack ``weight`` ``[out, in]`` (any float dtype; cast to bf16) as this layer's weight."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.in_features}->{self.out_features} layer")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(),
                                                              self.batch_hint)

    @property
    def weight(self) -> Tensor:
        """The weight in the plain ``[out, in]`` layout (a fresh copy; for inspection, not for the forward)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return prepacked_linear(x, self.key)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def prepack_available() -> bool:
    """Whether this torch build packs bf16 linears for oneDNN and gives ``F.linear``'s results bit for bit."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
        x = torch.randn(3, 5, 40, generator=g).to(torch.bfloat16)
        layer = PrepackedLinear(40, 24, b)
        layer.load(w)
        return torch.equal(layer(x), nn.functional.linear(x, w.to(torch.bfloat16), b.to(torch.bfloat16)))
    except (RuntimeError, AttributeError):
        return False


def prepack_linears(model: nn.Module, batch_hint: int = 8) -> dict[str, PrepackedLinear]:
    """Replace every ``nn.Linear`` of a bf16 CPU ``model`` by a :class:`PrepackedLinear` holding its weight.

    Returns the new layers by module name (empty, with the model unchanged, when packing is not available or the
    model is not bf16 on CPU). A replaced layer's weight is no longer a parameter of ``model``: weights tied to it
    elsewhere (an input embedding tied to the head) stay parameters of the other modules.
    """
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.bfloat16 or not prepack_available():
        return {}
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    layers = {}
    for name in names:
        old = model.get_submodule(name)
        new = PrepackedLinear(old.in_features, old.out_features, old.bias, batch_hint)
        new.load(old.weight)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        layers[name] = new
    return layers
