"""Golden values for the reward-model losses (alignkit/losses/reward.py), computed by hand on plain floats.

Golden batch R: P = 2 pairs, K = 2 aspects, r_w = ((2, 0), (-1, 1.5)), r_l = ((1, 0.5), (0.5, -0.5)),
margin m = (0.5, 1) per pair, so d = r_w - r_l - m = ((0.5, -1), (-2.5, 1)) and
(r_w + r_l)^2 = ((9, 0.25), (0.25, 1)); soft labels s = (0.75, 0.5) per pair.
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
S = [0.75, 0.5]


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


def soft_bt(rw: float, rl: float, m: float, s: float) -> float:
    """-(s log sigma(d) + (1 - s) log sigma(-d)), d = rw - rl - m, on floats."""
    d = rw - rl - m
    return s * softplus(-d) + (1 - s) * softplus(d)


def test_bt_soft_targets_golden():
    rw, rl = t(R_W, requires_grad=True), t(R_L, requires_grad=True)
    out = bradley_terry(rw, rl, margin_P=t(M), target_P=t(S))
    torch.testing.assert_close(out.losses, t([[soft_bt(R_W[p][k], R_L[p][k], M[p], S[p]) for k in range(2)] for p in range(2)]))
    # softplus(d) - softplus(-d) = d: the soft loss is the hard one plus (1 - s) d, (1 - s) d = ((0.125, -0.25), (-1.25, 0.5))
    hard = expected(M)
    torch.testing.assert_close(out.losses, t([[hard[0][0] + 0.125, hard[0][1] - 0.25], [hard[1][0] - 1.25, hard[1][1] + 0.5]]))
    torch.testing.assert_close(out.losses, t([[0.5990769842, 1.0632616875], [1.3288897343, 0.8132616875]]))
    # the s = 1/2 pair does not care which response is preferred: its loss is even in d
    swapped = bradley_terry(t(R_L), t(R_W), margin_P=-t(M), target_P=t(S))
    torch.testing.assert_close(swapped.losses[1], out.losses[1].detach())
    # metrics are those of the hard labels
    assert out.correct.tolist() == [[True, False], [False, True]] and out.count.item() == 4
    # gradient: d loss / d r_w = sigma(d) - s
    out.losses.sum().backward()
    for p in range(2):
        for k in range(2):
            d = R_W[p][k] - R_L[p][k] - M[p]
            assert rw.grad[p, k].item() == pytest.approx(sigmoid(d) - S[p], abs=1e-12)
            assert rl.grad[p, k].item() == pytest.approx(S[p] - sigmoid(d), abs=1e-12)


def test_bt_soft_targets_broadcast_mask_and_hard_limit():
    # a target of 1 is the hard label, and None is exactly today's loss
    ones = bradley_terry(t(R_W), t(R_L), margin_P=t(M), center_coef=0.1, target_P=t([1.0, 1.0]))
    torch.testing.assert_close(ones.losses, t(expected(M, 0.1)), rtol=0, atol=1e-15)
    # a [P, K] target equal to the broadcast [P] one
    per_pair = bradley_terry(t(R_W), t(R_L), target_P=t(S)).losses
    per_entry = bradley_terry(t(R_W), t(R_L), target_P=t([[0.75, 0.75], [0.5, 0.5]])).losses
    torch.testing.assert_close(per_entry, per_pair)
    # masked entries stay 0 with no gradient; centering adds as before
    rw = t(R_W, requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    out = bradley_terry(rw, t(R_L), margin_P=t(M), mask_PK=mask, center_coef=0.1, target_P=t(S))
    assert out.losses[0, 1].item() == 0.0 and out.count.item() == 3
    torch.testing.assert_close(out.losses[1, 1], t(soft_bt(1.5, -0.5, 1.0, 0.5) + 0.1 * 1.0))
    out.losses.sum().backward()
    assert rw.grad[0, 1].item() == 0.0
    for bad in ([1.5, 0.5], [0.5, float("nan")], [-0.1, 1.0]):
        with pytest.raises(ValueError, match="target_P"):
            bradley_terry(t(R_W), t(R_L), target_P=t(bad))


@pytest.mark.parametrize("s,m", [(0.75, 0.0), (0.9, 0.0), (0.6, 0.5), (0.3, 0.0)])
def test_bt_soft_target_closed_form(s, m):
    """One pair with free scalar rewards: the loss is a cross-entropy in sigma(d) against s, convex in d with
    derivative sigma(d) - s, so gradient descent drives sigma(d) to s (d = logit(s); r_w - r_l = logit(s) + m).
    The hard label (s = 1) has no such fixed point: its gap keeps growing."""

    def descend(target):
        """d after 400 steps of gradient descent (lr 1) on the pair's rewards, both starting at 0."""
        r = t([0.0, 0.0], requires_grad=True)
        opt = torch.optim.SGD([r], lr=1.0)
        for _ in range(400):
            opt.zero_grad()
            bradley_terry(r[:1], r[1:], margin_P=t([m]), target_P=target).losses.sum().backward()
            opt.step()
        return (r[0] - r[1]).item() - m

    d = descend(t([s]))
    assert sigmoid(d) == pytest.approx(s, abs=1e-6)
    assert d == pytest.approx(math.log(s / (1 - s)), abs=1e-5)
    assert descend(None) > math.log(s / (1 - s)) + 2


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
