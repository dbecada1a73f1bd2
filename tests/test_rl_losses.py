"""Golden values, equivalences and gradient claims for alignkit.rl.advantages and
alignkit.losses.policy (ALGORITHMS.md, "Online RL")."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses.policy import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    get_aggregation,
    get_kl_estimator,
    get_policy_loss,
    gspo,
    kl_k1,
    kl_k2,
    kl_k3,
    normaliser,
    ppo_clip,
    value_loss,
)
from alignkit.rl.advantages import (
    ADVANTAGES,
    discounted_returns,
    dr_grpo,
    gae,
    get_advantage,
    grpo,
    reinforce_pp,
    rloo,
    token_rewards,
)

D = torch.float64


# ------------------------------------------------------------------ registries


def test_registries_and_errors():
    assert set(ADVANTAGES) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "log_mean_exp"}
    assert ADVANTAGES["gae"].needs_value_model and not ADVANTAGES["gae"].needs_groups
    assert ADVANTAGES["rloo"].needs_groups and not ADVANTAGES["rloo"].needs_value_model
    assert POLICY_LOSSES["gspo"].sequence_level and not POLICY_LOSSES["ppo_clip"].sequence_level
    assert POLICY_LOSSES["kimi_omd"].sequence_level and ADVANTAGES["log_mean_exp"].hparams == ("tau",)
    assert KL_ESTIMATORS["k2"].loss_gradient == "reverse_kl"
    for getter, bad, choice in (
        (get_advantage, "ppo", "rloo"),
        (get_policy_loss, "trpo", "gspo"),
        (get_kl_estimator, "k4", "k3"),
        (get_aggregation, "mean", "token_mean"),
    ):
        with pytest.raises(ConfigError, match=choice):
            getter(bad)


# ------------------------------------------------------------------ KL estimators


def test_kl_golden():
    lp, ref = torch.tensor([0.5, -1.0], dtype=D), torch.zeros(2, dtype=D)
    # l = (0.5, -1): k1 = l; k2 = l^2/2; k3 = e^{-l} - 1 + l
    assert torch.allclose(kl_k1(lp, ref), torch.tensor([0.5, -1.0], dtype=D))
    assert torch.allclose(kl_k2(lp, ref), torch.tensor([0.125, 0.5], dtype=D))
    want = torch.tensor([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0], dtype=D)
    assert torch.allclose(kl_k3(lp, ref), want)
    # clamp keeps k3 finite: l = -1000 is evaluated at l = -20
    big = kl_k3(torch.tensor([-1000.0]), torch.zeros(1))
    assert torch.isfinite(big).all() and torch.allclose(big, torch.tensor([math.exp(20) - 21]))


def test_kl_gradient_claims_exact_expectation():
    """On a categorical over 5 outcomes, E_{y~pi_theta}[grad_theta k(y)] (samples fixed, gradient
    only through logp_theta) is computed exactly as sum_y sg(pi(y)) grad k(y)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=D).requires_grad_()
    logp_ref = torch.log_softmax(torch.randn(5, generator=g, dtype=D), -1)

    def expected_grad(k):
        logp = torch.log_softmax(theta, -1)
        (gr,) = torch.autograd.grad((logp.exp().detach() * k(logp, logp_ref)).sum(), theta)
        return gr

    logp = torch.log_softmax(theta, -1)
    (g_rev,) = torch.autograd.grad((logp.exp() * (logp - logp_ref)).sum(), theta)  # KL(pi||ref)
    logp = torch.log_softmax(theta, -1)
    (g_fwd,) = torch.autograd.grad((logp_ref.exp() * (logp_ref - logp)).sum(), theta)  # KL(ref||pi)
    assert torch.allclose(expected_grad(kl_k1), torch.zeros(5, dtype=D), atol=1e-12)
    assert torch.allclose(expected_grad(kl_k2), g_rev, atol=1e-12)
    assert torch.allclose(expected_grad(kl_k3), g_fwd, atol=1e-12)
    assert g_rev.abs().max() > 1e-3 and not torch.allclose(g_rev, g_fwd)
    # values: k1 and k3 unbiased for KL(pi||ref); k2 is not
    with torch.no_grad():
        logp = torch.log_softmax(theta, -1)
        kl = (logp.exp() * (logp - logp_ref)).sum()
        for k, unbiased in ((kl_k1, True), (kl_k2, False), (kl_k3, True)):
            est = (logp.exp() * k(logp, logp_ref)).sum()
            assert torch.isclose(est, kl) == unbiased


# ------------------------------------------------------------------ advantages


def test_token_rewards_and_returns_golden():
    r = token_rewards(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[1, 1, 0]]), 0.5)
    # -0.5*0.1 = -0.05; -0.5*0.2 + score 1 = 0.9 at the last real token; masked -> 0
    assert torch.allclose(r, torch.tensor([[-0.05, 0.9, 0.0]]))
    # G = [1 + .5*(2 + .5*3), 2 + .5*3, 3]
    ret = discounted_returns(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), gamma=0.5)
    assert torch.allclose(ret, torch.tensor([[2.75, 3.5, 3.0]]))


def test_gae_golden():
    # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5*0.75 = 0.125
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 1.0]]))


def _gae_slow(r, v, m, gamma, lam):
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if m[b][t]]
        for k, t in enumerate(idx):
            a = 0.0
            for l_, s in enumerate(idx[k:]):
                v_next = v[b][idx[k + l_ + 1]] if k + l_ + 1 < len(idx) else 0.0
                delta = r[b][s] + gamma * v_next - v[b][s]
                a += (gamma * lam) ** l_ * delta
            adv[b][t] = a
    ret = [[(adv[b][t] + v[b][t]) if m[b][t] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("left_pad", [False, True])
def test_gae_matches_slow_reference(left_pad):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 7
    r, v = torch.randn(B, T, generator=g, dtype=D), torch.randn(B, T, generator=g, dtype=D)
    lens = torch.tensor([7, 1, 4, 0, 6])
    pos = torch.arange(T)
    m = (pos >= T - lens[:, None]) if left_pad else (pos < lens[:, None])
    adv, ret = gae(r, v, m.long(), gamma=0.9, lam=0.8)
    ea, er = _gae_slow(r.tolist(), v.tolist(), m.tolist(), 0.9, 0.8)
    assert torch.allclose(adv, torch.tensor(ea, dtype=D), atol=1e-6)
    assert torch.allclose(ret, torch.tensor(er, dtype=D), atol=1e-6)


def test_group_advantages():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=D)
    # unbiased std of (1,0,0,1) = sqrt(4*0.25/3); (1 - 0.5)/0.57735 = 0.866025
    a = grpo(R, eps=0.0 + 1e-12)
    assert torch.allclose(a[0], torch.tensor([1, -1, -1, 1], dtype=D) * 0.5 / math.sqrt(1 / 3))
    assert torch.equal(a[1], torch.zeros(4, dtype=D))  # all-equal group -> 0
    assert torch.allclose(dr_grpo(R)[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=D))
    assert torch.allclose(rloo(torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor([[1.0, -0.5, -0.5]]))
    Rr = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=D)
    want = torch.tensor(
        [[Rr[b, i].item() - sum(Rr[b, j].item() for j in range(6) if j != i) / 5 for i in range(6)] for b in range(3)],
        dtype=D,
    )
    assert torch.allclose(rloo(Rr), want, atol=1e-12)
    for fn in (rloo, grpo):
        with pytest.raises(ValueError, match="G >= 2"):
            fn(torch.ones(2, 1))


def test_reinforce_pp():
    # scores (1, 0), no KL, one token each: returns (1, 0), mean .5, biased std .5 -> (1, -1)
    a = reinforce_pp(torch.tensor([1.0, 0.0]), torch.zeros(2, 1), torch.ones(2, 1), beta=0.1)
    assert torch.allclose(a, torch.tensor([[1.0], [-1.0]]), atol=1e-6)
    g = torch.Generator().manual_seed(3)
    score, kl = torch.randn(4, generator=g, dtype=D), torch.rand(4, 6, generator=g, dtype=D)
    m = (torch.arange(6) < torch.tensor([6, 2, 3, 5])[:, None]).long()
    a = reinforce_pp(score, kl, m, beta=0.2, gamma=0.9)
    ret = discounted_returns(token_rewards(score, kl, m, 0.2), m, gamma=0.9)
    vals = ret[m.bool()]
    assert torch.allclose(a[m.bool()], (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-8))
    assert torch.equal(a[~m.bool()], torch.zeros_like(a[~m.bool()]))


# ------------------------------------------------------------------ policy losses


def test_ppo_clip_golden_and_dual_clip():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 4.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]], dtype=D)
    m = torch.ones(1, 4)
    out = ppo_clip(ratio.log(), torch.zeros_like(ratio), adv, m)
    # -min(1.5, 1.2) = -1.2 (clipped); -min(-0.5, -0.8) = 0.8 (clipped);
    # -min(2.2, 2.2) = -2.2 (inside); -min(-4, -1.2) = 4 (unclipped is the larger loss)
    assert torch.allclose(out.losses, torch.tensor([[-1.2, 0.8, -2.2, 4.0]], dtype=D))
    assert out.metrics["clip_frac"].item() == pytest.approx(0.5)
    assert out.metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 4.0) / 4)
    dual = ppo_clip(ratio.log(), torch.zeros_like(ratio), adv, m, dual_clip=3.0)
    # only the A<0 token with loss 4 > -3*A = 3 is bounded
    assert torch.allclose(dual.losses, torch.tensor([[-1.2, 0.8, -2.2, 3.0]], dtype=D))
    assert dual.metrics["dual_clip_frac"].item() == pytest.approx(0.25)
    # clip-higher: eps_high=0.28 -> -min(1.5, 1.28)
    hi = ppo_clip(ratio.log(), torch.zeros_like(ratio), adv, m, eps_high=0.28)
    assert hi.losses[0, 0].item() == pytest.approx(-1.28)
    with pytest.raises(ValueError):
        ppo_clip(ratio.log(), torch.zeros_like(ratio), adv, m, dual_clip=0.5)


def test_first_inner_step_ratio_one_and_metrics_detached():
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 5, generator=g) * 3
    logp = old.clone().requires_grad_()
    m = (torch.arange(5) < torch.tensor([5, 2, 3])[:, None]).long()
    adv = torch.randn(3, 5, generator=g)
    for fn in (ppo_clip, gspo):
        out = fn(logp, old, adv, m)
        assert out.metrics["ratio_mean"].item() == 1.0
        assert out.metrics["clip_frac"].item() == 0.0
        assert all(not v.requires_grad for v in out.metrics.values())
        assert torch.equal(out.losses[~m.bool()], torch.zeros_like(out.losses[~m.bool()]))
    out = ppo_clip(logp, old, adv, m)
    assert torch.equal(out.losses, -adv * m)  # ratio exactly 1


def test_gspo_sequence_ratio():
    old = torch.zeros(2, 3, dtype=D)
    lr = torch.tensor([[1e-4, 3e-4, 7.0], [1e-3, 1e-3, 1e-3]], dtype=D)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = lr.clone().requires_grad_()
    out = gspo(logp, old, torch.tensor([1.0, 1.0], dtype=D), m)
    s0 = math.exp(2e-4)  # mean of (1e-4, 3e-4); the masked 7.0 is ignored; inside [1-3e-4, 1+3e-4]
    assert torch.allclose(out.losses, torch.tensor([[-s0, -s0, 0.0], [-(1 + 3e-4)] * 3], dtype=D), rtol=0, atol=1e-12)
    assert out.metrics["clip_frac"].item() == pytest.approx(0.5)
    out.losses.sum().backward()
    # seq 0: L = -exp(mean lr) on 2 tokens, dL/dlr_t = -s0/2 per copy, 2 copies -> -s0; seq 1 clipped -> 0
    assert torch.allclose(logp.grad, torch.tensor([[-s0, -s0, 0.0], [0.0, 0.0, 0.0]], dtype=D))
    # a broadcast [B, T] advantage gives the same as [B]
    out2 = gspo(lr, old, torch.ones(2, 3, dtype=D), m)
    assert torch.allclose(out2.losses, out.losses.detach())


def test_value_loss_golden():
    V, Vo, R = (torch.tensor([[1.0, 0.1, 5.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 9.0]]))
    out = value_loss(V, Vo, R, torch.tensor([[1, 1, 0]]), eps_v=0.2)
    # tok0: 0.5*max(0, (0.2-1)^2) = 0.32; tok1: V inside the clip range -> 0.5*0.01; tok2 masked
    assert torch.allclose(out.losses, torch.tensor([[0.32, 0.005, 0.0]]))
    assert out.metrics["vf_clip_frac"].item() == pytest.approx(0.5)


# ------------------------------------------------------------------ aggregation


def test_aggregation_golden():
    loss = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert normaliser("token_mean", [m]) == 3 and normaliser("seq_mean_token_mean", [m]) == 2
    assert AGGREGATIONS["token_mean"].fn(loss, m, step_normaliser=3).item() == pytest.approx(2.0)
    assert AGGREGATIONS["seq_mean_token_mean"].fn(loss, m, step_normaliser=2).item() == pytest.approx(2.25)
    assert AGGREGATIONS["seq_sum_constant"].fn(loss, m, step_normaliser=2, constant=4).item() == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="constant"):
        AGGREGATIONS["seq_sum_constant"].fn(loss, m, step_normaliser=2, constant=None)


def _pad(x, width, value=0.0):
    return torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("loss_name", sorted(POLICY_LOSSES))
def test_micro_batch_split_gives_same_gradient(agg, loss_name):
    """One micro-batch vs two, the second padded to a wider width with extra masked columns."""
    g = torch.Generator().manual_seed(5)
    B, T = 5, 6
    base = -torch.rand(B, T, generator=g, dtype=D) * 2
    old = base + 0.05 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)[:, None].expand(B, T)
    m = (torch.arange(T) < torch.tensor([6, 3, 1, 4, 5])[:, None]).long()
    spec, fn = AGGREGATIONS[agg], POLICY_LOSSES[loss_name].fn
    kw = {"eps_low": 0.02, "eps_high": 0.03} if loss_name == "gspo" else {}
    const = 8.0 if spec.needs_constant else None

    logp = base.clone().requires_grad_()
    n = normaliser(agg, [m])
    full = spec.fn(fn(logp, old, adv, m, **kw).losses, m, step_normaliser=n, constant=const)
    full.backward()
    g_full = logp.grad.clone()

    logp2 = base.clone().requires_grad_()
    parts = [(slice(0, 2), T), (slice(2, 5), T + 3)]
    masks = [_pad(m[s], w) for s, w in parts]
    n2 = normaliser(agg, masks)
    assert n2 == n
    total = 0.0
    for (s, w), mk in zip(parts, masks):
        lp = _pad(logp2[s], w, value=123.0)  # garbage in padded columns must not matter
        out = fn(lp, _pad(old[s], w, -50.0), _pad(adv[s], w, 9.0), mk, **kw)
        contrib = spec.fn(out.losses, mk, step_normaliser=n2, constant=const)
        contrib.backward()
        total += contrib.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    assert torch.isfinite(logp2.grad).all()
    assert torch.allclose(logp2.grad, g_full, atol=1e-12)
    assert g_full.abs().max() > 1e-4


def test_gspo_with_seq_mean_token_mean_is_the_paper_objective():
    g = torch.Generator().manual_seed(6)
    lp = 0.01 * torch.randn(3, 4, generator=g, dtype=D)
    m = (torch.arange(4) < torch.tensor([4, 2, 3])[:, None]).long()
    A = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    out = gspo(lp, torch.zeros_like(lp), A, m, eps_low=0.2, eps_high=0.2)
    agg = AGGREGATIONS["seq_mean_token_mean"].fn(out.losses, m, step_normaliser=normaliser("seq_mean_token_mean", [m]))
    s = torch.exp((lp * m).sum(-1) / m.sum(-1))
    paper = -torch.minimum(s * A, s.clamp(0.8, 1.2) * A).mean()
    assert torch.allclose(agg, paper)
