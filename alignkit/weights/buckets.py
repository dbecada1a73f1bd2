"""Buckets: named tensors packed into flat byte buffers of a bounded size, and unpacked again bit for bit.

A transport moves a few large buffers far better than thousands of small tensors (one message, one broadcast,
one shared-memory copy per bucket), and a bounded bucket lets a transport allocate its buffer once (a
shared-memory segment, a receive buffer) whatever the model's size.

Layout. A :class:`Bucket` is a 1-D ``uint8`` tensor of at most ``bucket_bytes`` bytes and the list of the
:class:`Piece` s it holds, in order. Each piece is a run of one tensor's raw bytes (its row-major, contiguous
storage) at ``offset`` in the bucket; ``start`` says where that run begins within the tensor's bytes. Offsets
are rounded up to :data:`ALIGN` bytes, so a receiver may view a whole tensor in place with its own dtype (an
empty tensor's piece has no bytes and sits where the previous one ended).

Which tensors are split: a tensor that fits in one bucket is never split (it opens a new bucket when the
current one lacks room for it); a tensor larger than a bucket is cut into pieces that fill the current bucket's
free room and then whole buckets. So every bucket holds at most ``bucket_bytes`` bytes, and no transport ever
needs a buffer larger than that, which is why a large tensor is split rather than given an oversized bucket of
its own. :func:`unpack` joins the pieces again, checking that they arrive in order and complete.

The bytes are copied, never converted: what comes out of :func:`unpack` has the dtype, shape and bits of what
went into :func:`pack`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN = 16  # bytes; every piece (but an empty tensor's) starts at a multiple of it within its bucket


@dataclass(frozen=True)
class Piece:
    """One run of a tensor's bytes in a bucket (module docstring)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # where the run starts in the bucket
    nbytes: int  # its length
    start: int  # where it starts within the tensor's bytes: 0 unless the tensor was split
    total: int  # the whole tensor's size in bytes

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.nbytes == self.total


@dataclass
class Bucket:
    """``data``: the bucket's bytes (``uint8``, exactly as long as its pieces need); ``pieces`` in offset order.

    A bucket handed out by :func:`pack` with a ``buffer`` (or by a receiver) is a view of a reused buffer:
    valid until the next bucket is drawn. Whatever keeps one longer copies it."""

    data: torch.Tensor
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat ``uint8`` tensor (a view when ``t`` is contiguous)."""
    t = t.detach().contiguous()
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    return t.reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` whose bytes are ``data`` (flat ``uint8``, aligned), as a view."""
    return data.view(dtype).reshape(shape)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(source: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *, buffer: torch.Tensor | None = None,
         device: torch.device | str = "cpu") -> Iterator[Bucket]:
    """The tensors of ``source`` (``(name, tensor)`` pairs), in its order, packed into buckets of at most
    ``bucket_bytes`` bytes (module docstring for the layout and the split rule).

    ``buffer``: a ``uint8`` tensor of at least ``bucket_bytes`` bytes (a transport's shared segment) that every
    bucket is written into and viewed from, so each bucket is valid only until the next is drawn. Without it
    every bucket is a new tensor on ``device``. The source is read lazily: one bucket's tensors at a time.
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be at least {ALIGN}, not {bucket_bytes}")
    if buffer is not None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < bucket_bytes:
            raise ValueError(f"buffer must be a 1-D uint8 tensor of at least {bucket_bytes} bytes")
        device = buffer.device
    space = buffer if buffer is not None else torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
    pieces: list[Piece] = []
    used = 0

    def flush() -> Bucket:
        nonlocal space, pieces, used
        bucket = Bucket(space[:used], pieces)
        if buffer is None:  # the next bucket gets its own memory; the one handed out keeps this
            space = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
        pieces, used = [], 0
        return bucket

    for name, tensor in source:
        data = raw_bytes(tensor)
        total, start = int(data.numel()), 0
        meta = dict(name=name, dtype=tensor.dtype, shape=tuple(tensor.shape), total=total)
        if total == 0:
            pieces.append(Piece(offset=used, nbytes=0, start=0, **meta))
            continue
        if total <= bucket_bytes and _aligned(used) + total > bucket_bytes and pieces:
            yield flush()  # it fits in a bucket: never split it
        while start < total:
            offset = _aligned(used)
            if offset >= bucket_bytes:
                yield flush()
                offset = 0
            n = min(bucket_bytes - offset, total - start)
            space[offset:offset + n].copy_(data[start:start + n])
            pieces.append(Piece(offset=offset, nbytes=n, start=start, **meta))
            used, start = offset + n, start + n
    if pieces:
        yield flush()


def unpack(buckets: Iterable[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor the buckets hold, in packing order: each a new tensor (copied out of
    its bucket, so the buckets may be reused), bit-equal to the packed one. Raises ``ValueError`` when a piece
    lies outside its bucket or overlaps another, or when a split tensor's pieces arrive out of order or
    incomplete."""
    name, parts, got = None, None, 0  # the split tensor being joined
    for bucket in buckets:
        end = 0
        for p in bucket.pieces:
            if p.offset < end or p.offset + p.nbytes > bucket.nbytes:
                raise ValueError(f"piece of {p.name!r} at bytes [{p.offset}, {p.offset + p.nbytes}) overlaps "
                                 f"the previous piece or lies outside its bucket of {bucket.nbytes} bytes")
            end = p.offset + p.nbytes
            chunk = bucket.data[p.offset:end]
            if p.whole and name is None:
                yield p.name, from_bytes(chunk.clone(), p.dtype, p.shape)
                continue
            if p.start == 0 and name is None:
                name, parts, got = p.name, torch.empty(p.total, dtype=torch.uint8, device=chunk.device), 0
            if p.name != name or p.start != got:
                raise ValueError(f"piece of {p.name!r} at byte {p.start} arrived while {name!r} was complete "
                                 f"up to byte {got}: pieces lost or out of order")
            parts[got:got + p.nbytes].copy_(chunk)
            got += p.nbytes
            if got == p.total:
                yield name, from_bytes(parts, p.dtype, p.shape)
                name, parts, got = None, None, 0
    if name is not None:
        raise ValueError(f"the buckets ended with {name!r} incomplete ({got} bytes received)")
