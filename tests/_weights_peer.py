"""The other processes of tests/test_weights.py: weight receivers (``shm``, ``collective``) that save what they
receive, and a 2-rank FSDP2 trainer that sends through both transports.

    python tests/_weights_peer.py collective HOST PORT RANK WORLD OUT SYNCS     # a receiving worker
    torchrun --nproc_per_node 2 tests/_weights_peer.py trainer PORT OUT         # the sharded trainer

A receiver saves each sync it reads as ``OUT/<label>-v<version>.pt`` (a dict of name -> tensor, in arrival
order). Receivers import torch and ``alignkit.weights`` only, as an engine's process would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alignkit.weights import CollectiveReceiver, weight_group

BUCKET = 4096  # bytes: smaller than most of the tiny model's tensors, larger than its norms and LoRA A


def save(out: str, label: str, version: int, pairs) -> None:
    torch.save(dict(pairs), Path(out) / f"{label}-v{version}.pt")


def shm_main(receiver, out: str, syncs: int, stop_early: bool = False) -> None:
    """Read ``syncs`` syncs; with ``stop_early``, then read one tensor of the next and stop (the sender must
    learn of it)."""
    for _ in range(syncs):
        version, pairs = receiver.receive()
        save(out, "shm", version, pairs)
    if stop_early:
        _, pairs = receiver.receive()
        next(pairs)
        pairs.close()
    receiver.close()


def collective_main(host: str, port: int, rank: int, world: int, out: str, syncs: int) -> None:
    receiver = CollectiveReceiver(weight_group(host, port, rank, world, timeout=120))
    for _ in range(syncs):
        version, pairs = receiver.receive()
        save(out, f"collective{rank}", version, pairs)


def lora_model(seed: int = 1):
    """The tiny model with LoRA adapters drawn from ``seed`` (the same in every process), B not zero (peft starts
    B at zero: nothing would merge)."""
    from alignkit.models.loading import LoraSettings, add_lora, tiny_model

    model = add_lora(tiny_model(seed=seed), LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def trainer_main(port: int, out: str) -> None:
    """Two FSDP2 ranks send a tied plain model (v1), a LoRA model merged (v2) and its adapters (v3) through
    ``shm`` (to a process rank 0 starts) and ``collective`` (to the two workers the test starts); rank 0 first
    saves what should arrive, from unsharded copies."""
    import copy

    import torch.multiprocessing as mp
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from alignkit.models.loading import tiny_model
    from alignkit.rl.rollout import merged_parameter
    from alignkit.train import dist, strategy
    from alignkit.weights import CollectiveSender, ModuleSource, push, shm_pair

    dist.init()
    rank = dist.rank()
    plain, lora = tiny_model(seed=0, tie_word_embeddings=True), lora_model()
    if rank == 0:
        fresh = AutoModelForCausalLM.from_config(plain.config)
        whole = copy.deepcopy(lora)
        expected = {
            "fresh_keys": list(fresh.state_dict()),
            "plain": {k: v.clone() for k, v in plain.state_dict().items()},
            "merged": {n: merged_parameter(whole.get_base_model(), n).detach().clone()
                       for n in (n.replace(".base_layer", "") for n, _ in whole.get_base_model().named_parameters()
                                 if "lora_" not in n)},
            "adapters": {k: v.clone() for k, v in get_peft_model_state_dict(whole).items()},
        }
        torch.save(expected, Path(out) / "expected.pt")
    strategy.shard(plain)
    strategy.shard(lora)
    assert isinstance(next(plain.parameters()), torch.distributed.tensor.DTensor)
    gathered = strategy.full_state_dict(plain)  # the strategy's own gather, to compare with

    shm = coll = child = None
    if rank == 0:
        shm, receiver = shm_pair(BUCKET, timeout=120)
        child = mp.get_context("spawn").Process(target=shm_main, args=(receiver, out, 3))
        child.start()
        coll = CollectiveSender(weight_group("127.0.0.1", port, 0, 3, timeout=120))
        torch.save(gathered, Path(out) / "gathered.pt")
    syncs = [(1, ModuleSource(plain)), (2, ModuleSource(lora, "merged")), (3, ModuleSource(lora, "adapters"))]
    if rank == 0:  # read from the shards, before any gather
        meta = {v: [(m.name, m.shape, m.dtype) for m in source.metadata()] for v, source in syncs}
        torch.save(meta, Path(out) / "metadata.pt")
    for version, source in syncs:
        push(source, shm, version, BUCKET)
        push(source, coll, version, BUCKET)

    total = torch.tensor([rank + 1.0])  # the trainer's own group is intact and still its two ranks
    torch.distributed.all_reduce(total)
    assert total.item() == 3.0 and dist.world() == 2, (total, dist.world())
    if rank == 0:
        child.join(60)
        assert child.exitcode == 0, child.exitcode
        shm.close()
    dist.finish()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "collective":
        host, port, rank, world, out, syncs = args
        collective_main(host, int(port), int(rank), int(world), out, int(syncs))
    elif mode == "trainer":
        trainer_main(int(args[0]), args[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
