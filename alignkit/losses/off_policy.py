"""Off-policy corrections for a sampler that is not the trainer ("Off-policy corrections" in ALGORITHMS.md;
docs/off_policy.md has the choices and their sources).

Three policies take part (decoupled PPO, Hilton et al. 2110.00641): ``pi_rollout`` sampled the tokens (the
engine's log-probs, kept on each rollout row as ``extra["rollout"]``), ``pi_old`` is the trainer's own
computation of the policy that sampled them (the behaviour log-probs), and ``pi_theta`` is being trained. The
first two hold the same weights but differ when the engine computes differently (a bf16 copy, other kernels,
vLLM), runs stale weights (a missed or asynchronous weight sync) or samples another distribution. Per valid
token, with the log-ratio clamped to [-20, 20] before ``exp`` as the policy losses do:

    ``delta_t = logp_old_t - logp_rollout_t``,   ``rho_t = exp(delta_t) = pi_old / pi_rollout``.

:data:`CORRECTIONS` maps ``(old, rollout, mask)`` to DETACHED weights ``w`` [B, T] (0 on masked positions)
that multiply the per-token loss, so ``E_{pi_rollout}[w * loss]`` estimates ``E_{pi_old}[loss]``:

- ``none``: ``w_t = 1``;
- ``tis``: ``w_t = min(rho_t, C)`` (Yao et al. 2025; verl ``rollout_is="token"``; slime ``vanilla_tis_function``);
- ``icepop``: ``w_t = rho_t * 1[lo <= rho_t <= hi]`` (IcePop, Ling team 2510.18855; OpenRLHF and NeMo-RL);
- ``seq_mask_tis``: ``w_t = min(rho_t, C) * 1[lo <= g_i <= hi]`` with ``g_i = exp(mean_t delta_t)`` over the
  valid tokens of sequence i (OpenRLHF and NeMo-RL ``seq-mask-tis``);
- ``mis``: ``w_t = rho_i * 1[lo <= rho_i <= hi]`` with ``rho_i = exp(sum_t delta_t)`` (Liu, Li et al. 2025, their
  Seq-MIS; verl ``decoupled_seq_is_rs``).

With no mismatch (``old == rollout``) every ``rho`` is exactly 1, and every weight is exactly 1 provided
``C >= 1`` and ``lo <= 1 <= hi`` (``alignkit.rl.objective.Objective.validate`` demands both): the loss is then
the uncorrected one, bit for bit. A masked token or sequence keeps its place in the step's normaliser (its
weight is 0, the count is unchanged), as in OpenRLHF and NeMo-RL; verl's rejection sampling removes it from the
denominator instead, which needs the weights before the step's normaliser is counted.

:func:`mismatch_metrics` measures the gap every step, as ``name -> (sum, count)`` pairs.

Shapes: ``_BT`` per token, ``_B`` per sequence; ``mask_BT`` marks the tokens that train (1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.losses.policy import _LOG_RATIO_CLAMP, _masked_mean, kl_k3

__all__ = [
    "CORRECTIONS",
    "CorrectionOutput",
    "CorrectionSpec",
    "get_correction",
    "icepop",
    "mis",
    "mismatch_metrics",
    "no_correction",
    "seq_mask_tis",
    "tis",
]


@dataclass
class CorrectionOutput:
    """``weights`` [B, T]: detached, 0 on masked positions. ``metrics``: detached scalars over this micro-batch's
    valid tokens: ``weight_mean``, and where the entry has them ``clipped_frac`` (tokens whose ``rho`` was cut
    to C) and ``masked_frac`` (tokens given weight 0 by a bound)."""

    weights: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _log_ratio(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``delta_t = old - rollout`` on valid tokens, 0 elsewhere, clamped to [-20, 20]; never differentiated."""
    d = torch.where(mask_BT.bool(), old_logp_BT.detach() - rollout_logp_BT.detach(), torch.zeros_like(old_logp_BT))
    return d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _out(w_BT: Tensor, m: Tensor, **fracs: Tensor) -> CorrectionOutput:
    metrics = {"weight_mean": _masked_mean(w_BT, m)}
    metrics.update({k: _masked_mean(v.to(m.dtype), m) for k, v in fracs.items()})
    return CorrectionOutput(weights=(w_BT * m).detach(), metrics={k: v.detach() for k, v in metrics.items()})


def no_correction(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> CorrectionOutput:
    """``w_t = 1``: the loss as if the sampler were the trainer (the default)."""
    m = mask_BT.to(old_logp_BT.dtype)
    return _out(torch.ones_like(m), m)


def tis(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, *, clip: float = 2.0) -> CorrectionOutput:
    """Truncated importance sampling per token (Yao et al., "Your efficient RL framework secretly brings you
    off-policy RL training", 2025; verl ``rollout_is="token"`` with ``rollout_is_threshold``; slime
    ``vanilla_tis_function``):

    ``w_t = min(rho_t, C)``, ``rho_t = exp(logp_old_t - logp_rollout_t)``.

    Truncating from above only bounds the variance a token the sampler found unlikely can add; tokens with
    ``rho_t < 1`` keep their small weight (OpenRLHF's ``tis`` also clamps from below, at its lower bound).

    Golden (C=2): deltas ``(log 3, log 0.5, 0)`` -> weights ``(2, 0.5, 1)``, ``clipped_frac`` 1/3.
    """
    m = mask_BT.to(old_logp_BT.dtype)
    rho = torch.exp(_log_ratio(old_logp_BT, rollout_logp_BT, mask_BT))
    return _out(rho.clamp(max=clip), m, clipped_frac=rho > clip)


def icepop(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, *, low: float = 0.5,
           high: float = 5.0) -> CorrectionOutput:
    """IcePop (Ling team, "Every step evolves: scaling reinforcement learning for trillion-scale thinking model",
    2510.18855): the token's importance weight, masked to 0 outside ``[lo, hi]`` (OpenRLHF and NeMo-RL
    ``icepop``, default ``[0.5, 5]``):

    ``w_t = rho_t * 1[lo <= rho_t <= hi]``.

    A token the two policies disagree on by more than the bounds gets no gradient at all, instead of a
    truncated one. Golden ([0.5, 5]): deltas ``(log 3, log 0.25, log 6)`` -> weights ``(3, 0, 0)``,
    ``masked_frac`` 2/3.
    """
    m = mask_BT.to(old_logp_BT.dtype)
    rho = torch.exp(_log_ratio(old_logp_BT, rollout_logp_BT, mask_BT))
    keep = (rho >= low) & (rho <= high)
    return _out(rho * keep, m, masked_frac=~keep)


def seq_mask_tis(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, *, clip: float = 2.0,
                 low: float = 0.5, high: float = 5.0) -> CorrectionOutput:
    """Sequence-masked TIS (OpenRLHF and NeMo-RL ``seq-mask-tis``): a sequence whose geometric-mean ratio leaves
    the bounds is dropped whole, the others get per-token TIS weights:

    ``g_i = exp(mean_{t valid} delta_t)``, ``w_t = min(rho_t, C) * 1[lo <= g_i <= hi]``.

    The geometric mean does not grow with the length (a product of 1000 ratios of 1.001 is 2.7, their geometric
    mean 1.001), so one bound serves short and long sequences. OpenRLHF and NeMo-RL keep the UNTRUNCATED
    ``rho_t`` inside a kept sequence; here it is truncated at C as in :func:`tis`, so a single wild token of an
    otherwise agreeing sequence cannot dominate (with ``is_clip`` large the two agree).

    Golden (C=2, [0.5, 5]): sequence 1 deltas ``(log 4, log 0.25)`` -> ``g = 1``, kept, weights ``(2, 0.25)``;
    sequence 2 deltas ``(log 8, log 8)`` -> ``g = 8 > 5``, masked, weights ``(0, 0)``.
    """
    m = mask_BT.to(old_logp_BT.dtype)
    d = _log_ratio(old_logp_BT, rollout_logp_BT, mask_BT)
    rho = torch.exp(d)
    g_B = torch.exp(d.sum(-1) / m.sum(-1).clamp_min(1.0))
    keep_B1 = ((g_B >= low) & (g_B <= high)).unsqueeze(-1)
    return _out(rho.clamp(max=clip) * keep_B1, m, clipped_frac=(rho > clip) & keep_B1,
                masked_frac=~keep_B1.expand_as(rho))


def mis(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, *, low: float = 0.5,
        high: float = 5.0) -> CorrectionOutput:
    """Sequence-level masked importance sampling (Liu, Li et al., "When speed kills stability: demystifying RL
    collapse from the training-inference mismatch", 2025, their Seq-MIS; verl ``decoupled_seq_is_rs``, slime's
    ``mis.py`` in its ``mask`` mode): the whole sequence's importance ratio, and a rejection mask where it leaves
    the bounds:

    ``rho_i = exp(sum_{t valid} delta_t)``, ``w_t = rho_i * 1[lo <= rho_i <= hi]`` on every valid token of i.

    The sequence ratio is the unbiased one for a sequence-level reward (the product over tokens, Williams 1992's
    trajectory weight); rejecting rather than truncating outliers keeps the accepted ones unbiased. Its sum of
    log-ratios is clamped to [-20, 20]. Golden ([0.5, 5]): sequence 1 deltas ``(log 2, log 1.5)`` ->
    ``rho = 3``, weights ``(3, 3)``; sequence 2 deltas ``(log 4, log 2)`` -> ``rho = 8``, rejected, ``(0, 0)``.
    """
    m = mask_BT.to(old_logp_BT.dtype)
    s_B = _log_ratio(old_logp_BT, rollout_logp_BT, mask_BT).sum(-1).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    rho_B1 = torch.exp(s_B).unsqueeze(-1)
    keep_B1 = (rho_B1 >= low) & (rho_B1 <= high)
    return _out((rho_B1 * keep_B1).expand_as(m), m, masked_frac=~keep_B1.expand_as(m))


@dataclass(frozen=True)
class CorrectionSpec:
    """A registry entry. ``sequence_level``: its weight or mask is decided per sequence. ``hparams``: keyword
    hyperparameters it takes, among ``clip`` (C, the truncation of ``rho``) and ``low``/``high`` (the bounds)."""

    name: str
    fn: Callable[..., CorrectionOutput]
    sequence_level: bool
    hparams: tuple[str, ...]


CORRECTIONS: dict[str, CorrectionSpec] = {
    s.name: s
    for s in (
        CorrectionSpec("none", no_correction, sequence_level=False, hparams=()),
        CorrectionSpec("tis", tis, sequence_level=False, hparams=("clip",)),
        CorrectionSpec("icepop", icepop, sequence_level=False, hparams=("low", "high")),
        CorrectionSpec("seq_mask_tis", seq_mask_tis, sequence_level=True, hparams=("clip", "low", "high")),
        CorrectionSpec("mis", mis, sequence_level=True, hparams=("low", "high")),
    )
}


def get_correction(name: str) -> CorrectionSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return CORRECTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown off-policy correction {name!r}; choose one of: {', '.join(CORRECTIONS)}") from None


# --------------------------------------------------------------------------------------------
# Measuring the gap
# --------------------------------------------------------------------------------------------


def mismatch_metrics(trainer_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, *,
                     threshold: float) -> dict[str, tuple[float, float]]:
    """How far the sampler's log-probs are from the trainer's on this micro-batch's valid tokens, as
    ``name -> (sum, count)`` for the training loop to add up (``max_*`` names carry ``(max, 1)`` and the loop
    keeps their maximum). With ``l_t = logp_rollout_t - logp_trainer_t`` on tokens the sampler drew:

    - ``mismatch/k1``: mean ``l_t``, the k1 estimate of KL(pi_rollout || pi_trainer) (Schulman 2020): sampler
      minus trainer, the direction in which tokens were drawn;
    - ``mismatch/k3``: mean ``exp(-l_t) - 1 + l_t = rho_t - 1 - log rho_t``, the same KL, never negative;
    - ``mismatch/abs``: mean ``|l_t|``; ``mismatch/max_abs``: the largest ``|l_t|``;
    - ``mismatch/max_ratio``: the largest ``rho_t = pi_trainer / pi_rollout``, the importance weight TIS cuts;
    - ``mismatch/frac_over``: share of tokens with ``|l_t| > threshold``.

    Golden: ``l = (0.1, -0.3)``, threshold 0.2 -> k1 -0.1, abs 0.2, max_abs 0.3, max_ratio ``exp(0.3)``,
    frac_over 0.5, k3 ``(exp(-0.1) - 0.9 + exp(0.3) - 1.3) / 2``.
    """
    valid = mask_BT.bool()
    n = float(valid.sum())
    if n == 0:
        return {}
    roll, trainer = rollout_logp_BT.detach()[valid].double(), trainer_logp_BT.detach()[valid].double()
    l = roll - trainer
    return {
        "mismatch/k1": (float(l.sum()), n),
        "mismatch/k3": (float(kl_k3(roll, trainer).sum()), n),
        "mismatch/abs": (float(l.abs().sum()), n),
        "mismatch/max_abs": (float(l.abs().max()), 1.0),
        "mismatch/max_ratio": (float(torch.exp((-l).clamp(max=_LOG_RATIO_CLAMP)).max()), 1.0),
        "mismatch/frac_over": (float((l.abs() > threshold).sum()), n),
    }
