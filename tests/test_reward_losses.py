"""Golden values for the reward-model losses (alignkit/losses/reward.py), computed by hand on plain floats.

Golden batch R: P = 2 pairs, K = 2 aspects, r_w = ((2, 0), (-1, 1.5)), r_l = ((1, 0.5), (0.5, -0.5)),
margin m = (0.5, 1) per pair, so d = r_w - r_l - m = ((0.5, -1), (-2.5, 1)) and
(r_w + r_l)^2 = ((9, 0.25), (0.25, 1)).
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import RewardOutput, aggregate_steps, bradley_terry, prm_bce

F64 = torch.float64
R_W = [[2.0, 0.0], [-1.0, 1.5]]
R_L = [[1.0, 0.5], [0.5, -0.5]]
M = [0.5, 1.0]


def softplus(z: float) -> float:
    return math.log(1 + math.exp(z))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def bt(rw: float, rl: float, m: float = 0.0, c: float = 0.0) -> float:
    """-log sigma(rw - rl - m) + c (rw + rl)^2, on floats."""
    return softplus(-(rw - rl - m)) + c * (rw + rl) ** 2


def t(x, **kw):
    return torch.tensor(x, dtype=F64, **kw)


def expected(m=(0.0, 0.0), c=0.0):
    return [[bt(R_W[p][k], R_L[p][k], m[p], c) for k in range(2)] for p in range(2)]


def test_plain_bt():
    out = bradley_terry(t(R_W), t(R_L))
    assert isinstance(out, RewardOutput)
    torch.testing.assert_close(out.losses, t(expected()))
    torch.testing.assert_close(out.losses, t([[0.3132616875, 0.9740769842], [1.7014132780, 0.1269280110]]))
    assert out.correct.tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(out.margins, t([[1.0, -0.5], [-1.5, 2.0]]))
    assert out.count.item() == 4 and out.mask.all()


def test_bt_with_margin():
    out = bradley_terry(t(R_W), t(R_L), margin_P=t(M))
    torch.testing.assert_close(out.losses, t(expected(M)))
    torch.testing.assert_close(out.losses, t([[0.4740769842, 1.3132616875], [2.5788897343, 0.3132616875]]))
    # metrics do not subtract the margin
    assert out.correct.tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(out.margins, t([[1.0, -0.5], [-1.5, 2.0]]))
    # a [P, K] margin equal to the broadcast [P] one gives the same losses
    torch.testing.assert_close(bradley_terry(t(R_W), t(R_L), margin_P=t([[0.5, 0.5], [1.0, 1.0]])).losses, out.losses)


def test_bt_with_centering():
    out = bradley_terry(t(R_W), t(R_L), margin_P=t(M), center_coef=0.1)
    torch.testing.assert_close(out.losses, t(expected(M, 0.1)))
    torch.testing.assert_close(out.losses, t([[1.3740769842, 1.3382616875], [2.6038897343, 0.4132616875]]))


def test_bt_mask_zero_loss_and_grad():
    rw, rl = t(R_W, requires_grad=True), t(R_L, requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    out = bradley_terry(rw, rl, margin_P=t(M), mask_PK=mask, center_coef=0.1)
    full = expected(M, 0.1)
    torch.testing.assert_close(out.losses, t([[full[0][0], 0.0], [full[1][0], full[1][1]]]))
    assert out.losses[0, 1].item() == 0.0
    assert out.count.item() == 3
    assert out.correct.tolist() == [[True, False], [False, True]]
    assert out.margins[0, 1].item() == 0.0
    out.losses.sum().backward()
    assert rw.grad[0, 1].item() == 0.0 and rl.grad[0, 1].item() == 0.0
    assert rw.grad[0, 0].item() != 0.0


def test_bt_mask_blocks_nan_rewards_of_unlabelled_heads():
    rw = t([[1.0, float("nan")]], requires_grad=True)
    rl = t([[0.0, float("inf")]], requires_grad=True)
    out = bradley_terry(rw, rl, mask_PK=torch.tensor([[True, False]]), center_coef=0.1)
    assert out.losses[0, 1].item() == 0.0
    torch.testing.assert_close(out.losses[0, 0], t(bt(1.0, 0.0, c=0.1)))
    out.losses.sum().backward()
    assert torch.isfinite(rw.grad).all() and torch.isfinite(rl.grad).all()
    assert rw.grad[0, 1].item() == 0.0 and rl.grad[0, 1].item() == 0.0


def test_bt_one_dimensional():
    rw, rl = t([R_W[0][0], R_W[1][0]]), t([R_L[0][0], R_L[1][0]])
    out = bradley_terry(rw, rl, margin_P=t(M), center_coef=0.1)
    assert out.losses.shape == (2,)
    torch.testing.assert_close(out.losses, t([bt(2.0, 1.0, 0.5, 0.1), bt(-1.0, 0.5, 1.0, 0.1)]))
    torch.testing.assert_close(out.losses, t([1.3740769842, 2.6038897343]))
    assert out.correct.tolist() == [True, False] and out.count.item() == 2
    # same as the [P, 1] case
    two_d = bradley_terry(rw[:, None], rl[:, None], margin_P=t(M), center_coef=0.1)
    torch.testing.assert_close(two_d.losses[:, 0], out.losses)


def test_bt_gradient_formula():
    c = 0.1
    rw, rl = t(R_W, requires_grad=True), t(R_L, requires_grad=True)
    bradley_terry(rw, rl, margin_P=t(M), center_coef=c).losses.sum().backward()
    for p in range(2):
        for k in range(2):
            w, l, m = R_W[p][k], R_L[p][k], M[p]
            g_w = -(1 - sigmoid(w - l - m)) + 2 * c * (w + l)
            g_l = (1 - sigmoid(w - l - m)) + 2 * c * (w + l)
            assert rw.grad[p, k].item() == pytest.approx(g_w, abs=1e-12)
            assert rl.grad[p, k].item() == pytest.approx(g_l, abs=1e-12)


def test_bt_metrics_detached_and_half_precision():
    rw = torch.tensor(R_W, requires_grad=True)
    out = bradley_terry(rw, torch.tensor(R_L))
    assert out.losses.requires_grad and not out.margins.requires_grad and not out.correct.requires_grad
    half = bradley_terry(torch.tensor(R_W, dtype=torch.bfloat16), torch.tensor(R_L, dtype=torch.bfloat16))
    assert half.losses.dtype == torch.float32
    torch.testing.assert_close(half.losses, torch.tensor(expected(), dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_bt_shape_errors():
    with pytest.raises(ValueError):
        bradley_terry(t([1.0, 2.0]), t([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        bradley_terry(t(R_W), t(R_L), mask_PK=torch.tensor([True, False]))


def test_prm_bce_golden():
    logits = t([2.0, -1.0, 0.0], requires_grad=True)
    labels = torch.tensor([True, True, False])
    losses = prm_bce(logits, labels)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, t([softplus(-2.0), softplus(1.0), math.log(2.0)]))
    torch.testing.assert_close(losses, t([0.1269280110, 1.3132616875, 0.6931471806]))
    losses.sum().backward()  # d/dz = sigma(z) - y
    torch.testing.assert_close(logits.grad, t([sigmoid(2.0) - 1, sigmoid(-1.0) - 1, 0.5]))
    torch.testing.assert_close(prm_bce(t([2.0, -1.0, 0.0]), torch.tensor([1, 1, 0])), losses.detach())


def test_aggregate_steps():
    assert aggregate_steps([0.9, 0.5, 0.8]) == 0.5
    assert aggregate_steps([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_steps([0.9, 0.5, 0.8], "prod") == pytest.approx(0.36)
    assert aggregate_steps(torch.tensor([0.9, 0.5, 0.8], dtype=F64), "prod") == pytest.approx(0.36)
    assert aggregate_steps(torch.tensor([0.7]), "min") == pytest.approx(0.7)
    with pytest.raises(ConfigError, match="mean"):
        aggregate_steps([0.5], "mean")
    with pytest.raises(ValueError):
        aggregate_steps([], "min")
