"""Weight sync: the trainer's whole tensors, packed into buckets, carried to rollout engines, written by name.

- :class:`~alignkit.weights.source.ModuleSource`: ``(name, tensor)`` of a plain, LoRA or FSDP2-sharded model,
  named as a fresh Hugging Face model names them (iterate it on every trainer rank);
- :func:`~alignkit.weights.buckets.pack` / :func:`~alignkit.weights.buckets.unpack`: flat byte buckets of a
  bounded size, bit for bit;
- :mod:`~alignkit.weights.transports`: ``inproc``, ``shm`` and ``collective``, each ``send(version, buckets)`` /
  ``receive() -> (version, pairs)``, and :func:`~alignkit.weights.transports.push`;
- :func:`~alignkit.weights.sink.apply_weights` and :class:`~alignkit.weights.sink.WeightSink`: write a sync into
  an engine's model and refuse a generation that asks for another weight version.

Everything but ``ModuleSource`` needs torch alone, so an engine's process imports no model code to receive;
``ModuleSource`` is imported on first use.
"""

from alignkit.weights.buckets import Bucket, Piece, pack, unpack
from alignkit.weights.sink import ApplyReport, WeightSink, WeightSyncError, WeightVersionError, apply_weights
from alignkit.weights.transports import (CollectiveReceiver, CollectiveSender, InprocTransport, Receiver, Sender,
                                         SendReport, ShmReceiver, ShmSender, SyncAborted, WeightGroup, push,
                                         shm_pair, weight_group)

__all__ = [
    "ApplyReport", "Bucket", "CollectiveReceiver", "CollectiveSender", "InprocTransport", "ModuleSource", "Piece",
    "Receiver", "Sender", "SendReport", "ShmReceiver", "ShmSender", "SyncAborted", "TensorMeta", "WeightGroup",
    "WeightSink", "WeightSyncError", "WeightVersionError", "apply_weights", "pack", "push", "shm_pair",
    "unpack", "weight_group",
]


def __getattr__(name):
    if name in ("ModuleSource", "TensorMeta"):
        from alignkit.weights import source

        return getattr(source, name)
    raise AttributeError(f"module 'alignkit.weights' has no attribute {name!r}")
