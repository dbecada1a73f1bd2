"""Online-RL losses: KL estimators, policy losses and loss aggregation ("Online RL" in
ALGORITHMS.md).

Three registries, each entry carrying the flags a trainer asks about:

- :data:`KL_ESTIMATORS`: per-token estimates of KL(pi_theta || pi_ref) from sampled tokens;
- :data:`POLICY_LOSSES`: PPO clip (with DAPO clip-higher via ``eps_high`` and dual-clip), GSPO and Kimi k1.5's
  online mirror descent (``kimi_omd``); each returns an UNREDUCED per-token loss ``[B, T]`` (0 on masked positions) and detached
  scalar metrics;
- :data:`AGGREGATIONS`: how a per-token loss becomes the scalar to backpropagate. The normaliser
  is counted over the WHOLE optimizer step (all micro-batches, and all ranks once the trainer
  all-reduces :func:`normaliser`'s result), so accumulating micro-batches gives the same gradient
  as one big batch, whatever each micro-batch's padding width (DESIGN.md principle 4).

Shapes: ``_BT`` per token, ``_B`` per sequence. ``mask_BT`` marks response tokens (1) and padding
or prompt (0). Ratios are ``s_t = exp(logp_t - old_logp_t)``, computed from the log-ratio clamped
to [-20, 20] so a stale or garbage log-prob cannot overflow ``exp``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.errors import ConfigError

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AggregationSpec",
    "KLSpec",
    "PolicyLossSpec",
    "PolicyOutput",
    "get_aggregation",
    "get_kl_estimator",
    "get_policy_loss",
    "gspo",
    "kimi_omd",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "normaliser",
    "ppo_clip",
    "seq_mean_token_mean",
    "seq_sum_constant",
    "token_mean",
    "value_loss",
]

_LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def kl_k1(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k1 = ``l`` with ``l = logp_theta - logp_ref`` (Schulman, "Approximating KL divergence",
    2020). Unbiased for KL(pi_theta||pi_ref) on tokens sampled from pi_theta, high variance, can be
    negative. As a LOSS term differentiated through ``logp_theta`` only, its expected gradient is
    ``E[grad logp_theta] = sum_y grad pi_theta(y) = 0``: useless as a penalty. Golden: l=0.5 -> 0.5."""
    return logp_BT - ref_logp_BT


def kl_k2(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k2 = ``l^2 / 2`` (Schulman 2020). Biased but low-variance estimate of KL(pi_theta||pi_ref).
    As a loss term differentiated through ``logp_theta`` only (samples fixed), its expected
    gradient ``E_{pi_theta}[l * grad logp_theta]`` is EXACTLY the gradient of
    KL(pi_theta||pi_ref) (the RLHF objective). Golden: l=0.5 -> 0.125."""
    lr = logp_BT - ref_logp_BT
    return 0.5 * lr * lr


def kl_k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k3 = ``exp(-l) - 1 + l`` (Schulman 2020; GRPO's penalty, Shao et al. 2402.03300).
    Unbiased for KL(pi_theta||pi_ref) and always >= 0. As a loss term differentiated through
    ``logp_theta`` only, the expected gradient ``E_{pi_theta}[(1 - pi_ref/pi_theta) grad logp]
    = -sum_y pi_ref(y) grad logp_theta(y)`` is the gradient of the FORWARD KL(pi_ref||pi_theta),
    not of the RLHF objective. ``l`` is clamped to [-20, 20] before ``exp`` (``exp(20)`` ~ 5e8;
    beyond that the estimate is meaningless and would overflow in half precision); computed as
    ``expm1(-l) + l`` for accuracy near l = 0. Golden: l=0.5 -> ``exp(-0.5) - 0.5 = 0.1065307``."""
    lr = (logp_BT - ref_logp_BT).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.expm1(-lr) + lr


@dataclass(frozen=True)
class KLSpec:
    """A registry entry. ``unbiased``: its value is an unbiased estimate of KL(pi_theta||pi_ref)
    under samples from pi_theta. ``loss_gradient``: what its expected gradient is when used as a
    loss term through ``logp_theta`` only: ``"zero"``, ``"reverse_kl"`` (grad KL(pi_theta||pi_ref))
    or ``"forward_kl"`` (grad KL(pi_ref||pi_theta))."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    unbiased: bool
    loss_gradient: str


KL_ESTIMATORS: dict[str, KLSpec] = {
    s.name: s
    for s in (
        KLSpec("k1", kl_k1, unbiased=True, loss_gradient="zero"),
        KLSpec("k2", kl_k2, unbiased=False, loss_gradient="reverse_kl"),
        KLSpec("k3", kl_k3, unbiased=True, loss_gradient="forward_kl"),
    )
}


def get_kl_estimator(name: str) -> KLSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ConfigError(f"unknown KL estimator {name!r}; choose one of: {', '.join(sorted(KL_ESTIMATORS))}") from None


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyOutput:
    """``losses`` [B, T]: unreduced, differentiable, 0 on masked positions; reduce it with an
    :data:`AGGREGATIONS` entry. ``metrics``: detached scalars over this micro-batch's valid
    tokens (``clip_frac``, ``ratio_mean``, ...)."""

    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    lr = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
    return torch.exp(lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def ppo_clip(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyOutput:
    """PPO clipped surrogate (Schulman et al. 1707.06347), per token:

    ``loss_t = -min(s_t A_t, clip(s_t, 1 - eps_low, 1 + eps_high) A_t)``.

    ``eps_high > eps_low`` is DAPO's clip-higher (0.28 vs 0.2; Yu et al. 2503.14476). With
    ``dual_clip = c > 1`` (Ye et al. 1912.09729), tokens with ``A_t < 0`` are further bounded:
    ``loss_t = min(loss_t, -c A_t)``, so a huge ratio on a bad token cannot blow up the loss.

    Metrics (detached, over valid tokens): ``clip_frac`` = fraction where the clipped branch is
    the active one (its loss strictly larger), ``dual_clip_frac``, ``ratio_mean``.

    Golden (eps=0.2): ``s=1.5, A=1`` -> ``-min(1.5, 1.2) = -1.2`` (clipped);
    ``s=0.5, A=-1`` -> ``-min(-0.5, -0.8) = 0.8`` (clipped);
    ``s=4, A=-1, c=3`` -> PPO ``-min(-4, -1.2) = 4``, dual-clip ``min(4, 3) = 3``.
    """
    m = mask_BT.to(logp_BT.dtype)
    ratio = _ratio(logp_BT, old_logp_BT, mask_BT)
    adv = adv_BT.to(ratio.dtype)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": _masked_mean((clipped > unclipped).to(m.dtype), m).detach()}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * adv
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        metrics["dual_clip_frac"] = _masked_mean(dual.to(m.dtype), m).detach()
    metrics["ratio_mean"] = _masked_mean(ratio, m).detach()
    return PolicyOutput(losses=loss * m, metrics=metrics)


def gspo(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 3e-4,
) -> PolicyOutput:
    """GSPO, group sequence policy optimisation (Zheng et al. 2507.18071).

    One length-normalised ratio per sequence,
    ``s_i = exp(mean_{t valid}(logp_t - old_logp_t))``, and the per-sequence clipped objective
    ``L_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)`` with the small eps of the
    paper (3e-4 default). ``A_i`` is the sequence advantage: ``adv`` may be ``[B]`` or ``[B, T]``
    (then ``A_i`` is its masked token mean, i.e. the value when it was broadcast).

    Spreading over tokens: ``L_i`` is written on EVERY valid token of sequence i (the gradient
    still flows through all tokens via ``s_i``). With the ``seq_mean_token_mean`` aggregation the
    token mean of sequence i is exactly ``L_i`` and the step loss is ``mean_i L_i``, the paper's
    objective. ``token_mean`` would instead weight sequence i by its length ``|y_i|``.

    Metrics: ``clip_frac`` = fraction of sequences (with a valid token) where clipping is active,
    ``ratio_mean`` = mean sequence ratio.

    Golden: one sequence, log-ratios ``(1e-4, 3e-4)``: ``s = exp(2e-4)``, inside the clip range,
    ``A=1`` -> ``L = -exp(2e-4)`` on both tokens; log-ratios ``(1e-3, 1e-3)``: ``s = exp(1e-3) >
    1 + 3e-4`` -> ``L = -(1 + 3e-4)`` (clipped, no gradient).
    """
    m = mask_BT.to(logp_BT.dtype)
    n_B = m.sum(-1)
    seq_lr = _seq_log_ratio(logp_BT, old_logp_BT, mask_BT) / n_B.clamp_min(1.0)
    ratio_B = torch.exp(seq_lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    adv_B = _seq_advantage(adv_BT, m)
    unclipped = -ratio_B * adv_B
    clipped = -ratio_B.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_B
    loss_B = torch.maximum(unclipped, clipped)
    has = (n_B > 0).to(m.dtype)
    metrics = {
        "clip_frac": _masked_mean((clipped > unclipped).to(m.dtype), has).detach(),
        "ratio_mean": _masked_mean(ratio_B, has).detach(),
    }
    return PolicyOutput(losses=loss_B.unsqueeze(-1) * m, metrics=metrics)


def _seq_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``sum_t m_t (logp_t - old_logp_t)`` per sequence [B]; masked positions never enter (garbage there is fine)."""
    return torch.where(mask_BT.bool(), logp_BT - old_logp_BT, torch.zeros_like(logp_BT)).sum(-1)


def _seq_advantage(adv_BT: Tensor, m_BT: Tensor) -> Tensor:
    """One advantage per sequence [B]: ``adv`` itself if it is ``[B]``, else its masked token mean (the value
    the trainer broadcast over the sequence's tokens)."""
    if adv_BT.dim() == 1:
        return adv_BT.to(m_BT.dtype)
    return (adv_BT.to(m_BT.dtype) * m_BT).sum(-1) / m_BT.sum(-1).clamp_min(1.0)


def kimi_omd(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    tau: float = 1.0,
) -> PolicyOutput:
    """Kimi k1.5 online mirror descent (Kimi Team 2501.12599, section 2.3.2): a squared loss per sequence.

    Iteration i maximises ``E_{y~pi}[r(y)] - tau KL(pi || pi_i)`` against ``pi_i``, the policy of the current
    iteration. Its optimum is ``pi*(y) = pi_i(y) exp(r(y)/tau) / Z`` with ``Z = E_{pi_i}[exp(r/tau)]``, so
    ``r(y) - tau log Z = tau log(pi*(y)/pi_i(y))`` holds for EVERY y. The paper's surrogate regresses that
    identity on the k samples ``y_j ~ pi_i`` of a prompt:

        ``L = 1/k sum_j (r_j - b - tau * log(pi_theta(y_j) / pi_i(y_j)))^2``,

    log-probs summed over the sequence's tokens. Its expectation is minimised (to 0) by ``pi*`` exactly when
    ``b = tau log Z``. ``adv`` carries ``A_j = r_j - b`` from the advantage stage, so the baseline is an
    advantage entry (``alignkit.rl.advantages``): ``dr_grpo``, ``b = mean_j r_j`` (Kimi's practical choice; by
    Jensen ``E_{pi_i} r <= tau log Z``, and the optimum is then another policy: docs/reasoning.md measures the
    gap), or ``log_mean_exp``, ``b = tau log(1/k sum_j exp(r_j/tau))``, the estimate of ``tau log Z`` from the
    samples. ``adv`` may be ``[B]`` or ``[B, T]`` (then ``A_j`` is its masked token mean, the broadcast value).

    ``old_logp_BT`` is ``log pi_i``: the behaviour log-probs of the rollout, i.e. the weights at the start of the
    iteration that sampled it, held fixed for every update on that rollout (alignkit's "old" policy, or the
    sampler's with ``correction_mode=bypass``). A rollout is one mirror-descent iteration: with several updates
    per rollout (``ppo_epochs`` or ``mini_batches`` > 1) the later ones minimise the loss against the same
    ``pi_i``. On the first update ``pi_theta = pi_i``, the log-ratio is 0 and the gradient is
    ``-2 tau A_j grad log pi_theta(y_j)``: a policy gradient with advantage ``2 tau A_j``. Anchoring instead on
    the current policy detached would keep that gradient forever (no trust region); not detached, no gradient.

    ``L_j`` is written on every valid token of sequence j, like :func:`gspo`: with the ``seq_mean_token_mean``
    aggregation the step loss is ``mean_j L_j``, the paper's ``1/k sum_j`` averaged over prompts.

    Metrics (detached): ``log_ratio_mean``, the mean over sequences of ``log(pi_theta(y_j)/pi_i(y_j))``, and
    ``ratio_mean``, of ``pi_theta(y_j)/pi_i(y_j)`` (log-ratio clamped to [-20, 20] before ``exp``).

    Golden (tau = 0.5): sequence 1 with log-probs ``(-1, -2)`` against ``pi_i``'s ``(-1.5, -2.25)``: log-ratio
    ``0.5 + 0.25 = 0.75``, ``A = 1`` -> ``(1 - 0.5 * 0.75)^2 = 0.390625`` on both tokens; sequence 2 with one
    valid token, ``-0.5`` against ``-0.25``, ``A = -0.5`` -> ``(-0.5 + 0.125)^2 = 0.140625``. The gradient of
    ``L_1`` with respect to each of its token log-probs is ``2 (1 - 0.375) (-0.5) = -0.625``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    m = mask_BT.to(logp_BT.dtype)
    seq_lr = _seq_log_ratio(logp_BT, old_logp_BT, mask_BT)
    loss_B = (_seq_advantage(adv_BT, m) - tau * seq_lr) ** 2
    has = (m.sum(-1) > 0).to(m.dtype)
    metrics = {
        "log_ratio_mean": _masked_mean(seq_lr, has).detach(),
        "ratio_mean": _masked_mean(torch.exp(seq_lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)), has).detach(),
    }
    return PolicyOutput(losses=loss_B.unsqueeze(-1) * m, metrics=metrics)


def value_loss(
    values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor, *, eps_v: float = 0.2
) -> PolicyOutput:
    """PPO clipped value loss (Schulman et al. 1707.06347; Ouyang et al. 2203.02155):

    ``0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)`` per token.

    Metric ``vf_clip_frac``: fraction of valid tokens where the clipped term is the larger.
    Golden: ``V=1, V_old=0, R=1, eps_v=0.2`` -> ``0.5*max(0, (0.2-1)^2) = 0.32``.
    """
    m = mask_BT.to(values_BT.dtype)
    v_clip = torch.maximum(torch.minimum(values_BT, old_values_BT + eps_v), old_values_BT - eps_v)
    a = (values_BT - returns_BT) ** 2
    b = (v_clip - returns_BT) ** 2
    loss = 0.5 * torch.maximum(a, b)
    return PolicyOutput(losses=loss * m, metrics={"vf_clip_frac": _masked_mean((b > a).to(m.dtype), m).detach()})


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registry entry. ``sequence_level``: one loss per sequence (GSPO, Kimi), so pair it with
    ``seq_mean_token_mean`` to get the paper's objective. ``hparams``: keyword hyperparameters, each read from
    the :class:`~alignkit.rl.objective.Objective` field of the same name."""

    name: str
    fn: Callable[..., PolicyOutput]
    sequence_level: bool
    hparams: tuple[str, ...]


POLICY_LOSSES: dict[str, PolicyLossSpec] = {
    s.name: s
    for s in (
        PolicyLossSpec("ppo_clip", ppo_clip, sequence_level=False, hparams=("eps_low", "eps_high", "dual_clip")),
        PolicyLossSpec("gspo", gspo, sequence_level=True, hparams=("eps_low", "eps_high")),
        PolicyLossSpec("kimi_omd", kimi_omd, sequence_level=True, hparams=("tau",)),
    )
}


def get_policy_loss(name: str) -> PolicyLossSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown policy loss {name!r}; choose one of: {', '.join(sorted(POLICY_LOSSES))}") from None


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def token_mean(loss_BT: Tensor, mask_BT: Tensor, *, step_normaliser: float, constant: float | None = None) -> Tensor:
    """Token mean over the whole step (DAPO, Yu et al. 2503.14476): this micro-batch's
    ``sum_{i,t} m_it loss_it / N_tokens(step)``. Golden: loss ``[[1, 2], [3, 0]]``, mask
    ``[[1, 1], [1, 0]]``, N=3 -> ``6/3 = 2``."""
    return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / step_normaliser


def seq_mean_token_mean(
    loss_BT: Tensor, mask_BT: Tensor, *, step_normaliser: float, constant: float | None = None
) -> Tensor:
    """Mean over sequences of each sequence's token mean (original GRPO, Shao et al.
    2402.03300): ``sum_i (sum_t m_it loss_it / |y_i|) / N_seqs(step)``. Rows with no valid token
    contribute 0 and are not counted by :func:`normaliser`. Golden (as above, N=2 sequences):
    ``(1.5 + 3) / 2 = 2.25``."""
    m = mask_BT.to(loss_BT.dtype)
    per_seq = (loss_BT * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return per_seq.sum() / step_normaliser


def seq_sum_constant(
    loss_BT: Tensor, mask_BT: Tensor, *, step_normaliser: float, constant: float | None = None
) -> Tensor:
    """Dr. GRPO (Liu et al. 2503.20783): each sequence's token SUM divided by a constant (e.g.
    ``max_new_tokens``), not by its own length, then divided by the number of sequences in the
    step: ``sum_{i,t} m_it loss_it / (constant * N_seqs(step))``. Golden (as above, constant 4,
    N=2): ``6 / 8 = 0.75``."""
    if constant is None or constant <= 0:
        raise ConfigError("the seq_sum_constant aggregation needs a positive constant (e.g. max_new_tokens)")
    return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / (constant * step_normaliser)


@dataclass(frozen=True)
class AggregationSpec:
    """A registry entry. ``counts``: what :func:`normaliser` counts over the step (``"tokens"`` or
    ``"sequences"``). ``needs_constant``: takes ``constant``."""

    name: str
    fn: Callable[..., Tensor]
    counts: str
    needs_constant: bool


AGGREGATIONS: dict[str, AggregationSpec] = {
    s.name: s
    for s in (
        AggregationSpec("token_mean", token_mean, counts="tokens", needs_constant=False),
        AggregationSpec("seq_mean_token_mean", seq_mean_token_mean, counts="sequences", needs_constant=False),
        AggregationSpec("seq_sum_constant", seq_sum_constant, counts="sequences", needs_constant=True),
    )
}


def get_aggregation(name: str) -> AggregationSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown loss aggregation {name!r}; choose one of: {', '.join(sorted(AGGREGATIONS))}") from None


def normaliser(name: str, masks: Sequence[Tensor]) -> float:
    """The step normaliser of aggregation ``name`` counted over ALL micro-batches' masks of one
    optimizer step: valid tokens for ``token_mean``, sequences with at least one valid token for
    the others. Across ranks, all-reduce (sum) this count before use. Clamped to >= 1 so an empty
    step gives a zero loss instead of NaN."""
    spec = get_aggregation(name)
    total = 0.0
    for m in masks:
        mb = m.bool()
        total += float(mb.sum()) if spec.counts == "tokens" else float(mb.any(dim=-1).sum())
    return max(total, 1.0)
