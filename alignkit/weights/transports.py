"""Transports: how buckets travel from the trainer to a rollout engine, all behind one interface.

The trainer side calls ``sender.send(version, buckets)`` and gets a :class:`SendReport`; the engine side calls
``receiver.receive()`` and gets ``(version, pairs)``, where ``pairs`` lazily yields ``(name, tensor)`` for every
tensor sent, each a new tensor bit-equal to the one packed (:func:`alignkit.weights.buckets.unpack`). A receiver
must read ``pairs`` to the end before the next ``receive()``; the version is the trainer's integer weight
version, which travels with every sync. :func:`push` is what every trainer rank calls.

- :class:`InprocTransport` (``inproc``): sender and receiver in one process; ``send`` copies the buckets and
  ``receive`` hands them out in order. For an engine in the trainer's process that keeps its own copy.
- :func:`shm_pair` (``shm``): one ``multiprocessing.shared_memory`` segment of ``bucket_bytes``, refilled per
  bucket, and a pipe carrying each bucket's metadata and the receiver's acknowledgement; the receiver runs in
  another process of the same machine (a colocated engine, a local rollout worker). The sender writes the
  next bucket only after the receiver has copied the last out, so one segment serves any model size.
  ``device="cuda"`` shares one CUDA buffer the same way (its IPC handle pickled once over the pipe by
  ``torch.multiprocessing``): NOT TESTED here (no GPU in CI).
- :class:`CollectiveSender` / :class:`CollectiveReceiver` (``collective``): the trainer's rank 0 broadcasts each
  bucket, after a small pickled metadata message, over a process group of its own (:func:`weight_group`) that
  joins it with every receiving worker, built from a ``TCPStore`` of its own and ``ProcessGroupGloo`` directly,
  so the trainer's default group (torchrun's) is neither used nor changed, and the workers never join it.
  Gloo on CPU is tested; ``backend="nccl"`` (CUDA buckets, the multi-node GPU case) is NOT TESTED here.

After a sync that failed part way (a timeout, an error at either end), make a new sender and receiver: the
protocol does not resynchronise a half-read stream.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as tdist

from alignkit.weights.buckets import Bucket, pack, unpack

TIMEOUT = 300.0  # seconds a side waits for the other before giving up


class SyncAborted(RuntimeError):
    """The other end of a sync stopped it (its error is in the message)."""


@dataclass
class SendReport:
    version: int
    buckets: int
    tensors: int
    bytes: int  # bucket bytes sent (tensor bytes plus alignment padding)
    seconds: float


class Sender(Protocol):
    def send(self, version: int, buckets: Iterable[Bucket]) -> SendReport: ...


class Receiver(Protocol):
    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]: ...


def push(source, sender: Sender | None, version: int, bucket_bytes: int) -> SendReport | None:
    """Send ``source``'s tensors as weight ``version`` in buckets of ``bucket_bytes``: called on every trainer
    rank, since gathering a sharded model is a collective. Where the source keeps the tensors (its ``keeps``,
    rank 0 by default) they go through ``sender``; elsewhere the source is only iterated (its gathers joined)
    and None is returned. A sender with a ``buffer`` (shared memory) has the buckets packed straight into it."""
    if not getattr(source, "keeps", True):
        for _ in source:
            pass
        return None
    if sender is None:
        raise ValueError("this rank keeps the weights but was given no sender")
    return sender.send(version, pack(source, bucket_bytes, buffer=getattr(sender, "buffer", None)))


class _Tally:
    """Counts what a sender sends."""

    def __init__(self, version: int):
        self.version, self.buckets, self.tensors, self.bytes = int(version), 0, 0, 0
        self.began = time.perf_counter()

    def add(self, bucket: Bucket) -> None:
        self.buckets += 1
        self.tensors += sum(p.start == 0 for p in bucket.pieces)
        self.bytes += bucket.nbytes

    def report(self) -> SendReport:
        return SendReport(self.version, self.buckets, self.tensors, self.bytes, time.perf_counter() - self.began)


# ------------------------------------------------------------------------------------------------------ inproc


class InprocTransport:
    """Both ends in one process: ``send`` keeps a copy of the buckets, ``receive`` unpacks the oldest sync."""

    def __init__(self):
        self._pending: list[tuple[int, list[Bucket]]] = []

    def send(self, version: int, buckets: Iterable[Bucket]) -> SendReport:
        tally, kept = _Tally(version), []
        for bucket in buckets:
            kept.append(Bucket(bucket.data.clone(), list(bucket.pieces)))  # a bucket may be a reused buffer
            tally.add(bucket)
        self._pending.append((tally.version, kept))
        return tally.report()

    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        if not self._pending:
            raise RuntimeError("nothing was sent")
        version, buckets = self._pending.pop(0)
        return version, unpack(buckets)


# --------------------------------------------------------------------------------------------- shared memory


def shm_pair(bucket_bytes: int, *, device: str = "cpu", timeout: float = TIMEOUT, context=None):
    """A connected ``(ShmSender, ShmReceiver)``; pass the receiver to the engine's process (it pickles)."""
    import torch.multiprocessing as mp  # its pickler shares CUDA tensors by IPC handle

    ours, theirs = (context or mp.get_context("spawn")).Pipe(duplex=True)
    return ShmSender(ours, bucket_bytes, device=device, timeout=timeout), ShmReceiver(theirs, timeout=timeout)


class ShmSender:
    """The trainer's end of the ``shm`` transport (module docstring). :attr:`buffer` is the shared bucket."""

    def __init__(self, conn, bucket_bytes: int, *, device: str = "cpu", timeout: float = TIMEOUT):
        from multiprocessing import shared_memory

        self._conn, self.bucket_bytes, self.timeout = conn, int(bucket_bytes), timeout
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self._segment = shared_memory.SharedMemory(create=True, size=self.bucket_bytes)
            self.buffer = torch.frombuffer(self._segment.buf, dtype=torch.uint8)
            self._handle = ("shm", self._segment.name)
        else:  # untested: a CUDA buffer, shared by IPC handle
            self._segment = None
            self.buffer = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
            self._handle = ("cuda", self.buffer)
        self._announced = False

    def send(self, version: int, buckets: Iterable[Bucket]) -> SendReport:
        tally = _Tally(version)
        self._conn.send(("begin", tally.version, None if self._announced else self._handle))
        self._announced = True
        try:
            for bucket in buckets:
                if bucket.nbytes > self.bucket_bytes:
                    raise ValueError(f"a bucket of {bucket.nbytes} bytes does not fit the shared buffer of "
                                     f"{self.bucket_bytes}: pack with bucket_bytes <= {self.bucket_bytes}")
                if bucket.data.data_ptr() != self.buffer.data_ptr():  # not packed in place
                    self.buffer[:bucket.nbytes].copy_(bucket.data)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                self._conn.send(("bucket", bucket.pieces, bucket.nbytes))
                self._await()
                tally.add(bucket)
        except BaseException as e:
            if not isinstance(e, SyncAborted):  # tell the receiver, which waits for the next message
                self._conn.send(("abort", f"{type(e).__name__}: {e}"))
            raise
        self._conn.send(("end", tally.buckets))
        self._await()
        return tally.report()

    def _await(self) -> None:
        if not self._conn.poll(self.timeout):
            raise TimeoutError(f"the shm receiver did not answer within {self.timeout:g} s")
        answer = self._conn.recv()
        if answer != "ack":
            raise SyncAborted(f"the receiver failed: {answer[1]}")

    def close(self) -> None:
        """Free the shared segment (the receiver's mapping stays valid until it closes)."""
        self.buffer = None
        if self._segment is not None:
            try:
                self._segment.close()
            except BufferError:  # a bucket view is still alive: the mapping goes with it
                pass
            self._segment.unlink()
            self._segment = None
        self._conn.close()


class ShmReceiver:
    """The engine's end of the ``shm`` transport (module docstring)."""

    def __init__(self, conn, *, timeout: float = TIMEOUT):
        self._conn, self.timeout = conn, timeout
        self._segment, self._view = None, None

    def __getstate__(self):  # travels to the engine's process before any sync
        return {"_conn": self._conn, "timeout": self.timeout}

    def __setstate__(self, state):
        self.__init__(state["_conn"], timeout=state["timeout"])

    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        msg = self._get()
        if msg[0] != "begin":
            raise RuntimeError(f"expected the start of a sync, got {msg[0]!r}")
        _, version, handle = msg
        if handle is not None:
            self._attach(handle)
        if self._view is None:
            raise RuntimeError("the sender never announced its buffer")
        return version, unpack(self._buckets())

    def _buckets(self) -> Iterator[Bucket]:
        count = 0
        try:
            while True:
                msg = self._get()
                if msg[0] == "bucket":
                    _, pieces, nbytes = msg
                    yield Bucket(self._view[:nbytes], pieces)
                    if self._view.is_cuda:
                        torch.cuda.current_stream(self._view.device).synchronize()
                    count += 1
                    self._conn.send("ack")  # the bucket was copied out: the sender may overwrite it
                elif msg[0] == "end":
                    if msg[1] != count:
                        raise RuntimeError(f"the sender sent {msg[1]} buckets, {count} arrived")
                    self._conn.send("ack")
                    return
                else:
                    raise SyncAborted(f"the sender stopped: {msg[1]}")
        except GeneratorExit:
            self._conn.send(("error", "the receiver stopped reading before the end of the sync"))
            raise
        except Exception as e:
            if not isinstance(e, SyncAborted):  # tell the sender, which waits for an answer
                self._conn.send(("error", f"{type(e).__name__}: {e}"))
            raise

    def _get(self):
        if not self._conn.poll(self.timeout):
            raise TimeoutError(f"no message from the shm sender within {self.timeout:g} s")
        return self._conn.recv()

    def _attach(self, handle) -> None:
        kind, what = handle
        self.close_segment()
        if kind == "cuda":
            self._view = what
            return
        self._segment = _attach_untracked(what)
        self._view = torch.frombuffer(self._segment.buf, dtype=torch.uint8)

    def close_segment(self) -> None:
        self._view = None
        if self._segment is not None:
            try:
                self._segment.close()
            except BufferError:
                pass
            self._segment = None

    def close(self) -> None:
        self.close_segment()
        self._conn.close()


def _attach_untracked(name: str):
    """Map the sender's segment without registering it with this process's resource tracker, which would
    unlink it (and warn of a leak) when this process exits: the sender owns it."""
    from multiprocessing import resource_tracker, shared_memory

    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        pass
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


# ------------------------------------------------------------------------------------------------ collective


class WeightGroup:
    """A process group for the weight sync alone: ``world_size`` members (the trainer's sending rank and the
    engines' workers), met through a ``TCPStore`` at ``host:port`` that member 0 serves. Built directly from a
    store and a backend object, it touches none of torch.distributed's global state: the trainer's own
    default group is neither used nor changed, and a worker needs no ``init_process_group``. Every member
    constructs it at about the same time (each waits up to ``timeout`` seconds for the others)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
                 timeout: float = TIMEOUT):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        wait = timedelta(seconds=timeout)
        self._store = tdist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=wait)
        store = tdist.PrefixStore("alignkit/weights", self._store)
        if backend == "gloo":
            self.pg = tdist.ProcessGroupGloo(store, rank, world_size, wait)
            self.device = torch.device("cpu")
        elif backend == "nccl":  # untested: needs one GPU per member
            options = tdist.ProcessGroupNCCL.Options()
            options._timeout = wait
            self.pg = tdist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = tdist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()

    def send_object(self, obj, src: int) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=self.device), src)
        self.broadcast(payload.to(self.device), src)

    def recv_object(self, src: int):
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size, src)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(payload, src)
        return pickle.loads(payload.cpu().numpy().tobytes())


def weight_group(host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
                 timeout: float = TIMEOUT) -> WeightGroup:
    """:class:`WeightGroup` (member 0 sends: the trainer's rank 0)."""
    return WeightGroup(host, port, rank, world_size, backend=backend, timeout=timeout)


class CollectiveSender:
    """Broadcasts each bucket to every other member of ``group`` (module docstring); the sending member."""

    def __init__(self, group: WeightGroup, src: int = 0):
        if group.rank != src:
            raise ValueError(f"member {group.rank} of the weight group is not the sender ({src})")
        self.group, self.src = group, src

    def send(self, version: int, buckets: Iterable[Bucket]) -> SendReport:
        tally = _Tally(version)
        self.group.send_object(("begin", tally.version), self.src)
        for bucket in buckets:
            self.group.send_object(("bucket", bucket.pieces, bucket.nbytes), self.src)
            if bucket.nbytes:
                self.group.broadcast(bucket.data.to(self.group.device), self.src)
            tally.add(bucket)
        self.group.send_object(("end", tally.buckets), self.src)
        return tally.report()


class CollectiveReceiver:
    """A receiving member of ``group``: every receiver reads every sync, in step with the others."""

    def __init__(self, group: WeightGroup, src: int = 0):
        self.group, self.src = group, src
        self._space = torch.empty(0, dtype=torch.uint8, device=group.device)

    def receive(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        kind, version = self.group.recv_object(self.src)
        if kind != "begin":
            raise RuntimeError(f"expected the start of a sync, got {kind!r}")
        return version, unpack(self._buckets())

    def _buckets(self) -> Iterator[Bucket]:
        count = 0
        while True:
            msg = self.group.recv_object(self.src)
            if msg[0] == "end":
                if msg[1] != count:
                    raise RuntimeError(f"the sender sent {msg[1]} buckets, {count} arrived")
                return
            _, pieces, nbytes = msg
            if self._space.numel() < nbytes:
                self._space = torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)
            data = self._space[:nbytes]
            if nbytes:
                self.group.broadcast(data, self.src)
            count += 1
            yield Bucket(data, pieces)
