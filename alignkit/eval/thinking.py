"""The ``thinking`` suite of ``alignkit eval``: does a reasoning model follow the thinking mode it is asked for,
what does thinking buy, and does the thinking budget hold? (docs/reasoning.md, "Evaluation")

- **Mode following** (Qwen3's ThinkFollow, 2505.09388, section 4.3): multi-turn conversations built from held-out
  prompts, each user turn carrying ``/think`` or ``/no_think`` with probability 1/2 (a random one of the two; a
  conversation without any flag gets one at a random turn). The last flag of the conversation is the requested mode
  (:func:`~alignkit.data.thinking.requested_mode`), wherever it stands. Earlier assistant turns are the model's own
  greedy answers under the mode requested at that point (a hard switch, so the history is what a compliant model
  would have said; with no flag yet the model decides); the last turn is generated with no switch at all, the model
  deciding, and it follows when its thinking is non-empty after ``/think`` and empty (or absent) after
  ``/no_think`` (:func:`follows`). Reported: the share followed with a bootstrap interval, overall and per requested
  mode.
- **Accuracy against the budget**: greedy answers to a math set with answers, thinking on, at each budget ``B`` of
  ``budgets`` with the engine's hard stop (``max_thinking_tokens=B``, ``budget_action``) and ``B + answer_tokens``
  new tokens, scored on the answer after the thinking block (correctness against ``answer``); the curve is drawn in
  the report.
- **Thinking on against off**: the same problems answered after an empty thinking block (``thinking=off``), and the
  paired bootstrap interval of accuracy(on, the largest budget) minus accuracy(off).
- **Within budget**: the share of budgeted samples whose thinking block (tags and forced tokens included, as the
  engine counts it) holds at most ``B`` tokens; with the hard stop it must be 1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from alignkit.data.thinking import NO_THINK_FLAG, REASONING_KEY, THINK_FLAG, requested_mode, split_thinking
from alignkit.rl.rollout import SamplingParams
from alignkit.rl.thinking import resolve_mode

MODES = ("think", "no_think")


def _text(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def conversations(prompts: Sequence, n: int, max_turns: int, seed: int) -> list[list[str]]:
    """``n`` conversations (lists of user-turn texts, flags included) of 1 to ``max_turns`` turns; the last turn of
    conversation ``i`` is prompt ``i`` (cycling), the earlier ones other prompts drawn at random (module docstring)."""
    rng = random.Random(seed)
    texts = [_text(p) for p in prompts]
    out = []
    for i in range(n):
        turns = [rng.choice(texts) for _ in range(rng.randint(1, max_turns) - 1)] + [texts[i % len(texts)]]
        flags = [rng.choice((THINK_FLAG, NO_THINK_FLAG)) if rng.random() < 0.5 else None for _ in turns]
        if not any(flags):
            flags[rng.randrange(len(turns))] = rng.choice((THINK_FLAG, NO_THINK_FLAG))
        out.append([f"{t} {f}" if f else t for t, f in zip(turns, flags)])
    return out


def follows(requested: str, text: str) -> bool:
    """Whether a completion ``text`` obeys ``requested``: non-empty thinking for ``think``, none for ``no_think``."""
    thinks = bool(split_thinking(text)[0])
    return thinks == (requested == "think")


def run_conversations(engine, tok, convs: list[list[str]], *, max_new_tokens: int, budget: int | None,
                      budget_action: str = "force_end") -> tuple[list[list[dict]], list[str]]:
    """Play ``convs`` turn by turn (module docstring): ``(messages before each last turn's answer, last answers)``."""
    from alignkit.data.tokenize import prompt_ids

    histories: list[list[dict]] = [[] for _ in convs]
    last: list[str] = [""] * len(convs)
    for depth in range(max(len(c) for c in convs)):
        live = [i for i, c in enumerate(convs) if depth < len(c)]
        for i in live:
            histories[i].append({"role": "user", "content": convs[i][depth]})
        final = {i for i in live if depth == len(convs[i]) - 1}
        modes = [None if i in final else resolve_mode(None, histories[i]) for i in live]
        sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, max_thinking_tokens=budget,
                                  budget_action=budget_action)
        done = engine.generate([prompt_ids(tok, histories[i]) for i in live], 1, sampling, thinking=modes)
        for i, group in zip(live, done):
            c = group[0]
            if i in final:
                last[i] = c.text
            else:
                histories[i].append({"role": "assistant", "content": c.answer.strip() or "...",
                                     REASONING_KEY: c.reasoning.strip()})
    return histories, last


def _ci(values, n_boot: int, seed: int) -> list[float]:
    from alignkit.eval.metrics import bootstrap_ci

    return list(bootstrap_ci(values, n_boot=n_boot, seed=seed)) if len(values) else []


def score_following(convs: list[list[str]], texts: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mode following of the last answers ``texts``: ``accuracy`` and ``ci`` overall, and ``by_mode[mode]`` with
    ``n``, ``accuracy``, ``ci``; each conversation's requested mode is its last flag."""
    requested = [requested_mode([{"role": "user", "content": t} for t in c]) for c in convs]
    ok = [float(follows(r, t)) for r, t in zip(requested, texts)]
    out = {"n": len(ok), "accuracy": float(np.mean(ok)) if ok else None, "ci": _ci(ok, n_boot, seed), "by_mode": {}}
    for mode in MODES:
        got = [x for x, r in zip(ok, requested) if r == mode]
        out["by_mode"][mode] = {"n": len(got), "accuracy": float(np.mean(got)) if got else None,
                                "ci": _ci(got, n_boot, seed)}
    return out


def answer_scores(completions, answers: Sequence) -> list[float]:
    """1.0 or 0.0 per completion: the answer after its thinking block against the reference answer."""
    from alignkit.rl.verifiable import correctness_reward

    return [float(v or 0.0) for v in correctness_reward(None, [c.answer for c in completions], list(answers))]


def stopped_by_budget(completion, budget: int) -> bool:
    """Whether the hard stop ended the completion's thinking: its block holds the whole budget and ends in forced
    tokens. (The opening ``<think>`` the engine feeds for thinking on is forced too, so "any forced token" would
    count every completion.)"""
    k = completion.thinking_tokens
    return k >= budget and 0 < k <= len(completion.forced) and bool(completion.forced[k - 1])


def budget_sweep(engine, prompt_ids_list: list[list[int]], answers: Sequence, budgets: Sequence[int], *,
                 answer_tokens: int, budget_action: str = "force_end", n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy at each thinking budget with the hard stop, with thinking off, on minus off (paired), and the
    share of samples within their budget (module docstring)."""
    from alignkit.eval.metrics import bootstrap_ci_paired

    curve, on_scores, within_all = [], None, []
    for b in sorted(budgets):
        sampling = SamplingParams(temperature=0.0, max_new_tokens=b + answer_tokens, thinking=True,
                                  max_thinking_tokens=b, budget_action=budget_action)
        comps = [g[0] for g in engine.generate(prompt_ids_list, 1, sampling)]
        ok = answer_scores(comps, answers)
        within = [float(c.thinking_tokens <= b) for c in comps]
        within_all += within
        curve.append({"budget": b, "accuracy": float(np.mean(ok)), "ci": _ci(ok, n_boot, seed),
                      "within_budget": float(np.mean(within)),
                      "thinking_tokens": float(np.mean([c.thinking_tokens for c in comps])),
                      "cut": float(np.mean([stopped_by_budget(c, b) for c in comps]))})
        on_scores = ok
    off = [g[0] for g in engine.generate(prompt_ids_list, 1, SamplingParams(
        temperature=0.0, max_new_tokens=answer_tokens, thinking=False))]
    off_scores = answer_scores(off, answers)
    return {"curve": curve, "budget_action": budget_action, "answer_tokens": answer_tokens,
            "on": {"budget": max(budgets), "accuracy": float(np.mean(on_scores)), "ci": _ci(on_scores, n_boot, seed)},
            "off": {"accuracy": float(np.mean(off_scores)), "ci": _ci(off_scores, n_boot, seed)},
            "on_minus_off": float(np.mean(on_scores) - np.mean(off_scores)),
            "on_minus_off_ci": list(bootstrap_ci_paired(off_scores, on_scores, n_boot=n_boot, seed=seed)),
            "within_budget": float(np.mean(within_all)), "samples": len(within_all)}
