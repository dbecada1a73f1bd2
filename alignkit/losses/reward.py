"""Reward-model losses: the "Reward models" section of ALGORITHMS.md.

Pure functions of reward tensors. Like the preference losses they return UNREDUCED losses: the trainer
sums them and divides by the number of labelled entries in the whole optimizer step (``count`` for
Bradley-Terry, the number of labelled steps for a PRM), so nothing here takes a mean.

Shapes: ``_P`` is one value per pair, ``_PK`` one per (pair, aspect) for a reward model with K heads
(helpfulness, safety, ...), ``_N`` one per reasoning step (all steps of a batch, flattened).
Half-precision inputs are computed in float32, as in ``alignkit.losses.preference``.

Golden batch R (``tests/test_reward_losses.py``), P = 2 pairs, K = 2 aspects:
``r_w = ((2, 0), (-1, 1.5))``, ``r_l = ((1, 0.5), (0.5, -0.5))``, per-pair margin ``m = (0.5, 1)``, so
``d = r_w - r_l - m = ((0.5, -1), (-2.5, 1))`` and ``(r_w + r_l)^2 = ((9, 0.25), (0.25, 1))``; per-pair soft
labels ``s = (0.75, 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.models.reward import STEP_AGGREGATIONS, aggregate_steps  # noqa: F401  (scoring lives with the model)

__all__ = ["STEP_AGGREGATIONS", "RewardOutput", "aggregate_steps", "bradley_terry", "prm_bce"]



def _f(t: Tensor) -> Tensor:
    """Upcast half precision to float32; other dtypes pass through."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


@dataclass
class RewardOutput:
    """What :func:`bradley_terry` returns; every tensor has the shape of the rewards given ([P, K] or [P]).

    ``losses``: unreduced and differentiable; exactly 0 (and no gradient) where ``mask`` is false.
    ``correct``: detached bool, ``r_w > r_l`` (the margin ``m`` is not subtracted); false where masked.
    ``margins``: detached ``r_w - r_l``; 0 where masked.
    ``mask``: bool, the (pair, aspect) entries that are labelled.
    ``count``: 0-d tensor, ``mask.sum()``: the trainer sums ``losses``, ``correct`` and ``margins`` and
    ``count`` over the step and divides (loss = sum / count, accuracy = correct.sum() / count).
    """

    losses: Tensor
    correct: Tensor
    margins: Tensor
    mask: Tensor
    count: Tensor


def bradley_terry(
    r_chosen_PK: Tensor,
    r_rejected_PK: Tensor,
    *,
    margin_P: Tensor | None = None,
    mask_PK: Tensor | None = None,
    center_coef: float = 0.0,
    target_P: Tensor | None = None,
) -> RewardOutput:
    """Bradley-Terry reward-model loss, InstructGPT (Ouyang et al. 2022, arXiv:2203.02155), per aspect.

    ``loss = -log sigma(r_w - r_l - m) + c * (r_w + r_l)^2`` for each (pair, aspect) entry; with soft targets s,
    ``loss = -(s log sigma(d) + (1 - s) log sigma(-d)) + c * (r_w + r_l)^2`` with ``d = r_w - r_l - m``.

    * ``r_chosen_PK``/``r_rejected_PK``: rewards of the preferred and dispreferred response, [P, K] (one
      column per head), or [P] for a single head; the outputs have the same shape.
    * ``margin_P``: optional per-pair margin m (Llama 2's margin loss), [P], shared by all aspects, or [P, K].
    * ``mask_PK``: optional bool, which aspects each pair is labelled for. A masked entry has loss exactly 0
      and passes no gradient, even if its rewards are not finite (they are replaced before any arithmetic).
    * ``center_coef`` c: the centering term ``c * (r_w + r_l)^2`` keeps the summed reward of a pair near 0
      (BT is invariant to a shift of r); Eisenstein et al. 2023 ("Helping or Herding", arXiv:2312.09244) use
      it as an auxiliary loss, with c around 0.01.
    * ``target_P``: optional soft labels s in [0, 1], [P] (shared by all aspects) or [P, K]: the probability
      that the preferred response is better (an AI judge's, as ``alignkit cai stage=label`` writes it), i.e. the
      cross-entropy of sigma(d) against s. None is the hard label s = 1 (the loss above, computed as before).
      Since ``softplus(d) - softplus(-d) = d``, the soft loss is the hard one plus ``(1 - s) d``.

    Gradient: ``d loss / d r_w = -(s - sigma(d)) + 2c (r_w + r_l)`` (s = 1 without targets), so without
    centering a free pair stops where ``sigma(d) = s``: a probability-0.75 label asks for a reward gap
    ``logit(0.75) = log 3``, not an unbounded one.

    Golden (batch R): without margin or centering, ``softplus(-(r_w - r_l)) =
    ((0.3132616875, 0.9740769842), (1.7014132780, 0.1269280110))``; with the margin m, ``softplus(-d) =
    ((0.4740769842, 1.3132616875), (2.5788897343, 0.3132616875))``; adding ``c = 0.1`` centering gives
    ``((1.3740769842, 1.3382616875), (2.6038897343, 0.4132616875))``. With mask ``((T, F), (T, T))`` the
    (0, 1) entry becomes 0 and ``count = 3``. ``correct = ((T, F), (F, T))``,
    ``margins = ((1, -0.5), (-1.5, 2))``. With the margin and soft labels s = (0.75, 0.5), ``softplus(-d) +
    (1 - s) d = softplus(-d) + ((0.125, -0.25), (-1.25, 0.5)) = ((0.5990769842, 1.0632616875),
    (1.3288897343, 0.8132616875))``; the s = 0.5 pair's loss ``(softplus(d) + softplus(-d)) / 2`` is even in d.
    """
    r_w, r_l = _f(r_chosen_PK), _f(r_rejected_PK)
    if r_w.shape != r_l.shape or r_w.dim() not in (1, 2):
        raise ValueError(
            f"rewards must both be [P] or [P, K], got {tuple(r_w.shape)} and {tuple(r_l.shape)}"
        )
    mask = torch.ones_like(r_w, dtype=torch.bool) if mask_PK is None else mask_PK.to(torch.bool)
    if mask.shape != r_w.shape:
        raise ValueError(f"mask_PK has shape {tuple(mask.shape)}, rewards {tuple(r_w.shape)}")
    # Replace masked inputs before any arithmetic, so that NaN/inf rewards of unlabelled heads cannot leak
    # NaN into the gradient (0 * nan = nan in the backward of logsigmoid).
    zero = torch.zeros((), dtype=r_w.dtype, device=r_w.device)
    r_w, r_l = torch.where(mask, r_w, zero), torch.where(mask, r_l, zero)
    diff = r_w - r_l
    logits = diff
    if margin_P is not None:
        logits = diff - torch.where(mask, _per_entry(margin_P, r_w), zero)
    if target_P is None:
        losses = -F.logsigmoid(logits)
    else:
        s = _per_entry(target_P, r_w)
        if not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError("target_P must hold probabilities in [0, 1]")
        losses = -(s * F.logsigmoid(logits) + (1 - s) * F.logsigmoid(-logits))
    if center_coef:
        losses = losses + center_coef * (r_w + r_l) ** 2
    losses = torch.where(mask, losses, zero)
    diff = diff.detach()
    return RewardOutput(
        losses=losses,
        correct=(diff > 0) & mask,
        margins=torch.where(mask, diff, zero),
        mask=mask,
        count=mask.sum(),
    )


def _per_entry(values_P: Tensor, like_PK: Tensor) -> Tensor:
    """A per-pair [P] (or per-entry [P, K]) tensor in the rewards' dtype, broadcast to their shape."""
    v = _f(values_P).to(device=like_PK.device, dtype=like_PK.dtype)
    if v.dim() == 1 and like_PK.dim() == 2:
        v = v[:, None]
    return v.expand_as(like_PK)


def prm_bce(step_logits_N: Tensor, labels_N: Tensor) -> Tensor:
    """Process reward model loss, Lightman et al. 2023 ("Let's Verify Step by Step", arXiv:2305.20050).

    Binary cross-entropy with logits at each step's last token, unreduced [N]:
    ``loss = -(y log sigma(z) + (1 - y) log(1 - sigma(z))) = softplus(z) - y z``, with ``y`` the step's
    label (bool or 0/1) and ``z`` its logit.

    Golden: ``z = (2, -1, 0)``, ``y = (1, 1, 0)`` gives ``(softplus(-2), softplus(1), log 2) =
    (0.1269280110, 1.3132616875, 0.6931471806)``.
    """
    logits = _f(step_logits_N)
    if logits.shape != labels_N.shape:
        raise ValueError(f"step_logits_N has shape {tuple(logits.shape)}, labels_N {tuple(labels_N.shape)}")
    return F.binary_cross_entropy_with_logits(logits, labels_N.to(logits.dtype), reduction="none")
