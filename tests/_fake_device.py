"""A second device on a CPU-only machine, for tests that prove no CPU tensor meets a model tensor.

On the CPU every tensor lives on one device, so a forgotten ``.to(device)`` never fails there; it fails on the
first GPU run. :func:`fake_device` makes a device that is not the CPU but computes like it: inside the context,
a tensor created on (or moved to) the ``meta`` device is an :class:`OnDevice`, a CPU tensor that says it lives on
``meta``. Every operation runs on the CPU tensors inside, so values are exact (a loss on the fake device equals
the loss on the CPU, bit for bit), and the outputs of an operation on :class:`OnDevice` tensors are
:class:`OnDevice` again. ``.to("meta")``, ``torch.zeros(..., device=x.device)``, ``torch.tensor(data,
device=...)`` put tensors there; ``.cpu()`` / ``.to("cpu")`` take them back; ``.item()`` and ``.tolist()`` read
them as on a GPU.

An operation that combines an :class:`OnDevice` tensor with a plain CPU tensor fails at once with
:class:`DeviceMix`, naming the operation and the shapes, as CUDA would ("Expected all tensors to be on the same
device"). Following CUDA, a 0-d CPU tensor may enter a pointwise operation (a CPU scalar), and ``copy_`` /
``_to_copy`` (``.to()``, ``load_state_dict``) may cross devices. A ``torch.Generator`` cannot be made on
``meta``: :func:`fake_device` replaces ``torch.Generator`` with a CPU generator that remembers the device it was
asked for, and a random op on the fake device fails when its generator was not asked for it.

Limits: this checks *where* tensors are, not how a real accelerator computes: CUDA kernels and their numerics,
bf16 autocast on CUDA (``torch.autocast("meta")`` does not exist, so tests of the bf16 path record the device
type autocast is asked for instead), FSDP2 collectives over NCCL, memory and speed are not exercised. It is
stricter than CUDA in one respect: a CPU index tensor used to index a GPU tensor, which CUDA accepts at the cost
of a copy and a synchronisation, is reported too. Code that branches on ``device.type == "cpu"`` takes its
non-CPU branch here, which is the point.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

FAKE = torch.device("meta")
_CROSSING = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class DeviceMix(AssertionError):
    """An operation met tensors on two devices."""


class OnDevice(torch.Tensor):
    """A CPU tensor (``inner``) that reports the ``meta`` device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=FAKE, requires_grad=False)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, None)  # outside fake_device(): compute, check nothing


def _fake(dev) -> bool:
    return dev is not None and torch.device(dev).type == FAKE.type


def _wrap(t):
    return OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t


def _run(func, args, kwargs, mode):
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    on = any(isinstance(t, OnDevice) for t in tensors)
    if mode is not None:
        mode.check(func, tensors, on, kwargs)
    dev = kwargs.get("device")
    kw = dict(kwargs)
    if _fake(dev):
        kw["device"] = torch.device("cpu")
    inner_args, inner_kw = tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, (args, kw))
    out = func(*inner_args, **inner_kw)
    returns = func._schema.returns
    if returns and returns[0].alias_info is not None and returns[0].alias_info.is_write:
        for a, arg in zip(func._schema.arguments, args):  # in place: the argument itself, not a new wrapper
            if a.alias_info is not None and a.alias_info.is_write:
                return arg
    to_cpu = dev is not None and torch.device(dev).type == "cpu"
    if (on and not to_cpu) or _fake(dev):
        return tree_map(_wrap, out)
    return out


def _where() -> str:
    """The alignkit frames of the current stack (where the offending tensor came from), innermost last."""
    frames = [f for f in traceback.extract_stack() if "/alignkit/" in f.filename.replace("\\", "/")]
    return "".join(traceback.format_list(frames[-8:])) or "".join(traceback.format_stack(limit=12))


class _Checks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops_on_device = 0
        self.autocast_devices: list[str] = []

    def check(self, func, tensors, on, kwargs):
        if not on:
            return
        self.ops_on_device += 1
        if func in _CROSSING:
            return
        pointwise = torch.Tag.pointwise in func.tags
        plain = [t for t in tensors if not isinstance(t, OnDevice) and not (pointwise and t.dim() == 0)]
        if plain:
            raise DeviceMix(f"{func}: CPU tensor(s) of shape {[tuple(t.shape) for t in plain]} meet tensors on the "
                            f"model's device, in\n{_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, self)


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` would make a real meta tensor (no values): build it on the CPU, wrap it.
    ``.tolist()`` refuses tensor subclasses: read the CPU tensor inside, as a GPU tensor is read. A random op
    whose generator was made for another device than the one it draws on fails, as on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        gen = kwargs.get("generator")
        if gen is not None:  # checked here: below, in dispatch, the generator is a new object without ``asked``
            on = _fake(kwargs.get("device")) or any(isinstance(t, OnDevice) for t in tree_leaves(args))
            if on != _fake(getattr(gen, "asked", None)):
                raise DeviceMix(f"{func.__name__}: a generator made for {getattr(gen, 'asked', 'cpu')} draws "
                                f"{'on the model device' if on else 'on the CPU'}, in\n{_where()}")
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):  # as on a GPU: a copy to the host
            return args[0].inner.tolist()
        if func in _FROM_DATA:
            dev = kwargs.get("device")
            if dev is None and func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice):
                dev = FAKE
            if _fake(dev):
                kwargs["device"] = "cpu"
                out = func(*args, **kwargs)
                with torch._C.DisableTorchFunction():
                    return OnDevice(out)
        return func(*args, **kwargs)


_REAL_GENERATOR = torch.Generator


class _Generator(_REAL_GENERATOR):
    """Stands in for ``torch.Generator``: a CPU generator that remembers the device it was asked for."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, device="cpu")

    def __init__(self, device="cpu"):
        self.asked = torch.device(device)

    @property
    def device(self):
        return self.asked


_REAL_AUTOCAST, _REAL_AUTOCAST_ENABLED = torch.autocast, torch.is_autocast_enabled


@contextlib.contextmanager
def fake_device():
    """The fake device is live inside; yields the checker: ``ops_on_device`` counts the operations run there,
    ``autocast_devices`` lists the device type of every ``torch.autocast`` asked for (autocast has no meta
    device, so on the fake device it is recorded and does nothing)."""
    checks = _Checks()

    def autocast(device_type, *args, **kwargs):
        checks.autocast_devices.append(device_type)
        if device_type == FAKE.type:
            return contextlib.nullcontext()
        return _REAL_AUTOCAST(device_type, *args, **kwargs)

    def is_autocast_enabled(*args):
        if args and args[0] == FAKE.type:
            return False
        return _REAL_AUTOCAST_ENABLED(*args)

    torch.Generator, torch.autocast, torch.is_autocast_enabled = _Generator, autocast, is_autocast_enabled
    try:
        with _FromData(), checks:
            yield checks
    finally:
        torch.Generator, torch.autocast, torch.is_autocast_enabled = (_REAL_GENERATOR, _REAL_AUTOCAST,
                                                                      _REAL_AUTOCAST_ENABLED)


def foreach_on_fake_device(monkeypatch) -> None:
    """Let ``torch._foreach_*`` (gradient norms, AdamW's foreach path) accept the fake device as they accept CUDA."""
    from torch.utils import _foreach_utils

    real = _foreach_utils._get_foreach_kernels_supported_devices
    monkeypatch.setattr(_foreach_utils, "_get_foreach_kernels_supported_devices", lambda: [*real(), FAKE.type])


def is_fake(t) -> bool:
    return isinstance(t, OnDevice)
