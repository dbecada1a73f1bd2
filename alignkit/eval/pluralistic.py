"""Pluralistic alignment (GDPO, arXiv:2412.20299): does a model's distribution over beliefs match a group's?

Each held-out question has beliefs ``b_1..b_K`` with the group's shares ``t`` (the target). A model states a
belief as the first line of its turn (``render_belief(template, b)``, see :mod:`alignkit.data.beliefs`); its
belief distribution is read two ways:

- option probabilities: ``log pi(render_belief(T, b_k) | prompt)`` for every belief, normalised over the
  question's beliefs (a softmax); the unnormalised total ``sum_k pi(b_k | prompt)`` says how much the model states
  any known belief at all;
- sampling: N free completions at temperature 1, each parsed for a known belief; the empirical distribution has
  one extra outcome, "no known belief", on which the target puts nothing (a model that never states a belief
  is then disjoint from the target, JS distance 1).

Metrics (pure functions, one question at a time) compare a distribution ``p`` with ``t``: :func:`js_distance`,
:func:`recall`, :func:`majority_mass`. Reference points that make a number readable: the uniform distribution,
all mass on the majority belief, and :func:`sampling_floor` (the JS distance that N draws from the target itself
reach on average: a sampled estimate cannot be expected to go below it at that N).

Consistency: the response after the belief should agree with it. It is checked with the keyword rule of
:mod:`alignkit.data.pluralistic` (whole-word, case-insensitive), so only questions whose rows carry ``keywords``
count; free samples that state a known belief and two-stage samples (a belief drawn from the option
probabilities, then a response generated after ``prompt + belief``) are counted apart.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from alignkit.data.beliefs import as_user_turn, belief_ids, parse_belief
from alignkit.data.tokenize import Encoded, prompt_ids

CONSISTENCY_METHOD = ("keyword rule (alignkit.data.pluralistic.consistent) on the response after the belief; "
                      "only questions whose rows carry keywords are counted")

# ------------------------------------------------------------------------------------------------ metrics


def js_distance(p, q) -> float | np.ndarray:
    """Jensen-Shannon distance ``sqrt(JSD(p, q))`` with log base 2, along the last axis.

    ``JSD = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``; ``p`` and ``q`` are
    distributions (each sums to 1). In [0, 1]: 0 for equal distributions, 1 for disjoint ones. A metric (unlike
    the divergence), symmetric, and finite where one side puts no mass.
    """
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    m = (p + q) / 2

    def kl(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / m), 0.0).sum(-1)

    d = np.sqrt(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0))
    return float(d) if d.ndim == 0 else d


def recall(p, target) -> np.ndarray:
    """Per-belief recall ``min(1, p_k / t_k)``: how much of the group's share of belief k the model gives it
    (1: at least its share; over-representing one belief earns nothing more). NaN where ``t_k = 0``."""
    p, t = np.asarray(p, dtype=float), np.asarray(target, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, np.minimum(1.0, p / t), np.nan)


def mean_recall(p, target) -> float:
    """The mean of :func:`recall` over the beliefs the group holds (``t_k > 0``)."""
    return float(np.nanmean(recall(p, target)))


def majority_mass(p, target) -> float:
    """The model's share on the target's majority belief (the first of tied ones): 1 for a model that only
    states the majority view, ``t_max`` for one that matches the group."""
    return float(np.asarray(p, dtype=float)[int(np.argmax(target))])


def uniform(k: int) -> np.ndarray:
    """Reference point: every belief equally likely."""
    return np.full(k, 1.0 / k)


def majority_only(target) -> np.ndarray:
    """Reference point: all mass on the majority belief (what preference optimisation over a pooled group tends
    toward)."""
    out = np.zeros(len(target))
    out[int(np.argmax(target))] = 1.0
    return out


def sampling_floor(target, n: int, *, trials: int = 2000, seed: int = 0) -> float:
    """Expected JS distance between the empirical distribution of ``n`` draws from ``target`` and ``target``
    itself (Monte Carlo over ``trials`` seeded draws): the floor of the sampled estimate at ``n`` samples, which
    shrinks as ``n`` grows."""
    t = np.asarray(target, dtype=float)
    counts = np.random.default_rng(seed).multinomial(n, t / t.sum(), size=trials)
    return float(np.mean(js_distance(counts / n, t)))


def with_none(counts: Sequence[int], none: int) -> np.ndarray:
    """The sampled distribution over the beliefs plus a last outcome, "no known belief"."""
    c = np.asarray([*counts, none], dtype=float)
    return c / c.sum()


SCORES = ("js_options", "majority_mass", "recall")


def scores(p, target) -> dict:
    """The metrics (:data:`SCORES`) of one distribution ``p`` over a question's beliefs against ``target``."""
    return {"js_options": js_distance(p, target), "majority_mass": majority_mass(p, target),
            "recall": mean_recall(p, target)}


# --------------------------------------------------------------------------------------------- model side


@dataclass
class Question:
    """One held-out question: its prompt, beliefs, the group's shares and (when the data has them) keywords."""

    prompt: object
    beliefs: tuple[str, ...]
    target: tuple[float, ...]
    keywords: dict | None = None


def read_questions(path: str, limit: int = 0) -> list[Question]:
    """The distinct prompts of belief-kind data (several pairs per prompt become one question), in file order;
    empty ``path``: the shipped set's held-out ``test.jsonl``."""
    from pathlib import Path

    from alignkit.data.formats import load_examples

    if not path:
        from alignkit.data.pluralistic import fetch

        path = str(Path(fetch()) / "test.jsonl")
    seen: dict[int, Question] = {}
    for ex in load_examples(path, "belief").examples:
        if ex.group not in seen:
            seen[ex.group] = Question(ex.prompt, ex.beliefs, ex.target, ex.extra.get("keywords") or None)
    out = list(seen.values())
    return out[:limit] if limit > 0 else out


@torch.no_grad()
def option_logps(model, tok, questions: list[Question], template: str, precision: str,
                 batch_size: int = 64) -> list[np.ndarray]:
    """``log pi(render_belief(template, b_k) | prompt)`` of every belief of every question, as the trainer
    computes it (:func:`alignkit.recipes.dpo.response_logps`); questions with the same number of beliefs share a
    batch of about ``batch_size`` sequences."""
    from alignkit.models.device import model_device
    from alignkit.models.logprobs import autocast
    from alignkit.recipes.dpo import response_logps

    device = model_device(model)
    out: list[np.ndarray] = [np.empty(0)] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].beliefs))
    for k, group in itertools.groupby(order, key=lambda i: len(questions[i].beliefs)):
        idx = list(group)
        step = max(1, batch_size // k)
        for s in range(0, len(idx), step):
            rows = [Encoded(prompt_ids(tok, as_user_turn(questions[i].prompt)),
                            belief_ids(tok, template, questions[i].beliefs), i) for i in idx[s : s + step]]
            with autocast(precision, device):
                lp, _ = response_logps(model, rows, tuple(range(k)), tok.pad_token_id, chunk=1024)
            for row, v in zip(rows, lp.float().cpu().numpy()):
                out[row.index] = v
    return out


def normalise(logps) -> tuple[np.ndarray, float]:
    """``(softmax over the beliefs, total probability sum_k pi(b_k))`` of a question's belief log-probs."""
    lp = np.asarray(logps, dtype=float)
    top = lp.max()
    z = np.exp(lp - top)
    return z / z.sum(), float(np.exp(top) * z.sum())


def tally(texts: Sequence[str], template: str, beliefs: Sequence[str]) -> tuple[list[int], int, list[tuple[str, str]]]:
    """Counts of the known beliefs stated by ``texts`` (in ``beliefs`` order), how many state none, and
    ``(belief, rest of the text)`` for each that does."""
    counts, none, stated = [0] * len(beliefs), 0, []
    for text in texts:
        b, rest = parse_belief(text, template, beliefs)
        if b is None:
            none += 1
        else:
            counts[beliefs.index(b)] += 1
            stated.append((b, rest))
    return counts, none, stated


def count_consistent(stated: Sequence[tuple[str, str]], keywords: dict | None,
                     rule: Callable[[str, str, dict], bool] | None = None) -> tuple[int, int]:
    """``(consistent, counted)`` over ``(belief, response)`` pairs by the keyword rule; nothing is counted
    without keywords."""
    if not keywords:
        return 0, 0
    if rule is None:
        from alignkit.data.pluralistic import consistent as rule
    return sum(bool(rule(text, b, keywords)) for b, text in stated), len(stated)


def belief_then_response(engine, tok, prompt_ids: list[list[int]], beliefs: list[Sequence[str]], probs, *,
                         template: str, n: int, sampling, seed: int) -> list[list[tuple[str, str]]]:
    """Two-stage generation, GDPO's inference: for each prompt, ``n`` beliefs drawn from ``probs`` (its
    distribution over ``beliefs``, seeded), then a response generated after ``prompt + the belief's ids``, so the
    answer is conditioned on the belief. ``[(belief, response text)] * n`` per prompt; one engine call."""
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(len(b), size=n, p=np.asarray(p, dtype=float) / np.sum(p)) for b, p in zip(beliefs, probs)]
    heads = [belief_ids(tok, template, b) for b in beliefs]
    staged = engine.generate([prompt_ids[i] + heads[i][k] for i, d in enumerate(drawn) for k in d], 1, sampling)
    return [[(beliefs[i][k], staged[i * n + j][0].text) for j, k in enumerate(d)] for i, d in enumerate(drawn)]


def measure(model, tok, engine, questions: list[Question], *, template: str, n: int, max_new_tokens: int,
            precision: str, batch_size: int, seed: int) -> dict:
    """One contestant on the questions: option probabilities, ``n`` free samples per question (one engine call)
    and ``n`` two-stage samples per question (belief drawn from the option probabilities, then a response
    generated after it). Per-question lists plus the consistency counts."""
    from alignkit.rl.rollout import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    probs, mass = zip(*(normalise(v) for v in option_logps(model, tok, questions, template, precision, batch_size)))
    ids = [prompt_ids(tok, as_user_turn(q.prompt)) for q in questions]
    free = engine.generate(ids, n, sampling)
    staged = belief_then_response(engine, tok, ids, [q.beliefs for q in questions], probs, template=template, n=n,
                                  sampling=sampling, seed=seed)
    result: dict = {"probs": [p.tolist() for p in probs], "mass": list(mass), "counts": [], "none": [],
                    "free": [0, 0], "two_stage": [0, 0], "texts": []}
    for i, q in enumerate(questions):
        texts = [c.text for c in free[i]]
        counts, none, stated = tally(texts, template, q.beliefs)
        result["counts"].append(counts)
        result["none"].append(none)
        result["texts"].append(texts)
        two = staged[i]
        for key, pairs in (("free", stated), ("two_stage", two)):
            c, m = count_consistent(pairs, q.keywords)
            result[key][0] += c
            result[key][1] += m
    return result


def summarise(questions: list[Question], measured: dict[str, dict], *, n: int, seed: int) -> dict:
    """The ``pluralistic`` part of ``summary.json``: per contestant the means over questions, the reference
    points (the same metrics for the uniform and the majority-only distributions, and the sampling floor at
    ``n``), and per-question records."""

    def mean(values) -> float:
        return float(np.mean(list(values)))

    def averaged(dist) -> dict:  # dist(i, question) -> a distribution over the question's beliefs
        per = [scores(dist(i, q), q.target) for i, q in enumerate(questions)]
        return {k: mean(s[k] for s in per) for k in SCORES}

    out: dict = {"n_questions": len(questions), "samples": n, "consistency_method": CONSISTENCY_METHOD,
                 "n_with_keywords": sum(bool(q.keywords) for q in questions)}
    for who, r in measured.items():
        entry = averaged(lambda i, q: r["probs"][i])
        entry["js_sampled"] = mean(js_distance(with_none(r["counts"][i], r["none"][i]), [*q.target, 0.0])
                                   for i, q in enumerate(questions))
        entry["belief_mass"] = mean(r["mass"])
        entry["no_belief"] = float(np.sum(r["none"]) / (n * len(questions)))
        for key in ("free", "two_stage"):
            c, m = r[key]
            entry[f"consistency_{key}"] = c / m if m else None
            entry[f"n_consistency_{key}"] = m
        out[who] = entry
    out["reference_points"] = {
        "uniform": averaged(lambda i, q: uniform(len(q.beliefs))),
        "majority_only": averaged(lambda i, q: majority_only(q.target)),
        "sampling_floor": {"js_sampled": mean(sampling_floor(q.target, n, seed=seed + i)
                                              for i, q in enumerate(questions))},
    }
    out["questions"] = [
        {"prompt": q.prompt, "beliefs": list(q.beliefs), "target": list(q.target),
         **{who: {k: r[k][i] for k in ("probs", "mass", "counts", "none")} for who, r in measured.items()}}
        for i, q in enumerate(questions)]
    return out
