"""Padding-free micro-batches: every sequence of a micro-batch goes through the model in ONE row, with no padding.

The linear layers, norms and MLPs (nearly all of a step's FLOPs) then run on the real tokens only. Attention must
still stay within each sequence. The model's attention implementation is switched to :data:`NAME`, which behaves
exactly like ``sdpa`` unless the forward pass carries a ``packed_layout`` keyword (from
:func:`alignkit.data.collate.collate_packed`). With it, queries, keys and values are regrouped into one padded row
per sequence for the attention kernel alone (causal, so the right padding is never attended to) and scattered back.
``position_ids`` restart at 0 for each sequence, so rotary positions are those of the sequence on its own.

The layout rides in the layer's keyword arguments, so a checkpointed layer's recomputation in the backward pass
sees it too.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "alignkit_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     packed_layout=None, **kwargs):
    """``sdpa`` attention, or per-sequence causal attention over a packed row when ``packed_layout`` is given.

    ``packed_layout = (gather_SL, take_N)``: ``gather_SL[s, i]`` is the packed position of sequence ``s``'s token
    ``i`` (0 where the sequence is shorter); ``take_N`` is each packed token's flat index into ``S x L``.
    """
    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]}")
    gather_SL, take_N = packed_layout

    def regroup(x_1HND):  # [1, H, N, d] -> [S, H, L, d]
        return x_1HND[0][:, gather_SL].transpose(0, 1)

    out_SLHd, _ = sdpa_attention_forward(module, regroup(query), regroup(key), regroup(value), None, dropout=dropout,
                                         scaling=scaling, is_causal=True, **kwargs)
    S, L, H, d = out_SLHd.shape
    return out_SLHd.reshape(S * L, H, d)[take_N][None], None


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def supports_packing(model) -> str | None:
    """None if ``model`` can run packed batches, else why not (attention that is not plain causal sdpa)."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    for key in ("sliding_window", "attn_logit_softcapping"):
        if getattr(cfg, key, None):
            return f"its config sets {key}"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "it has layers other than full attention"
    if cfg._attn_implementation not in ("sdpa", "eager", NAME):
        return f"attn_implementation={cfg._attn_implementation}"
    return None


def enable_packing(model) -> None:
    """Switch ``model`` (a transformers model, unwrapped) to :data:`NAME` attention; unpacked batches are unchanged."""
    model.set_attn_implementation(NAME)
