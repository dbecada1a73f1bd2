"""Equivalence tests (DESIGN.md principle 8): two ways of computing the same thing must agree.

All runs use the built-in ``tiny`` model in fp32 with ``lr=1e-3``, so three Adam steps move the weights by
~1e-3, a hundred times the tolerance; the toy rows (tests/_toy.py) have different prompt and response lengths.
Each test compares the per-step metrics of ``OUTPUT/metrics.jsonl`` (loss, pre-clipping gradient norm, learning
rate, implicit rewards) and the weights in ``OUTPUT/final/model.safetensors``. The gradient norm is what
catches a wrong normaliser for pair-normalised losses: a per-micro-batch mean there only rescales the gradient,
which Adam and clipping would otherwise hide.

1. accumulation: batch 8 x accumulation 1 == batch 1 x 8 == batch 2 x 4 (SFT token-normalised, DPO per pair).
2. grouping and padding: ``group_by_length`` true == false; DPO ``share_prompt`` true == false; at the log-prob
   level, a right-padded batch == each sequence alone == a naive full-vocabulary log-softmax, for any ``chunk``,
   gradients included.
3. ``reference=cached`` == ``reference=live`` (full fine-tuning and LoRA).
4. resumed after a crash == uninterrupted (full and LoRA), metrics.jsonl has one line per step, and a leftover
   ``.tmp-step-*`` directory (a crash during a checkpoint write) is ignored.
5. two processes under torchrun (gloo) x batch 4 == one process x batch 8, through the real CLI.
6. KTO: batch 4 x 1 == batch 1 x 4 (its reference point z0 is taken over the whole step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _toy
from alignkit.config import DPOConfig, SFTConfig, build, to_dict
from alignkit.data.collate import collate
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import encode_all
from alignkit.models.loading import load_model
from alignkit.models.logprobs import sequence_logps, token_logps
from alignkit.recipes import dpo as dpo_recipe
from alignkit.recipes import sft as sft_recipe

TOL = 1e-5
# adam_eps=1e-6 rather than the default 1e-8: Adam's step lr * g / (|g| + eps) turns float32 rounding noise in a
# gradient entry that is ~0 (|g| ~ 1e-9) into a weight change of up to lr * noise / eps, which with eps=1e-8
# reached 4.5e-6 on single entries of equivalent runs; with 1e-6 every weight agrees within ~5e-7.
COMMON = dict(model="tiny", lr=1e-3, adam_eps=1e-6, max_steps=3, progress=False, seed=0)
METHODS = {"sft": (SFTConfig, sft_recipe), "dpo": (DPOConfig, dpo_recipe)}
COMPARED = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/margin")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "sft": _toy.sft_jsonl(d, n=24),
        "dpo": _toy.preference_jsonl(d, n=24),
        "kto": _toy.unpaired_jsonl(d, n=16),
    }


@pytest.fixture(scope="session")
def run(tmp_path_factory, data):
    """``run(method, **overrides) -> output dir``: one in-process run through the recipe, cached per config
    (the batch-8 baselines serve several tests)."""
    done: dict[tuple, Path] = {}

    def go(method: str, **overrides) -> Path:
        kind = "kto" if overrides.get("loss") == "kto" else method
        cls, recipe = METHODS[method]
        cfg = build(cls, overrides={**COMMON, "data": str(data[kind]), **overrides})
        key = (method, json.dumps(to_dict(cfg), sort_keys=True))  # the full config: defaults spelled out or not
        if key not in done:
            out = tmp_path_factory.mktemp(method)
            recipe.run(dataclasses.replace(cfg, output_dir=str(out)))
            done[key] = out
        return done[key]

    return go


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_same_run(a: Path, b: Path, tol: float = TOL, label: str = "") -> None:
    """Same steps, same per-step metrics and same final weights within ``tol``; prints the largest gaps."""
    ma, mb = metrics(a), metrics(b)
    assert len(ma) >= 3 and [r["step"] for r in ma] == [r["step"] for r in mb]
    worst = {}
    for ra, rb in zip(ma, mb):
        for k in COMPARED:
            if k in ra or k in rb:
                worst[k] = max(worst.get(k, 0.0), abs(ra[k] - rb[k]))
    w = max_diff(weights(a), weights(b))
    print(f"\n[{label}] max |diff|: weights {w:.2e}, " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert all(v <= tol for v in worst.values()), worst
    assert w <= tol, w


def moved(out: Path) -> float:
    """Largest weight change of a full fine-tune from the initial tiny model."""
    init = load_model("tiny", seed=COMMON["seed"])[0].state_dict()
    final = weights(out)
    return max((final[k] - init[k]).abs().max().item() for k in final)


# ---------------------------------------------------------------- 1. accumulation


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_accumulation_equals_whole_batch(run, method):
    whole = run(method, batch_size=8, grad_accum=1)
    assert moved(whole) > 100 * TOL
    assert any(r["grad_norm"] > 1.0 for r in metrics(whole)), "clipping (max_grad_norm=1) should be active"
    assert_same_run(whole, run(method, batch_size=1, grad_accum=8), label=f"{method} 8x1 vs 1x8")
    assert_same_run(whole, run(method, batch_size=2, grad_accum=4), label=f"{method} 8x1 vs 2x4")


def test_toy_rows_differ_in_length(data):
    """Without different lengths test 1 could not tell a per-micro-batch mean from the global normaliser."""
    _, tok = load_model("tiny")
    for kind in ("sft", "dpo"):
        rows = _encode(data[kind], "sft" if kind == "sft" else "preference", tok)
        assert len({sum(map(len, r.responses)) for r in rows}) >= 4
        assert len({len(r.prompt) for r in rows}) >= 4


# ---------------------------------------------------------------- 2. grouping, padding, chunking


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_group_by_length_changes_nothing(run, method):
    grouped = run(method, batch_size=2, grad_accum=4, group_by_length=True)
    plain = run(method, batch_size=2, grad_accum=4, group_by_length=False)
    assert_same_run(grouped, plain, label=f"{method} grouped vs not")


def test_shared_prompt_equals_separate_sequences(run):
    """DPO's default batching (each pair one sequence, the prompt computed once) == chosen and rejected as
    separate right-padded sequences."""
    shared = run("dpo", batch_size=2, grad_accum=4, share_prompt=True)
    separate = run("dpo", batch_size=2, grad_accum=4, share_prompt=False)
    assert_same_run(shared, separate, label="dpo shared prompt vs separate")


def _encode(path: Path, kind: str, tok):
    examples = load_examples(str(path), kind).examples
    return encode_all(examples, tok, max_length=1024, max_prompt_length=None, truncation="truncate").rows


def _naive_token_logps(model, batch) -> torch.Tensor:
    """Full ``[B, T, V]`` log-softmax, gathered at each response token from the position before it: ``[B, T-1]``."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    logp = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
    lp_BT = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.where(mask[:, 1:], lp_BT, 0.0)


def _grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_logps_equal_sliced_and_naive(data):
    """Per response token within 1e-5, so per sequence within 1e-5 x its token count (the sums are ~-100 to
    -250, where float32 itself resolves only ~1e-5)."""
    model, tok = load_model("tiny", seed=1)
    pad = tok.pad_token_id
    rows = _encode(data["dpo"], "preference", tok)[:6]
    batch = collate(rows, (0, 1), pad)  # 12 sequences, right-padded to the longest
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    seqs = [(k, r) for k in (0, 1) for r in rows]
    with torch.no_grad():
        padded_BT = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        padded, n = sequence_logps(model, batch)
        alone = [collate([r], (k,), pad) for k, r in seqs]
        alone_BT = [token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])[0] for b in alone]
        alone_sum = torch.cat([sequence_logps(model, b)[0] for b in alone])
        naive_BT = _naive_token_logps(model, batch)
        chunked = {c: sequence_logps(model, batch, chunk=c)[0] for c in (1, 3, 1024)}
        chunked_BT = {c: token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk=c)
                      for c in (1, 3)}
    assert torch.equal(n, torch.tensor([float(len(r.responses[k])) for k, r in seqs]))
    assert torch.equal(padded, padded_BT.sum(-1))
    assert padded.abs().min() > 10.0  # real sums of many log-probs, not zeros

    token_gaps = {
        "alone": max((padded_BT[b, : len(t)] - t).abs().max().item() for b, t in enumerate(alone_BT)),
        "padding is zero": padded_BT[batch["attention_mask"] == 0].abs().max().item(),
        "naive": (padded_BT[:, 1:] - naive_BT).abs().max().item(),
        **{f"chunk={c}": (padded_BT - v).abs().max().item() for c, v in chunked_BT.items()},
    }
    seq_gaps = {"alone": (padded - alone_sum).abs() / n, "naive": (padded - naive_BT.sum(-1)).abs() / n}
    seq_gaps.update({f"chunk={c}": (padded - v).abs() / n for c, v in chunked.items()})
    seq_gaps = {k: v.max().item() for k, v in seq_gaps.items()}
    print(f"\n[log-probs] per token max |diff| vs padded: {token_gaps}\n[log-probs] per sequence / tokens: {seq_gaps}")
    assert all(g <= TOL for g in token_gaps.values()), token_gaps
    assert all(g <= TOL for g in seq_gaps.values()), seq_gaps

    naive_g = _grads(model, lambda: _naive_token_logps(model, batch))
    scale = max(v.abs().max().item() for v in naive_g.values())
    for c in (1, 3, 1024):
        g = _grads(model, lambda: sequence_logps(model, batch, chunk=c)[0])
        assert g.keys() == naive_g.keys()
        gap = max_diff(g, naive_g)
        print(f"[log-probs] grads chunk={c} vs naive: {gap:.2e} (largest gradient {scale:.1f})")
        assert gap <= TOL * scale


# ---------------------------------------------------------------- 3. cached vs live reference


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cached_reference_equals_live(run, lora):
    cached = run("dpo", batch_size=8, lora=lora, reference="cached")
    live = run("dpo", batch_size=8, lora=lora, reference="live")
    assert_same_run(cached, live, label=f"reference cached vs live, lora={lora}")
    # the reference must stay the initial model: from step 2 on the policy differs from it
    assert any(abs(r["rewards/margin"]) > 1e-3 for r in metrics(live)[1:])


def test_first_step_policy_equals_reference(run):
    """Before the first update the policy is the initial model, so the reference log-probs equal the policy's:
    every implicit reward of step 1 is 0 and its DPO loss is log 2. (A reference of zeros, cached or live, would
    pass the cached-vs-live comparison above; this does not.)"""
    first = metrics(run("dpo", batch_size=8, grad_accum=1))[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


# ---------------------------------------------------------------- 4. resume


class SimulatedCrash(RuntimeError):
    pass


class CrashingTask:
    """Wraps a Task and raises at the start of optimizer step ``crash_at`` (1-based), like a kill would."""

    def __init__(self, task, crash_at: int):
        self.task, self.crash_at, self.step = task, crash_at, 0

    def weight(self, row):
        return self.task.weight(row)

    def begin_step(self, model, rows):
        self.step += 1
        if self.step == self.crash_at:
            raise SimulatedCrash(f"simulated crash at step {self.step}")
        if hasattr(self.task, "begin_step"):
            self.task.begin_step(model, rows)

    def loss(self, model, rows, normaliser):
        return self.task.loss(model, rows, normaliser)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_equals_uninterrupted(run, tmp_path, monkeypatch, data, lora):
    settings = dict(batch_size=5, max_steps=6, save_steps=2, lora=lora)  # 30 rows of 24: crosses an epoch
    whole = run("dpo", **settings)

    out = tmp_path / "crashed"
    cfg = {**COMMON, **settings, "data": str(data["dpo"]), "output_dir": str(out)}
    real_train = dpo_recipe.train
    with monkeypatch.context() as m:
        m.setattr(dpo_recipe, "train", lambda task, *a, **kw: real_train(CrashingTask(task, crash_at=6), *a, **kw))
        with pytest.raises(SimulatedCrash):
            dpo_recipe.run(build(DPOConfig, overrides=cfg))
    # step 5 was logged but not checkpointed: resume starts from step 4 and must log step 5 once
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    saved = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    if lora:
        assert saved and all("lora_" in k for k in saved), "a LoRA checkpoint holds only the adapter"
    else:
        assert len(saved) == len(weights(whole))

    # a crash in the middle of writing a later checkpoint leaves only a temporary directory: ignored
    junk = out / "checkpoints" / ".tmp-step-00000006-99999"
    junk.mkdir()
    (junk / "state.json").write_text(json.dumps({"step": 6}))
    (junk / "trainable.safetensors").write_bytes(b"not a checkpoint")

    dpo_recipe.run(build(DPOConfig, overrides={**cfg, "resume": True}))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert_same_run(whole, out, tol=1e-6, label=f"resumed vs uninterrupted, lora={lora}")


# ---------------------------------------------------------------- 5. two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_two_processes_equal_one(run, tmp_path, data, method):
    out = tmp_path / "torchrun"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "alignkit.cli", method, f"data={data[method]}",
        f"output_dir={out}", "batch_size=4", *(f"{k}={v}" for k, v in COMMON.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(run(method, batch_size=8), out, label=f"{method} 2 processes x 4 vs 1 x 8")


# ---------------------------------------------------------------- 6. KTO


def test_kto_accumulation_equals_whole_batch(run):
    whole = run("dpo", loss="kto", batch_size=4, grad_accum=1)
    accumulated = run("dpo", loss="kto", batch_size=1, grad_accum=4)
    assert_same_run(whole, accumulated, label="kto 4x1 vs 1x4")
    assert any(abs(r["rewards/chosen"]) > 1e-3 for r in metrics(whole)[1:])
