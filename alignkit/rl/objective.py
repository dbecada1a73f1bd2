"""The online-RL objective as a combination of registry entries, and the named presets.

An :class:`Objective` names one entry of each registry (advantage estimator, policy loss, loss aggregation,
KL estimator, off-policy correction) plus where the KL penalty goes and its hyperparameters. PPO, GRPO,
Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ and Kimi k1.5's mirror descent are entries of :data:`PRESETS`: field
values, not code (DESIGN.md principle 2). The two functions here are everything a trainer needs between the rewards and ``loss.backward()``,
and they are pure functions of tensors, so the tabular-bandit tests run exactly the code the trainer runs.

KL placement (ALGORITHMS.md, "Online RL"):

- ``kl_in="reward"``: the penalty is part of the reward. Per-token estimators (``gae``, ``reinforce_pp``) get
  ``r_t = -beta * kl_t`` plus the score at the last token; group estimators get the sequence reward
  ``R_i - beta * sum_t kl_t`` (with k1 that is ``R_i - beta * log pi(y_i)/pi_ref(y_i)``, RLOO's form). With k1 the
  optimum of ``E[R] - beta KL(pi||pi_ref)`` is ``pi* ~ pi_ref exp(R / beta)``.
- ``kl_in="loss"``: ``beta * kl_t`` is added to the per-token policy loss and differentiated through
  ``logp_theta`` (GRPO). Its expected gradient is zero for k1, the gradient of KL(pi||pi_ref) for k2 (same
  optimum as above) and the gradient of the forward KL(pi_ref||pi) for k3, whose optimum is different: on a
  softmax policy it solves ``pi(y) (R(y) - E_pi R) = beta (pi(y) - pi_ref(y))`` (see
  :func:`forward_kl_optimum`). These optima hold when the advantage is an unscaled estimate of ``R - E R``
  (rloo; dr_grpo up to its (G-1)/G factor). The ``grpo`` advantage divides by the group's reward std, which
  rescales the reward against the KL term, so GRPO with the KL in the loss reaches neither optimum exactly;
  with the KL in the reward both terms are divided alike and ``pi_ref exp(R / beta)`` is still the optimum.
- ``kl_in="none"`` or ``kl_coef=0``: no reference model is needed at all (DAPO, Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.losses.off_policy import get_correction
from alignkit.losses.policy import get_aggregation, get_kl_estimator, get_policy_loss
from alignkit.rl.advantages import get_advantage, token_rewards

__all__ = ["PRESETS", "KLController", "Objective", "compute_advantages", "forward_kl_optimum", "policy_objective",
           "preset", "whiten"]


@dataclass(frozen=True)
class Objective:
    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    aggregation: str = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    kl_in: str = "loss"  # "reward" | "loss" | "none"
    kl_coef: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    aggregation_constant: float | None = None  # seq_sum_constant's denominator (the token limit)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False  # normalise advantages over the rollout batch (PPO's usual practice)
    correction: str = "none"  # an alignkit.losses.off_policy.CORRECTIONS entry (the sampler is not the trainer)
    correction_mode: str = "decoupled"  # "decoupled" | "bypass" (see policy_objective)
    is_clip: float = 2.0  # C: the truncation of the importance ratio (tis, seq_mask_tis)
    is_low: float = 0.5  # the bounds outside which icepop, seq_mask_tis and mis mask
    is_high: float = 5.0
    tau: float = 1.0  # Kimi k1.5: the KL coefficient of each mirror-descent iteration (kimi_omd, log_mean_exp)

    def validate(self) -> Objective:
        get_advantage(self.advantage), get_policy_loss(self.policy_loss), get_kl_estimator(self.kl_estimator)
        get_correction(self.correction)
        if self.correction_mode not in ("decoupled", "bypass"):
            raise ConfigError(f"correction_mode={self.correction_mode!r}: expected decoupled or bypass")
        if self.correction_mode == "bypass" and self.correction != "none":
            raise ConfigError(f"correction={self.correction} with correction_mode=bypass: bypass takes the sampler's "
                              "log-probs as the old policy, so every importance weight old/rollout is 1; choose "
                              "correction=none with bypass, or correction_mode=decoupled")
        # so a token on which sampler and trainer agree keeps weight 1 and the loss is the uncorrected one
        if not self.is_clip >= 1:
            raise ConfigError(f"is_clip must be >= 1, got {self.is_clip}")
        if not 0 <= self.is_low <= 1 <= self.is_high:
            raise ConfigError(f"is_bounds must satisfy 0 <= low <= 1 <= high, got ({self.is_low}, {self.is_high})")
        agg = get_aggregation(self.aggregation)
        if self.kl_in not in ("reward", "loss", "none"):
            raise ConfigError(f"kl_in={self.kl_in!r}: expected one of reward, loss, none")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if agg.needs_constant and not (self.aggregation_constant or 0) > 0:
            raise ConfigError(f"aggregation={self.aggregation} needs a positive constant (the token limit)")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1 (or unset), got {self.dual_clip}")
        if not (self.eps_low >= 0 and self.eps_high >= 0):
            raise ConfigError("eps_low and eps_high must be >= 0")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.policy_loss == "kimi_omd" and (self.advantage not in _KIMI_BASELINES or self.whiten_advantages):
            raise ConfigError(f"policy_loss=kimi_omd regresses tau * log(pi/pi_i) on the reward minus a baseline: "
                              f"advantage must be {' or '.join(_KIMI_BASELINES)} and whiten_advantages false (got "
                              f"advantage={self.advantage}, whiten_advantages={self.whiten_advantages}); another "
                              "scale of the advantage changes the optimum")
        return self

    @property
    def uses_kl(self) -> bool:
        return self.kl_in != "none" and self.kl_coef > 0

    @property
    def needs_value_model(self) -> bool:
        return get_advantage(self.advantage).needs_value_model

    @property
    def needs_groups(self) -> bool:
        return get_advantage(self.advantage).needs_groups


# the baselines of kimi_omd: the group's mean reward (Kimi's choice) and the exact tau * log-mean-exp
_KIMI_BASELINES = ("dr_grpo", "log_mean_exp")

PRESETS: dict[str, dict] = {
    # Ouyang et al. 2203.02155: critic + GAE, k1 penalty in the reward, token-mean PPO clip.
    "ppo": dict(advantage="gae", policy_loss="ppo_clip", aggregation="token_mean", kl_estimator="k1",
                kl_in="reward", kl_coef=0.05, whiten_advantages=True),
    # Shao et al. 2402.03300: group-normalised advantage, k3 in the loss, mean of per-sequence token means.
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="seq_mean_token_mean", kl_estimator="k3",
                 kl_in="loss", kl_coef=0.04),
    # Liu et al. 2503.20783: no std division, token sums over a constant, no KL term.
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo_clip", aggregation="seq_sum_constant", kl_in="none",
                    kl_coef=0.0),
    # Yu et al. 2503.14476: clip-higher, token-mean over the step, no KL; dynamic sampling is on in the config.
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="token_mean", kl_in="none", kl_coef=0.0,
                 eps_low=0.2, eps_high=0.28),
    # Zheng et al. 2507.18071: sequence-level ratio with a tiny clip range, no KL.
    "gspo": dict(advantage="grpo", policy_loss="gspo", aggregation="seq_mean_token_mean", kl_in="none", kl_coef=0.0,
                 eps_low=3e-4, eps_high=4e-4),
    # Ahmadian et al. 2402.14740: leave-one-out baseline, k1 penalty in the sequence reward.
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", aggregation="token_mean", kl_estimator="k1",
                 kl_in="reward", kl_coef=0.05),
    # Hu 2501.03262: token-level k1 penalty in the reward, returns normalised over the batch.
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo_clip", aggregation="token_mean",
                         kl_estimator="k1", kl_in="reward", kl_coef=0.01),
    # Kimi Team 2501.12599: squared loss against tau * log(pi/pi_i), pi_i the rollout's policy, the mean reward as
    # the baseline (advantage=log_mean_exp for the exact tau log Z); the KL to pi_i is the loss itself.
    "kimi": dict(advantage="dr_grpo", policy_loss="kimi_omd", aggregation="seq_mean_token_mean", kl_in="none",
                 kl_coef=0.0),
}


def preset(name: str, **overrides) -> Objective:
    """The :class:`Objective` of preset ``name`` with ``overrides`` (only non-None values) applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(Objective)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown objective field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    extra = {k: v for k, v in overrides.items() if v is not None}
    return replace(Objective(**PRESETS[name]), **extra).validate()


def whiten(x_BT: Tensor, mask_BT: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / (std + eps)`` over the valid entries of the whole batch (biased std); 0 where masked."""
    m = mask_BT.to(x_BT.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (x_BT * m).sum() / n
    std = ((((x_BT - mean) * m) ** 2).sum() / n).sqrt()
    return (x_BT - mean) / (std + eps) * m


def compute_advantages(
    obj: Objective,
    scores_B: Tensor,
    mask_BT: Tensor,
    *,
    group_size: int = 1,
    kl_BT: Tensor | None = None,
    values_BT: Tensor | None = None,
    scored_B: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token advantages ``[B, T]`` (0 where masked) and, for GAE, the value targets.

    ``scores_B``: one scalar reward per completion, completions of one prompt adjacent (row ``b`` belongs to
    group ``b // group_size``). ``kl_BT``: the per-token KL estimate (detached), used when ``kl_in="reward"``.
    ``scored_B`` (bool): the completions that got a reward; only they enter a group's mean and std (default:
    those with a token in ``mask_BT``). A completion may be scored and still masked from the loss (DAPO's
    overlong filtering of truncated completions): it then counts in its group's baseline but gets no gradient.
    """
    spec = get_advantage(obj.advantage)
    m = mask_BT.to(torch.float32)
    scores_B = scores_B.to(torch.float32)
    penalty = obj.kl_in == "reward" and obj.kl_coef > 0
    if penalty and kl_BT is None:
        raise ValueError("kl_in='reward' needs kl_BT")
    kl = kl_BT.detach().to(torch.float32) * m if penalty else torch.zeros_like(m)
    returns = None
    if spec.needs_groups:
        if scores_B.shape[0] % group_size:
            raise ValueError(f"{scores_B.shape[0]} completions do not split into groups of {group_size}")
        r_B = scores_B - obj.kl_coef * kl.sum(-1) if penalty else scores_B
        valid_B = mask_BT.bool().any(-1) if scored_B is None else scored_B.bool()
        hp = {k: getattr(obj, k) for k in spec.hparams}
        adv_B = spec.fn(r_B.view(-1, group_size), valid_B.view(-1, group_size), **hp).reshape(-1)
        adv = adv_B[:, None] * m
    elif obj.advantage == "reinforce_pp":
        adv = spec.fn(scores_B, kl, mask_BT, beta=obj.kl_coef if penalty else 0.0, gamma=obj.gamma)
    else:  # gae
        if values_BT is None:
            raise ValueError("gae needs values_BT from a value model")
        rewards = token_rewards(scores_B, kl, mask_BT, obj.kl_coef if penalty else 0.0)
        adv, returns = spec.fn(rewards, values_BT.detach().to(torch.float32), mask_BT, gamma=obj.gamma, lam=obj.lam)
    if obj.whiten_advantages:
        adv = whiten(adv, mask_BT)
    return adv, returns


def policy_objective(
    obj: Objective,
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    step_normaliser: float,
    ref_logp_BT: Tensor | None = None,
    rollout_logp_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, tuple[float, float]]]:
    """The scalar loss of this micro-batch (already divided by the step's normaliser) and its metrics.

    Per-token loss = the policy loss entry's loss, plus ``kl_coef * kl_t`` when ``kl_in="loss"``; then reduced by
    the aggregation entry with the step-global ``step_normaliser`` (see ``alignkit.losses.policy.normaliser``).
    Metrics are ``name -> (sum, count)`` over this micro-batch's valid tokens, for the training loop to add up.

    ``old_logp_BT`` are the trainer's behaviour log-probs, ``rollout_logp_BT`` the sampler's (needed by any
    correction and by bypass). Off-policy correction (``alignkit.losses.off_policy``), by ``obj.correction_mode``:

    - ``decoupled`` (three policies): the PPO ratio is ``pi_theta / pi_old`` and the per-token loss, the KL term
      in the loss included, is multiplied by the correction's detached weight ``w_t(old, rollout)``:
      ``loss_t = w_t * (ppo_t + kl_coef * kl_t)``. The KL estimator in the loss, too, assumes tokens drawn from
      ``pi_old``; weighting only the PPO term (verl) leaves its gradient an expectation under the sampler;
    - ``bypass`` (two policies, ``old := rollout``): the PPO ratio is ``pi_theta / pi_rollout``, no weight.

    With ``correction="none"`` in decoupled mode no weight is computed and the loss is the uncorrected one.
    """
    spec = get_policy_loss(obj.policy_loss)
    correction = get_correction(obj.correction)
    if rollout_logp_BT is None and (obj.correction_mode == "bypass" or correction.name != "none"):
        raise ValueError(f"correction={obj.correction}, correction_mode={obj.correction_mode} need the sampler's "
                         "log-probs (rollout_logp_BT)")
    anchor = rollout_logp_BT if obj.correction_mode == "bypass" else old_logp_BT
    out = spec.fn(logp_BT, anchor, adv_BT, mask_BT, **{k: getattr(obj, k) for k in spec.hparams})
    losses = out.losses
    m = mask_BT.to(logp_BT.dtype)
    n_tok = float(m.sum())
    metrics = {f"policy/{k}": (float(v) * n_tok, n_tok) for k, v in out.metrics.items()}
    if ref_logp_BT is not None:
        kl_BT = get_kl_estimator(obj.kl_estimator).fn(logp_BT, ref_logp_BT) * m
        metrics["kl"] = (float(kl_BT.detach().sum()), n_tok)
        if obj.kl_in == "loss" and obj.kl_coef > 0:
            losses = losses + obj.kl_coef * kl_BT
    if correction.name != "none" and obj.correction_mode == "decoupled":
        bounds = {"clip": obj.is_clip, "low": obj.is_low, "high": obj.is_high}
        cw = correction.fn(old_logp_BT, rollout_logp_BT, mask_BT, **{k: bounds[k] for k in correction.hparams})
        losses = losses * cw.weights.to(losses.dtype)
        metrics.update({f"correction/{k}": (float(v) * n_tok, n_tok) for k, v in cw.metrics.items()})
    agg = get_aggregation(obj.aggregation)
    loss = agg.fn(losses, mask_BT, step_normaliser=step_normaliser, constant=obj.aggregation_constant)
    metrics["policy/loss"] = (float(loss.detach()) * step_normaliser, n_tok if agg.counts == "tokens" else
                              float(mask_BT.bool().any(-1).sum()))
    return loss, metrics


class KLController:
    """Fixed, or adaptive (Ziegler et al. 1909.08593) KL coefficient:
    ``beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n_steps / horizon)``, i.e. the gain K of
    ALGORITHMS.md is 1 (the paper's and TRL's choice); ``target=0`` keeps beta fixed."""

    def __init__(self, beta: float, target: float = 0.0, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int = 1) -> float:
        if self.target > 0 and kl == kl:  # NaN-safe: a step without a KL estimate leaves beta unchanged
            err = max(-0.2, min(0.2, (kl - self.target) / self.target))
            self.beta *= 1.0 + err * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


def forward_kl_optimum(ref_K: Tensor, r_K: Tensor, beta: float, iters: int = 200) -> Tensor:
    """The stationary softmax policy of ``E_pi[r] - beta * KL(pi_ref || pi)`` (what k3 in the loss converges to).

    Setting the softmax gradient to zero gives ``pi_k (r_k - c) = beta (pi_k - ref_k)`` with ``c = E_pi r``, i.e.
    ``pi_k = beta ref_k / (beta - r_k + c)``, with ``c`` chosen so that ``sum_k pi_k = 1`` and every
    denominator is positive (``c > max_k r_k - beta``). ``sum_k pi_k(c)`` falls monotonically in ``c`` on
    that range, so bisection finds it; the result also satisfies ``c = E_pi r`` (multiply by ``r_k - c`` and sum).
    """
    ref = ref_K.double() / ref_K.double().sum()
    r = r_K.double()
    lo = float(r.max()) - beta + 1e-12
    hi = float(r.max()) + 1.0
    total = lambda c: float((beta * ref / (beta - r + c)).sum())  # noqa: E731
    while total(hi) > 1:
        hi += hi - lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
    c = 0.5 * (lo + hi)
    pi = beta * ref / (beta - r + c)
    return (pi / pi.sum()).to(ref_K.dtype)
