"""Thinking mode and thinking budget in the rollout engine (``alignkit.rl.thinking``, ``LocalEngine``).

Two tiny models: the random one (it never writes ``</think>``, so it thinks until a budget closes the block) and
a "thinker", the same model fitted for a few seconds on ``Q:<think>\\n{letters}\\n</think>\\n\\n{answer}<eos>``, so
it closes its thinking by itself after a few letters and then ends; at a high temperature some rows think long.
"""

from __future__ import annotations

import random

import pytest
import torch

from alignkit.config import RLConfig, build
from alignkit.data.thinking import THINK_CLOSE, requested_mode
from alignkit.errors import ConfigError
from alignkit.models.loading import load_model
from alignkit.rl.rewards import RewardSet, completion_columns
from alignkit.rl.rollout import LocalEngine, SamplingParams
from alignkit.rl.thinking import TRANSITION, ThinkingTokens, resolve_mode, through_close

LETTERS = "abcdefghijklmnopqrstuvwxyz "


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny", seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def thinker():
    model, tok = load_model("tiny", seed=0)
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        texts = [f"Q:<think>\n{''.join(rng.choice(LETTERS) for _ in range(rng.randint(2, 12)))}\n</think>\n\n"
                 f"{rng.choice('xyz')}{tok.eos_token}" for _ in range(16)]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), tok


def _ids(tok, *texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _block_end(tok, ids: list[int]) -> int:
    """The thinking block's tokens counted from the decoded text alone: through the first ``</think>``."""
    for k in range(1, len(ids) + 1):
        if THINK_CLOSE in tok.decode(ids[:k]):
            return k
    return len(ids)


# ------------------------------------------------------------------------------------------------ the switch

def test_soft_switch_last_flag_wins():
    assert requested_mode([{"role": "system", "content": "be brief /no_think"},
                           {"role": "user", "content": "why? /think"}]) == "think"
    assert requested_mode([{"role": "user", "content": "/think a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c /no_think"}]) == "no_think"
    assert requested_mode([{"role": "user", "content": "/no_think then /think then /no_think"}]) == "no_think"
    # an assistant's flags do not count; no flag at all: the model decides
    assert requested_mode([{"role": "user", "content": "/think"}, {"role": "assistant", "content": "/no_think"}]) \
        == "think"
    assert requested_mode([{"role": "user", "content": "hello"}]) is None
    # the hard flag wins over the soft one; without either: None
    msgs = [{"role": "user", "content": "x /no_think"}]
    assert resolve_mode(None, msgs) is False and resolve_mode(True, msgs) is True
    assert resolve_mode(None, "q /think") is True and resolve_mode(None, "q") is None


@pytest.mark.parametrize("mode", [True, False, None])
def test_hard_switch_opens_or_closes_the_block(tiny, mode):
    model, tok = tiny
    seqs = ThinkingTokens.of(tok)
    out = LocalEngine(model, tok, precision="fp32").generate(_ids(tok, "hello"), 2,
                                                             SamplingParams(max_new_tokens=30, seed=0, thinking=mode))
    for c in out[0]:
        if mode is True:
            assert c.token_ids[: len(seqs.open)] == seqs.open and c.forced[: len(seqs.open)] == [True] * len(seqs.open)
            assert c.thinking_tokens == len(c.token_ids) and c.answer_tokens == 0  # it never closes it
        elif mode is False:
            n = len(seqs.empty)
            assert c.token_ids[:n] == seqs.empty and c.forced == [True] * n + [False] * (len(c.token_ids) - n)
            assert c.reasoning == "" and c.thinking_tokens == through_close(tok, seqs.empty)
            assert c.answer == c.text[len("<think>\n\n</think>\n\n"):].strip()
        else:
            assert not any(c.forced) and c.thinking_tokens == 0 and c.answer_tokens == len(c.token_ids)


def test_per_prompt_modes_override_the_call(tiny):
    model, tok = tiny
    seqs = ThinkingTokens.of(tok)
    out = LocalEngine(model, tok, precision="fp32").generate(
        _ids(tok, "a", "b"), 1, SamplingParams(max_new_tokens=24, seed=0, thinking=True), thinking=[False, None])
    assert out[0][0].token_ids[: len(seqs.empty)] == seqs.empty
    assert out[1][0].token_ids[: len(seqs.open)] == seqs.open  # None: the call's mode


# ------------------------------------------------------------------------------------------------ the budget

@pytest.mark.parametrize("action", ["force_end", "transition"])
def test_budget_forces_exactly_the_action_tokens_then_the_model_answers(tiny, action):
    model, tok = tiny
    seqs = ThinkingTokens.of(tok)
    forced_seq = seqs.action(action)
    c_at = through_close(tok, forced_seq)
    budget = len(seqs.open) + c_at + 7
    sp = SamplingParams(max_new_tokens=budget + 20, seed=3, thinking=True, max_thinking_tokens=budget,
                        budget_action=action)
    out = LocalEngine(model, tok, precision="fp32").generate(_ids(tok, "hello", "hi"), 2, sp)
    for c in (c for g in out for c in g):
        start = budget - c_at
        assert c.token_ids[start : start + len(forced_seq)] == forced_seq
        flags = [True] * len(seqs.open) + [False] * (start - len(seqs.open)) + [True] * len(forced_seq)
        assert c.forced[: start + len(forced_seq)] == flags
        assert c.thinking_tokens == budget == _block_end(tok, c.token_ids)
        # after the forced tokens the model answers: sampled tokens, counted as the answer
        assert c.answer_tokens == len(c.token_ids) - budget > len(forced_seq) - c_at
        assert not any(c.forced[start + len(forced_seq):])
        if action == "transition":
            assert "Considering the limited time by the user" in c.reasoning
        assert THINK_CLOSE not in c.answer and c.answer


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("action", ["force_end", "transition"])
def test_budget_is_never_exceeded_at_any_batch_size(thinker, batch, action):
    """Rows that close early, rows cut by the budget at different steps (per-prompt budgets, retractions), several
    samples a prompt: the block counted from the text is within the budget in every sample."""
    model, tok = thinker
    need = len(ThinkingTokens.of(tok).open) + through_close(tok, ThinkingTokens.of(tok).action(action))
    budgets = [need + 2, need + 9, need + 25, need + 4]
    prompts = _ids(tok, "Q:", "Q: ", "Q:a", "Q:b")
    engine = LocalEngine(model, tok, precision="fp32", max_batch=batch)
    ends, hit = set(), 0
    for seed, minimum in ((0, 0), (1, need + 3)):
        sp = SamplingParams(temperature=1.6, max_new_tokens=need + 60, seed=seed, thinking=True,
                            min_thinking_tokens=minimum, budget_action=action)
        out = engine.generate(prompts, 3, sp, max_thinking_tokens=budgets)
        for b, group in zip(budgets, out):
            for c in group:
                assert _block_end(tok, c.token_ids) == c.thinking_tokens <= b
                hit += c.thinking_tokens == b
                ends.add(c.thinking_tokens)
    assert hit and len(ends) > 3  # some rows hit their budget, others closed by themselves


def test_budget_too_small_for_the_tags_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_thinking_tokens=5"):
        LocalEngine(model, tok, precision="fp32").generate(_ids(tok, "a"), 1, SamplingParams(
            thinking=True, max_thinking_tokens=5, seed=0))


# ------------------------------------------------------------------------------------------------ s1's minimum

def test_min_thinking_replaces_an_early_close_with_wait(thinker):
    model, tok = thinker
    prompts = _ids(tok, "Q:")
    free = LocalEngine(model, tok, precision="fp32").generate(prompts, 6, SamplingParams(
        max_new_tokens=80, seed=0, thinking=True))[0]
    assert all(c.thinking_tokens < 30 for c in free)  # left alone it closes early
    wait = ThinkingTokens.of(tok).wait
    out = LocalEngine(model, tok, precision="fp32").generate(prompts, 6, SamplingParams(
        max_new_tokens=120, seed=0, thinking=True, min_thinking_tokens=40, max_thinking_tokens=100))[0]
    for c in out:
        assert c.thinking_tokens >= 40 or c.finish_reason == "length"
        assert "Wait" in c.reasoning and "</thinkWait" not in c.text  # the partial close was taken back
        starts = [i for i in range(len(c.token_ids)) if c.token_ids[i : i + len(wait)] == wait]
        assert starts and all(c.forced[i : i + len(wait)] == [True] * len(wait) for i in starts)


# ------------------------------------------------------------------------------------------- log-probs, rows

@pytest.mark.parametrize("fast", [True, False])
def test_forced_and_taken_back_tokens_keep_the_cache_and_logps_consistent(thinker, fast):
    """Each token's log-prob, forced or sampled, after tokens were taken back or not, is what the trainer
    recomputes from prompt + completion in one unpadded forward: the cache saw exactly the completion."""
    model, tok = thinker
    prompts = _ids(tok, "Q:", "Q:abc")
    sp = SamplingParams(temperature=1.3, max_new_tokens=70, seed=2, thinking=True, min_thinking_tokens=30,
                        max_thinking_tokens=50, budget_action="force_end")
    out = LocalEngine(model, tok, precision="fp32", fast_decode=fast).generate(prompts, 3, sp)
    forced = 0
    for prompt, group in zip(prompts, out):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 1.3
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logps), expected, atol=2e-4, rtol=0)
            forced += sum(c.forced)
    assert forced > 0


def test_a_rows_budgeted_samples_do_not_depend_on_the_other_rows(thinker):
    model, tok = thinker
    prompts = _ids(tok, "Q:", "Q:ab", "Q: z")
    sp = SamplingParams(temperature=1.6, max_new_tokens=60, seed=0, thinking=True, min_thinking_tokens=20)
    budgets = [30, 45, 26]
    engine = LocalEngine(model, tok, precision="fp32")
    whole = engine.generate(prompts, 3, sp, seeds=[5, 6, 7], max_thinking_tokens=budgets)
    for i in range(3):
        alone = engine.generate([prompts[i]], 3, sp, seeds=[5 + i], max_thinking_tokens=[budgets[i]])[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in whole[i]]
        assert [c.forced for c in alone] == [c.forced for c in whole[i]]
    assert len({c.thinking_tokens for g in whole for c in g}) > 2


def test_continuous_batching_carries_each_rows_forcing_state(thinker):
    """Rows with their own budgets, s1's minimum and take-backs, admitted into slots freed by finished rows while
    others are mid-thought: the same completions per seed as static batches and as transformers' steps."""
    model, tok = thinker
    prompts = _ids(tok, "Q:", "Q:ab", "Q: z", "Q:abc", "Q:x")
    sp = SamplingParams(temperature=1.6, max_new_tokens=60, thinking=True, min_thinking_tokens=20)
    budgets, seeds = [30, 45, 26, 50, 35], [5, 6, 7, 8, 9]
    runs = {name: LocalEngine(model, tok, precision="fp32", max_batch=4, **kw).generate(
        prompts, 2, sp, seeds=seeds, max_thinking_tokens=budgets)
        for name, kw in {"continuous": {}, "static": {"continuous": False}, "transformers": {"fast_decode": False}}.items()}
    for name in ("static", "transformers"):
        for group, ref in zip(runs["continuous"], runs[name]):
            assert [(c.token_ids, c.forced, c.thinking_tokens) for c in group] == \
                [(c.token_ids, c.forced, c.thinking_tokens) for c in ref]
    assert any(any(c.forced) for g in runs["continuous"] for c in g)
    assert len({len(c.token_ids) for g in runs["continuous"] for c in g}) > 2


# ------------------------------------------------------------------------------------------------ the records

def test_records_count_thinking_and_answer_and_rewards_read_them(thinker):
    model, tok = thinker
    out = LocalEngine(model, tok, precision="fp32").generate(_ids(tok, "Q:"), 4, SamplingParams(
        max_new_tokens=60, seed=0, thinking=True, max_thinking_tokens=40))[0]
    for c in out:
        assert c.thinking_tokens + c.answer_tokens == len(c.token_ids) == len(c.forced) == len(c.logps)
        assert c.thinking_tokens == _block_end(tok, c.token_ids)
        head = tok.decode(c.token_ids[: c.thinking_tokens])
        assert head.startswith("<think>\n") and head.endswith(THINK_CLOSE)
        assert c.reasoning == head[len("<think>\n") : -len(THINK_CLOSE)].strip()
        assert c.answer == tok.decode(c.token_ids[c.thinking_tokens:], skip_special_tokens=True).strip()

    seen = {}

    def reward(prompts, completions, reasoning, answer_text, thinking_tokens, answer_tokens, lengths, **_):
        seen.update(reasoning=reasoning, answer_text=answer_text, thinking=thinking_tokens, answer=answer_tokens)
        return [float(len(a)) for a in answer_text]

    def older(prompts, completions, **_):  # a reward written before thinking: still the whole text
        return [float(len(c)) for c in completions]

    scores = RewardSet([("r", reward, 1.0), ("older", older, 1.0)])(
        ["Q:"] * 4, [c.text for c in out], completion_columns(out))
    assert seen == {"reasoning": [c.reasoning for c in out], "answer_text": [c.answer for c in out],
                    "thinking": [c.thinking_tokens for c in out], "answer": [c.answer_tokens for c in out]}
    assert scores.per_function["older"] == [float(len(c.text)) for c in out]


def test_a_prompt_that_opens_the_block_starts_inside_it(thinker):
    model, tok = thinker
    c = LocalEngine(model, tok, precision="fp32").generate(_ids(tok, "Q:<think>\n"), 1, SamplingParams(
        max_new_tokens=60, seed=0, thinking=True, max_thinking_tokens=30))[0][0]
    assert not c.text.startswith("<think>") and c.thinking_tokens == _block_end(tok, c.token_ids) <= 30
    assert c.reasoning and THINK_CLOSE not in c.reasoning


# ------------------------------------------------------------------------------------------------ the config

def test_config_keys_reach_the_sampler_and_are_validated():
    from alignkit.rl.trainer import sampling_params

    cfg = build(RLConfig, overrides=["data=p.jsonl", "thinking=on", "max_thinking_tokens=200",
                                     "min_thinking_tokens=50", "budget_action=transition"])
    sp = sampling_params(cfg)
    assert (sp.thinking, sp.max_thinking_tokens, sp.min_thinking_tokens, sp.budget_action) == (
        True, 200, 50, "transition")
    assert sampling_params(build(RLConfig, overrides=["data=p.jsonl"])).thinking is None
    for bad, match in ((["budget_action=stop"], "budget_action"), (["max_thinking_tokens=-1"], "max_thinking_tokens"),
                       (["max_thinking_tokens=10", "min_thinking_tokens=20"], "min_thinking_tokens=20"),
                       (["thinking=off", "max_thinking_tokens=10"], "thinking=off"),
                       (["thinking=on", "rollout_backend=vllm"], "vllm")):
        with pytest.raises(ConfigError, match=match):
            build(RLConfig, overrides=["data=p.jsonl", *bad])
    assert TRANSITION.endswith("</think>\n\n")
