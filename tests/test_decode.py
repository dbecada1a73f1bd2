"""``alignkit.rl.decode``: the lean decode step against transformers' step on tiny Llama and Qwen2 models (left
padding, grouped-query attention, q/k/v biases), in float32 and in bf16 with prepacked weights; and which models
it declines."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, Qwen2Config

from alignkit.models.loading import LoraSettings, add_lora, load_model
from alignkit.models.prepacked import prepack_available, prepack_linears
from alignkit.rl.decode import KVBuffer, fast_decoder, supports_fast_decode
from alignkit.rl.rollout import _forward


def _qwen2():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _llama():
    return load_model("tiny", seed=0)[0].eval()


def _steps(model, decode, n_steps=8):
    """Logits of ``n_steps`` greedy steps after a left-padded prefill of 3 prompts (2, 5 and 9 tokens), every
    step fed transformers' argmax so both paths see the same tokens: ``(transformers, fast)`` lists."""
    g = torch.Generator().manual_seed(1)
    lengths = [2, 5, 9]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(1, model.config.vocab_size, (n,), generator=g)
        mask[i, T - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        logits = _forward(model, ids, mask, pos, ref_cache)
        ours = KVBuffer.from_cache(copy.deepcopy(ref_cache), capacity=T + n_steps)
    ref_out, fast_out = [], []
    next_pos = mask.sum(-1)
    for _ in range(n_steps):
        tok = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = _forward(model, tok[:, None], mask, next_pos[:, None], ref_cache)
        ref_out.append(logits)
        fast_out.append(decode.step(tok, mask, next_pos, ours))
        next_pos = next_pos + 1
    return ref_out, fast_out


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_fast_steps_match_transformers_in_float32(build):
    model = build()
    ref, fast = _steps(model, fast_decoder(model))
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=0)


@pytest.mark.skipif(not prepack_available(), reason="this torch build cannot prepack bf16 linears")
@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_fast_steps_match_transformers_in_bf16_with_prepacked_weights(build):
    model = build().to(torch.bfloat16)
    assert prepack_linears(model)
    ref, fast = _steps(model, fast_decoder(model))
    for a, b in zip(ref, fast):
        # float32 attention against transformers' (bf16 in, float32 accumulation): bf16-sized differences only
        assert (b - a).abs().max() < 0.05 * a.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_unsupported_models_are_declined():
    model = _llama()
    assert supports_fast_decode(model)
    assert fast_decoder(add_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8))) is None  # LoRA layers
    sliding = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16))
    assert not supports_fast_decode(sliding)
    sliding.config.sliding_window = None
    assert supports_fast_decode(sliding)


def test_a_full_buffer_is_an_error():
    model = _llama()
    ids = torch.tensor([[5, 6]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        _forward(model, ids, torch.ones_like(ids), torch.tensor([[0, 1]]), cache)
    kv = KVBuffer.from_cache(cache, capacity=2)  # room for the prompt only
    with pytest.raises(RuntimeError, match="holds 2 positions"):
        fast_decoder(model).step(torch.tensor([7]), torch.ones(1, 3, dtype=torch.long), torch.tensor([2]), kv)
