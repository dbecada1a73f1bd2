"""``optimizer_in_backward=true`` (alignkit/train/in_backward.py): each parameter's AdamW step taken in its
post-accumulate-grad hook, its gradient freed at once.

The claims, each on the ``tiny`` model in fp32 through the SFT recipe (lr 1e-3 with warm-up then cosine decay,
weight decay 0.1, so a wrong learning rate or a second step shows; ``adam_eps=1e-6`` as in test_equivalence.py):
1. the same weights as the plain step (within 1e-6) after several steps, with one micro-batch a step, with
   accumulation over two (the last one steps), and with LoRA; the same logged gradient norm and learning rate;
2. while the armed backward runs, at most one parameter holds a gradient (the plain step holds them all);
3. resumed after a crash == uninterrupted (the optimizer state and the schedule round-trip through a checkpoint);
4. a non-finite loss gets no backward and a finite loss with non-finite gradients moves no parameter (the
   fused kernel's ``found_inf``): either step is skipped, and the run goes on;
5. what it cannot do is refused: clipping by the global norm, FSDP2, more than one process;
6. on the CPU it pins glibc's mmap threshold: after a large block is freed, a 1 MiB block still gets its own mmap
   (glibc would have raised the threshold and served it from the heap, which freed memory does not leave).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _toy
from alignkit.config import SFTConfig, build
from alignkit.errors import ConfigError
from alignkit.recipes import sft as sft_recipe

COMMON = dict(model="tiny", lr=1e-3, adam_eps=1e-6, max_steps=4, batch_size=8, weight_decay=0.1, warmup_steps=1,
              scheduler="cosine", max_grad_norm=0.0, progress=False, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _toy.sft_jsonl(tmp_path_factory.mktemp("data"), n=24)


def _cfg(data: Path, out: Path, **overrides) -> SFTConfig:
    return build(SFTConfig, overrides={**COMMON, "data": str(data), "output_dir": str(out), **overrides})


def _run(data: Path, out: Path, **overrides) -> Path:
    sft_recipe.run(_cfg(data, out, **overrides))
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("settings", [dict(), dict(batch_size=4, grad_accum=2), dict(lora=True)],
                         ids=["one-micro-batch", "accumulation", "lora"])
def test_same_weights_as_the_plain_step(data, tmp_path, settings):
    plain = _run(data, tmp_path / "plain", **settings)
    inside = _run(data, tmp_path / "inside", optimizer_in_backward=True, **settings)
    a, b = _weights(plain / "final" / "model.safetensors"), _weights(inside / "final" / "model.safetensors")
    from alignkit.models.loading import load_model

    init = load_model("tiny", seed=0)[0].state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # the steps moved the weights
    gap = _max_diff(a, b)
    print(f"\nmax |weight diff| {gap:.2e}")
    assert gap <= 1e-6
    ma, mb = _metrics(plain), _metrics(inside)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert rb["lr"] == ra["lr"] and rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
        assert "skipped" not in rb


@pytest.mark.parametrize("in_backward", [True, False])
def test_at_most_one_gradient_exists_at_a_time(data, tmp_path, in_backward):
    """A hook registered before the run's sees, after each parameter's gradient is complete, how many
    parameters hold one: 1 with the step in backward (each is freed before the next arrives), all of them at the
    end of the plain backward (the test's own check)."""
    from alignkit.data.formats import load_examples
    from alignkit.data.tokenize import encode_all
    from alignkit.models.loading import load_model
    from alignkit.recipes.sft import SFTTask
    from alignkit.train.loop import train

    model, tok = load_model("tiny", seed=0)
    rows = encode_all(load_examples(str(data), "sft").examples, tok, max_length=1024, max_prompt_length=None,
                      truncation="truncate").rows
    params = [p for p in model.parameters() if p.requires_grad]
    live: list[int] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    cfg = _cfg(data, tmp_path / "out", max_steps=2, optimizer_in_backward=in_backward)
    train(SFTTask(tok.pad_token_id, cfg.logits_chunk), model, rows, cfg)
    assert len(live) == 2 * len(params)  # every parameter's hook fired once a step
    assert max(live) == (1 if in_backward else len(params))
    assert all(p.grad is None for p in params)


def test_resumed_equals_uninterrupted(data, tmp_path, monkeypatch):
    """Crash at the start of step 5 of 6 (checkpoints every 2 steps), resume from step 4: the same weights and
    per-step metrics as the uninterrupted run. The schedule (warm-up then cosine) differs at every step, so a
    resumed optimizer that stepped with a stale learning rate, or lost its moments, would differ."""
    settings = dict(max_steps=6, save_steps=2, batch_size=5, optimizer_in_backward=True)
    whole = _run(data, tmp_path / "whole", **settings)

    out = tmp_path / "crashed"
    _toy.run_until_crash(monkeypatch, sft_recipe, 5, lambda: _run(data, out, **settings))  # at step 5's start
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    _run(data, out, resume=True, **settings)
    assert _max_diff(_weights(whole / "final" / "model.safetensors"), _weights(out / "final" / "model.safetensors")) <= 1e-6
    mw, mo = _metrics(whole), _metrics(out)
    assert [r["step"] for r in mo] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(mw, mo):
        assert rb["lr"] == ra["lr"] and rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7)


class _InfGradient(torch.autograd.Function):
    """The identity forward; every gradient flowing back through it becomes non-finite (x inf)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("poison", ["nan_loss_finite_gradient", "finite_loss_inf_gradient"])
def test_a_non_finite_step_moves_no_weight_and_the_run_goes_on(data, tmp_path, monkeypatch, caplog, poison):
    """Step 2 is poisoned: its loss + NaN (whose gradient is finite: a backward would update the weights, so none
    may run), or its loss through a function whose backward makes every gradient inf or NaN while the loss stays
    finite (each parameter's update must be skipped by the kernel). Either way the weights after step 2 are those
    after step 1, the step is logged as skipped, and the later steps train."""
    import logging

    original, calls = sft_recipe.SFTTask.loss, {"n": 0}

    def loss(self, model, rows, normaliser):
        calls["n"] += 1
        value, metrics = original(self, model, rows, normaliser)
        if calls["n"] == 2:
            value = value + float("nan") if poison == "nan_loss_finite_gradient" else _InfGradient.apply(value)
        return value, metrics

    monkeypatch.setattr(sft_recipe.SFTTask, "loss", loss)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        _run(data, out, optimizer_in_backward=True, save_steps=1, save_total_limit=10)
    assert [r.get("skipped", 0) for r in _metrics(out)] == [0, 1, 0, 0]
    assert "not finite, the step was skipped" in caplog.text
    ckpt = lambda s: _weights(out / "checkpoints" / f"step-{s:08d}" / "trainable.safetensors")  # noqa: E731
    w1, w2, w3 = ckpt(1), ckpt(2), ckpt(3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.isfinite(t).all() for t in w3.values()) and _max_diff(w2, w3) > 1e-5


def test_what_it_cannot_do_is_refused(data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="max_grad_norm=1.0"):
        _cfg(data, tmp_path, optimizer_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="strategy=fsdp2"):
        _cfg(data, tmp_path, optimizer_in_backward=True, strategy="fsdp2")
    _cfg(data, tmp_path, max_grad_norm=1.0)  # without it, clipping is fine
    from alignkit.models.loading import load_model
    from alignkit.train import dist
    from alignkit.train.loop import train

    cfg = _cfg(data, tmp_path / "two", optimizer_in_backward=True)
    model, tok = load_model("tiny", seed=0)
    monkeypatch.setattr(dist, "world", lambda: 2)  # as under torchrun: the loop refuses before any step
    with pytest.raises(ConfigError, match="one process"):
        train(sft_recipe.SFTTask(tok.pad_token_id, cfg.logits_chunk), model, [], cfg)


MMAP_PROBE = """
import ctypes, sys
import torch
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "in_backward":
    from alignkit.train.in_backward import OptimizerInBackward, per_parameter_groups
    w = torch.nn.Parameter(torch.zeros(4))
    OptimizerInBackward(torch.optim.AdamW(per_parameter_groups([w])))
libc.free(libc.malloc(8 << 20))  # freeing an 8 MiB mmapped block raises glibc's dynamic threshold past 1 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.parametrize("setting, mmapped", [("in_backward", "1"), ("plain", "0")])
def test_cpu_step_in_backward_pins_the_mmap_threshold(tmp_path, setting, mmapped):
    """6: a fresh process; ``plain`` shows that without the pin glibc serves the 1 MiB block from the heap."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    probe = tmp_path / "probe.py"
    probe.write_text(MMAP_PROBE)
    proc = subprocess.run([sys.executable, str(probe), setting], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == mmapped
