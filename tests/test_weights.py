"""Weight sync (alignkit.weights): every tensor arrives bit-equal, named as a fresh model names it, through each
transport, from a plain, a LoRA and a 2-rank FSDP2 model, in buckets smaller than one tensor; a sync writes every
parameter of its target; a missing tensor or a version other than the one asked for fails loudly.

The other processes (an ``shm`` receiver, ``collective`` workers over gloo, the torchrun trainer) live in
``_weights_peer.py``; they save what they receive and the comparisons are made here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _weights_peer as peer
from alignkit.weights import (Bucket, CollectiveSender, InprocTransport, SyncAborted, WeightSink, WeightSyncError,
                              WeightVersionError, apply_weights, pack, push, shm_pair, unpack, weight_group)

BUCKET = peer.BUCKET
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` would call -0.0 equal to 0.0 and NaN unequal to itself)."""
    from alignkit.weights.buckets import raw_bytes

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))


def assert_bit_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    bad = [n for n in want if not same_bits(got[n], want[n])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def tiny(**kw):
    from alignkit.models.loading import tiny_model

    return tiny_model(**kw)


def source_tensors(model, lora="merged") -> dict[str, torch.Tensor]:
    from alignkit.weights import ModuleSource

    return {n: t.clone() for n, t in ModuleSource(model, lora)}


def zeroed(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model


# --------------------------------------------------------------------------------------------- buckets


def test_pack_splits_only_tensors_larger_than_a_bucket_and_unpack_restores_every_bit():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(40, 7, generator=gen),  # 1120 bytes: 5 buckets of 256
        "half": torch.randn(13, generator=gen).to(torch.bfloat16),
        "ids": torch.randint(-9, 9, (5, 3), generator=gen),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "scalar": torch.tensor(-0.0),
        "empty": torch.empty(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), 1e-45]),
        "strided": torch.randn(8, 6, generator=gen).t(),  # not contiguous
        "tail": torch.randn(60, generator=gen),  # 240 bytes: fits a bucket, so it is never split
    }
    buckets = [Bucket(b.data.clone(), b.pieces) for b in pack(tensors.items(), 256)]
    assert all(b.nbytes <= 256 for b in buckets)
    pieces = [p for b in buckets for p in b.pieces]
    assert sum(p.name == "big" for p in pieces) >= 5
    assert all(p.whole for p in pieces if p.name != "big")
    assert all(p.offset % 16 == 0 for p in pieces if p.nbytes)
    back = dict(unpack(buckets))
    assert list(back) == list(tensors)
    assert all(same_bits(back[n], t.contiguous()) for n, t in tensors.items())


def test_pack_into_a_reused_buffer_gives_views_of_it():
    buffer = torch.empty(300, dtype=torch.uint8)
    tensors = {"a": torch.arange(100.0), "b": torch.arange(7)}
    kept = []
    for b in pack(tensors.items(), 256, buffer=buffer):
        assert b.data.data_ptr() == buffer.data_ptr()
        kept.append(Bucket(b.data.clone(), b.pieces))
    back = dict(unpack(kept))
    assert all(same_bits(back[n], t) for n, t in tensors.items())


def test_unpack_refuses_a_lost_or_misplaced_piece():
    tensors = {"a": torch.arange(200.0), "b": torch.arange(10.0)}
    buckets = [Bucket(b.data.clone(), b.pieces) for b in pack(tensors.items(), 256)]
    with pytest.raises(ValueError, match="lost or out of order"):
        list(unpack(buckets[:1] + buckets[2:]))
    with pytest.raises(ValueError, match="incomplete"):
        list(unpack(buckets[:2]))
    last = buckets[-1]
    with pytest.raises(ValueError, match="outside its bucket"):
        list(unpack(buckets[:-1] + [Bucket(last.data[:-1], last.pieces)]))


# ---------------------------------------------------------------------------------------------- source


@pytest.mark.parametrize("tied", [True, False])
def test_names_are_a_fresh_models_state_dict_and_a_tied_tensor_travels_once(tied):
    from transformers import AutoModelForCausalLM

    from alignkit.weights import ModuleSource

    model = tiny(tie_word_embeddings=tied)
    fresh = list(AutoModelForCausalLM.from_config(model.config).state_dict())
    source = ModuleSource(model)
    sent = source.names()
    assert sent == [n for n in fresh if n not in source.tied]  # in the state dict's order
    assert source.tied == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert [n for n, _ in source] == sent
    meta = source.metadata()
    assert [(m.name, m.shape, m.dtype) for m in meta] == [(n, tuple(t.shape), t.dtype) for n, t in source]


def test_an_inproc_sync_restores_a_zeroed_model_exactly_and_records_its_version():
    from alignkit.weights import ModuleSource

    model = tiny(tie_word_embeddings=True)
    link = InprocTransport()
    report = push(ModuleSource(model), link, 7, BUCKET)
    assert report.tensors == 20 and report.buckets > 20  # buckets smaller than the embedding: it was split
    target = zeroed(tiny(seed=3, tie_word_embeddings=True))
    sink = WeightSink(target, link)
    applied = sink.receive()
    assert applied.tensors == 20 and applied.bytes == sum(p.numel() * 4 for p in model.parameters())
    assert_bit_equal(target.state_dict(), model.state_dict())
    assert sink.version == 7
    sink.require(7)
    with pytest.raises(WeightVersionError, match="version 6.*holds version 7"):
        sink.require(6)


def test_lora_merged_equals_merged_parameter_and_adapters_send_only_the_adapter():
    from peft import get_peft_model_state_dict

    from alignkit.rl.rollout import merged_parameter
    from alignkit.weights import ModuleSource

    model = peer.lora_model()
    base = model.get_base_model()
    merged = source_tensors(model, "merged")
    plain_names = [n for n, _ in tiny().named_parameters()]
    assert list(merged) == plain_names
    want = {n: merged_parameter(base, n).detach() for n in plain_names}
    assert_bit_equal(merged, want)
    assert not same_bits(merged["model.layers.0.self_attn.q_proj.weight"],
                         base.model.layers[0].self_attn.q_proj.base_layer.weight)  # something was merged

    adapters = source_tensors(model, "adapters")
    saved = get_peft_model_state_dict(model)
    assert list(adapters) == list(saved) and all("lora_" in n for n in adapters)
    assert_bit_equal(adapters, saved)

    link = InprocTransport()  # into an engine's own peft copy, its adapters zeroed
    push(ModuleSource(model, "adapters"), link, 1, 700)
    target = peer.lora_model(seed=5)
    with torch.no_grad():
        for n, p in target.named_parameters():
            if "lora_" in n:
                p.zero_()
    applied = WeightSink(target, link).receive()
    assert applied.tensors == len(saved)
    assert_bit_equal(get_peft_model_state_dict(target), saved)


# ------------------------------------------------------------------------------------------- failures


def test_a_sync_missing_one_tensor_fails_loudly_and_leaves_no_version():
    model = tiny()
    pairs = list(source_tensors(model).items())
    sink = WeightSink(zeroed(tiny()))
    sink.load(1, pairs)
    with pytest.raises(WeightSyncError, match="1 of the target's 21 tensors were not received.*'model.norm"):
        sink.load(2, pairs[:-2] + pairs[-1:])
    assert sink.version is None
    with pytest.raises(WeightVersionError, match="no complete weights"):
        sink.require(1)
    with pytest.raises(WeightSyncError, match="unexpected tensor 'extra'"):
        apply_weights(tiny(), pairs + [("extra", torch.zeros(1))])
    with pytest.raises(WeightSyncError, match="received twice"):
        apply_weights(tiny(), pairs + pairs[:1])
    name, t = pairs[3]
    with pytest.raises(WeightSyncError, match="shape"):
        apply_weights(tiny(), pairs[:3] + [(name, t[:-1])] + pairs[4:])
    with pytest.raises(WeightSyncError, match="dtype"):
        apply_weights(tiny(), pairs[:3] + [(name, t.to(torch.int32))] + pairs[4:])
    half = apply_weights(tiny(), [(n, t.to(torch.bfloat16)) for n, t in pairs])  # floats cast to the target's
    assert half.tensors == 21
    # a tied engine model fed an untied trainer's head: refused by name instead of one copy left stale
    with pytest.raises(WeightSyncError, match="'lm_head.weight'.*ties it to 'model.embed_tokens.weight'"):
        apply_weights(tiny(tie_word_embeddings=True), pairs)


# ------------------------------------------------------------------------------------------ transports


def _spawn(target, *args):
    import torch.multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def test_shm_carries_a_plain_and_a_lora_model_to_another_process_bit_for_bit(tmp_path):
    from alignkit.weights import ModuleSource

    plain, lora = tiny(tie_word_embeddings=True), peer.lora_model()
    sender, receiver = shm_pair(BUCKET, timeout=60)
    child = _spawn(peer.shm_main, receiver, str(tmp_path), 2, True)
    try:
        first = push(ModuleSource(plain), sender, 1, BUCKET)
        push(ModuleSource(lora, "merged"), sender, 2, BUCKET)
        with pytest.raises(SyncAborted, match="stopped reading before the end"):
            push(ModuleSource(plain), sender, 3, BUCKET)
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        sender.close()
    assert first.buckets > first.tensors
    assert_bit_equal(torch.load(tmp_path / "shm-v1.pt"), source_tensors(plain))
    assert_bit_equal(torch.load(tmp_path / "shm-v2.pt"), source_tensors(lora, "merged"))


def test_collective_broadcasts_over_a_gloo_group_of_its_own(tmp_path):
    """The sender (this process) and one worker; the FSDP2 run below has two workers."""
    from alignkit.weights import ModuleSource

    plain, lora = tiny(), peer.lora_model()
    port = _free_port()
    worker = _spawn(peer.collective_main, "127.0.0.1", port, 1, 2, str(tmp_path), 2)
    try:
        sender = CollectiveSender(weight_group("127.0.0.1", port, 0, 2, timeout=60))
        assert not torch.distributed.is_initialized()  # no default group was made, none is needed
        push(ModuleSource(plain), sender, 4, BUCKET)
        push(ModuleSource(lora, "adapters"), sender, 5, BUCKET)
        worker.join(60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
    assert_bit_equal(torch.load(tmp_path / "collective1-v4.pt"), source_tensors(plain))
    assert_bit_equal(torch.load(tmp_path / "collective1-v5.pt"), source_tensors(lora, "adapters"))


# ------------------------------------------------------------------------------------------------ FSDP2


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """One torchrun launch: 2 FSDP2 ranks send v1 (tied plain), v2 (LoRA merged), v3 (LoRA adapters) through
    shm and collective (2 workers); returns the folder of what every receiver saved."""
    out = tmp_path_factory.mktemp("fsdp2_sync")
    port, master = _free_port(), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(HERE / "_weights_peer.py")
    workers = [subprocess.Popen([sys.executable, script, "collective", "127.0.0.1", str(port), str(r), "3", str(out),
                                 "3"], env=env, stderr=subprocess.PIPE, text=True) for r in (1, 2)]
    trainer = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                              "127.0.0.1", "--master_port", str(master), script, "trainer", str(port), str(out)],
                             env=env, capture_output=True, text=True, timeout=240)
    errors = [w.communicate(timeout=60)[1] for w in workers]
    assert trainer.returncode == 0, trainer.stderr[-4000:]
    assert all(w.returncode == 0 for w in workers), errors
    return out


@pytest.mark.parametrize("transport", ["shm", "collective1", "collective2"])
def test_a_two_rank_fsdp2_trainer_sends_every_tensor_bit_equal(sharded_run, transport):
    expected = torch.load(sharded_run / "expected.pt")
    plain = torch.load(sharded_run / f"{transport}-v1.pt")
    fresh = expected["fresh_keys"]
    assert sorted(plain) == sorted(set(fresh) - {"lm_head.weight"})  # tied: the head travels as the embedding
    assert_bit_equal(plain, {n: expected["plain"][n] for n in plain})
    gathered = torch.load(sharded_run / "gathered.pt")  # the strategy's full state dict of the sharded model
    assert all(same_bits(plain[n], gathered[n]) for n in plain)
    merged, adapters = (torch.load(sharded_run / f"{transport}-v{v}.pt") for v in (2, 3))
    assert_bit_equal(merged, expected["merged"])
    assert_bit_equal(adapters, expected["adapters"])
    metadata = torch.load(sharded_run / "metadata.pt")  # what the source announced without gathering
    for version, got in ((1, plain), (2, merged), (3, adapters)):
        assert metadata[version] == [(n, tuple(t.shape), t.dtype) for n, t in got.items()]
