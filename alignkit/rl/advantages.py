"""Advantage estimators: the "Advantage estimators" table of ALGORITHMS.md ("Online RL").

Pure functions of tensors. Shapes: ``_BT`` one value per token ([B, T], right- or left-padded,
``mask_BT`` marks the real response tokens, which must be contiguous within a row), ``_B`` one
value per sequence, ``_BG`` one value per response of a group of G responses to one prompt
([B, G] with B prompts). Masked positions of every ``_BT`` output are exactly 0.

Which estimator a trainer uses is a registry entry (:data:`ADVANTAGES`) carrying the flags the
trainer asks about: ``needs_value_model`` (GAE needs a critic) and ``needs_groups`` (the group
baselines need G responses per prompt, laid out ``[B, G]``). The group estimators return one
advantage per response; the trainer broadcasts it over that response's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.errors import ConfigError

__all__ = [
    "ADVANTAGES",
    "AdvantageSpec",
    "discounted_returns",
    "dr_grpo",
    "gae",
    "get_advantage",
    "grpo",
    "log_mean_exp",
    "reinforce_pp",
    "rloo",
    "token_rewards",
]


def _last_token_index(mask_BT: Tensor) -> Tensor:
    """Index [B] of the last real token of each row (0 for an empty row)."""
    T = mask_BT.shape[-1]
    pos = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT.bool(), pos, torch.zeros_like(pos)).amax(dim=-1)


def token_rewards(score_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, beta: float) -> Tensor:
    """Per-token RLHF rewards (Ziegler et al. 1909.08593; Ouyang et al. 2203.02155).

    ``r_t = -beta * kl_t`` on every real token, plus the sequence score ``R`` at the last real
    token; 0 on masked positions. ``kl_BT`` is any per-token KL estimate (see
    ``alignkit.losses.policy.KL_ESTIMATORS``), used here as a reward, so it should be detached.

    Golden: ``score=[1.]``, ``kl=[[0.1, 0.2, 9.]]``, ``mask=[[1, 1, 0]]``, ``beta=0.5`` ->
    ``[[-0.05, -0.1 + 1, 0]] = [[-0.05, 0.9, 0]]``.
    """
    m = mask_BT.to(kl_BT.dtype)
    r = -beta * kl_BT * m
    last = _last_token_index(mask_BT)
    has_tok = mask_BT.bool().any(dim=-1)
    add = torch.where(has_tok, score_B.to(r.dtype), torch.zeros_like(score_B, dtype=r.dtype))
    return r.scatter_add(-1, last.unsqueeze(-1), add.unsqueeze(-1))


def discounted_returns(rewards_BT: Tensor, mask_BT: Tensor, *, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over the real tokens (G after the last real token is 0);
    masked positions 0. Vectorised over B, one reverse loop over T.

    Golden: ``r=[[1, 2, 3]]``, ``gamma=0.5`` -> ``[[1 + 0.5*(2 + 0.5*3), 2 + 0.5*3, 3]] =
    [[2.75, 3.5, 3]]``.
    """
    m = mask_BT.to(rewards_BT.dtype)
    out = torch.zeros_like(rewards_BT)
    running = torch.zeros_like(rewards_BT[..., 0])
    for t in reversed(range(rewards_BT.shape[-1])):
        running = (rewards_BT[..., t] + gamma * running) * m[..., t]
        out[..., t] = running
    return out


def gae(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 1506.02438), as used by PPO-RLHF
    (Ouyang et al. 2203.02155).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last real token taken as 0
    (the episode ends there), ``A_t = sum_l (gamma*lam)^l delta_{t+l}`` computed backwards as
    ``A_t = delta_t + gamma*lam*A_{t+1}``, and ``returns = A + V`` (the value-loss targets).
    Returns ``(advantages_BT, returns_BT)``, both detached-friendly (no in-place on the inputs)
    and 0 on masked positions. Vectorised over B with a reverse loop over T; padding may sit
    after (right padding) or before (left padding) the response; masked values never enter.

    Golden: ``r=[[0, 1]]``, ``V=[[0.5, 0.25]]``, ``gamma=1``, ``lam=0.5``:
    ``delta_1 = 1 + 0 - 0.25 = 0.75``, ``delta_0 = 0 + 0.25 - 0.5 = -0.25``,
    ``A = [[-0.25 + 0.5*0.75, 0.75]] = [[0.125, 0.75]]``, ``returns = [[0.625, 1.0]]``.
    """
    m = mask_BT.to(values_BT.dtype)
    r = rewards_BT.to(values_BT.dtype) * m
    v = values_BT * m
    T = v.shape[-1]
    adv = torch.zeros_like(v)
    next_value = torch.zeros_like(v[..., 0])
    next_adv = torch.zeros_like(v[..., 0])
    for t in reversed(range(T)):
        mt = m[..., t]
        delta = r[..., t] + gamma * next_value - v[..., t]
        a = (delta + gamma * lam * next_adv) * mt
        adv[..., t] = a
        # on a masked position keep carrying the later token's value/advantage (left padding)
        next_value = torch.where(mt.bool(), v[..., t], next_value)
        next_adv = torch.where(mt.bool(), a, next_adv)
    return adv, (adv + v) * m


def _check_groups(rewards_BG: Tensor, valid_BG: Tensor | None) -> Tensor:
    """The validity mask as float (all ones when None), after checking the shapes."""
    if rewards_BG.dim() != 2:
        raise ValueError(f"group rewards must be [B, G], got shape {tuple(rewards_BG.shape)}")
    if valid_BG is None:
        return torch.ones_like(rewards_BG)
    if valid_BG.shape != rewards_BG.shape:
        raise ValueError(f"valid_BG {tuple(valid_BG.shape)} must match rewards_BG {tuple(rewards_BG.shape)}")
    return valid_BG.to(rewards_BG.dtype)


def _group_mean(rewards_BG: Tensor, v_BG: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean over the valid entries of each group [B, 1], their count [B, 1])``; 0 for a group with none."""
    n = v_BG.sum(dim=1, keepdim=True)
    return (rewards_BG * v_BG).sum(dim=1, keepdim=True) / n.clamp_min(1.0), n


def grpo(rewards_BG: Tensor, valid_BG: Tensor | None = None, *, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2402.03300): ``(R_i - mean_G R) / (std_G R + eps)``.

    ``std`` is the UNBIASED sample standard deviation (divides by G-1), as ``torch.std`` in
    DeepSeekMath's description and TRL's ``GRPOTrainer``; hence G >= 2. A group whose rewards are
    all equal gets advantage 0 (DAPO's dynamic sampling drops such groups).

    ``valid_BG`` (optional, bool): completions that got a reward. The mean and std are taken over the
    valid completions only (n of them, std divided by n - 1); invalid ones get 0, and a group with fewer
    than 2 valid completions gets 0 throughout. Filling a missing reward with the group mean instead would
    shrink the std and inflate the others' advantages.

    Golden: ``R=[[1, 0, 0, 1]]``: mean 0.5, unbiased std ``sqrt(4*0.25/3) = 0.57735``,
    ``A = [[0.866025, -0.866025, -0.866025, 0.866025]]`` (up to eps). With ``R=[[1, ?, ?, 0]]`` (two missing):
    mean 0.5, std ``sqrt(0.5) = 0.70711``, ``A = [[0.707107, 0, 0, -0.707107]]`` (mean-filling gave +-1.2247).
    """
    v = _check_groups(rewards_BG, valid_BG)
    if rewards_BG.shape[1] < 2:
        raise ValueError("grpo needs G >= 2 responses per prompt (unbiased std)")
    mean, n = _group_mean(rewards_BG, v)
    var = (((rewards_BG - mean) * v) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp_min(1.0)
    return torch.where(n >= 2, (rewards_BG - mean) / (var.sqrt() + eps), 0.0) * v


def dr_grpo(rewards_BG: Tensor, valid_BG: Tensor | None = None) -> Tensor:
    """Dr. GRPO advantage (Liu et al. 2503.20783): ``R_i - mean_G R``, no division by the std
    (which up-weights easy and hard prompts). Pair it with the ``seq_sum_constant`` aggregation
    (``alignkit.losses.policy.AGGREGATIONS``), the other half of the paper's fix. ``valid_BG``: as in
    :func:`grpo` (the mean over valid completions; invalid ones 0).

    Golden: ``R=[[1, 0, 0, 1]]`` -> ``[[0.5, -0.5, -0.5, 0.5]]``.
    """
    v = _check_groups(rewards_BG, valid_BG)
    mean, _ = _group_mean(rewards_BG, v)
    return (rewards_BG - mean) * v


def log_mean_exp(rewards_BG: Tensor, valid_BG: Tensor | None = None, *, tau: float = 1.0) -> Tensor:
    """Reward minus Kimi k1.5's exact baseline (2501.12599, section 2.3.2):
    ``A_i = R_i - tau * log(1/n sum_j exp(R_j / tau))`` over the n valid completions of the group.

    ``tau log Z`` with ``Z = E_{pi_i}[exp(R / tau)]`` is the baseline under which the optimum of the
    ``kimi_omd`` loss is exactly ``pi_i exp(R / tau) / Z`` (``alignkit.losses.policy.kimi_omd``);
    ``1/n sum_j exp(R_j / tau)`` is an unbiased estimate of ``Z`` from samples of ``pi_i``, and its log a
    consistent (by Jensen, low by O(1/n)) estimate of ``log Z``. ``tau -> inf`` gives the mean reward
    (``dr_grpo``), ``tau -> 0`` the group's best reward. Computed with ``logsumexp``, so a small ``tau`` does not
    overflow. ``valid_BG``: as in :func:`grpo` (invalid completions get 0, as does a group with none valid).

    Golden (tau = 0.5): ``R = [[1, 0, 0, 1]]``: ``1/4 (2 e^2 + 2) = (e^2 + 1)/2 = 4.1945280``, baseline
    ``0.5 log(4.1945280) = 0.7168904``, ``A = [[0.2831096, -0.7168904, -0.7168904, 0.2831096]]`` (the mean
    baseline 0.5 would give +-0.5).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    v = _check_groups(rewards_BG, valid_BG)
    n = v.sum(dim=1, keepdim=True)
    z = torch.where(v > 0, rewards_BG / tau, torch.full_like(rewards_BG, -math.inf))
    b = tau * (torch.logsumexp(z, dim=1, keepdim=True) - n.clamp_min(1.0).log())
    return torch.where(n > 0, rewards_BG - b, 0.0) * v


def rloo(rewards_BG: Tensor, valid_BG: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2402.14740; Kool et al. 2019):
    ``A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean_G R)``. Needs G >= 2.

    Derivation of the second form: ``mean_{j!=i} R_j = (G*mean - R_i)/(G-1)``, so
    ``R_i - that = (G*R_i - G*mean)/(G-1)``. ``valid_BG``: the baseline leaves one out of the n valid
    completions (``n/(n-1) * (R_i - mean)``); invalid ones get 0, and so does a group with n < 2.

    Golden: ``R=[[1, 0, 0]]`` -> ``[[1 - 0, 0 - 0.5, 0 - 0.5]] = [[1, -0.5, -0.5]]``.
    """
    v = _check_groups(rewards_BG, valid_BG)
    G = rewards_BG.shape[1]
    if G < 2:
        raise ValueError("rloo needs G >= 2 responses per prompt (the baseline leaves one out)")
    mean, n = _group_mean(rewards_BG, v)
    return torch.where(n >= 2, n / (n - 1).clamp_min(1.0) * (rewards_BG - mean), 0.0) * v


def reinforce_pp(
    score_B: Tensor,
    kl_BT: Tensor,
    mask_BT: Tensor,
    *,
    beta: float,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ advantage (Hu 2501.03262).

    1. token rewards ``r_t = -beta*kl_t`` plus the score at the last real token
       (:func:`token_rewards`);
    2. discounted returns ``G_t = sum_{s>=t} gamma^(s-t) r_s`` (:func:`discounted_returns`);
    3. global normalisation over ALL real tokens of the batch:
       ``A = (G - mean) / (std + eps)``, with the BIASED std (divide by the token count), as
       OpenRLHF's masked whitening does. Normalise over the whole rollout batch: calling this per
       micro-batch would give a different estimator.

    Masked positions are 0. Golden: ``score=[1, 0]``, ``kl=0``, ``mask`` all ones of width 1:
    returns ``[1, 0]``, mean 0.5, biased std 0.5, ``A = [[1], [-1]]`` (up to eps).
    """
    m = mask_BT.to(kl_BT.dtype)
    returns = discounted_returns(token_rewards(score_B, kl_BT, mask_BT, beta), mask_BT, gamma=gamma)
    n = m.sum().clamp_min(1.0)
    mean = (returns * m).sum() / n
    var = (((returns - mean) * m) ** 2).sum() / n
    return (returns - mean) / (var.sqrt() + eps) * m


@dataclass(frozen=True)
class AdvantageSpec:
    """A registry entry. ``needs_value_model``: takes critic values (GAE). ``needs_groups``: takes
    rewards laid out ``[B, G]`` (G responses per prompt) and returns ``[B, G]``; otherwise the
    function works per token and returns ``[B, T]``. ``hparams``: keyword hyperparameters of a group
    estimator, each read from the :class:`~alignkit.rl.objective.Objective` field of the same name."""

    name: str
    fn: Callable[..., Tensor | tuple[Tensor, Tensor]]
    needs_value_model: bool
    needs_groups: bool
    hparams: tuple[str, ...] = ()


ADVANTAGES: dict[str, AdvantageSpec] = {
    spec.name: spec
    for spec in (
        AdvantageSpec("gae", gae, needs_value_model=True, needs_groups=False),
        AdvantageSpec("grpo", grpo, needs_value_model=False, needs_groups=True),
        AdvantageSpec("dr_grpo", dr_grpo, needs_value_model=False, needs_groups=True),
        AdvantageSpec("rloo", rloo, needs_value_model=False, needs_groups=True),
        AdvantageSpec("log_mean_exp", log_mean_exp, needs_value_model=False, needs_groups=True, hparams=("tau",)),
        AdvantageSpec("reinforce_pp", reinforce_pp, needs_value_model=False, needs_groups=False),
    )
}


def get_advantage(name: str) -> AdvantageSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ConfigError(
            f"unknown advantage estimator {name!r}; choose one of: {', '.join(sorted(ADVANTAGES))}"
        ) from None
