"""Closed-form optima of the preference losses on a tabular bandit (ALGORITHMS.md, "Closed forms
worth testing against").

One prompt, K one-token responses, a known reward r and reference pi_ref. The policy is
pi = softmax(theta) (float64), so logp of response i is log pi_i with token count 1. We minimise the
EXPECTED loss over all ordered pairs (w=i, l=j), i != j, weighted by the probability p_ij that i is
preferred (Bradley-Terry: p_ij = sigma(r_i - r_j)), using the registry's own loss functions, and
compare the trained policy with the optimum each docstring derives.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import PairLogps, UnpairedLogps, cdpo, dpo, hinge, ipo, kto, kto_reference_point, orpo, robust, simpo

F64 = torch.float64
R = torch.tensor([1.0, 0.3, -0.4, 0.8, -1.0], dtype=F64)
PI_REF = torch.tensor([0.1, 0.3, 0.25, 0.15, 0.2], dtype=F64)


def bradley_terry(r: torch.Tensor) -> torch.Tensor:
    """P[i, j] = sigma(r_i - r_j), the probability that i is preferred to j."""
    return torch.sigmoid(r[:, None] - r[None, :])


def ordered_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    keep = i != j
    return i[keep], j[keep]


def expected_pair_loss(fn, theta, pref, log_ref, **hp) -> torch.Tensor:
    """sum over ordered pairs (w=i, l=j) of pref[i, j] * loss(i over j)."""
    win, lose = ordered_pairs(len(theta))
    logpi = torch.log_softmax(theta, 0)
    ones = torch.ones(len(win), dtype=F64)
    batch = PairLogps(logpi[win], logpi[lose], ones, ones, log_ref[win], log_ref[lose])
    return (pref[win, lose] * fn(batch, **hp).losses).sum()


def lbfgs(objective, theta0: torch.Tensor, iters: int = 300) -> torch.Tensor:
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def adam(objective, theta0: torch.Tensor, steps: int, lr: float = 0.05) -> torch.Tensor:
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        objective(theta).backward()
        opt.step()
    return theta.detach()


def train_pairs(fn, pref, pi_ref=PI_REF, **hp) -> torch.Tensor:
    log_ref = pi_ref.log()
    theta = lbfgs(lambda th: expected_pair_loss(fn, th, pref, log_ref, **hp), log_ref)
    return torch.softmax(theta, 0)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def boltzmann(log_base: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.softmax(log_base + r / beta, 0)


# ---------------------------------------------------------------- DPO and robust DPO


def test_dpo_reaches_boltzmann_optimum():
    beta = 0.5
    pi = train_pairs(dpo, bradley_terry(R), beta=beta)
    target = boltzmann(PI_REF.log(), R, beta)
    assert tv(pi, target) < 1e-2
    assert tv(pi, target) < 1e-4  # what LBFGS actually reaches in float64
    # the test is sensitive: the optimum for a wrong beta, or ignoring the reference, is far off
    assert tv(pi, boltzmann(PI_REF.log(), R, 2 * beta)) > 0.1
    assert tv(pi, boltzmann(torch.zeros(5, dtype=F64), R, beta)) > 0.1


def test_robust_denoises_flipped_preferences():
    """Preferences observed through label flips at rate eps: p_obs = eps + (1 - 2 eps) p. Robust
    DPO with the same eps reaches the clean optimum pi_ref * exp(r / beta); plain DPO does not."""
    beta, eps = 0.5, 0.2
    noisy = eps + (1 - 2 * eps) * bradley_terry(R)
    target = boltzmann(PI_REF.log(), R, beta)
    assert tv(train_pairs(robust, noisy, beta=beta, label_smoothing=eps), target) < 1e-3
    assert tv(train_pairs(dpo, noisy, beta=beta), target) > 0.05


def test_cdpo_stops_at_finite_margin():
    """K = 2, deterministic preference for response 0: cDPO stops at sigma(beta Delta) = 1 - eps."""
    beta, eps = 0.5, 0.1
    pi_ref = torch.tensor([0.3, 0.7], dtype=F64)
    pref = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)
    pi = train_pairs(cdpo, pref, pi_ref, beta=beta, label_smoothing=eps)
    delta = (pi.log() - pi_ref.log()) @ torch.tensor([1.0, -1.0], dtype=F64)
    assert delta.item() == pytest.approx(math.log((1 - eps) / eps) / beta, abs=1e-5)


@pytest.mark.parametrize("s", [0.55, 0.75, 0.9])
def test_dpo_with_a_soft_label_fits_the_judges_probability(s):
    """K = 2, one pair with response 0 chosen and soft label s: DPO on soft labels is cdpo with the pair's
    eps = 1 - s on a deterministic preference (p = 1), whose optimum sigma(beta Delta) = eps + (1 - 2 eps) p
    is s: the policy's implicit preference is the judge's probability."""
    beta = 0.5
    pi_ref = torch.tensor([0.3, 0.7], dtype=F64)
    pref = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)  # only the row (0 over 1) is seen
    eps = torch.full((2,), 1 - s, dtype=F64)  # one eps per ordered pair; the (1 over 0) row has weight 0
    pi = train_pairs(cdpo, pref, pi_ref, beta=beta, label_smoothing=eps)
    delta = (pi.log() - pi_ref.log()) @ torch.tensor([1.0, -1.0], dtype=F64)
    assert torch.sigmoid(beta * delta).item() == pytest.approx(s, abs=1e-6)


def test_dpo_on_a_judges_soft_labels_reaches_boltzmann_optimum():
    """One row per unordered pair, chosen the response the judge prefers, with the judge's Bradley-Terry
    probability s_ij = sigma(r_i - r_j) as its soft label. Each row's loss is the cross-entropy of
    sigma(beta Delta_ij) against s_ij, minimised at beta Delta_ij = r_i - r_j: the same optimum as DPO on
    the full preference distribution, pi_ref * exp(r / beta). The same rows with hard labels are not."""
    beta = 0.5
    win, lose = ordered_pairs(5)
    keep = R[win] > R[lose]
    w, lo = win[keep], lose[keep]
    s = torch.sigmoid(R[w] - R[lo])
    log_ref, ones = PI_REF.log(), torch.ones(len(w), dtype=F64)

    def rows_loss(theta, **hp):
        logpi = torch.log_softmax(theta, 0)
        return cdpo(PairLogps(logpi[w], logpi[lo], ones, ones, log_ref[w], log_ref[lo]), beta=beta, **hp).losses.sum()

    target = boltzmann(log_ref, R, beta)
    assert tv(torch.softmax(lbfgs(lambda th: rows_loss(th, label_smoothing=1 - s), log_ref), 0), target) < 1e-4
    hard = adam(lambda th: rows_loss(th), log_ref, steps=300)
    assert tv(torch.softmax(hard, 0), target) > 0.1


def test_hinge_reaches_unit_margins():
    """Deterministic preferences (i over j iff r_i > r_j): zero loss, every beta * Delta >= 1."""
    beta = 0.5
    pref = (R[:, None] > R[None, :]).to(F64)
    log_ref = PI_REF.log()
    theta = adam(lambda th: expected_pair_loss(hinge, th, pref, log_ref, beta=beta), log_ref, steps=300)
    assert expected_pair_loss(hinge, theta, pref, log_ref, beta=beta).item() == 0.0
    rho = torch.log_softmax(theta, 0) - log_ref
    win, lose = ordered_pairs(5)
    preferred = pref[win, lose] > 0
    assert (beta * (rho[win] - rho[lose]))[preferred].min().item() >= 1.0


# ---------------------------------------------------------------- IPO


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_reaches_least_squares_optimum(beta):
    """rho_i = (1/K) sum_{j != i} t_ij + const with t_ij = (p_ij - 1/2) / beta (ipo docstring)."""
    pref = bradley_terry(R)
    targets = (pref - 0.5) / beta  # diagonal is 0
    expected = torch.softmax(PI_REF.log() + targets.sum(1) / 5, 0)
    pi = train_pairs(ipo, pref, beta=beta)
    assert tv(pi, expected) < 1e-2
    assert tv(pi, expected) < 1e-4
    # IPO is not DPO: its optimum is far from the Boltzmann one at the same beta
    assert tv(expected, boltzmann(PI_REF.log(), R, beta)) > 0.05


# ---------------------------------------------------------------- SimPO


def test_simpo_no_margin_reaches_reference_free_boltzmann():
    beta = 0.5
    pi = train_pairs(simpo, bradley_terry(R), beta=beta, gamma=0.0)
    target = boltzmann(torch.zeros(5, dtype=F64), R, beta)
    assert tv(pi, target) < 1e-4
    assert tv(pi, boltzmann(PI_REF.log(), R, beta)) > 0.05  # the reference plays no part


@pytest.mark.parametrize("p", [0.7, 0.5, 0.95])
def test_simpo_margin_two_responses_solves_quadratic(p):
    """(1 - p) a z^2 + (1 - 2p) z - p a = 0, a = exp(-gamma), z = exp(beta (log pi_1 - log pi_2))."""
    beta, gamma = 2.0, 0.5
    a = math.exp(-gamma)
    qa, qb, qc = (1 - p) * a, 1 - 2 * p, -p * a
    z = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
    pi1 = 1 / (1 + math.exp(-math.log(z) / beta))
    pref = torch.tensor([[0.0, p], [1 - p, 0.0]], dtype=F64)
    pi = train_pairs(simpo, pref, torch.tensor([0.5, 0.5], dtype=F64), beta=beta, gamma=gamma)
    assert pi[0].item() == pytest.approx(pi1, abs=1e-6)
    if p != 0.5:  # gamma > 0 moves the optimum away from the gamma = 0 one, sigma(u) = p
        assert abs(pi1 - 1 / (1 + math.exp(-math.log(p / (1 - p)) / beta))) > 1e-2


# ---------------------------------------------------------------- ORPO


def bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(("p", "lam"), [(0.8, 0.1), (0.8, 1.0), (0.3, 0.5)])
def test_orpo_two_responses_matches_root(p, lam):
    """The optimum x = logit(pi_1) solves (sigma(x) - p) + 2 lambda (sigma(2x) - p) = 0."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    x_star = bisect(lambda x: (sig(x) - p) + 2 * lam * (sig(2 * x) - p), -20.0, 20.0)
    pref = torch.tensor([[0.0, p], [1 - p, 0.0]], dtype=F64)
    pi = train_pairs(orpo, pref, torch.tensor([0.5, 0.5], dtype=F64), orpo_lambda=lam)
    x = (pi[0] / pi[1]).log().item()
    assert x == pytest.approx(x_star, abs=1e-5)
    assert abs(x_star - math.log(p / (1 - p))) > 1e-2  # the odds-ratio term matters


# ---------------------------------------------------------------- KTO


KTO_PI_REF = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=F64)
KTO_Q = torch.tensor([0.3, 0.6, 0.2, 0.8, 0.45], dtype=F64)


@pytest.mark.parametrize(
    ("lambda_d", "lambda_u", "good"),
    [(1.0, 1.0, [1, 3]), (1.0, 2.0, [3]), (2.0, 1.0, [1, 3, 4])],
)
def test_kto_moves_mass_onto_responses_more_often_desirable(lambda_d, lambda_u, good):
    """Response i is labelled desirable with probability q_i; every response appears equally often.
    KTO sends the mass onto G = {i : q_i lambda_D > (1 - q_i) lambda_U}, which excludes the
    reference's argmax (response 0)."""
    k, beta = 5, 0.1
    in_g = torch.zeros(k, dtype=torch.bool)
    in_g[good] = True
    assert torch.equal(in_g, KTO_Q * lambda_d > (1 - KTO_Q) * lambda_u)
    log_ref = KTO_PI_REF.log()
    weights = torch.cat([KTO_Q, 1 - KTO_Q]) / k  # each response once desirable, once undesirable
    desirable = torch.arange(2 * k) < k

    def expected_loss(theta):
        logpi = torch.log_softmax(theta, 0)
        z0 = kto_reference_point(logpi - log_ref)
        batch = UnpairedLogps(logpi.repeat(2), torch.ones(2 * k, dtype=F64), log_ref.repeat(2), desirable)
        out = kto(batch, reference_point=z0, beta=beta, kto_lambda_d=lambda_d, kto_lambda_u=lambda_u)
        return (weights * out.losses).sum()

    pi = torch.softmax(adam(expected_loss, log_ref, steps=400, lr=0.1), 0)
    assert KTO_PI_REF[in_g].sum() < 0.5
    assert pi[in_g].sum().item() > 0.99
