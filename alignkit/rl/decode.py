"""A lean one-token decode step for Llama-style models, used by the rollout engine's bf16 copy.

Why not transformers' forward: at a decode step every matmul has a handful of rows, so the step is bound by
reading the weights plus a fixed cost per op, and transformers' forward adds its own machinery (masks, cache
bookkeeping, a flash-attention kernel for one query). Measured on SmolLM2-135M at batch 8 the gain is small,
1.04-1.07x a step (``bench/decode_parts.py``). This step calls the model's own modules for the projections,
norms, rotary table, activation and head (so it uses whatever weights they hold, prepacked ones included:
:mod:`alignkit.models.prepacked`), writes keys and values into preallocated buffers, and computes attention for
the single query as two small float32 matmuls. The prefill
still runs transformers' forward; its cache is copied into :class:`KVBuffer`.

The rotary embedding module is the model's (so RoPE scaling variants behave as the model defines them), and the
rotation is transformers' ``q * cos + rotate_half(q) * sin`` in the model's dtype. The one difference from
transformers' step is attention in float32 (keys and values stored in float32; transformers' flash kernel also
accumulates in float32): the tests bound the logits' difference and check greedy decoding gives the same tokens.

Supported: ``model_type`` llama, qwen2 and mistral with every layer full attention (no sliding window), no
``pretraining_tp`` split, no per-head q/k norms. :func:`fast_decoder` returns None for anything else, and the
engine keeps transformers' forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.models.prepacked import PrepackedLinear

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def supports_fast_decode(model) -> bool:
    """Whether :class:`FastDecoder` reproduces ``model``'s forward (see the module docstring)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    layer = model.get_decoder().layers[0]
    attn = layer.self_attn
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (not hasattr(attn, "q_norm") and hasattr(layer.mlp, "act_fn")  # plain layers, not LoRA-wrapped ones
            and all(type(m) in (nn.Linear, PrepackedLinear) for m in linears))


class KVBuffer:
    """Keys and values of every layer, ``[B, H_kv, capacity, head_dim]`` float32, filled up to ``length``."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def from_cache(cls, cache, capacity: int) -> KVBuffer:
        """A buffer holding a transformers ``DynamicCache``'s contents, with room for ``capacity`` positions."""
        keys, values = [], []
        length = cache.layers[0].keys.shape[2]
        for layer in cache.layers:
            for src, out in ((layer.keys, keys), (layer.values, values)):
                buf = src.new_empty(*src.shape[:2], capacity, src.shape[3], dtype=torch.float32)
                buf[:, :, :length] = src
                out.append(buf)
        return cls(keys, values, length)

    def batch_select_indices(self, rows: Tensor) -> None:
        """Keep (and repeat) the batch rows ``rows``, in that order (as ``DynamicCache`` does)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class FastDecoder:
    """One-token decode steps of a Llama-style ``model`` (see the module docstring), with the model's own modules
    and weights: nothing is copied, so it follows every change to the model's weights."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder()
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = getattr(self.decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)

    @torch.no_grad()
    def step(self, tokens_B: Tensor, mask_BS: Tensor, pos_B: Tensor, kv: KVBuffer) -> Tensor:
        """Float32 logits ``[B, V]`` after the tokens ``tokens_B`` at positions ``pos_B``; appends their keys and
        values to ``kv``. ``mask_BS`` marks the attended positions (prompt padding 0), ``S = kv.length + 1``."""
        B, t = tokens_B.shape[0], kv.length
        if t >= kv.keys[0].shape[2]:
            raise RuntimeError(f"the key/value buffer holds {kv.keys[0].shape[2]} positions; position {t} is past it")
        h_BD = self.decoder.embed_tokens(tokens_B)
        cos_B1d, sin_B1d = self.decoder.rotary_emb(h_BD, pos_B[:, None])  # [B, 1, d]: broadcast over heads
        bias_BS = torch.zeros(mask_BS.shape, device=mask_BS.device).masked_fill_(mask_BS == 0, float("-inf"))
        bias_B11S = bias_BS[:, None, None, :]
        Hq, Hk, d = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x_BD = layer.input_layernorm(h_BD)
            q_BHd = _rotate(attn.q_proj(x_BD).view(B, Hq, d), cos_B1d, sin_B1d)
            kv.keys[i][:, :, t] = _rotate(attn.k_proj(x_BD).view(B, Hk, d), cos_B1d, sin_B1d)
            kv.values[i][:, :, t] = attn.v_proj(x_BD).view(B, Hk, d)
            # grouped-query attention for one query: [B, H_kv, group, d] x [B, H_kv, d, S], in float32
            q_BKGd = q_BHd.view(B, Hk, Hq // Hk, d).float()
            scores = torch.matmul(q_BKGd, kv.keys[i][:, :, : t + 1].transpose(-1, -2)).mul_(self.scale).add_(bias_B11S)
            out_BKGd = torch.matmul(scores.softmax(-1), kv.values[i][:, :, : t + 1])
            h_BD = h_BD + attn.o_proj(out_BKGd.reshape(B, Hq * d).to(h_BD.dtype))
            x_BD = layer.post_attention_layernorm(h_BD)
            h_BD = h_BD + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x_BD)) * mlp.up_proj(x_BD))
        kv.length = t + 1
        return head_logits(self.model, self.decoder.norm(h_BD))


def head_logits(model, h_BD: Tensor) -> Tensor:
    """Float32 logits ``[B, V]`` of the final hidden states ``h_BD`` (contiguous, 2-D), softcapped as the model's
    config says."""
    logits_BV = model.get_output_embeddings()(h_BD).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits_BV / softcap) * softcap if softcap else logits_BV


def fast_decoder(model) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model``, or None when it is not supported."""
    return FastDecoder(model) if supports_fast_decode(model) else None


def _rotate(x_BHd: Tensor, cos_B1d: Tensor, sin_B1d: Tensor) -> Tensor:
    """transformers' rotary embedding: ``x * cos + rotate_half(x) * sin``, in ``x``'s dtype."""
    half = x_BHd.shape[-1] // 2
    rotated = torch.cat((-x_BHd[..., half:], x_BHd[..., :half]), dim=-1)
    return x_BHd * cos_B1d + rotated * sin_B1d
