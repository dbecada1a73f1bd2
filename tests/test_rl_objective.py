"""alignkit.rl.objective: the presets as registry combinations, what a trainer runs between the rewards
and ``loss.backward()`` (``compute_advantages`` then ``policy_objective``), and the optima it reaches
(ALGORITHMS.md, "Online RL" and "Closed forms worth testing against").

The bandit tests run exactly the trainer's code path on a tabular bandit: one prompt, K = 5 one-token
responses, a fixed reward vector ``R`` and a non-uniform ``pi_ref``, policy ``softmax(theta)``. Per-function
golden values of the estimators, losses and aggregations live in ``test_rl_losses.py``; this file tests how
:mod:`alignkit.rl.objective` combines them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses.policy import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    get_aggregation,
    get_kl_estimator,
    normaliser,
    value_loss,
)
from alignkit.rl.advantages import ADVANTAGES, grpo
from alignkit.rl.objective import (
    PRESETS,
    KLController,
    Objective,
    compute_advantages,
    forward_kl_optimum,
    policy_objective,
    preset,
    whiten,
)

D = torch.float64

# ------------------------------------------------------------------ tabular bandit

R64 = torch.tensor([1.0, 0.3, -0.4, 0.8, -1.0], dtype=D)
PI_REF64 = torch.tensor([0.1, 0.3, 0.25, 0.15, 0.2], dtype=D)  # sums to 1 in float64 (not after a float32 trip)
R, PI_REF = R64.float(), PI_REF64.float()  # what the bandit trains with
BETA = 0.5
TOL = 2e-2  # total variation
GROUPS, G = 64, 8  # 64 independent groups (prompts) of the same bandit, G responses each: 512 samples a step


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def reverse_kl_optimum(beta: float = BETA) -> torch.Tensor:
    """argmax_pi E_pi[R] - beta KL(pi || pi_ref) = pi_ref exp(R / beta) / Z."""
    p = PI_REF64 * torch.exp(R64 / beta)
    return p / p.sum()


PI_STAR = reverse_kl_optimum()
PI_FWD = forward_kl_optimum(PI_REF64, R64, BETA)


def train_bandit(obj: Objective, *, seed: int = 0, steps: int = 200, lr: float = 0.1, average_last: int = 50):
    """Trains ``softmax(theta)`` on the bandit with the trainer's functions; returns (policy, value).

    Each step: sample GROUPS*G actions from the current policy (seeded generator), ``logp`` [B, 1] through
    theta, mask all ones, score ``R[a]``; ``compute_advantages`` (with the detached per-token KL estimate for
    ``kl_in="reward"``, and a tabular critic ``V`` for ``gae``), then ``policy_objective`` with
    ``old_logp = logp.detach()`` (one inner PPO step: ratio 1) and the step normaliser of the aggregation;
    Adam with lr decaying as 1/(1 + step/50). The returned policy is the Polyak average of the last
    ``average_last`` iterates, which removes most of the sampling noise of the final iterates.

    Why gae needs a value model: GAE's baseline is the critic's ``V``. For a one-token response
    ``delta_0 = r_0 + gamma*0 - V_0``, so ``A = R - beta*k1 - V``: REINFORCE with a learned baseline. The
    critic here is one scalar (one prompt, one state), trained with the real PPO ``value_loss`` towards the
    returns ``A + V`` that ``compute_advantages`` hands back.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(len(R), requires_grad=True)
    value = torch.zeros((), requires_grad=True)
    params = [theta, value] if obj.needs_value_model else [theta]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s / 50))
    log_ref = PI_REF.log()
    kl_fn = get_kl_estimator(obj.kl_estimator).fn
    B = GROUPS * G
    mask = torch.ones(B, 1)
    step_normaliser = normaliser(obj.aggregation, [mask])
    avg = torch.zeros(len(R), dtype=D)
    for step in range(steps):
        logpi = torch.log_softmax(theta, 0)
        a = torch.multinomial(logpi.detach().exp(), B, replacement=True, generator=gen)
        logp, ref_logp = logpi[a][:, None], log_ref[a][:, None]
        values = value.detach().expand(B, 1) if obj.needs_value_model else None
        adv, returns = compute_advantages(
            obj, R[a], mask, group_size=G, kl_BT=kl_fn(logp, ref_logp).detach(), values_BT=values
        )
        loss, _ = policy_objective(
            obj, logp, logp.detach(), adv, mask, step_normaliser=step_normaliser, ref_logp_BT=ref_logp
        )
        if obj.needs_value_model:
            v = value.expand(B, 1)
            loss = loss + value_loss(v, v.detach(), returns, mask).losses.sum() / B
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - average_last:
            avg += torch.softmax(theta.detach().double(), 0) / average_last
    return avg, value.detach().item()


def test_bandit_optima_are_far_apart():
    """The tolerance can tell the optima apart: reverse-KL optimum, forward-KL optimum, pi_ref and the
    argmax are pairwise much further than TOL in total variation for R, PI_REF, BETA."""
    assert tv(PI_STAR, PI_FWD) > 5 * TOL  # ~0.17
    assert tv(PI_STAR, PI_REF) > 10 * TOL  # ~0.43
    assert tv(PI_STAR, torch.eye(len(R))[R.argmax()]) > 20 * TOL  # ~0.66


@pytest.mark.parametrize(
    "name, obj",
    [
        # GRPO-style: group-normalised advantage of the sequence reward R - beta*k1, PPO clip. At pi* the
        # sequence reward R(y) - beta log(pi*(y)/pi_ref(y)) = beta log Z is the same for every y, so every
        # group's advantage is exactly 0: pi* is a fixed point whatever the std normalisation does.
        ("grpo_k1_reward", Objective(advantage="grpo", kl_estimator="k1", kl_in="reward", kl_coef=BETA)),
        # RLOO preset (k1 in the sequence reward, leave-one-out baseline).
        ("rloo", preset("rloo", kl_coef=BETA)),
        # REINFORCE++ preset (token-level k1 in the reward, batch-normalised returns).
        ("reinforce_pp", preset("reinforce_pp", kl_coef=BETA)),
        # PPO preset as is (gae with a tabular critic, k1 in the reward, whitened advantages) ...
        ("ppo_gae", preset("ppo", kl_coef=BETA)),
        # ... and without whitening, where the critic's V is the only baseline.
        ("ppo_gae_unwhitened", preset("ppo", kl_coef=BETA, whiten_advantages=False)),
        # k2 in the LOSS: expected gradient = grad KL(pi || pi_ref), so the same optimum, PROVIDED the
        # advantage is an unbiased estimate of the reward gradient (rloo; see the grpo test below).
        ("rloo_k2_loss", Objective(advantage="rloo", kl_estimator="k2", kl_in="loss", kl_coef=BETA)),
        # Dr. GRPO's R_i - mean_G R = (G-1)/G * rloo: an unbiased reward gradient scaled by (G-1)/G, so
        # kl_coef = BETA*(G-1)/G in the loss has the optimum of BETA (tokens sum over constant 1 = one token).
        (
            "dr_grpo_k2_loss",
            preset("dr_grpo", aggregation_constant=1.0, kl_in="loss", kl_estimator="k2", kl_coef=BETA * (G - 1) / G),
        ),
    ],
)
def test_bandit_converges_to_reverse_kl_optimum(name, obj):
    """pi* = pi_ref exp(R/beta)/Z, the optimum of E[R] - beta KL(pi||pi_ref), within TOL total variation."""
    pi, value = train_bandit(obj)
    assert tv(pi, PI_STAR) < TOL, (name, pi)
    assert tv(pi, PI_FWD) > 5 * TOL
    if obj.needs_value_model:
        # the critic learns E_pi[R - beta*k1], which at pi* is beta*log Z for every action
        beta_log_z = BETA * math.log(float((PI_REF64 * torch.exp(R64 / BETA)).sum()))
        assert value == pytest.approx(beta_log_z, abs=0.01)


def test_bandit_dr_grpo_scaling_is_visible():
    """The (G-1)/G factor of the Dr. GRPO test above is not within the tolerance by accident."""
    assert tv(reverse_kl_optimum(BETA * (G - 1) / G), PI_STAR) > TOL


def test_bandit_k3_in_loss_converges_to_forward_kl_optimum():
    """k3 in the loss: expected gradient = grad of the FORWARD KL(pi_ref || pi), so the policy reaches
    ``forward_kl_optimum`` (pi_k (R_k - E_pi R) = beta (pi_k - pi_ref_k)), not pi*."""
    obj = Objective(advantage="rloo", kl_estimator="k3", kl_in="loss", kl_coef=BETA)
    pi, _ = train_bandit(obj)
    assert tv(pi, PI_FWD) < TOL, pi
    assert tv(pi, PI_STAR) > 5 * TOL


def test_bandit_k1_in_loss_does_not_regularise():
    """k1 in the loss: expected gradient E[grad logp] = 0, so only the reward acts and the policy runs to the
    argmax far beyond pi* (pi*[argmax] = 0.34)."""
    obj = Objective(advantage="rloo", kl_estimator="k1", kl_in="loss", kl_coef=BETA)
    pi, _ = train_bandit(obj)
    best = int(R.argmax())
    assert PI_STAR[best] < 0.4
    assert pi[best] > 0.9, pi
    assert tv(pi, PI_STAR) > 0.5


def test_bandit_grpo_std_normalisation_rescales_kl_in_loss():
    """GRPO's advantage divides by the group std of R, so a KL term in the LOSS (not in the reward) competes
    with a reward scaled by ~1/std: with k2 in the loss and the grpo advantage the policy does NOT reach pi*
    (the optimum of ``objective.py``'s docstring holds for an unscaled advantage such as rloo, tested above)."""
    obj = Objective(advantage="grpo", kl_estimator="k2", kl_in="loss", kl_coef=BETA)
    pi, _ = train_bandit(obj)
    assert tv(pi, PI_STAR) > 10 * TOL, pi
    assert pi[int(R.argmax())] > PI_STAR[int(R.argmax())] + 0.3  # the effective beta is smaller


# ------------------------------------------------------------------ first inner step


def _objective_for(name: str, **overrides) -> Objective:
    needs_const = get_aggregation(PRESETS[name].get("aggregation", Objective.aggregation)).needs_constant
    return preset(name, aggregation_constant=8.0 if needs_const else None, **overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_first_inner_step_ratio_is_one(name):
    """With old_logp = logp.detach() every preset's policy loss has ratio exactly 1 and clips nothing (kimi_omd
    does not clip); the metrics are (sum, count) pairs over this micro-batch's valid tokens."""
    obj = _objective_for(name, kl_in="loss", kl_coef=0.1)
    g = torch.Generator().manual_seed(11)
    B, T = 4, 6
    m = (torch.arange(T) < torch.tensor([6, 2, 4, 1])[:, None]).long()
    logp = torch.where(m.bool(), -3 * torch.rand(B, T, generator=g), torch.full((B, T), 50.0)).requires_grad_()
    adv = torch.randn(B, generator=g)[:, None] * m
    ref = logp.detach() + torch.randn(B, T, generator=g)
    n = normaliser(obj.aggregation, [m])
    loss, metrics = policy_objective(obj, logp, logp.detach(), adv, m, step_normaliser=n, ref_logp_BT=ref)
    n_tok = float(m.sum())
    kimi = obj.policy_loss == "kimi_omd"
    assert kimi or metrics["policy/clip_frac"] == (0.0, n_tok)
    s, c = metrics["policy/ratio_mean"]
    assert c == n_tok and s / c == 1.0
    assert metrics["kl"][1] == n_tok and math.isfinite(metrics["kl"][0])
    # ratio 1: the clipped losses are -A on every valid token (GSPO's A_i is the broadcast value), kimi_omd's
    # squared loss is A^2 (its gradient, -2 tau A, is tested in test_kimi_omd.py), plus the KL
    per_token = ((adv**2 if kimi else -adv) + 0.1 * get_kl_estimator(obj.kl_estimator).fn(logp.detach(), ref)) * m
    agg = get_aggregation(obj.aggregation).fn(per_token, m, step_normaliser=n, constant=obj.aggregation_constant)
    assert torch.allclose(loss.detach(), agg, atol=1e-6, rtol=0)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[~m.bool()], torch.zeros_like(logp.grad[~m.bool()]))


# ------------------------------------------------------------------ presets


def test_presets_are_registry_combinations():
    registries = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES, "aggregation": AGGREGATIONS,
                  "kl_estimator": KL_ESTIMATORS}
    fields = set(Objective.__dataclass_fields__)
    assert set(PRESETS) == {"ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "kimi"}
    for name, entry in PRESETS.items():
        assert set(entry) <= fields, name
        obj = _objective_for(name)
        assert obj.validate() is obj
        for key, registry in registries.items():
            assert getattr(obj, key) in registry, (name, key)
        for key, val in entry.items():
            assert getattr(obj, key) == val, (name, key)
    # the flags a trainer asks about
    assert preset("ppo").needs_value_model and not preset("grpo").needs_value_model
    assert preset("grpo").needs_groups and preset("rloo").needs_groups and not preset("reinforce_pp").needs_groups
    assert {n for n in PRESETS if _objective_for(n).uses_kl} == {"ppo", "grpo", "rloo", "reinforce_pp"}
    dapo = preset("dapo")
    assert dapo.eps_high > dapo.eps_low
    assert POLICY_LOSSES[preset("gspo").policy_loss].sequence_level


def test_preset_errors_and_overrides():
    with pytest.raises(ConfigError, match="constant"):
        preset("dr_grpo")
    with pytest.raises(ConfigError, match="constant"):
        preset("dr_grpo", aggregation_constant=0.0)
    assert preset("dr_grpo", aggregation_constant=1024).aggregation_constant == 1024
    with pytest.raises(ConfigError) as e:
        preset("x")
    assert "'x'" in str(e.value) and all(n in str(e.value) for n in PRESETS)
    # None overrides are ignored, others replace the preset's value and are validated
    assert preset("grpo", kl_coef=None, eps_high=None, dual_clip=None) == preset("grpo")
    assert preset("grpo", kl_coef=0.5).kl_coef == 0.5
    assert preset("grpo", kl_coef=0.0).kl_coef == 0.0  # falsy but not None: applied
    for bad in ({"kl_in": "both"}, {"kl_coef": -1.0}, {"dual_clip": 1.0}, {"eps_low": -0.1},
                {"advantage": "ppo"}, {"kl_estimator": "k4"}):
        with pytest.raises(ConfigError):
            preset("grpo", **bad)


# ------------------------------------------------------------------ split invariance


def _pad(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("kl", ["preset", "loss"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_micro_batch_split_invariance(name, kl):
    """Advantages are computed once on the rollout batch; the summed losses of two micro-batches (right-
    padded to different widths, garbage in the padding) with the step normaliser counted over both masks
    give the whole-batch loss and gradient. ``kl="loss"`` turns on a k-estimator term in the loss."""
    over = {"kl_in": "loss", "kl_coef": 0.1} if kl == "loss" else {}
    obj = _objective_for(name, **over)
    g = torch.Generator().manual_seed(5)
    B, T, group = 6, 5, 3
    m = (torch.arange(T) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).long()
    base = -torch.rand(B, T, generator=g, dtype=D) * 2
    # rows 0, 2, 4 are stale (ratio != 1, PPO clips some tokens); rows 1, 3, 5 are fresh (GSPO's tiny clip
    # range leaves their gradient on)
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=D) * (torch.arange(B) % 2 == 0)[:, None]
    ref = base + 0.5 * torch.randn(B, T, generator=g, dtype=D)
    scores = torch.randn(B, generator=g)
    values = torch.randn(B, T, generator=g) if obj.needs_value_model else None
    kl_BT = get_kl_estimator(obj.kl_estimator).fn(old, ref).float()
    adv, _ = compute_advantages(obj, scores, m, group_size=group, kl_BT=kl_BT, values_BT=values)
    adv = adv.to(D)

    logp = base.clone().requires_grad_()
    full, _ = policy_objective(obj, logp, old, adv, m, step_normaliser=normaliser(obj.aggregation, [m]),
                               ref_logp_BT=ref)
    full.backward()
    g_full = logp.grad.clone()
    assert g_full.abs().max() > 1e-4

    logp2 = base.clone().requires_grad_()
    parts = [(slice(0, 2), T), (slice(2, 6), T + 3)]
    masks = [_pad(m[s], w, 0) for s, w in parts]
    n = normaliser(obj.aggregation, masks)
    assert n == normaliser(obj.aggregation, [m])
    total = 0.0
    for (s, w), mk in zip(parts, masks):
        loss, _ = policy_objective(obj, _pad(logp2[s], w, 123.0), _pad(old[s], w, -50.0),
                                   _pad(adv[s], w, 9.0), mk, step_normaliser=n,
                                   ref_logp_BT=_pad(ref[s], w, -77.0))
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), abs=1e-10)
    assert torch.allclose(logp2.grad, g_full, atol=1e-10, rtol=0)


# ------------------------------------------------------------------ golden values


def test_compute_advantages_grpo_k1_in_reward_golden():
    """grpo, k1 in the reward, beta = 0.5, groups of 3, T = 2.

    Group 0: scores (1.2, 0.5, 0.5), per-token k1 rows (0.1, 0.3), (1.0, [9.0 masked]), (0.25, -0.25), so
    sum_t kl = (0.4, 1.0, 0.0) and the sequence rewards R - 0.5*sum kl = (1.0, 0.0, 0.5): mean 0.5,
    unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5, advantages (1, -1, 0) (up to grpo's eps = 1e-6),
    broadcast over each row's valid tokens, 0 on padding. Group 1: equal rewards (0.3 - 0) -> 0.
    With kl_in="loss" the KL does not enter the advantage: it is grpo of the raw scores."""
    obj = Objective(advantage="grpo", kl_estimator="k1", kl_in="reward", kl_coef=0.5)
    scores = torch.tensor([1.2, 0.5, 0.5, 0.3, 0.3, 0.3])
    kl = torch.tensor([[0.1, 0.3], [1.0, 9.0], [0.25, -0.25], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    m = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 1]])
    adv, returns = compute_advantages(obj, scores, m, group_size=3, kl_BT=kl)
    want = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert returns is None
    assert torch.allclose(adv, want * 0.5 / (0.5 + 1e-6), atol=1e-6, rtol=0)
    no_kl, _ = compute_advantages(Objective(advantage="grpo", kl_in="loss"), scores, m, group_size=3, kl_BT=kl)
    assert torch.allclose(no_kl, grpo(scores.view(2, 3)).reshape(-1, 1) * m)
    # kl_coef = 0 in the reward is the same as no penalty, and needs no kl_BT
    zero, _ = compute_advantages(Objective(advantage="grpo", kl_in="reward", kl_coef=0.0), scores, m, group_size=3)
    assert torch.equal(zero, no_kl)
    with pytest.raises(ValueError, match="kl_BT"):
        compute_advantages(obj, scores, m, group_size=3)
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages(obj, scores, m, group_size=4, kl_BT=kl)


def test_compute_advantages_reinforce_pp_golden():
    """reinforce_pp, k1 in the reward, beta = 0.5, gamma = 0.5.

    Row 0: score 1, kl (0.2, 0.4, [5.0 masked]) -> token rewards (-0.1, -0.2 + 1 = 0.8); returns
    G_1 = 0.8, G_0 = -0.1 + 0.5*0.8 = 0.3. Row 1: score -0.8, kl (0.6) -> reward -0.3 - 0.8 = -1.1 = G_0.
    Valid returns (0.3, 0.8, -1.1): mean 0, biased std sqrt((0.09 + 0.64 + 1.21) / 3) = sqrt(1.94/3);
    A = returns / that."""
    obj = preset("reinforce_pp", kl_coef=0.5, gamma=0.5)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = torch.tensor([[0.2, 0.4, 5.0], [0.6, 0.0, 0.0]])
    adv, returns = compute_advantages(obj, torch.tensor([1.0, -0.8]), m, kl_BT=kl)
    want = torch.tensor([[0.3, 0.8, 0.0], [-1.1, 0.0, 0.0]]) / math.sqrt(1.94 / 3)
    assert returns is None
    assert torch.allclose(adv, want, atol=1e-5, rtol=0)


def test_compute_advantages_gae_golden():
    """gae (the ppo preset), k1 in the reward, beta = 0.5, gamma = 1, lam = 0.5, whiten_advantages=False.

    Row 0: score 1, kl (0.2, 0.4) -> rewards (-0.1, 0.8); V = (0.5, 0.25): delta_1 = 0.8 - 0.25 = 0.55,
    delta_0 = -0.1 + 0.25 - 0.5 = -0.35, A = (-0.35 + 0.5*0.55, 0.55) = (-0.075, 0.55), returns = A + V =
    (0.425, 0.8). Row 1 (one valid token): score -1, kl 0.6 -> reward -1.3, V 0.2: A = -1.5, returns -1.3;
    the masked V = 9 never enters. With whitening (the preset's default) A = whiten(A) and the returns are
    unchanged."""
    obj = preset("ppo", kl_coef=0.5, lam=0.5, whiten_advantages=False)
    m = torch.tensor([[1, 1], [1, 0]])
    kl, scores = torch.tensor([[0.2, 0.4], [0.6, 7.0]]), torch.tensor([1.0, -1.0])
    values = torch.tensor([[0.5, 0.25], [0.2, 9.0]])
    adv, returns = compute_advantages(obj, scores, m, kl_BT=kl, values_BT=values)
    assert torch.allclose(adv, torch.tensor([[-0.075, 0.55], [-1.5, 0.0]]), atol=1e-6, rtol=0)
    assert torch.allclose(returns, torch.tensor([[0.425, 0.8], [-1.3, 0.0]]), atol=1e-6, rtol=0)
    adv_w, returns_w = compute_advantages(replace(obj, whiten_advantages=True), scores, m, kl_BT=kl, values_BT=values)
    assert torch.allclose(adv_w, whiten(adv, m)) and torch.equal(returns_w, returns)
    with pytest.raises(ValueError, match="values_BT"):
        compute_advantages(obj, scores, m, kl_BT=kl)


def test_whiten_golden():
    """Valid entries (1, 2, 3): mean 2, biased std sqrt(2/3); (x - 2)/sqrt(2/3) = (-1.2247, 0, 1.2247);
    masked entries (100, 0, ...) are 0 and do not enter the statistics."""
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -7.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s = math.sqrt(2 / 3)
    want = torch.tensor([[-1 / s, 0.0, 0.0], [1 / s, 0.0, 0.0]], dtype=D)
    assert torch.allclose(whiten(x, m), want, atol=1e-7, rtol=0)
    # constant input: std 0, eps keeps it finite and 0; empty mask gives zeros
    assert torch.equal(whiten(torch.full((2, 2), 3.0), torch.ones(2, 2)), torch.zeros(2, 2))
    assert torch.equal(whiten(x, torch.zeros(2, 3)), torch.zeros(2, 3, dtype=D))


def test_kl_controller_golden():
    """Adaptive (Ziegler et al. 1909.08593): beta *= 1 + clip((KL - target)/target, -0.2, 0.2) * n/horizon.

    beta 0.1, target 6, horizon 100: KL 12 -> error 1 clipped to 0.2 -> 0.1*(1 + 0.2*10/100) = 0.102 after
    10 steps; then KL 3 -> error -0.5 clipped to -0.2 -> 0.102*(1 - 0.02) = 0.09996; then KL 6.6 -> error
    0.1, one step -> 0.09996*(1 + 0.001); NaN (no estimate) leaves beta unchanged. Fixed (target 0) never
    changes."""
    c = KLController(0.1, target=6.0, horizon=100)
    assert c.update(12.0, n_steps=10) == pytest.approx(0.102, abs=1e-15)
    assert c.update(3.0, n_steps=10) == pytest.approx(0.102 * 0.98, abs=1e-15)
    assert c.update(6.6) == pytest.approx(0.102 * 0.98 * 1.001, abs=1e-15)
    before = c.beta
    assert c.update(float("nan")) == before
    c2 = KLController(1.0, target=6.0, horizon=100)
    c2.load_state_dict(c.state_dict())
    assert c2.beta == c.beta
    fixed = KLController(0.05)
    assert fixed.update(100.0, n_steps=1000) == 0.05 and fixed.update(0.0) == 0.05


@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_forward_kl_optimum_is_stationary(beta):
    """pi = forward_kl_optimum satisfies pi_k (R_k - c) = beta (pi_k - pi_ref_k) with c = E_pi R to 1e-9,
    i.e. the softmax gradient of E_pi R - beta KL(pi_ref || pi) vanishes; a small beta (below the reward
    spread) exercises the bisection's lower end."""
    ref, r = PI_REF64, R64
    pi = forward_kl_optimum(ref, r, beta)
    assert pi.dtype == D and (pi > 0).all() and abs(pi.sum().item() - 1) < 1e-12
    c = (pi * r).sum()
    assert torch.allclose(pi * (r - c), beta * (pi - ref), atol=1e-9, rtol=0)
    theta = pi.log().clone().requires_grad_()
    logpi = torch.log_softmax(theta, 0)
    (logpi.exp() * r).sum().add(beta * (ref * logpi).sum()).backward()
    assert theta.grad.abs().max() < 1e-9
    # float32 in, float32 out
    assert forward_kl_optimum(PI_REF, R, beta).dtype == torch.float32
