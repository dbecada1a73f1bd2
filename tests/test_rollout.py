"""``alignkit.rl.rollout``: the sampler's log-probs against the trainer's, truncation, stop conditions, shared
prefill, seeding, and the bf16 copy following the training model's weights. Tiny models only."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.models.loading import LoraSettings, add_lora, load_model
from alignkit.models.logprobs import token_logps, unwrap
from alignkit.rl.rollout import Completion, LocalEngine, SamplingParams

EOS = 3  # <|im_end|> of the tiny tokenizer


def _model(*, lora: bool = False, eos_bias: float = 0.0, head_scale: float = 1.0, seed: int = 0):
    """The tiny model; ``eos_bias`` adds a bias to the EOS logit, ``head_scale`` sharpens the distributions, and
    ``lora`` wraps it in a LoRA adapter whose B matrices are random (so the adapter changes the outputs)."""
    model, tok = load_model("tiny", seed=seed)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * head_scale)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    if lora:
        model = add_lora(model, LoraSettings(r=4, alpha=8))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), tok


def _prompts(tok, texts=("hello there", "hi", "a much longer prompt, with more words in it")):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def _logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Float32 logits ``[len(completion), V]`` predicting each completion token, from one unpadded forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


@pytest.mark.parametrize("lora", [False, True])
def test_sampler_logps_match_the_trainers_recomputation(lora):
    model, tok = _model(lora=lora, eos_bias=4.0)  # EOS is likely: rows finish at different steps
    prompts = _prompts(tok)
    out = LocalEngine(model, tok, precision="fp32").generate(prompts, 3, SamplingParams(max_new_tokens=16, seed=0))
    assert [len(o) for o in out] == [3, 3, 3]
    lengths, diffs = set(), []
    for prompt, comps in zip(prompts, out):
        for c in comps:
            lengths.add(len(c.token_ids))
            ids = torch.tensor([prompt + c.token_ids])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt):] = True
            with torch.no_grad():
                lp = token_logps(model, ids, torch.ones_like(ids), mask)[0, len(prompt):]
            diffs.append((lp - torch.tensor(c.logps)).abs().mean().item())
    assert len(lengths) > 1  # finished rows left the batch while others went on
    assert sum(diffs) / len(diffs) <= 1e-4 and max(diffs) <= 1e-3


def test_logps_are_those_of_the_tempered_distribution():
    model, tok = _model(lora=True)
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=0.6, max_new_tokens=8, seed=1)
    for prompt, comps in zip(prompts, LocalEngine(model, tok, precision="fp32").generate(prompts, 2, sp)):
        for c in comps:
            expected = (_logits(model, prompt, c.token_ids) / 0.6).log_softmax(-1)
            expected = expected.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logps), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_model_generate(fast):
    model, tok = _model()
    prompts = _prompts(tok)
    out = LocalEngine(model, tok, precision="fp32", fast_decode=fast).generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, (c,) in zip(prompts, out):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0, use_cache=True)[0, len(prompt):].tolist()
        if EOS in gen:
            gen = gen[: gen.index(EOS) + 1]
        assert c.token_ids == gen
        # greedy log-probs are those of the untempered distribution
        expected = _logits(model, prompt, c.token_ids).log_softmax(-1)
        torch.testing.assert_close(torch.tensor(c.logps), expected.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0],
                                   atol=1e-4, rtol=0)


def test_top_k_and_top_p_keep_samples_in_the_truncated_set():
    model, tok = _model(head_scale=20.0)  # peaked distributions: the nucleus is a real subset
    prompts = _prompts(tok)
    engine = LocalEngine(model, tok, precision="fp32")
    for sp in (SamplingParams(top_k=3, max_new_tokens=10, seed=0), SamplingParams(top_p=0.6, max_new_tokens=10, seed=0),
               SamplingParams(temperature=0.8, top_k=5, top_p=0.5, max_new_tokens=10, seed=0)):
        sizes = []
        for prompt, comps in zip(prompts, engine.generate(prompts, 4, sp)):
            for c in comps:
                logits = _logits(model, prompt, c.token_ids) / sp.temperature
                for t, row in zip(c.token_ids, logits):
                    if sp.top_k:
                        assert row[t] >= row.topk(sp.top_k).values[-1] - 1e-4
                        row = row.masked_fill(row < row.topk(sp.top_k).values[-1], float("-inf"))
                    p = row.softmax(-1)
                    before = p[p > p[t] + 1e-6].sum()  # mass of tokens strictly more likely than t
                    assert before < sp.top_p + 1e-4
                    sizes.append(int((p.sort(descending=True).values.cumsum(0) < sp.top_p).sum()) + 1)
        assert min(sizes) < 20  # the truncation was not vacuous


def test_first_token_frequencies_follow_softmax():
    model, tok = _model(head_scale=10.0)
    prompt = _prompts(tok)[0]
    n = 20_000
    engine = LocalEngine(model, tok, precision="fp32", max_batch=n)
    (comps,) = engine.generate([prompt], n, SamplingParams(max_new_tokens=1, seed=0))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in comps]), minlength=model.config.vocab_size)
    p = _logits(model, prompt, [0])[0].softmax(-1)
    assert 0.5 * (counts / n - p).abs().sum() < 0.05


def test_stop_strings_eos_and_length():
    # Sampling favours a few letters, so that the sample has a 2-letter stop string in its middle.
    model, tok = _model()
    with torch.no_grad():
        for ch in "abc ":
            model.lm_head.bias[tok.convert_tokens_to_ids(ch if ch != " " else "Ġ")] = 6.0
    engine = LocalEngine(model, tok, precision="fp32")
    prompt = _prompts(tok)[:1]
    (full,) = engine.generate(prompt, 1, SamplingParams(max_new_tokens=24, seed=3))[0:1][0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24 and len(full.text) == 24
    stop = full.text[10:12]
    first = full.text.find(stop)
    (cut,) = engine.generate(prompt, 1, SamplingParams(max_new_tokens=24, seed=3, stop=("zzz", stop)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:first]
    assert cut.token_ids == full.token_ids[: first + 2] and cut.logps == full.logps[: first + 2]

    eos_model, _ = _model(eos_bias=50.0)
    (c,) = LocalEngine(eos_model, tok, precision="fp32").generate(prompt, 1, SamplingParams(max_new_tokens=5))[0]
    assert c == Completion(token_ids=[EOS], text="", logps=c.logps, finish_reason="eos")
    assert c.logps[0] > -1e-3

    sometimes, _ = _model(eos_bias=4.0)
    for c in LocalEngine(sometimes, tok, precision="fp32").generate(prompt, 16, SamplingParams(max_new_tokens=6))[0]:
        assert EOS not in c.token_ids[:-1]
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == EOS
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 6


def _record_forward_shapes(model) -> list[tuple[int, int]]:
    """``(rows, tokens)`` of every forward, prefill or decode step (both decode paths embed the new tokens)."""
    calls = []
    unwrap(model).get_input_embeddings().register_forward_pre_hook(
        lambda m, args: calls.append(tuple(args[0].shape) if args[0].dim() == 2 else (args[0].shape[0], 1)))
    return calls


@pytest.mark.parametrize("fast", [True, False])
def test_prompts_are_prefilled_once_and_shared_by_their_samples(fast):
    model, tok = _model()
    calls = _record_forward_shapes(model)
    prompts = _prompts(tok)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    engine = LocalEngine(model, tok, precision="fp32", fast_decode=fast)
    out = engine.generate(prompts, 4, greedy)
    assert [s for s in calls if s[1] > 1] == [(3, max(map(len, prompts)))]  # one prefill, a row per prompt
    assert {s[0] for s in calls if s[1] == 1} == {12}  # then 3 x 4 rows decode
    for prompt, comps in zip(prompts, out):
        (alone,) = engine.generate([prompt], 1, greedy)[0]
        assert all(c.token_ids == alone.token_ids and c.logps == pytest.approx(alone.logps, abs=1e-5) for c in comps)

    calls.clear()  # max_batch: 2 prompts x 4 samples do not fit in 6 rows, so each prompt gets its own batch
    chunked = LocalEngine(model, tok, precision="fp32", fast_decode=fast, max_batch=6).generate(prompts, 4, greedy)
    assert sorted(s for s in calls if s[1] > 1) == sorted((1, len(p)) for p in prompts)
    assert [[c.token_ids for c in o] for o in chunked] == [[c.token_ids for c in o] for o in out]


@pytest.mark.parametrize("fast", [True, False])
def test_finished_rows_leave_the_batch(fast):
    model, tok = _model(eos_bias=3.0)
    calls = _record_forward_shapes(model)
    out = LocalEngine(model, tok, precision="fp32", fast_decode=fast).generate(_prompts(tok), 4, SamplingParams(max_new_tokens=12, seed=0))
    decode_rows = [s[0] for s in calls if s[1] == 1]
    lengths = [len(c.token_ids) for o in out for c in o]
    # the step that samples token t + 1 runs on the rows that have more than t tokens and did not finish at t
    assert decode_rows == [sum(n > t for n in lengths) for t in range(1, max(lengths))]
    assert decode_rows[-1] < decode_rows[0] < 12


def test_seeds_make_samples_reproducible_and_a_group_diverse():
    model, tok = _model(lora=True)
    engine = LocalEngine(model, tok, precision="fp32")
    prompts = _prompts(tok)
    sp = SamplingParams(max_new_tokens=8, seed=7)
    a, b = engine.generate(prompts, 4, sp), engine.generate(prompts, 4, sp)
    assert a == b
    c = engine.generate(prompts, 4, SamplingParams(max_new_tokens=8, seed=8))
    assert [[x.token_ids for x in o] for o in a] != [[x.token_ids for x in o] for o in c]
    for group in a:
        assert len({tuple(x.token_ids) for x in group}) > 1
    model.train()
    engine.generate(prompts, 1, sp)
    assert model.training  # the training model's mode is restored


def _bf16_copy_matches(engine, expected_state):
    got = engine.held_weights()  # prepacked linears unpacked, fused q/k/v and gate/up split
    # every weight is there (the tests' head bias is not: the copy is built from the config, which has none)
    assert {n for n in expected_state if n.endswith(".weight")} <= set(got) <= set(expected_state)
    for name, p in got.items():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, expected_state[name].to(torch.bfloat16), atol=0, rtol=2**-8)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_copy_follows_update_weights(lora):
    model, tok = _model(lora=lora)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = LocalEngine(model, tok, precision="bf16")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the training model is untouched
    assert model.training

    def merged():
        return unwrap(copy.deepcopy(model).merge_and_unload() if lora else model).state_dict()

    _bf16_copy_matches(engine, merged())
    prompts = _prompts(tok)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    old = engine.generate(prompts, 1, greedy)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a big change: LoRA B matrices only, or every weight of the full model
        for name, p in model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if lora else 0.05))
    assert engine.generate(prompts, 1, greedy) == old  # the copy does not see the change by itself
    engine.update_weights(model)
    _bf16_copy_matches(engine, merged())
    new = engine.generate(prompts, 1, greedy)
    assert new != old
    fresh = LocalEngine(model, tok, precision="bf16")
    fresh.version = engine.version  # the versions count syncs; the samples must agree
    assert new == fresh.generate(prompts, 1, greedy)  # a fresh copy agrees
    # bf16 logps are close to the fp32 model's
    for prompt, (c,) in zip(prompts, new):
        lp = _logits(model, prompt, c.token_ids).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert (lp - torch.tensor(c.logps)).abs().mean() < 0.1


def test_generate_text_tokenizes_without_specials():
    model, tok = _model()
    engine = LocalEngine(model, tok, precision="fp32")
    sp = SamplingParams(max_new_tokens=4, seed=0)
    assert engine.generate_text(["hi there"], 2, sp) == engine.generate(_prompts(tok, ["hi there"]), 2, sp)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_weight_versions_are_stamped_checked_and_kept_through_sleep(precision):
    """Every completion carries the version of the weights that sampled it; asking for another version fails
    (a missed sync); ``sleep`` drops the bf16 copy, ``generate`` refuses until ``wake``, which rebuilds it from
    the model's weights of now: the same samples as an engine that never slept."""
    from alignkit.rl.rollout import EngineAsleep, StaleWeights

    model, tok = load_model("tiny", seed=0)
    engine = LocalEngine(model, tok, precision=precision)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=5)
    prompt = [tok("hello", add_special_tokens=False)["input_ids"]]
    assert engine.version == 0
    assert {c.weight_version for c in engine.generate(prompt, 2, sampling, seeds=[1], version=0)[0]} == {0}
    engine.update_weights(model)  # the next version
    engine.update_weights(model, version=7)
    assert engine.version == 7
    # what a sync writes: the whole bf16 copy (prepacked layers included), nothing for the fp32 model itself
    n_params = sum(p.numel() for p in model.parameters())
    assert engine.last_sync_bytes == (2 * n_params if precision == "bf16" else 0)
    with pytest.raises(StaleWeights, match="holds version 7"):
        engine.generate(prompt, 2, sampling, seeds=[1], version=6)
    engine.sleep()
    assert engine._copy is None
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    engine.update_weights(model, version=8)  # while asleep: taken at wake()
    with pytest.raises(EngineAsleep):
        engine.generate(prompt, 2, sampling, seeds=[1])
    engine.wake()
    fresh = LocalEngine(model, tok, precision=precision)
    got = engine.generate(prompt, 2, sampling, seeds=[1], version=8)[0]
    assert [c.token_ids for c in got] == [c.token_ids for c in fresh.generate(prompt, 2, sampling, seeds=[1])[0]]
    assert {c.weight_version for c in got} == {8}


def test_continuous_batching_gives_the_static_batches_samples_per_seed():
    """With 6 slots and 3 samples a prompt, a prompt waits for 3 free slots and then joins the rows still
    decoding (continuous); statically it waits for the whole batch to end. Same seeds, same samples (float32:
    the tiny model's logits do not depend on the company), in fewer decode steps."""
    model, tok = _model(eos_bias=3.0)
    calls = _record_forward_shapes(model)
    prompts = _prompts(tok, ("hello there", "hi", "a much longer prompt, with more words in it", "max(3,7)=",
                             "Which is larger?", "one", "two words"))
    sp, seeds = SamplingParams(temperature=1.0, max_new_tokens=16), list(range(10, 17))
    out, steps = {}, {}
    for name, kw in {"continuous": {}, "static": {"continuous": False}, "transformers": {"fast_decode": False}}.items():
        calls.clear()
        out[name] = LocalEngine(model, tok, precision="fp32", max_batch=6, **kw).generate(prompts, 3, sp, seeds=seeds)
        steps[name] = sum(1 for s in calls if s[1] == 1)
    for name in ("static", "transformers"):
        for group, ref in zip(out["continuous"], out[name]):
            assert [c.token_ids for c in group] == [c.token_ids for c in ref]
            for c, r in zip(group, ref):
                assert c.finish_reason == r.finish_reason
                torch.testing.assert_close(torch.tensor(c.logps), torch.tensor(r.logps), atol=1e-5, rtol=0)
    lengths = {len(c.token_ids) for g in out["continuous"] for c in g}
    assert len(lengths) > 4  # uneven rows: the static batch runs at the pace of its longest
    assert steps["continuous"] < steps["static"]


def test_continuous_batching_runs_a_waiting_prompt_beside_the_others(monkeypatch):
    """A prompt is admitted as soon as its rows fit in the slots freed by finished rows, while the others go on:
    some prompt joins a batch that still has live rows."""
    from alignkit.rl import decode

    model, tok = _model(eos_bias=3.0)
    joined = []  # live rows already decoding when a prompt is admitted
    real_admit = decode.SlotCache.admit
    monkeypatch.setattr(decode.SlotCache, "admit", lambda self, *a: (joined.append(self.live), real_admit(self, *a)))
    LocalEngine(model, tok, precision="fp32", max_batch=4).generate(
        _prompts(tok), 2, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3))
    assert joined[0] == 0 and any(n > 0 for n in joined[1:])
