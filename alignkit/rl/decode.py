"""The lean forward of Llama-style models for the rollout engine: the prefill and one-token decode steps.

Why not transformers' forward: at a decode step every matmul has a handful of rows, so the step is bound by
reading the weights plus a fixed cost per op, and transformers' forward adds its own machinery (masks, cache
bookkeeping, a flash-attention kernel for one query). This forward calls the model's own modules for the
projections, norms, rotary table, activation and head (so it uses whatever weights they hold, prepacked ones
included: :mod:`alignkit.models.prepacked`), and keeps keys and values in a :class:`SlotCache`: preallocated
per-row slots, each row with its own length, so rows at different positions (continuous batching, tokens
taken back) share one step. Measured on SmolLM2-135M: ``bench/decode_parts.py``.

- :meth:`FastDecoder.prefill`: the prompts right-padded (a causal mask then needs no padding mask: a row's real
  positions never see its padding), attention by ``scaled_dot_product_attention``, the head on each row's last
  real position only;
- :meth:`FastDecoder.step`: one token per row, written at the row's own column; attention for the single query
  as two small matmuls over the columns filled so far, masked per row;
- :func:`fuse_projections`: q/k/v and gate/up of every layer as one linear each (their weights concatenated),
  for a model only this forward runs (the engine's bf16 copy): 120 matmuls a step instead of 210 on
  SmolLM2-135M. The fused layer replaces the three (two): the weights are held once.

The rotary embedding module is the model's (so RoPE scaling variants behave as the model defines them), and the
rotation is transformers' ``q * cos + rotate_half(q) * sin`` in the model's dtype. Attention in a decode step
runs in the cache's dtype (float32, or the model's bf16 with ``kv_dtype``) with the softmax in float32; the tests
bound the logits' difference to transformers' and check greedy decoding gives the same tokens.

Supported: ``model_type`` llama, qwen2 and mistral with every layer full attention (no sliding window), no
``pretraining_tp`` split, no per-head q/k norms. :func:`fast_decoder` returns None for anything else, and the
engine keeps transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.models.prepacked import PrepackedLinear

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


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
    attn, mlp = layer.self_attn, layer.mlp
    names = [("qkv_proj",) if hasattr(attn, "qkv_proj") else ("q_proj", "k_proj", "v_proj"), ("o_proj",)]
    linears = [getattr(attn, n, None) for group in names for n in group]
    linears += [getattr(mlp, n, None) for n in (("gate_up_proj",) if hasattr(mlp, "gate_up_proj")
                                                else ("gate_proj", "up_proj")) + ("down_proj",)]
    return (not hasattr(attn, "q_norm") and hasattr(mlp, "act_fn")  # plain layers, not LoRA-wrapped ones
            and all(type(m) in (nn.Linear, PrepackedLinear) for m in linears))


def fuse_projections(model) -> dict[str, tuple[tuple[str, int], ...]]:
    """Replace each layer's q/k/v projections by one ``qkv_proj`` and gate/up by one ``gate_up_proj`` holding
    their weights (and biases) concatenated along the output; returns each new module's name with the names and
    output sizes of the modules it replaces, in order. Only :class:`FastDecoder` can run the model afterwards."""
    fused = {}
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    prefix = f"{prefix}.layers" if prefix else "layers"
    for i, layer in enumerate(decoder.layers):
        for new, parts in FUSED.items():
            olds = [layer.get_submodule(p) for p in parts]
            bias = None if olds[0].bias is None else torch.cat([m.bias for m in olds])
            weight = torch.cat([m.weight for m in olds])
            if type(olds[0]) is PrepackedLinear:
                module = PrepackedLinear(olds[0].in_features, weight.shape[0], bias, olds[0].batch_hint)
                module.load(weight)
            else:
                module = nn.Linear(olds[0].in_features, weight.shape[0], bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype).requires_grad_(False)
                with torch.no_grad():
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
            parent, _, attr = new.rpartition(".")
            holder = layer.get_submodule(parent)
            for p in parts:
                delattr(holder, p.rpartition(".")[2])
            setattr(holder, attr, module)
            fused[f"{prefix}.{i}.{new}"] = tuple((f"{prefix}.{i}.{p}", m.out_features) for p, m in zip(parts, olds))
    return fused


class SlotCache:
    """Keys and values of every layer, ``[slots, H_kv, capacity, head_dim]``, and per slot the attention bias
    ``bias[slot, column]`` (0 where attended, -inf elsewhere), its next column ``cols[slot]`` and the position id
    of its next token ``pos[slot]`` (they part when tokens are taken back). The live rows are slots
    ``0 .. live - 1``: a decode step runs on that prefix, a finished row's slot is refilled (:meth:`admit`) or
    filled from the end (:meth:`compact`)."""

    def __init__(self, layers: int, slots: int, n_kv: int, capacity: int, head_dim: int, dtype, device):
        shape = (slots, n_kv, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.bias = torch.full((slots, capacity), float("-inf"), device=device)
        self.cols: list[int] = [0] * slots
        self.pos: list[int] = [0] * slots
        self.live = 0

    @property
    def capacity(self) -> int:
        return self.bias.shape[1]

    def admit(self, keys: list[Tensor], values: list[Tensor], lengths: list[int], rows: list[int]) -> None:
        """Append ``len(rows)`` live slots holding prefilled rows ``rows`` of ``keys``/``values`` (per layer
        ``[P, H_kv, T, d]``, right-padded), row ``rows[k]`` being ``lengths[k]`` tokens long."""
        a, b, T = self.live, self.live + len(rows), keys[0].shape[2]
        if b > self.bias.shape[0] or T > self.capacity:
            raise RuntimeError(f"the cache holds {self.bias.shape[0]} rows of {self.capacity} positions; "
                               f"admitting {b} rows of {T}")
        src = torch.tensor(rows, device=self.bias.device)
        for own, new in ((self.keys, keys), (self.values, values)):
            for i in range(len(own)):
                own[i][a:b, :, :T] = new[i].index_select(0, src)
        self.bias[a:b] = float("-inf")
        for k, n in enumerate(lengths):
            self.bias[a + k, :n] = 0.0
            self.cols[a + k] = self.pos[a + k] = n
        self.live = b

    def compact(self, keep: list[int]) -> list[int]:
        """Keep the live slots ``keep`` (ascending) and drop the others: slots past ``len(keep)`` move into the
        holes (one slot's copy each, not the whole cache). Returns the new order: slot ``j`` now holds what slot
        ``order[j]`` held."""
        m = len(keep)
        order = list(range(m))
        kept = set(keep)
        holes = [j for j in range(m) if j not in kept]
        movers = [j for j in keep if j >= m]
        if holes:
            for h, s in zip(holes, movers):
                order[h] = s
            dst, src = torch.tensor(holes, device=self.bias.device), torch.tensor(movers, device=self.bias.device)
            S = max(self.cols[s] for s in movers)
            for cache in (self.keys, self.values):
                for t in cache:
                    t[dst, :, :S] = t[src, :, :S]
            self.bias[dst] = self.bias[src]
            for h, s in zip(holes, movers):
                self.cols[h], self.pos[h] = self.cols[s], self.pos[s]
        self.live = m
        return order

    def take_back(self, slot: int, n: int) -> None:
        """Mask slot ``slot``'s last ``n`` positions out of the attention and reuse their position ids."""
        self.bias[slot, self.cols[slot] - n : self.cols[slot]] = float("-inf")
        self.pos[slot] -= n


class FastDecoder:
    """The prefill and one-token decode steps of a Llama-style ``model`` (see the module docstring), with the
    model's own modules and weights: nothing is copied, so it follows every change to the model's weights."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder()
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = getattr(self.decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.dtype = self.decoder.embed_tokens.weight.dtype

    def cache(self, slots: int, capacity: int, kv_dtype=None) -> SlotCache:
        """An empty :class:`SlotCache` for this model (``kv_dtype``: float32 unless given)."""
        return SlotCache(len(self.decoder.layers), slots, self.n_kv, capacity, self.head_dim,
                         kv_dtype or torch.float32, self.decoder.embed_tokens.weight.device)

    def _qkv(self, attn, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if hasattr(attn, "qkv_proj"):
            q = self.n_heads * self.head_dim
            return attn.qkv_proj(x).split([q, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    @staticmethod
    def _mlp(mlp, x: Tensor) -> Tensor:
        if hasattr(mlp, "gate_up_proj"):
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            return mlp.down_proj(mlp.act_fn(gate) * up)
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], kv_dtype=None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Float32 logits ``[P, V]`` after each prompt's last token, and each layer's keys and values
        ``[P, H_kv, T, d]`` (right-padded to the longest prompt, ``T``; in ``kv_dtype``, default float32)."""
        P, T = len(prompts), max(map(len, prompts))
        device = self.decoder.embed_tokens.weight.device
        ids_PT = torch.zeros((P, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_PT[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids_PT = ids_PT.to(device)
        last_P = torch.tensor([len(p) - 1 for p in prompts], device=device)
        h = self.decoder.embed_tokens(ids_PT)
        cos, sin = self.decoder.rotary_emb(h, torch.arange(T, device=device)[None].expand(P, T))
        cos, sin = cos[:, None], sin[:, None]  # [P, 1, T, d]: broadcast over heads
        Hq, Hk, d = self.n_heads, self.n_kv, self.head_dim
        keys, values = [], []
        for layer in self.decoder.layers:
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer.self_attn, x)
            q = _rotate(q.reshape(P, T, Hq, d).transpose(1, 2), cos, sin)
            k = _rotate(k.reshape(P, T, Hk, d).transpose(1, 2), cos, sin)
            v = v.reshape(P, T, Hk, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=Hq != Hk)
            h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(P, T, Hq * d))
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))
            keys.append(k.to(kv_dtype or torch.float32))
            values.append(v.to(kv_dtype or torch.float32))
        h_last = h[torch.arange(P, device=device), last_P]
        return head_logits(self.model, self.decoder.norm(h_last)), keys, values

    @torch.no_grad()
    def step(self, tokens_B: Tensor, cache: SlotCache) -> Tensor:
        """Float32 logits ``[B, V]`` after the tokens ``tokens_B`` of the live slots (``B = cache.live``), each at
        its slot's next column and position; advances both."""
        B = tokens_B.shape[0]
        cols = cache.cols[:B]
        S = max(cols) + 1
        if S > cache.capacity:
            raise RuntimeError(f"the key/value cache holds {cache.capacity} positions; position {S - 1} is past it")
        device = tokens_B.device
        rows_B, cols_B = torch.arange(B, device=device), torch.tensor(cols, device=device)
        cache.bias[rows_B, cols_B] = 0.0
        logits_BV = self._step(tokens_B, torch.tensor(cache.pos[:B], device=device), rows_B, cols_B, cache.keys,
                               cache.values, cache.bias[:B, :S])
        for b in range(B):
            cache.cols[b] += 1
            cache.pos[b] += 1
        return logits_BV

    def compile(self) -> FastDecoder:
        """Run :meth:`step`'s tensor work compiled (``torch.compile``, sizes dynamic): one graph for the whole
        step, the prepacked matmuls inside it as opaque ops (:mod:`alignkit.models.prepacked`)."""
        self._step = torch.compile(self._step, dynamic=True)
        return self

    def _step(self, tokens_B, pos_B, rows_B, cols_B, keys_L, values_L, bias_BS) -> Tensor:
        B, S = bias_BS.shape
        h_BD = self.decoder.embed_tokens(tokens_B)
        cos_B1d, sin_B1d = self.decoder.rotary_emb(h_BD, pos_B[:, None])  # [B, 1, d]: broadcast over heads
        bias_B11S = bias_BS[:, None, None, :]
        Hq, Hk, d = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            keys, values = keys_L[i], values_L[i]
            q, k, v = self._qkv(attn, layer.input_layernorm(h_BD))
            q_BHd = _rotate(q.reshape(B, Hq, d), cos_B1d, sin_B1d)
            keys[rows_B, :, cols_B] = _rotate(k.reshape(B, Hk, d), cos_B1d, sin_B1d).to(keys.dtype)
            values[rows_B, :, cols_B] = v.reshape(B, Hk, d).to(values.dtype)
            # grouped-query attention for one query: [B, H_kv, group, d] x [B, H_kv, d, S], softmax in float32
            q_BKGd = q_BHd.reshape(B, Hk, Hq // Hk, d).to(keys.dtype)
            scores = torch.matmul(q_BKGd, keys[:B, :, :S].transpose(-1, -2)).float().mul_(self.scale).add_(bias_B11S)
            out_BKGd = torch.matmul(scores.softmax(-1).to(values.dtype), values[:B, :, :S])
            h_BD = h_BD + attn.o_proj(out_BKGd.reshape(B, Hq * d).to(h_BD.dtype))
            h_BD = h_BD + self._mlp(layer.mlp, layer.post_attention_layernorm(h_BD))
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


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' rotary embedding: ``x * cos + rotate_half(x) * sin``, in ``x``'s dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
