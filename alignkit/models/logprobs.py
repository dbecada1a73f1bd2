"""Per-token log-probabilities of response tokens, without full-vocabulary logits for the whole batch.

The trunk runs once over the batch; the vocabulary projection (``lm_head``) and the log-softmax run only at the
positions whose next token is a response token, ``chunk`` positions at a time. Under autograd each chunk is
checkpointed, so its float32 logits are recomputed in the backward pass instead of being kept: peak memory for
the projection is ``chunk x vocab`` floats rather than ``batch x length x vocab``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids_BT, attention_mask, position_ids_BT=None, **layer_kwargs) -> torch.Tensor:
    """Last hidden states ``[B, T, D]`` of the decoder trunk (the LM head is not applied).

    ``attention_mask`` is ``[B, T]`` (padding) or a ``[B, 1, T, T]`` boolean mask of allowed attention;
    ``layer_kwargs`` reach every attention call (``packed_layout``, see :mod:`alignkit.models.packing`).
    """
    trunk = unwrap(model).get_decoder()
    out = trunk(input_ids=input_ids_BT, attention_mask=attention_mask, position_ids=position_ids_BT, use_cache=False,
                **layer_kwargs)
    return out.last_hidden_state


def _token_logps(head, softcap, h_ND, target_N, temperature=1.0):
    logits = head(h_ND).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, target_N[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def project_logps(model, h_ND, target_N, *, chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """``log p(target | hidden)`` for N positions, ``chunk`` rows of the vocabulary projection at a time.

    ``temperature``: the log-probs of ``softmax(logits / temperature)``, the distribution a sampler at that
    temperature draws from (online RL scores its samples under it); no top-k/top-p truncation is applied.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    base = unwrap(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    pieces = []
    for start in range(0, h_ND.shape[0], chunk):
        args = (head, softcap, h_ND[start : start + chunk], target_N[start : start + chunk], temperature)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            pieces.append(_token_logps(*args))
    return torch.cat(pieces) if pieces else h_ND.new_zeros(0, dtype=torch.float32)


def token_logps(model, input_ids_BT, attention_mask_BT, loss_mask_BT, *, chunk: int = 1024, position_ids_BT=None,
                **layer_kwargs) -> torch.Tensor:
    """Log-probs ``[B, T]`` of each token given its prefix, filled only where ``loss_mask_BT`` is true (0 elsewhere).

    ``loss_mask_BT[b, t]`` marks token ``t`` as a response token; it is predicted from position ``t - 1``, so
    position 0 can never be a response token.
    """
    h_BTD = hidden_states(model, input_ids_BT, attention_mask_BT, position_ids_BT, **layer_kwargs)
    where = loss_mask_BT[:, 1:]
    out_BT = torch.zeros(input_ids_BT.shape, dtype=torch.float32, device=input_ids_BT.device)
    out_BT[:, 1:][where] = project_logps(model, h_BTD[:, :-1][where], input_ids_BT[:, 1:][where], chunk=chunk)
    return out_BT


def sequence_logps(model, batch: dict, *, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs ``[B]`` and the number of response tokens ``[B]`` of each row."""
    mask_BT = batch["loss_mask"]
    lp_BT = token_logps(model, batch["input_ids"], batch["attention_mask"], mask_BT, chunk=chunk)
    return lp_BT.sum(-1), mask_BT.sum(-1).float()


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast for ``precision='bf16'``, a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shared_prompt_logps(model, batch: dict, *, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts ``[B * R]`` (row-major: row, then response) of a batch made by
    :func:`alignkit.data.collate.collate_shared`, where each row's prompt went through the model once."""
    h_BTD = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[batch["source"]]
    lp_N = project_logps(model, h_ND, batch["target"], chunk=chunk)
    seg = batch["segment"]
    sums = torch.zeros(batch["n_segments"], dtype=lp_N.dtype, device=lp_N.device).index_add(0, seg, lp_N)
    counts = torch.zeros(batch["n_segments"], device=lp_N.device).index_add(0, seg, torch.ones_like(lp_N))
    return sums, counts
