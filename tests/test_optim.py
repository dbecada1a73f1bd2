"""``optimizer_state=bf16`` (alignkit/train/optim.py): AdamW with bf16 moments, the second rounded stochastically.

The claims:
1. stochastic rounding is unbiased (the mean of many roundings is the float32 value) and lands on one of the two
   bf16 neighbours; rounding to the nearest would be biased for the same value;
2. the second moment does not stall: under a constant gradient float32 AdamW's bias-corrected ``v`` is exactly
   g^2 at every step, and after 3,000 steps the bf16 state's is within 1% of it, where rounding ``v`` to the
   nearest bf16 leaves it at about 0.24 g^2 (the update then 2x too large);
3. the first step's update is torch's AdamW's to float32 rounding (it is computed from unrounded moments), and the
   stored moments are torch's rounded to bf16;
4. on the tiny model through the SFT recipe, 4 steps: the weights stay within the bound the rounding allows of
   torch's fused AdamW (and move far more than that), the moments are held in bf16, and the step in backward
   (one group per parameter) gives the same weights as the plain step, bit for bit;
5. resumed after a checkpoint == uninterrupted, bit for bit (the moments round-trip as bf16, the random bits are a
   function of the seed and the step);
6. FSDP2 is refused.
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
from alignkit.train import optim
from alignkit.train.optim import AdamWBf16State, round_stochastic_

COMMON = dict(model="tiny", lr=1e-3, adam_eps=1e-6, max_steps=4, batch_size=8, weight_decay=0.1, warmup_steps=1,
              scheduler="cosine", max_grad_norm=0.0, progress=False, seed=0)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    lo, hi = 1.0, 1.0 + 2 ** -7  # two neighbouring bf16 values (8 significant bits)
    assert torch.tensor([lo, hi]).to(torch.bfloat16).float().tolist() == [lo, hi]
    assert torch.tensor(lo + 2 ** -8 * 0.99).to(torch.bfloat16).item() == lo  # nothing between them
    gap = hi - lo
    for fraction in (0.1, 0.3, 0.75):
        for sign in (1.0, -1.0):
            x = torch.full((200_000,), sign * (1.0 + fraction * gap))
            bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(1))
            out = round_stochastic_(torch.empty_like(x, dtype=torch.bfloat16), x, bits).float()
            assert set(out.abs().unique().tolist()) <= {lo, hi}
            # the mean's standard error is gap * sqrt(f (1 - f) / n) < gap / 800
            assert out.mean().item() == pytest.approx(sign * (1.0 + fraction * gap), abs=gap / 200)
            nearest = x.to(torch.bfloat16).float().mean().item()
            assert abs(nearest - sign * (1.0 + fraction * gap)) >= 0.09 * gap  # what nearest rounding gives


def _constant_gradient_v_hat(steps: int) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamWBf16State([p], lr=0.0, betas=(0.9, 0.999), chunk=4096)  # lr 0: the parameter stays, the moments evolve
    p.grad = torch.full_like(p, 0.37)
    for _ in range(steps):
        opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    return state["exp_avg_sq"].float() / (1 - 0.999 ** steps)


def test_the_second_moment_does_not_stall():
    v_hat = _constant_gradient_v_hat(3000)
    g2 = 0.37 ** 2
    assert v_hat.mean().item() == pytest.approx(g2, rel=0.01)
    assert v_hat.std().item() < 0.05 * g2


def test_rounding_the_second_moment_to_the_nearest_stalls(monkeypatch):
    """The same run with nearest rounding: the bias-corrected v falls far below g^2. This is what claim 2 guards."""
    monkeypatch.setattr(optim, "round_stochastic_", lambda dst, src, bits: dst.copy_(src))
    v_hat = _constant_gradient_v_hat(3000)
    assert v_hat.mean().item() < 0.5 * 0.37 ** 2


def test_first_step_is_torch_adamw():
    torch.manual_seed(0)
    shapes = [(33, 17), (1000,), (5, 4, 3)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    grads = [torch.randn(s) for s in shapes]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = AdamWBf16State(ps, **kw, chunk=256)  # several slices per tensor
    ref = torch.optim.AdamW(qs, **kw)
    ours.step()
    ref.step()
    for p, q in zip(ps, qs):
        assert (p - q).abs().max().item() <= 1e-7
        assert not torch.equal(p.detach(), q.detach().clone().add_(1))  # sanity: compared the updated values
        s, r = ours.state[p], ref.state[q]
        assert torch.equal(s["exp_avg"], r["exp_avg"].to(torch.bfloat16))
        spacing = r["exp_avg_sq"].abs() * 2 ** -7
        assert ((s["exp_avg_sq"].float() - r["exp_avg_sq"]).abs() <= spacing).all()
        assert float(s["step"]) == 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _toy.sft_jsonl(tmp_path_factory.mktemp("data"), n=24)


def _run(data: Path, out: Path, **overrides) -> Path:
    sft_recipe.run(build(SFTConfig, overrides={**COMMON, "data": str(data), "output_dir": str(out), **overrides}))
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_training_stays_within_the_rounding_bound_of_fused_adamw(data, tmp_path, monkeypatch):
    """AdamW's update of a coordinate is lr * m_hat / (sqrt(v_hat) + eps), at most about lr in size; bf16 moments
    change m and sqrt(v) by at most 2^-8 and 2^-8 relative (v: 2^-7, halved by the root), so each step's update
    moves by at most about lr * 2^-7 (+ the drift of the weights it came from): 4 steps at lr <= 1e-3 stay under
    4 * 1e-3 * 2^-7 = 3.1e-5."""
    held: list[torch.optim.Optimizer] = []
    real = AdamWBf16State.__init__

    def keep(self, *args, **kwargs):
        real(self, *args, **kwargs)
        held.append(self)

    monkeypatch.setattr(AdamWBf16State, "__init__", keep)
    fp32 = _weights(_run(data, tmp_path / "fp32"))
    bf16 = _weights(_run(data, tmp_path / "bf16", optimizer_state="bf16"))
    from alignkit.models.loading import load_model

    init = load_model("tiny", seed=0)[0].state_dict()
    moved = _max_diff(fp32, {k: init[k] for k in fp32})
    gap = _max_diff(fp32, bf16)
    print(f"\nmoved {moved:.2e}, bf16 state against fp32 {gap:.2e}")
    assert moved > 1e-3
    assert 0 < gap <= 4 * 1e-3 * 2 ** -7
    (opt,) = held
    assert opt.state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
                             for s in opt.state.values())
    inside = _weights(_run(data, tmp_path / "inside", optimizer_state="bf16", optimizer_in_backward=True))
    assert _max_diff(bf16, inside) == 0.0


def test_resumed_equals_uninterrupted(data, tmp_path, monkeypatch):
    """Crash at the start of step 5 of 6 (checkpoints every 2 steps), resume from step 4: the same weights and
    losses, bit for bit. A resumed run whose moments came back as float32, or whose random bits differed, would
    round differently from step 5 on."""
    settings = dict(max_steps=6, save_steps=2, batch_size=5, optimizer_state="bf16")
    whole = _run(data, tmp_path / "whole", **settings)

    out = tmp_path / "crashed"
    _toy.run_until_crash(monkeypatch, sft_recipe, 5, lambda: _run(data, out, **settings))  # at step 5's start
    _run(data, out, resume=True, **settings)
    assert _max_diff(_weights(whole), _weights(out)) == 0.0
    losses = [[json.loads(line)["loss"] for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (whole, out)]
    assert len(losses[1]) == 6 and losses[0] == losses[1]


def test_fsdp2_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="optimizer_state=bf16"):
        build(SFTConfig, overrides={**COMMON, "data": str(data), "output_dir": str(tmp_path), "strategy": "fsdp2",
                                    "optimizer_state": "bf16"})
