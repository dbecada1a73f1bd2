"""Best-of-n selection and what it costs in KL, shared by ``alignkit bon`` and rejection-sampling fine-tuning.

Selection
---------
:func:`best_index` keeps the completion with the highest reward; completions without a reward (``None``) never
win, and among equal rewards the earliest sample wins. The samples of a prompt are i.i.d., so taking the earliest
of a tie is a uniform pick among the tied ones, and the kept completion has the best-of-n distribution.

With i.i.d. continuous rewards the best of ``n`` beats one fresh sample with probability ``n / (n + 1)``: of
``n + 1`` i.i.d. draws each is the largest with probability ``1 / (n + 1)``, and the fresh one loses unless it is.

KL of the best-of-n policy
--------------------------
Write ``u = F(r(y))`` for the reward's CDF under the policy ``pi``. For a continuous reward the best of ``n`` has
density ``n u^(n-1)`` with respect to ``pi``, so ``KL(pi_n || pi) = E[log(n u^(n-1))] = log n - (n-1)/n``, with
``u ~ Beta(n, 1)`` (the formula of Stiennon et al. 2009.01325). Beirami et al. (2401.01879) showed that it is an
upper bound: when rewards tie (a finite set of reward values ``v_1 < ... < v_K`` of probabilities ``p_k``,
cumulative ``C_k``) the best of ``n`` falls on level ``k`` with probability ``q_k = C_k^n - C_(k-1)^n`` and is
distributed as ``pi`` within it, so ``KL = sum_k q_k log(q_k / p_k)``, which is below the bound.

:func:`bon_kl` computes that exact formula on the empirical distribution of a prompt's sampled rewards (ties
merged into levels). It never exceeds the bound (merging values into levels is a coarse-graining of ``u``, and
KL does not grow under coarse-graining), equals the true KL for a reward with few levels whose frequencies the
samples give (a binary verifier: ``q_1 = 1 - (1 - p)^n``), is 0 when every sample of the prompt gets the same
reward (best-of-n then keeps ``pi``), and for ``m`` distinct continuous values approaches the bound from below as
``m`` grows (``m = n`` distinct values give 0.590 against 0.636 for ``n = 4``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from alignkit.rl.rollout import SamplingParams
from alignkit.rl.trainer import Collector, Group, Prompt, rollout_seed

__all__ = ["best_index", "bon_kl", "kl_bound", "sample_groups", "tournament"]


def kl_bound(n: int) -> float:
    """``log n - (n - 1) / n``: the KL of best-of-``n`` against the sampling policy for a continuous reward, and an
    upper bound for any reward (Beirami et al. 2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_index(scores: Sequence[float | None]) -> int | None:
    """The index of the highest score (the earliest among equal ones); None when no score exists."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    return best


def bon_kl(rewards: Sequence[float], n: int) -> float:
    """``KL(best-of-n || pi)`` where ``pi``'s reward distribution is the empirical one of ``rewards`` (module
    docstring): ``sum_k q_k log(q_k / p_k)`` over the distinct values, ``q_k = C_k^n - C_(k-1)^n``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    m = len(rewards)
    if m == 0:
        return 0.0
    total, below = 0.0, 0
    for _, count in sorted(Counter(rewards).items()):
        p = count / m
        q = ((below + count) / m) ** n - (below / m) ** n
        below += count
        if q > 0:
            total += q * math.log(q / p)
    return max(0.0, total)


def sample_groups(engine, rewards, prompts: list[Prompt], cfg, n: int, round_: int) -> list[Group]:
    """``n`` completions of every prompt from ``engine``, scored by ``rewards`` (a RewardSet): one
    :class:`~alignkit.rl.trainer.Group` a prompt, in order. Prompt ``i`` of round ``round_`` is sampled with the
    seed :func:`~alignkit.rl.trainer.rollout_seed` ``(cfg.seed, round_, 0, i)``: the same completions whatever the
    batching, and different ones every round (an iteration of rejection sampling)."""
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              max_new_tokens=cfg.max_new_tokens, stop=cfg.stop_strings)
    seeds = [rollout_seed(cfg.seed, round_, 0, i) for i in range(len(prompts))]
    outs = engine.generate([p.ids for p in prompts], n, sampling, seeds=seeds)
    groups, _ = Collector(engine, rewards, prompts, None, cfg).score(list(enumerate(outs)))
    return groups


def tournament(judge, prompts: list, texts: list[list[str]], **columns: Sequence) -> list[int]:
    """The winner of each prompt's completions under a pairwise judge: the first holds the title, and each later
    one takes it when the judge, asked in both orders (:func:`~alignkit.feedback.judges.judge_both_orders`),
    prefers it (combined preference above 0.5). ``n - 1`` rounds, each one batched call per order over all
    prompts; ``columns`` (one value per prompt) go to the judge."""
    from alignkit.feedback.judges import combine_orders, judge_both_orders

    champion = [0] * len(prompts)
    for j in range(1, max((len(t) for t in texts), default=0)):
        live = [i for i, t in enumerate(texts) if j < len(t)]
        if not live:
            continue
        cols = {k: [v[i] for i in live] for k, v in columns.items()}
        v_ab, v_ba = judge_both_orders(judge, [prompts[i] for i in live], [texts[i][champion[i]] for i in live],
                                       [texts[i][j] for i in live], **cols)
        for i, pref in zip(live, combine_orders(v_ab, v_ba)):
            if pref < 0.5:
                champion[i] = j
    return champion


# ------------------------------------------------------------------ what rejection sampling keeps
# A sample is a dict as the recipes store it: ``text``, ``reward`` (None: unscored), ``prompt_index``, ...; a
# blank text is never kept (a fine-tuning row needs a response).


def _usable(s: dict) -> bool:
    return bool(s["text"].strip())


def keep_best(samples: list[list[dict]], winners: list[int | None] | None = None) -> list[dict]:
    """RAFT (Dong et al. 2304.06767): each prompt's best sample by reward (:func:`best_index`), or the one
    ``winners`` names (a judge's pick); a prompt with no usable, scored sample gives nothing."""
    kept = []
    for i, group in enumerate(samples):
        if winners is not None:
            w = winners[i]
        else:
            w = best_index([s["reward"] if _usable(s) else None for s in group])
        if w is not None and _usable(group[w]):
            kept.append(group[w])
    return kept


def keep_verified(samples: list[list[dict]], threshold: float, max_per_prompt: int = 0) -> list[dict]:
    """ReST-EM (Singh et al. 2312.06585): every sample the verifier passes (``reward >= threshold``), one per
    distinct text, at most ``max_per_prompt`` a prompt (0: all), in sample order."""
    kept = []
    for group in samples:
        seen: set[str] = set()
        for s in group:
            if s["reward"] is not None and s["reward"] >= threshold and _usable(s) and s["text"] not in seen:
                if max_per_prompt and len(seen) >= max_per_prompt:
                    break
                seen.add(s["text"])
                kept.append(s)
    return kept


def with_previous_best(samples: list[list[dict]], previous: list[dict]) -> list[list[dict]]:
    """Llama 2 (Touvron et al. 2307.09288): each prompt's candidates are its best sample of all earlier
    iterations (``previous``, placed first, so it keeps a tie) followed by this iteration's samples;
    :func:`keep_best` on the result keeps the best over all iterations."""
    by_prompt = {s["prompt_index"]: s for s in previous}
    return [([by_prompt[g[0]["prompt_index"]]] if g and g[0]["prompt_index"] in by_prompt else []) + list(g)
            for g in samples]
