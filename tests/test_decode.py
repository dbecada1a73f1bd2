"""``alignkit.rl.decode``: the lean prefill and decode steps against transformers' forward on tiny Llama and Qwen2
models (prompts of uneven lengths, grouped-query attention, q/k/v biases), with q/k/v and gate/up fused or not,
in float32 and in bf16 with prepacked weights; the slot cache's bookkeeping; and which models it declines."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, Qwen2Config

from alignkit.models.loading import LoraSettings, add_lora, load_model
from alignkit.models.prepacked import PrepackedLinear, prepack_available, prepack_linears
from alignkit.rl.decode import fast_decoder, fuse_projections, supports_fast_decode
from alignkit.rl.rollout import _forward

LENGTHS = [2, 5, 9]


def _qwen2():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _llama():
    return load_model("tiny", seed=0)[0].eval()


def _fused(model):
    """A copy of ``model`` with q/k/v and gate/up fused (what the engine's copy runs)."""
    fused = copy.deepcopy(model)
    names = fuse_projections(fused)
    assert len(names) == 2 * model.config.num_hidden_layers
    return fused


def _prompts(model) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def _steps(model, lean_model, n_steps=8, kv_dtype=None):
    """Logits of the prefill and ``n_steps`` greedy steps of 3 prompts (2, 5 and 9 tokens): transformers' forward
    on ``model`` (left-padded) against the lean forward on ``lean_model``, every step fed transformers' argmax so
    both paths see the same tokens: ``(transformers, lean)`` lists, the prefill's logits first."""
    prompts = _prompts(model)
    T = max(LENGTHS)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lean = fast_decoder(lean_model)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        logits = _forward(model, ids, mask, pos, ref_cache)
        ours, keys, values = lean.prefill(prompts, kv_dtype)
        cache = lean.cache(3, T + n_steps, kv_dtype)
        cache.admit(keys, values, LENGTHS, [0, 1, 2])
    ref_out, lean_out = [logits], [ours]
    next_pos = mask.sum(-1)
    for _ in range(n_steps):
        tok = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = _forward(model, tok[:, None], mask, next_pos[:, None], ref_cache)
        ref_out.append(logits)
        lean_out.append(lean.step(tok, cache))
        next_pos = next_pos + 1
    return ref_out, lean_out


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_lean_prefill_and_steps_match_transformers_in_float32(build, fused):
    model = build()
    ref, lean = _steps(model, _fused(model) if fused else model)
    for a, b in zip(ref, lean):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=0)


def test_lean_prefill_matches_each_prompt_alone():
    """Right padding needs no padding mask: each prompt's logits are those of its own unpadded forward."""
    model = _llama()
    prompts = _prompts(model)
    logits, keys, _ = fast_decoder(_fused(model)).prefill(prompts)
    assert keys[0].shape[2] == max(LENGTHS)
    for p, got in zip(prompts, logits):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(got, alone, atol=2e-5, rtol=0)


@pytest.mark.skipif(not prepack_available(), reason="this torch build cannot prepack bf16 linears")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv_fp32", "kv_bf16"])
@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_lean_forward_matches_transformers_in_bf16_with_prepacked_fused_weights(build, kv_dtype):
    model = build().to(torch.bfloat16)
    lean_model = copy.deepcopy(model)
    fuse_projections(lean_model)
    assert prepack_linears(lean_model)
    assert type(lean_model.model.layers[0].self_attn.qkv_proj) is PrepackedLinear
    ref, lean = _steps(model, lean_model, kv_dtype=kv_dtype)
    for a, b in zip(ref, lean):
        # bf16 in, float32 accumulation on both sides: bf16-sized differences only
        assert (b - a).abs().max() < 0.05 * a.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_fused_layers_replace_the_parts_and_hold_their_weights_once():
    model = _qwen2()  # q/k/v have biases
    fused = _fused(model)
    attn, mlp = fused.model.layers[1].self_attn, fused.model.layers[1].mlp
    assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    ref = model.model.layers[1]
    torch.testing.assert_close(attn.qkv_proj.bias, torch.cat([ref.self_attn.q_proj.bias, ref.self_attn.k_proj.bias,
                                                              ref.self_attn.v_proj.bias]), atol=0, rtol=0)


def test_slot_cache_compacts_by_moving_the_last_rows_into_the_holes():
    """A finished row's slot is filled from the end; the rows that go on keep their keys, columns and masks, and
    their next steps give the logits they would have given without the compaction."""
    model = _llama()
    lean = fast_decoder(model)
    prompts = _prompts(model)
    _, keys, values = lean.prefill(prompts)
    tok = torch.tensor([7, 8, 9])
    a, b = lean.cache(3, 16), lean.cache(3, 16)
    for c in (a, b):
        c.admit(keys, values, LENGTHS, [0, 1, 2])
        lean.step(tok, c)
    order = b.compact([2])  # only row 2 goes on: it moves into slot 0
    assert order == [2] and b.live == 1 and b.cols[0] == a.cols[2]
    torch.testing.assert_close(lean.step(tok[2:], b), lean.step(tok, a)[2:], atol=2e-5, rtol=0)


def test_unsupported_models_are_declined():
    model = _llama()
    assert supports_fast_decode(model)
    assert supports_fast_decode(_fused(model))
    assert fast_decoder(add_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8))) is None  # LoRA layers
    sliding = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16))
    assert not supports_fast_decode(sliding)
    sliding.config.sliding_window = None
    assert supports_fast_decode(sliding)


def test_a_full_cache_is_an_error():
    model = _llama()
    lean = fast_decoder(model)
    _, keys, values = lean.prefill([[5, 6]])
    cache = lean.cache(1, 2)  # room for the prompt only
    cache.admit(keys, values, [2], [0])
    with pytest.raises(RuntimeError, match="holds 2 positions"):
        lean.step(torch.tensor([7]), cache)


@pytest.mark.skipif(not prepack_available(), reason="this torch build cannot prepack bf16 linears")
def test_compiled_step_gives_the_eager_steps_logits_and_follows_new_weights():
    """``torch.compile`` of the decode step, the prepacked matmuls inside the graph as the custom op: the eager
    step's logits, and a weight loaded after compiling is the one used (the op reads the live packed weight)."""
    model = _llama().to(torch.bfloat16)
    fuse_projections(model)
    layers = prepack_linears(model)
    eager, compiled = fast_decoder(model), fast_decoder(model).compile()
    prompts = _prompts(model)
    _, keys, values = eager.prefill(prompts, torch.bfloat16)
    caches = [eager.cache(3, 16, torch.bfloat16) for _ in range(2)]
    for c in caches:
        c.admit(keys, values, LENGTHS, [0, 1, 2])
    tok = torch.tensor([4, 5, 6])
    for _ in range(3):
        a, b = eager.step(tok, caches[0]), compiled.step(tok, caches[1])
        torch.testing.assert_close(b, a, atol=0.05 * a.abs().max().item(), rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        tok = a.argmax(-1)
    head = layers["lm_head"]
    head.load(head.weight * 2)  # the head's logits double, with no recompilation
    a, b = eager.step(tok, caches[0]), compiled.step(tok, caches[1])
    torch.testing.assert_close(b, a, atol=0.05 * a.abs().max().item(), rtol=0)
