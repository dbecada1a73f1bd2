"""Offline preference losses: the "Offline preference losses" table of ALGORITHMS.md.

Every loss is a pure function of per-sequence log-probabilities and keyword hyperparameters. It
returns a :class:`PreferenceOutput` whose ``losses`` are UNREDUCED (one per pair, or per example
for KTO): the trainer sums them and divides by the number of pairs in the whole optimizer step, so
no function here takes a mean.

Notation (ALGORITHMS.md): ``logp(y)`` is the sum of the response's token log-probs,
``avg_logp(y) = logp(y) / |y|``, ``rho(y) = logp_theta(y) - logp_ref(y)``,
``Delta = rho(y_w) - rho(y_l)``, ``sigma`` the logistic function and
``softplus(z) = log(1 + e^z) = -log sigma(-z)``. Shapes: ``_B`` is one value per pair/example.

Half-precision inputs are computed in float32: ``logsigmoid`` and ``log1p(-exp(a))`` keep only two
or three digits in bfloat16, and these losses cost nothing next to the forward pass.

The golden values in ``tests/test_losses_golden.py`` use one batch ``G`` of two pairs,
``(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)`` =
``(-5, -7, -6, -6.5, 2, 4)`` and ``(-8, -6, -7, -7.5, 4, 3)``, so that
``rho_w = (1, -1)``, ``rho_l = (-0.5, 1.5)``, ``Delta = (1.5, -2.5)``,
``avg_logp_w = (-2.5, -2)`` and ``avg_logp_l = (-1.75, -2)``.
Each docstring derives its loss's values on ``G``, and for the losses whose optimum is not the
DPO one, states the optimum it reaches on a tabular bandit (``tests/test_losses_closed_form.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ConfigError

__all__ = [
    "PairLogps",
    "UnpairedLogps",
    "PreferenceOutput",
    "LossSpec",
    "PREFERENCE_LOSSES",
    "get_loss",
    "dpo",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "simpo",
    "orpo",
    "kto",
    "kto_reference_point",
    "BeliefLogps",
    "belief_calibration",
    "belief_nll",
    "gdpo",
]


@dataclass
class PairLogps:
    """Per-pair log-probabilities, each of shape [B].

    ``chosen``/``rejected``: sum of the response's token log-probs under the policy.
    ``chosen_tokens``/``rejected_tokens``: response token counts (float), for ``avg_logp``.
    ``ref_chosen``/``ref_rejected``: the same sums under the reference model; only the losses with
    ``needs_reference`` read them.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass
class UnpairedLogps:
    """Per-example log-probabilities for KTO, each of shape [B].

    ``logps``/``ref_logps``: summed response log-probs under the policy and the reference;
    ``tokens``: response token counts; ``desirable``: bool label of each example.
    """

    logps: Tensor
    tokens: Tensor
    ref_logps: Tensor
    desirable: Tensor


@dataclass
class PreferenceOutput:
    """What a preference loss returns.

    ``losses`` [B]: unreduced, differentiable; the trainer sums and normalises over the step.

    ``chosen_rewards``/``rejected_rewards``: implicit rewards, detached. For paired losses both are
    [B] and aligned (pair i is ``(chosen_rewards[i], rejected_rewards[i])``), so the trainer logs
    their means, the margin ``chosen - rejected`` and the accuracy ``mean(margin > 0)``. For KTO
    (unpaired) ``chosen_rewards`` holds the rewards of the desirable examples and
    ``rejected_rewards`` those of the undesirable ones, in batch order, with independent lengths:
    log their means (sum and count over the step); a per-pair margin or accuracy is undefined.

    ``metrics``: extra detached [B] values a loss finds worth logging (ORPO's NLL and log-odds
    ratio).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _f(t: Tensor) -> Tensor:
    """Upcast half precision to float32 (see the module docstring); other dtypes pass through."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


def _log_ratios(batch: PairLogps) -> tuple[Tensor, Tensor]:
    """``(rho(y_w), rho(y_l))``, each [B]."""
    if batch.ref_chosen is None or batch.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs: set PairLogps.ref_chosen and ref_rejected")
    return _f(batch.chosen) - _f(batch.ref_chosen), _f(batch.rejected) - _f(batch.ref_rejected)


def _avg_logps(batch: PairLogps) -> tuple[Tensor, Tensor]:
    """``(avg_logp(y_w), avg_logp(y_l))``, each [B]."""
    return _f(batch.chosen) / _f(batch.chosen_tokens), _f(batch.rejected) / _f(batch.rejected_tokens)


def _paired(losses_B: Tensor, chosen_reward_B: Tensor, rejected_reward_B: Tensor, **metrics: Tensor) -> PreferenceOutput:
    return PreferenceOutput(
        losses_B,
        chosen_reward_B.detach(),
        rejected_reward_B.detach(),
        {k: v.detach() for k, v in metrics.items()},
    )


def _check_label_smoothing(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")


def _smoothing(eps: float | Tensor, like_B: Tensor, *, per_pair_top: float, top_open: bool) -> float | Tensor:
    """``label_smoothing`` as a float in [0, 0.5), or a per-pair tensor [B] in ``[0, per_pair_top]`` (``[0,
    per_pair_top)`` with ``top_open``), returned in ``like_B``'s dtype and device."""
    if not isinstance(eps, Tensor):
        _check_label_smoothing(eps)
        return eps
    eps_B = _f(eps).to(device=like_B.device, dtype=like_B.dtype)
    if eps_B.shape != like_B.shape:
        raise ValueError(f"a per-pair label_smoothing must have shape {tuple(like_B.shape)}, got {tuple(eps_B.shape)}")
    below = eps_B < per_pair_top if top_open else eps_B <= per_pair_top
    if not bool(((eps_B >= 0) & below).all()):
        bounds = f"[0, {per_pair_top}{')' if top_open else ']'}"
        raise ValueError(f"a per-pair label_smoothing must be in {bounds}, got {eps_B.tolist()}")
    return eps_B


def _dpo_terms(margin_B: Tensor) -> tuple[Tensor, Tensor]:
    """``(-log sigma(m), -log sigma(-m))``: the DPO loss of the pair as labelled and as flipped."""
    return -F.logsigmoid(margin_B), -F.logsigmoid(-margin_B)


def dpo(batch: PairLogps, *, beta: float = 0.1) -> PreferenceOutput:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290): ``loss = -log sigma(beta * Delta)``.

    Rewards: ``beta * rho``. Default ``beta = 0.1`` (paper, TRL).

    Optimum: on Bradley-Terry preferences ``p_ij = sigma(r_i - r_j)`` over all pairs, each pair's
    expected loss is a cross-entropy minimised at ``sigma(beta * Delta_ij) = p_ij``, i.e.
    ``beta * Delta_ij = r_i - r_j``; all pairs agree on ``pi* ∝ pi_ref * exp(r / beta)``.

    Golden (batch G, beta = 0.5): ``beta * Delta = (0.75, -1.25)``, loss
    ``= (softplus(-0.75), softplus(1.25)) = (0.3868710061, 1.5019290813)``; chosen rewards
    ``0.5 * rho_w = (0.5, -0.5)``, rejected rewards ``0.5 * rho_l = (-0.25, 0.75)``.
    """
    rho_w_B, rho_l_B = _log_ratios(batch)
    losses_B = -F.logsigmoid(beta * (rho_w_B - rho_l_B))
    return _paired(losses_B, beta * rho_w_B, beta * rho_l_B)


def cdpo(batch: PairLogps, *, beta: float = 0.1, label_smoothing: float | Tensor = 0.0) -> PreferenceOutput:
    """Conservative DPO, Mitchell 2023 ("A note on DPO with noisy preferences"; no arXiv id).

    ``loss = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)`` with
    ``eps = label_smoothing`` in [0, 0.5): DPO against labels smoothed towards 1/2 (``eps = 0`` is
    DPO). Since ``softplus(z) - softplus(-z) = z``, this equals ``dpo + eps * beta * Delta``.
    Rewards: ``beta * rho``.

    ``label_smoothing`` may also be a tensor [B], one eps_i per pair in [0, 1]: the cross-entropy of
    sigma(beta Delta_i) against the soft label ``s_i = 1 - eps_i``. With a judge's soft labels
    (``alignkit dpo`` on rows with ``soft_label``) each pair is fitted to its own probability; an
    eps_i above 1/2 is a pair whose label leans the other way (s_i < 1/2), which a global eps may not be.

    Optimum: a pair preferred with probability p is driven to
    ``sigma(beta Delta) = eps + (1 - 2 eps) p``, so even deterministic preferences (p = 1) stop
    at the finite margin ``beta Delta = logit(1 - eps)``; with p = 1 and eps_i = 1 - s_i that is
    ``sigma(beta Delta_i) = s_i``.

    Golden (batch G, beta = 0.5, eps = 0.1): DPO's values plus ``0.1 * (0.75, -1.25)``:
    ``(0.4618710061, 1.3769290813)``. Per pair, eps = (0.25, 0.6) (soft labels 0.75 and 0.4):
    DPO's values plus ``(0.25 * 0.75, 0.6 * -1.25) = (0.1875, -0.75)``: ``(0.5743710061, 0.7519290813)``.
    """
    rho_w_B, rho_l_B = _log_ratios(batch)
    label_smoothing = _smoothing(label_smoothing, rho_w_B, per_pair_top=1.0, top_open=False)
    clean_B, flipped_B = _dpo_terms(beta * (rho_w_B - rho_l_B))
    losses_B = (1 - label_smoothing) * clean_B + label_smoothing * flipped_B
    return _paired(losses_B, beta * rho_w_B, beta * rho_l_B)


def robust(batch: PairLogps, *, beta: float = 0.1, label_smoothing: float | Tensor = 0.0) -> PreferenceOutput:
    """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409).

    ``loss = ((1 - eps)(-log sigma(beta Delta)) - eps(-log sigma(-beta Delta))) / (1 - 2 eps)``
    with ``eps = label_smoothing`` in [0, 0.5), the rate at which labels are flipped. If each label
    is flipped with probability eps, the expected loss of the observed pair equals the clean DPO
    loss (unbiased): with ``L(m) = -log sigma(m)``, in
    ``(1-eps) loss(Delta) + eps loss(-Delta)`` the ``L(-beta Delta)`` terms cancel
    (``-eps (1-eps) + eps (1-eps) = 0``) and ``L(beta Delta)`` has weight
    ``((1-eps)^2 - eps^2) / (1 - 2 eps) = 1``. Equivalently
    ``robust = dpo - eps / (1 - 2 eps) * beta * Delta``.
    Rewards: ``beta * rho``. ``label_smoothing`` may also be a tensor [B] of per-pair flip rates, each
    in [0, 0.5) (a soft label is not one: its probability is what cdpo fits).

    Optimum: a pair observed preferred with probability p is driven to
    ``sigma(beta Delta) = (p - eps) / (1 - 2 eps)``, the de-noised preference: on Bradley-Terry
    preferences observed through flip noise eps it reaches DPO's ``pi_ref * exp(r / beta)``. If
    ``p`` is outside ``[eps, 1 - eps]`` (less noise than assumed) the loss is unbounded below.

    Golden (batch G, beta = 0.5, eps = 0.1): DPO's values minus ``0.125 * (0.75, -1.25)``:
    ``(0.2931210061, 1.6581790813)``. Per pair, eps = (0.25, 0.4): ``eps / (1 - 2 eps) = (0.5, 2)``, so
    DPO's values minus ``(0.375, -2.5)``: ``(0.0118710061, 4.0019290813)``.
    """
    rho_w_B, rho_l_B = _log_ratios(batch)
    label_smoothing = _smoothing(label_smoothing, rho_w_B, per_pair_top=0.5, top_open=True)
    clean_B, flipped_B = _dpo_terms(beta * (rho_w_B - rho_l_B))
    losses_B = ((1 - label_smoothing) * clean_B - label_smoothing * flipped_B) / (1 - 2 * label_smoothing)
    return _paired(losses_B, beta * rho_w_B, beta * rho_l_B)


def hinge(batch: PairLogps, *, beta: float = 0.1) -> PreferenceOutput:
    """Hinge loss of SLiC, Zhao et al. 2023 (arXiv:2305.10425), on the DPO margin.

    ``loss = max(0, 1 - beta * Delta)``. Rewards: ``beta * rho``.

    Optimum: zero loss exactly when every preferred margin satisfies ``beta * Delta >= 1``; on
    deterministic preferences any such policy is optimal (no unique distribution).

    Golden (batch G, beta = 0.5): ``(max(0, 1 - 0.75), max(0, 1 + 1.25)) = (0.25, 2.25)``.
    """
    rho_w_B, rho_l_B = _log_ratios(batch)
    losses_B = torch.relu(1 - beta * (rho_w_B - rho_l_B))
    return _paired(losses_B, beta * rho_w_B, beta * rho_l_B)


def ipo(batch: PairLogps, *, beta: float = 0.1, ipo_average: bool = False) -> PreferenceOutput:
    """IPO, Azar et al. 2023 (arXiv:2310.12036): ``loss = (Delta - 1 / (2 beta))^2``.

    ``Delta`` uses summed log-probs, as in the paper; ``ipo_average=True`` uses average log-probs
    (``rho = (logp_theta - logp_ref) / |y|``), as TRL does. Rewards: ``beta * rho`` of the summed
    log-probs in both cases.

    Optimum on a tabular bandit with preference probabilities ``p_ij`` over all ordered pairs
    (``p_ji = 1 - p_ij``): an unordered pair contributes
    ``p_ij (Delta_ij - tau)^2 + p_ji (Delta_ij + tau)^2`` with ``tau = 1 / (2 beta)``, which is
    ``(Delta_ij - t_ij)^2 + const`` with the regression target
    ``t_ij = tau (p_ij - p_ji) = (p_ij - 1/2) / beta``. Summing over the complete graph and setting
    the derivative in ``rho_i`` to zero gives ``K rho_i - sum_j rho_j = sum_{j != i} t_ij``, so
    ``rho_i = (1/K) sum_{j != i} t_ij + const`` and ``pi* ∝ pi_ref * exp(rho)``. Unlike DPO the
    targets are bounded (``|t_ij| < 1 / (2 beta)``), so deterministic preferences do not push the
    policy to a vertex.

    Golden (batch G, beta = 0.5, so ``1 / (2 beta) = 1``): sum version
    ``((1.5 - 1)^2, (-2.5 - 1)^2) = (0.25, 12.25)``; average version
    ``rho_w = ((-5 + 6) / 2, (-8 + 7) / 4) = (0.5, -0.25)``,
    ``rho_l = ((-7 + 6.5) / 4, (-6 + 7.5) / 3) = (-0.125, 0.5)``, ``Delta = (0.625, -0.75)``,
    loss ``= (0.375^2, 1.75^2) = (0.140625, 3.0625)``.
    """
    rho_w_B, rho_l_B = _log_ratios(batch)
    if ipo_average:
        delta_B = rho_w_B / _f(batch.chosen_tokens) - rho_l_B / _f(batch.rejected_tokens)
    else:
        delta_B = rho_w_B - rho_l_B
    losses_B = (delta_B - 1 / (2 * beta)) ** 2
    return _paired(losses_B, beta * rho_w_B, beta * rho_l_B)


def simpo(batch: PairLogps, *, beta: float = 2.0, gamma: float = 0.5) -> PreferenceOutput:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), reference-free.

    ``loss = -log sigma(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)``. Rewards:
    ``beta * avg_logp``. Defaults ``beta = 2.0``, ``gamma = 0.5`` are the SimPO repository's
    default config (beta 2, gamma / beta = 0.25); the paper tunes both per model. ``gamma`` here
    is the absolute target margin of the paper's equation, not the repository's gamma / beta.

    Optimum (one-token responses, so ``avg_logp = log pi``), with ``u_ij = beta (log pi_i - log pi_j)``:
    - ``gamma = 0``: each pair is a cross-entropy minimised at ``sigma(u_ij) = p_ij``; on
      Bradley-Terry preferences ``u_ij = r_i - r_j``, so ``pi* ∝ exp(r / beta)`` (no reference).
    - ``gamma > 0``, K = 2, ``p = p_12``, ``u = u_12``: the expected loss is
      ``f(u) = p softplus(gamma - u) + (1 - p) softplus(u + gamma)``, and
      ``f'(u) = -p sigma(gamma - u) + (1 - p) sigma(u + gamma)``. With ``a = exp(-gamma)``,
      ``z = exp(u)``: ``sigma(gamma - u) = 1 / (1 + a z)`` and ``sigma(u + gamma) = z / (z + a)``,
      so ``f'(u) = 0`` gives ``p (z + a) = (1 - p) z (1 + a z)``, i.e.
      ``(1 - p) a z^2 + (1 - 2p) z - p a = 0``; the product of the roots is
      ``-p / (1 - p) < 0``, so exactly one is positive and it is the optimum.

    Golden (batch G, beta = 2, gamma = 0.5): ``2 * (-2.5 + 1.75) - 0.5 = -2`` and
    ``2 * (-2 + 2) - 0.5 = -0.5``, loss ``(softplus(2), softplus(0.5)) = (2.1269280110, 0.9740769842)``;
    chosen rewards ``(-5, -4)``, rejected ``(-3.5, -4)``.
    """
    avg_w_B, avg_l_B = _avg_logps(batch)
    losses_B = -F.logsigmoid(beta * (avg_w_B - avg_l_B) - gamma)
    return _paired(losses_B, beta * avg_w_B, beta * avg_l_B)


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate at both ends (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"): ``log(-expm1(a))`` near 0, ``log1p(-exp(a))`` far from it.
    Both branches are finite for ``a < 0``, so ``torch.where`` leaks no NaN into the gradient."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _log_odds(avg_logp_B: Tensor) -> Tensor:
    """``log(P / (1 - P))`` with ``log P = avg_logp``. ``avg_logp`` is clamped to at most
    ``-eps(dtype)`` so the log-odds stay finite (and the gradient below ``1 / eps``) when the
    policy is certain of a response (``avg_logp -> 0``)."""
    a_B = avg_logp_B.clamp(max=-torch.finfo(avg_logp_B.dtype).eps)
    return a_B - _log1mexp(a_B)


def orpo(batch: PairLogps, *, beta: float = 0.1, orpo_lambda: float = 0.1) -> PreferenceOutput:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691), reference-free.

    ``loss = NLL(y_w) + lambda * (-log sigma(log_odds(y_w) - log_odds(y_l)))`` with
    ``NLL(y_w) = -avg_logp(y_w)`` (mean token NLL of the chosen response, per pair),
    ``log_odds(y) = a - log(1 - exp(a))``, ``a = avg_logp(y)``, computed with a stable
    ``log1mexp``. Default ``lambda = 0.1`` (paper). ``beta`` only scales the logged rewards
    ``beta * avg_logp``; the paper defines no implicit reward, this follows common practice (TRL).
    ``metrics``: ``nll`` and ``log_odds_ratio`` per pair.

    Optimum, K = 2 one-token responses, response 1 preferred with probability p, ``x = logit(pi_1)``
    (so ``log_odds`` of response 1 is x and of response 2 is -x, and ``NLL(y_1) = softplus(-x)``):
    the expected loss is ``p softplus(-x) + (1-p) softplus(x)
    + lambda (p softplus(-2x) + (1-p) softplus(2x))``, whose derivative
    ``(sigma(x) - p) + 2 lambda (sigma(2x) - p)`` is increasing in x: the optimum is its unique
    root, between ``logit(p) / 2`` and ``logit(p)`` (the odds-ratio term alone would stop at
    ``sigma(2x) = p``, the NLL term alone at ``sigma(x) = p``).

    Golden (chosen = -1, rejected = -3, two tokens each, lambda = 0.1): ``a = (-0.5, -1.5)``,
    ``log_odds = (-0.5 - log(1 - e^-0.5), -1.5 - log(1 - e^-1.5)) = (0.4327521296, -1.2475175411)``,
    ratio ``1.6802696706``, loss ``0.5 + 0.1 * softplus(-1.6802696706) = 0.5170859217``.
    """
    avg_w_B, avg_l_B = _avg_logps(batch)
    nll_B = -avg_w_B
    log_odds_ratio_B = _log_odds(avg_w_B) - _log_odds(avg_l_B)
    losses_B = nll_B - orpo_lambda * F.logsigmoid(log_odds_ratio_B)
    return _paired(losses_B, beta * avg_w_B, beta * avg_l_B, nll=nll_B, log_odds_ratio=log_odds_ratio_B)


def kto_reference_point(rho_mismatched: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean(rho_mismatched))``, detached (arXiv:2402.01306).

    ``rho_mismatched`` [N]: log-ratios ``logp_theta(y' | x) - logp_ref(y' | x)`` of mismatched
    pairs (a prompt with another example's response), a biased estimate of
    ``KL(pi_theta || pi_ref)``. Pass every such value of the optimizer step (gathered across
    ranks if wanted); the result is a 0-d tensor for :func:`kto`.
    """
    return _f(rho_mismatched).detach().mean().clamp(min=0)


def kto(
    batch: UnpairedLogps,
    *,
    reference_point: Tensor | float,
    beta: float = 0.1,
    kto_lambda_d: float = 1.0,
    kto_lambda_u: float = 1.0,
) -> PreferenceOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), unpaired.

    With ``z0 = reference_point`` (detached, from :func:`kto_reference_point`):
    desirable ``loss = lambda_D (1 - sigma(beta (rho - z0)))``, undesirable
    ``loss = lambda_U (1 - sigma(beta (z0 - rho)))``. Defaults ``beta = 0.1``,
    ``lambda_D = lambda_U = 1`` (paper, TRL). Rewards ``beta * rho``: ``chosen_rewards`` are the
    desirable examples', ``rejected_rewards`` the undesirable ones' (see PreferenceOutput).

    Optimum: a response i labelled desirable with probability q_i has expected loss
    ``q_i lambda_D - c_i sigma(beta (rho_i - z0))`` with ``c_i = q_i lambda_D - (1 - q_i) lambda_U``
    (using ``1 - sigma(-m) = sigma(m)``). With z0 detached, the gradient on rho_i is
    ``-c_i beta sigma'(beta (rho_i - z0))``: its sign is that of ``(1 - q_i) lambda_U - q_i lambda_D``
    times a positive factor. So KTO raises every response of
    ``G = {i : q_i lambda_D > (1 - q_i) lambda_U}`` and lowers every other: the policy's mass goes
    onto G. It is a per-response sign decision, not the Boltzmann optimum ``pi_ref exp(r / beta)``.

    Golden (logps ``(-5, -8, -3)``, ref ``(-6, -7, -3.5)``, desirable ``(T, F, T)``, z0 = 0.2,
    beta = 0.5, lambda_D = 1, lambda_U = 2): ``rho = (1, -1, 0.5)``; losses
    ``(sigma(-0.5 * 0.8), 2 sigma(-0.5 * 1.2), sigma(-0.5 * 0.3))
    = (0.4013123399, 0.7086873875, 0.4625701547)``; chosen rewards ``(0.5, 0.25)``, rejected
    ``(-0.5,)``.
    """
    rho_B = _f(batch.logps) - _f(batch.ref_logps)
    z0 = torch.as_tensor(reference_point, dtype=rho_B.dtype, device=rho_B.device).detach()
    margin_B = beta * (rho_B - z0)
    desirable_B = batch.desirable.bool()
    # 1 - sigma(m) = sigma(-m)
    losses_B = torch.where(desirable_B, kto_lambda_d * torch.sigmoid(-margin_B), kto_lambda_u * torch.sigmoid(margin_B))
    rewards_B = (beta * rho_B).detach()
    return PreferenceOutput(losses_B, rewards_B[desirable_B], rewards_B[~desirable_B])


@dataclass
class BeliefLogps:
    """A prompt's beliefs for GDPO, one row per pair, each of shape [B, K] (K: the most beliefs of any prompt).

    ``logps``: sequence log-probability ``log pi(b_k | x)`` of each belief's text under the policy;
    ``mask``: true on the prompt's real beliefs (padding is false); ``target``: the group's share ``p*(b_k | x)``
    (0 on padding, summing to 1); ``index`` [B]: which belief the pair is conditioned on.
    """

    logps: Tensor
    mask: Tensor
    target: Tensor
    index: Tensor


def _belief_log_q(beliefs: BeliefLogps) -> Tensor:
    """``log q(b_k | x)``, the model's belief distribution: the beliefs' sequence log-probs normalised over the
    prompt's beliefs (a softmax over the real ones; ``-inf`` on padding)."""
    logps = _f(beliefs.logps).masked_fill(~beliefs.mask.bool(), float("-inf"))
    return torch.log_softmax(logps, dim=-1)


def belief_calibration(beliefs: BeliefLogps) -> Tensor:
    """GDPO's calibration term [B]: ``KL(p* || q) = sum_k p*_k (log p*_k - log q_k)`` over the prompt's beliefs,
    with ``q`` the model's belief distribution (:func:`_belief_log_q`) and ``0 log 0 = 0``.

    Scoring every belief by its whole sequence log-probability and normalising over the options lets a belief
    be any text (a survey option, a star rating), not one token. The term is zero exactly when ``q = p*``.

    Golden (two beliefs, logps ``(-1, -2)``, target ``(0.6, 0.4)``): ``log q = (-1, -2) - log(e^-1 + e^-2)
    = (-0.3132616875, -1.3132616875)``, so
    ``KL = 0.6 (ln 0.6 + 0.3132616875) + 0.4 (ln 0.4 + 1.3132616875) = 0.0402500205``. Three beliefs, logps
    ``(-1, -2, -3)``, target ``(0.5, 0, 0.5)``: ``log q = (-0.4076059644, -1.4076059644, -2.4076059644)``,
    ``KL = 0.5 (ln 0.5 + 0.4076059644) + 0.5 (ln 0.5 + 2.4076059644) = 0.7144587838`` (the empty belief adds 0).
    """
    log_q = _belief_log_q(beliefs)
    target = _f(beliefs.target).to(log_q.dtype)
    present = (target > 0) & beliefs.mask.bool()
    terms = torch.where(present, target * (torch.log(target.clamp_min(1e-38)) - log_q), torch.zeros_like(log_q))
    return terms.sum(-1)


def belief_nll(beliefs: BeliefLogps) -> Tensor:
    """GDPO's belief likelihood term [B]: ``-log pi(b_i | x)``, the negative sequence log-probability of the
    pair's own belief (not normalised over the options: it also teaches the model to state a belief at all).

    Annotators' beliefs are draws from ``p*``, so in expectation over a prompt's pairs this is the cross-entropy
    ``-sum_k p*_k log pi(b_k | x)``, minimised by ``pi(b | x) = p*`` over the beliefs: the same optimum as the
    calibration term (on finite data it pulls towards the pairs' empirical frequencies).

    Golden (logps ``(-1, -2)``, index 1): ``2``.
    """
    return -_f(beliefs.logps).gather(-1, beliefs.index.long().unsqueeze(-1)).squeeze(-1)


def gdpo(
    batch: PairLogps,
    *,
    beliefs: BeliefLogps,
    loss: str = "dpo",
    calibration_weight: float = 1.0,
    belief_nll_weight: float = 1.0,
    preference_weight: float = 1.0,
    **hparams,
) -> PreferenceOutput:
    """GDPO, Yao et al. 2024 (arXiv:2412.20299, ICLR 2025): group distributional preference optimisation.

    The model factorises ``pi(b, y | x) = pi(b | x) pi(y | x, b)``: it states a belief, then answers given it.
    Per pair (conditioned on belief ``b_i``):
    ``loss = calibration_weight * KL(p* || q) + belief_nll_weight * (-log pi(b_i | x))
    + preference_weight * L_pref(y_w, y_l | x, b_i)``, where ``L_pref`` is the registered paired loss
    ``loss`` (DPO by default, taking its hyperparameters from ``hparams``) on the log-probs of the response
    tokens AFTER the belief, so the preference is conditioned on it. See :func:`belief_calibration` and
    :func:`belief_nll`.

    Optimum: the belief terms depend on ``pi(b | x)`` only and the preference term on ``pi(y | x, b)`` only, so
    they separate: the belief marginal goes to ``p*`` (where DPO on the pooled pairs, with shares p for y_1
    over y_2, drives ``pi(y_1) / pi(y_2)`` to ``pi_ref(y_1) / pi_ref(y_2) * (p / (1 - p))^(1 / beta)``:
    the majority takes nearly all the mass), and within each belief the preference loss reaches its own optimum.

    Golden (batch G of the module docstring, beta = 0.5, weights (1, 1, 1), beliefs of the first pair logps
    ``(-1, -2)`` target ``(0.6, 0.4)`` index 1, of the second logps ``(-1, -2, -3)`` target ``(0.5, 0, 0.5)``
    index 0): ``DPO + KL + NLL = (0.3868710061 + 0.0402500205 + 2, 1.5019290813 + 0.7144587838 + 1)
    = (2.4271210266, 3.2163878652)``. Rewards are the inner loss's. ``metrics``: ``calibration``,
    ``belief_nll`` and ``preference`` per pair, and the inner loss's own.
    """
    inner = get_loss(loss)
    if not inner.paired or inner.name == "gdpo":
        raise ConfigError(f"GDPO's preference term must be a paired preference loss, got {loss!r}")
    out = inner.fn(batch, **{k: hparams[k] for k in inner.hparams if k in hparams})
    calibration_B, nll_B = belief_calibration(beliefs), belief_nll(beliefs)
    pref_B = _f(out.losses)
    losses_B = preference_weight * pref_B + calibration_weight * calibration_B + belief_nll_weight * nll_B
    metrics = {**out.metrics, "calibration": calibration_B.detach(), "belief_nll": nll_B.detach(),
               "preference": pref_B.detach()}
    return PreferenceOutput(losses_B, out.chosen_rewards, out.rejected_rewards, metrics)


@dataclass(frozen=True)
class LossSpec:
    """A registry entry. ``hparams``: names of the keyword hyperparameters ``fn`` takes, so a
    trainer calls ``fn(batch, **{k: cfg[k] for k in spec.hparams})`` (KTO also takes
    ``reference_point``). ``paired``: takes :class:`PairLogps` (else :class:`UnpairedLogps`).
    ``needs_reference``: reads reference log-probs."""

    name: str
    fn: Callable[..., PreferenceOutput]
    needs_reference: bool
    paired: bool
    hparams: tuple[str, ...]


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", dpo, needs_reference=True, paired=True, hparams=("beta",)),
        LossSpec("cdpo", cdpo, needs_reference=True, paired=True, hparams=("beta", "label_smoothing")),
        LossSpec("robust", robust, needs_reference=True, paired=True, hparams=("beta", "label_smoothing")),
        LossSpec("hinge", hinge, needs_reference=True, paired=True, hparams=("beta",)),
        LossSpec("ipo", ipo, needs_reference=True, paired=True, hparams=("beta", "ipo_average")),
        LossSpec("kto", kto, needs_reference=True, paired=False, hparams=("beta", "kto_lambda_d", "kto_lambda_u")),
        LossSpec("orpo", orpo, needs_reference=False, paired=True, hparams=("beta", "orpo_lambda")),
        LossSpec("simpo", simpo, needs_reference=False, paired=True, hparams=("beta", "gamma")),
        # a composition: its preference term is another entry (``loss``), whose hyperparameters it passes on;
        # whether it reads reference log-probs is that entry's needs_reference
        LossSpec("gdpo", gdpo, needs_reference=True, paired=True,
                 hparams=("loss", "calibration_weight", "belief_nll_weight", "preference_weight", "beta",
                          "label_smoothing", "ipo_average", "gamma", "orpo_lambda")),
    )
}


def get_loss(name: str) -> LossSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown preference loss {name!r}; choose one of: {', '.join(sorted(PREFERENCE_LOSSES))}"
        ) from None
