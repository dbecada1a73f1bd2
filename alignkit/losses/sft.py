"""Supervised fine-tuning loss (ALGORITHMS.md, "Supervised fine-tuning")."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nll_sum"]


def nll_sum(token_logps: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Summed negative log-likelihood of the response tokens: ``-sum(token_logps[mask])``, or with per-token
    ``weights`` [B, T] ``-sum((weights * token_logps)[mask])`` (the trainer then divides by the masked weights'
    sum: a weighted mean, e.g. thinking tokens at ``thinking_loss``'s weight).

    ``token_logps`` [B, T]: log-prob of each target token; ``mask`` [B, T]: true (or 1) on response
    tokens, false on prompt and padding. Returns a 0-d tensor (float32 or wider).

    Why a sum and not a mean: the trainer divides by the number of response tokens in the whole
    optimizer step (all micro-batches, all ranks). A per-micro-batch mean would weight a token by
    ``1 / (tokens in its micro-batch)``, so tokens of short micro-batches would count more and
    batch 8 x accumulation 1 would differ from batch 1 x accumulation 8; summing here and dividing
    once by the global count makes them equal.

    Masked positions are selected with ``where`` rather than multiplied by 0, so a ``-inf``
    log-prob on a padding token cannot turn the sum into NaN. Half precision is summed in float32.
    """
    logps_BT = token_logps.float() if torch.finfo(token_logps.dtype).bits < 32 else token_logps
    if weights is not None:
        logps_BT = weights * logps_BT
    return -torch.where(mask.bool(), logps_BT, 0.0).sum()
