"""``alignkit.train.loop.clip_and_step``: the same update as ``clip_grad_norm_`` followed by ``optimizer.step()``,
for torch's fused AdamW (the coefficient passed to the kernel) and for the plain one."""

from __future__ import annotations

import pytest
import torch

from alignkit.train.loop import clip_and_step


def _setup(fused: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]
    # eps = 1 makes Adam's first step depend on the gradients' scale (with a tiny eps it is nearly sign(g))
    opt = torch.optim.AdamW(params, lr=0.1, eps=1.0, weight_decay=0.01, fused=fused or None, foreach=False if not fused else None)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0  # global norm about 17
    return params, opt


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [1.0, 100.0, 0.0])
def test_clip_and_step_is_clip_grad_norm_then_step(fused, max_norm):
    ref_params, ref_opt = _setup(fused)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm if max_norm > 0 else float("inf"))
    ref_opt.step()
    params, opt = _setup(fused)
    norm = clip_and_step(opt, params, max_norm)
    assert torch.equal(norm, ref_norm)
    assert opt.grad_scale is None
    clipped = max_norm == 1.0
    for p, q in zip(params, ref_params):
        m, m_ref = opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]
        if clipped and fused:  # divided by 1 / coefficient instead of multiplied by it: an ulp at most
            torch.testing.assert_close(m, m_ref, rtol=3e-7, atol=0)
            torch.testing.assert_close(p, q, rtol=3e-7, atol=1e-8)
        else:  # unclipped steps, and clipping without the fused kernel, are torch's arithmetic exactly
            assert torch.equal(m, m_ref) and torch.equal(p, q)
    if clipped:  # and clipping happened: the first moment is (1 - beta1) x the clipped gradient
        total = torch.sqrt(sum((opt.state[p]["exp_avg"] / 0.1).square().sum() for p in params))
        assert total == pytest.approx(1.0, rel=1e-5)
