"""AI labeler alignment: how often a judge's preference labels agree with known ones, measured before they are used.

Constitutional AI calls it the labeler's alignment (Bai et al. 2022, arXiv:2212.08073, fig. 4; Lee et al. 2023,
RLAIF, arXiv:2309.00267, "AI labeler alignment"): the share of labelled pairs on which the AI label names the
answer the labels say is better. A pair here is ``(prompt, better, worse)``; the judge is asked the constitution's
comparison questions about it exactly as ``alignkit cai stage=label`` asks them (:mod:`alignkit.feedback.cai`),
and the agreement is measured three ways, from the same answers:

- ``one_order``: one principle, one order (which answer is shown as (A) is a seeded coin per pair), P(A) read as
  the label: what a judge asked once gives, position bias included;
- ``both_orders``: that principle asked in both orders, ``(P_ab(A) + 1 - P_ba(A)) / 2`` (position bias cancels);
- ``ensemble``: ``k`` principles (drawn without replacement, seeded by the pair id), both orders each, averaged:
  what ``stage=label`` with ``principles_per_pair=k`` writes.

A pair scores 1 when its label gives the better answer probability > 1/2, 1/2 when exactly 1/2, 0 otherwise;
pairs whose options the judge's answers do not give are counted (``unreadable``) and left out. Each figure comes
with a 95% percentile-bootstrap interval over pairs. Also reported: ``position_bias`` (mean P(A) - 1/2 over all
questions: > 0 favours the first answer) and ``orders_agree`` (the share of (pair, principle) on which both
orders name the same winner).

Labelled sets (:func:`labelled_pairs`):

- ``refusal``: PyRIT's human-labelled refusal set (``alignkit data fetch refusal``). 40 of its requests have two
  responses, one a human marked as answering it and one marked as a refusal; all 40 are harmless requests whose
  "refusal" is an off-topic answer (a non-sequitur, which PyRIT counts as a refusal). The answering response is
  the better one by any helpfulness principle, so this set measures whether the judge reads helpfulness as the
  human labellers did.
- ``asdiv-prefs``: the ASDiv preference pairs (``alignkit data fetch asdiv-prefs``, test split), a program
  oracle: the chosen answer's final number is correct and the rejected one's is not.
- a file in alignkit's preference format: ``chosen`` is the better answer (human or program labels).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkit.errors import ConfigError
from alignkit.feedback.cai import ask_judge, comparison, draw_principles, pair_label, stable_seed
from alignkit.feedback.constitution import Constitution
from alignkit.feedback.lm import ChatLM
from alignkit.rl.rollout import SamplingParams

__all__ = ["BUILTIN_SETS", "LabelledPair", "REPORT_FILE", "check_labels", "labelled_pairs", "measure"]

BUILTIN_SETS = ("refusal", "asdiv-prefs")
REPORT_FILE = "labeler_alignment.json"
"""Written by ``alignkit cai`` beside the labels it measured; read by :func:`check_labels` before training."""
MODES = ("one_order", "both_orders", "ensemble")


@dataclass(frozen=True)
class LabelledPair:
    id: str
    prompt: object  # text, or a list of chat turns
    better: str
    worse: str


def _text(content) -> str:
    if isinstance(content, list):  # messages: the assistant's turn(s)
        return "\n".join(str(m.get("content", "")) for m in content)
    return str(content)


def labelled_pairs(spec: str, *, limit: int = 0) -> tuple[list[LabelledPair], str]:
    """The pairs of the labelled set ``spec`` (module docstring) and a line saying where their labels come from."""
    if spec == "refusal":
        from alignkit.data.sources import fetch

        rows = [json.loads(x) for x in (fetch("refusal") / "data.jsonl").read_text().splitlines() if x]
        by = defaultdict(list)
        for r in rows:
            by[r["objective"]].append(r)
        pairs = []
        for objective, rs in by.items():
            answered = [r for r in rs if not r["refusal"]]
            refused = [r for r in rs if r["refusal"]]
            if len(rs) == 2 and answered and refused:
                pairs.append(LabelledPair(f"refusal-{answered[0]['id']}", objective, answered[0]["text"],
                                          refused[0]["text"]))
        how = ("PyRIT refusal set, human labels: the response marked as answering the request beats the one "
               "marked as a refusal")
    else:
        from alignkit.data.formats import load_examples

        if spec == "asdiv-prefs":
            from alignkit.data.sources import fetch

            path, how = str(fetch("asdiv-prefs") / "test.jsonl"), "ASDiv pairs, program oracle: the correct answer wins"
        else:
            path, how = spec, f"{spec}: chosen beats rejected"
        loaded = load_examples(path, "preference")
        pairs = [LabelledPair(f"{Path(path).stem}-{ex.origin.row}", ex.prompt, _text(ex.chosen), _text(ex.rejected))
                 for ex in loaded.examples]
    if not pairs:
        raise ConfigError(f"labelled set {spec!r} holds no pairs")
    return (pairs[:limit] if limit else pairs), how


def _score(p_better: float) -> float:
    return 1.0 if p_better > 0.5 else 0.5 if p_better == 0.5 else 0.0


def _summary(scores: list[float], seed: int) -> dict:
    from alignkit.eval.metrics import bootstrap_ci

    if not scores:
        return {"accuracy": None, "ci": None, "n": 0}
    lo, hi = bootstrap_ci(scores, seed=seed) if len(scores) > 1 else (scores[0], scores[0])
    return {"accuracy": float(np.mean(scores)), "ci": [lo, hi], "n": len(scores)}


def measure(judge: ChatLM, pairs: Sequence[LabelledPair], constitution: Constitution, *,
            principles: Sequence[str] | None = None, k: int = 1, seed: int = 0, chain_of_thought: bool = False,
            sampling: SamplingParams = SamplingParams()) -> dict:
    """The judge's alignment with ``pairs`` in the three modes of the module docstring, asking the comparison
    questions of ``principles`` (ids of ``constitution``; default all), ``k`` per pair for the ensemble."""
    ids = list(principles or constitution.ids)
    unknown = [p for p in ids if p not in constitution.ids]
    if unknown:
        raise ConfigError(f"alignment principles {unknown} are not in the constitution ({', '.join(constitution.ids)})")
    k = min(k, len(ids))
    asks, convs = [], []  # (pair index, principle, order)
    for i, pair in enumerate(pairs):
        for pid in draw_principles(ids, seed, f"align-{pair.id}", k, replace_=False):
            q = constitution.principle(pid).comparison_question
            for order, (first, second) in (("ab", (pair.better, pair.worse)), ("ba", (pair.worse, pair.better))):
                asks.append((i, pid, order))
                convs.append(comparison(constitution, pair.prompt, q, first, second, chain_of_thought))
    seeds = [stable_seed(seed, pairs[i].id, pid, order, "reasoning") for i, pid, order in asks]
    probs = ask_judge(judge, convs, seeds, sampling, chain_of_thought)
    got: dict[int, dict[str, dict[str, float | None]]] = defaultdict(lambda: defaultdict(dict))
    for (i, pid, order), p in zip(asks, probs):
        got[i][pid][order] = p
    scores: dict[str, list[float]] = {m: [] for m in MODES}
    unreadable = dict.fromkeys(MODES, 0)
    agree, asked = [], []
    for i, pair in enumerate(pairs):
        per = got[i]
        first = next(iter(per))
        coin = random.Random(stable_seed(seed, "order", pair.id)).random() < 0.5
        one = per[first]["ab"] if coin else (None if per[first]["ba"] is None else 1 - per[first]["ba"])
        full = pair_label([per[j]["ab"] for j in per], [per[j]["ba"] for j in per], clamp=chain_of_thought)
        labels = {"one_order": one,
                  "both_orders": pair_label([per[first]["ab"]], [per[first]["ba"]], clamp=chain_of_thought)["p"],
                  "ensemble": full["p"]}
        agree += full["agreed"]
        asked += [v for j in per for v in per[j].values() if v is not None]
        for m, p in labels.items():
            if p is None:
                unreadable[m] += 1
            else:
                scores[m].append(_score(p))
    out = {m: {**_summary(scores[m], seed), "unreadable": unreadable[m]} for m in MODES}
    return {**out, "pairs": len(pairs), "principles": ids, "k": k, "judge": judge.name,
            "chain_of_thought": chain_of_thought,
            "position_bias": float(np.mean(asked)) - 0.5 if asked else None,
            "orders_agree": float(np.mean(agree)) if agree else None}


def gate_mode(principles_per_pair: int) -> str:
    """The mode whose labels ``stage=label`` writes with ``principles_per_pair`` principles per pair."""
    return "ensemble" if principles_per_pair > 1 else "both_orders"


def check_labels(data: str, force: bool) -> dict | None:
    """Before training on ``data``: if a labeler-alignment report lies beside it (written by ``alignkit cai``)
    and says the labels failed their threshold, stop with exit 2 unless ``force``. Returns the report, if any."""
    path = Path(data)
    report = path.with_name(REPORT_FILE) if path.suffix else None
    if report is None or not report.is_file():
        return None
    r = json.loads(report.read_text())
    if not r.get("passed", True) and not force:
        raise ConfigError(f"{data}: its labels come from a judge whose measured alignment {r['accuracy']:.3f} "
                          f"({r['mode']}, {r['set']}) is below min_alignment={r['min_alignment']} ({report}); "
                          "use a better judge, or pass force=true to train on them anyway")
    return r
