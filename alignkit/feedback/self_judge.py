"""The policy as its own judge: a 0-5 additive score per response (self-rewarding, Yuan et al. 2401.10020).

The judge prompt (:data:`SCORE_TEMPLATE`, written for alignkit) lists five checks, each worth one point when it
holds, and asks for a short reasoning followed by ``Score: N`` on its last line. :func:`parse_score` reads the
last ``Score: N`` of a judgement (``N`` an integer from 0 to 5, optionally written ``N/5``; anything else is a
parse failure, None). A response's score is the mean of its parsed judgements; it has none when no judgement
parsed.

:func:`best_worst` pairs a prompt's best and worst scored responses (the earliest of equal ones) and gives None
when fewer than two responses have scores or when all scores are equal: a tie carries no preference and is
dropped, never turned into a pair. :func:`judge_stats` gives what a run must watch: the parse-failure rate over
judgements, and judge collapse, the share of prompts (among those with at least two scored responses) whose
scores are all equal. A collapsed judge gives no pairs, and self-rewarding then stops learning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["SCORE_TEMPLATE", "best_worst", "judge_replies", "judge_stats", "mean_score", "parse_score", "score_questions"]

SCORE_TEMPLATE = """You are grading an answer on a scale from 0 to 5 built from five checks. Start from zero and \
add one point for every check that holds.
1. Relevant: the answer is about the question and offers at least some pertinent content.
2. Substantial: it deals with a good part of what was asked, even if something is left open.
3. Useful: it settles the main point of the question in a way the person asking could act on.
4. Well made: it is clear, organised and complete, as a helpful assistant would write it.
5. Excellent: it is accurate, focused and expert, with nothing superfluous.

Question:
{prompt}

Answer:
{response}

Give your reasons in a few sentences. Then write the total on the last line, as "Score: N" with N from 0 to 5."""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*5\b)?", re.IGNORECASE)


def parse_score(judgement: str) -> float | None:
    """The score of a judgement: the last ``Score: N`` (case-insensitive, ``N/5`` and ``**N**`` accepted), an
    integer from 0 to 5; None when there is none, or when it is out of range or not whole."""
    found = _SCORE.findall(judgement or "")
    if not found:
        return None
    text = found[-1]
    if not re.fullmatch(r"\d+", text):
        return None
    value = int(text)
    return float(value) if 0 <= value <= 5 else None


def _text(x) -> str:
    if isinstance(x, list):  # a message list: its turns, role by role
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in x)
    return str(x)


def score_questions(prompts: Sequence, responses: Sequence[str], template: str = SCORE_TEMPLATE) -> list[str]:
    """The judge's question for each (prompt, response)."""
    return [template.format(prompt=_text(p), response=r) for p, r in zip(prompts, responses)]


def mean_score(judgements: Sequence[str]) -> float | None:
    """The mean of the parsed scores of one response's judgements; None when none parsed."""
    xs = [s for s in map(parse_score, judgements) if s is not None]
    return sum(xs) / len(xs) if xs else None


def best_worst(scores: Sequence[float | None], texts: Sequence[str] | None = None) -> tuple[int, int] | None:
    """``(best, worst)`` indices of a prompt's scored responses (the earliest of equal scores); None when fewer
    than two are scored, when the best and worst scores are equal (a tie), or when their ``texts`` are equal."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    hi = max(s for s, _ in scored)
    lo = min(s for s, _ in scored)
    if hi <= lo:
        return None
    best = next(i for s, i in scored if s == hi)
    worst = next(i for s, i in scored if s == lo)
    if texts is not None and texts[best] == texts[worst]:
        return None
    return best, worst


def judge_stats(judgements: Sequence[Sequence[Sequence[str]]], scores: Sequence[Sequence[float | None]]) -> dict:
    """Per iteration: ``judge/parse_failure`` (share of judgements without a score), ``judge/collapse`` (share of
    prompts with two or more scored responses whose scores are all equal; 0 when there are none),
    ``judge/score_mean`` and the counts behind them. ``judgements[i][j]``: the judgements of response ``j`` of
    prompt ``i``; ``scores[i][j]``: its score."""
    flat = [t for prompt in judgements for response in prompt for t in response]
    failed = sum(parse_score(t) is None for t in flat)
    comparable = [[s for s in prompt if s is not None] for prompt in scores]
    comparable = [xs for xs in comparable if len(xs) >= 2]
    collapsed = sum(max(xs) == min(xs) for xs in comparable)
    all_scores = [s for prompt in scores for s in prompt if s is not None]
    return {"judge/judgements": len(flat), "judge/parse_failure": failed / len(flat) if flat else 0.0,
            "judge/comparable_prompts": len(comparable),
            "judge/collapse": collapsed / len(comparable) if comparable else 0.0,
            "judge/score_mean": sum(all_scores) / len(all_scores) if all_scores else None}


def judge_replies(engine, tok, questions: list[str], n: int, sampling, seeds: list[int]) -> list[list[str]]:
    """``n`` judgements of each question, generated by ``engine`` (the policy itself) with ``sampling``
    (:class:`~alignkit.rl.rollout.SamplingParams`), one seed a question. Each question is sent as one user message
    through the chat template (plain text for a tokenizer without one)."""
    from alignkit.data.tokenize import prompt_ids

    chat = getattr(tok, "chat_template", None)
    ids = [prompt_ids(tok, [{"role": "user", "content": q}] if chat else q) for q in questions]
    outs = engine.generate(ids, n, sampling, seeds=seeds) if ids else []
    return [[c.text for c in group] for group in outs]
