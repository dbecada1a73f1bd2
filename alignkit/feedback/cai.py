"""Constitutional AI's two data stages (Bai et al. 2022, arXiv:2212.08073), over any :class:`~alignkit.feedback.lm.ChatLM`.

SL-CAI (:func:`critique_revise`): for each prompt the model answers; then, ``rounds`` times, a principle is drawn
uniformly at random from the constitution (with replacement, seeded by ``(seed, prompt id, round)``), the model
is asked the principle's critique request after its latest answer, and then its revision request after the
critique. The conversation grows turn by turn, after the constitution's few-shot examples. Each prompt's whole
trace (response, critiques, revisions, principle ids) is one JSONL record; the SFT set pairs the prompt with
the final revision.

RL-CAI labels (:func:`label_pairs`): the policy samples two answers ``a`` and ``b`` per prompt; for each of
``principles_per_pair`` principles (drawn without replacement, seeded by ``(seed, prompt id)``) the judge is asked
the principle's comparison question twice, with ``a`` as option (A) and then with ``b`` as option (A). With
``lp_A``, ``lp_B`` the judge's log-probabilities of answering (A) and (B),

    P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) = sigmoid(lp_A - lp_B)
    p_j  = (P_ab(A) + 1 - P_ba(A)) / 2          (both orders: position bias cancels)
    p    = mean_j p_j                           (principles ensembled)

is the probability that ``a`` is better. With ``chain_of_thought`` the judge first writes its reasoning and the
two order probabilities are clamped to [0.4, 0.6] before they are combined (the paper's clamp: reasoning makes
the judge over-confident). The chosen answer is the one with p > 1/2 and ``soft_label`` is its probability, in
(1/2, 1]. Dropped and counted, never written as pairs: identical answers, ties (``|p - 1/2| <= tie_margin``) and
parse failures (a question whose options cannot be read; a principle missing either order is left out of the
mean, a pair with no principle left is dropped).

Resumable: records are appended per prompt to a trace (:class:`JsonlLog`, flushed and fsynced); a rerun skips the
prompt ids already there and discards a partial last line. Every seed depends on the prompt id, not on the
batch, so a resumed run writes what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignkit.errors import DataError
from alignkit.feedback.constitution import Constitution
from alignkit.feedback.judges import agreement, combine_orders
from alignkit.feedback.lm import ChatLM
from alignkit.rl.rollout import SamplingParams

__all__ = [
    "COT_REQUEST", "FINAL_REQUEST", "JsonlLog", "LabelStats", "ReviseStats", "ask_judge", "clean_reply", "comparison",
    "critique_revise", "draw_principles", "label_pairs", "option_probability", "pair_label", "stable_seed",
]

COT_REQUEST = "Before choosing, think it through in a few sentences."
FINAL_REQUEST = "So which answer is better: (A) or (B)?"
CLAMP = (0.4, 0.6)
TURN_MARKERS = ("<|im_start|>", "\nuser:", "\nUser:", "\nHuman:")
"""Where a reply ends if the model goes on to write the next turn itself; always stop strings."""

# Openers a small model puts before a revision ("Sure, here is a revised response:"); removed repeatedly.
_PREAMBLES = (
    re.compile(r"^\s*(?:revision|revised (?:response|answer|version)|rewrite|new (?:response|answer))\s*:\s*", re.I),
    re.compile(r"^\s*(?:sure|certainly|of course|okay|ok|absolutely|alright|great)\s*[,.!:]\s*", re.I),
    re.compile(r"^\s*(?:here(?:'s| is| are)|below is)\b[^\n:]{0,80}?(?:revis|rewrit|improv|updat|new|better)"
               r"[^\n:]{0,40}[:.]\s*", re.I),
)


def clean_reply(text: str, stops: Sequence[str] = (), *, preamble: bool = True) -> str:
    """``text`` cut before its first stop string (the next turn marker), stripped of preambles such as "Sure,
    here is a revised response:" and of quotes wrapping all of it."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
    text = text.strip()
    changed = preamble
    while changed:
        changed = False
        for pattern in _PREAMBLES:
            new = pattern.sub("", text, count=1)
            if new != text:
                text, changed = new.strip(), True
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def stable_seed(seed: int, *parts) -> int:
    """A 62-bit seed from ``seed`` and ``parts`` (the same in every process and run; not Python's ``hash``)."""
    digest = hashlib.sha256(repr((int(seed), *map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def draw_principles(ids: Sequence[str], seed: int, key: str, k: int, *, replace_: bool = True) -> list[str]:
    """``k`` principle ids drawn uniformly from ``ids``: with replacement (critique rounds) or without (an
    ensemble of comparisons; ``k`` at most ``len(ids)``), from a generator seeded by ``(seed, key)``."""
    rng = random.Random(stable_seed(seed, "principles", key))
    if replace_:
        return [ids[rng.randrange(len(ids))] for _ in range(k)]
    return rng.sample(list(ids), k)


class JsonlLog:
    """A JSONL file of records, one per prompt id, appended and fsynced so a killed run loses at most the
    records being written. :meth:`recover` reads it back, dropping a partial or unreadable LAST line (what a
    kill mid-write leaves); an unreadable line before it is an error naming the file and line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def recover(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # a last line without its newline was cut by a kill: never complete
        lines = data[:keep].split(b"\n")[:-1]
        records = []
        for n, raw in enumerate(lines, 1):
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError("not a record with an id")
            except ValueError as e:
                if n < len(lines):
                    raise DataError(f"unreadable record ({e}) before the last line: the file is damaged; move it "
                                    "away to start again", path=str(self.path), line=n) from None
                keep -= len(raw) + 1
                break
            records.append(rec)
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        return records

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_resumable(log: JsonlLog, prompts: Sequence[tuple[str, object]], batch_size: int,
                  make_records: Callable[[list[tuple[str, object]]], list[dict]],
                  on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Call ``make_records`` on the prompts not yet in ``log``, ``batch_size`` at a time, appending each batch's
    records as soon as they are made. Returns ``(resumed, written)``: prompts found done, records written."""
    done = {r["id"] for r in log.recover()}
    todo = [(pid, p) for pid, p in prompts if pid not in done]
    written = 0
    for start in range(0, len(todo), max(1, batch_size)):
        records = make_records(todo[start : start + max(1, batch_size)])
        log.append(records)
        written += len(records)
        if on_batch is not None:
            on_batch(len(records))
    return len(prompts) - len(todo), written


def _user(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def few_shot_turns(constitution: Constitution, n: int = -1) -> list[dict]:
    """The first ``n`` few-shot examples (all when negative) as conversation turns."""
    turns: list[dict] = []
    for shot in constitution.few_shot[: None if n < 0 else n]:
        p = constitution.principle(shot.principle)
        turns += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.response},
                  {"role": "user", "content": p.critique_request}, {"role": "assistant", "content": shot.critique},
                  {"role": "user", "content": p.revision_request}, {"role": "assistant", "content": shot.revision}]
    return turns


# ------------------------------------------------------------------------------------------------ SL-CAI


@dataclass
class ReviseStats:
    prompts: int = 0  # prompts asked for
    resumed: int = 0  # already in the trace when the run started
    written: int = 0  # records written by this run
    unrevised: int = 0  # records in which every revision was empty after cleaning (left out of the SFT set)
    principle_counts: Counter = field(default_factory=Counter)


def critique_revise(lm: ChatLM, prompts: Sequence[tuple[str, object]], constitution: Constitution, log: JsonlLog, *,
                    rounds: int = 1, sampling: SamplingParams = SamplingParams(), seed: int = 0, few_shot: int = -1,
                    batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> ReviseStats:
    """SL-CAI over ``prompts`` (``(id, prompt)`` pairs, ids unique), appending one record per prompt to ``log``.

    A record: ``{"id", "prompt", "response", "rounds": [{"principle", "critique", "revision"}, ...], "final",
    "revised"}``. ``revision`` is the cleaned reply (:func:`clean_reply`); an empty one leaves the answer as it
    was. ``final`` is the latest answer; ``revised`` says whether any round changed it."""
    stops = tuple(dict.fromkeys((*sampling.stop, *constitution.stop, *TURN_MARKERS)))
    sampling = replace(sampling, stop=stops)
    stats = ReviseStats(prompts=len(prompts))
    shots = few_shot_turns(constitution, few_shot)

    def make(batch):
        convs = [shots + _user(p) for _, p in batch]
        replies = lm.chat(convs, sampling, [stable_seed(seed, pid, "response") for pid, _ in batch])
        current = [clean_reply(r, stops, preamble=False) for r in replies]
        records = [{"id": pid, "prompt": p, "response": c, "rounds": []} for (pid, p), c in zip(batch, current)]
        draws = [draw_principles(constitution.ids, seed, pid, rounds) for pid, _ in batch]
        for r in range(rounds):
            principles = [constitution.principle(d[r]) for d in draws]
            for conv, answer, pr in zip(convs, current, principles):
                conv += [{"role": "assistant", "content": answer}, {"role": "user", "content": pr.critique_request}]
            critiques = lm.chat(convs, sampling, [stable_seed(seed, pid, r, "critique") for pid, _ in batch])
            critiques = [clean_reply(c, stops, preamble=False) for c in critiques]
            for conv, crit, pr in zip(convs, critiques, principles):
                conv += [{"role": "assistant", "content": crit}, {"role": "user", "content": pr.revision_request}]
            revisions = lm.chat(convs, sampling, [stable_seed(seed, pid, r, "revision") for pid, _ in batch])
            for i, (raw, pr) in enumerate(zip(revisions, principles)):
                rev = clean_reply(raw, stops)
                records[i]["rounds"].append({"principle": pr.id, "critique": critiques[i], "revision": rev})
                if rev:
                    current[i] = rev
                stats.principle_counts[pr.id] += 1
        for rec, final in zip(records, current):
            rec["final"] = final
            rec["revised"] = any(rd["revision"] for rd in rec["rounds"])
            stats.unrevised += not rec["revised"]
        return records

    stats.resumed, stats.written = run_resumable(log, prompts, batch_size, make, on_batch)
    return stats


def sft_rows(records: list[dict]) -> list[dict]:
    """The SFT set (alignkit's ``messages`` format): the prompt's turns, then the final revision as the
    assistant's answer; records without a revision are left out."""
    return [{"messages": _user(r["prompt"]) + [{"role": "assistant", "content": r["final"]}], "id": r["id"]}
            for r in records if r.get("revised") and r.get("final")]


# ------------------------------------------------------------------------------------------------ labels


def option_probability(lps: Sequence[float] | None) -> float | None:
    """``P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B))`` from the two options' log-probs; None when unreadable
    (no log-probs, a NaN, or both options impossible)."""
    if lps is None or len(lps) != 2 or any(math.isnan(x) for x in lps):
        return None
    a, b = float(lps[0]), float(lps[1])
    if a == -math.inf and b == -math.inf:
        return None
    if a == -math.inf or b == -math.inf:
        return 0.0 if a == -math.inf else 1.0
    d = a - b
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def pair_label(p_ab: Sequence[float | None], p_ba: Sequence[float | None], *, clamp: bool = False) -> dict:
    """Combine one pair's comparisons: ``p_ab[j]`` is P(A) with ``a`` shown as (A) under principle j, ``p_ba[j]``
    P(A) with ``b`` shown as (A). Returns ``{"p": probability that a is better (None: nothing readable),
    "used": indices of the principles used, "p_ab", "p_ba" (clamped when asked), "agreed"}``."""
    used = [j for j, (x, y) in enumerate(zip(p_ab, p_ba)) if x is not None and y is not None]
    lo, hi = CLAMP
    fix = (lambda v: min(max(v, lo), hi)) if clamp else (lambda v: v)
    ab, ba = [fix(p_ab[j]) for j in used], [fix(p_ba[j]) for j in used]
    per = combine_orders(ab, ba)
    return {"p": sum(per) / len(per) if per else None, "used": used, "p_ab": ab, "p_ba": ba,
            "agreed": agreement(ab, ba)}


@dataclass
class LabelStats:
    pairs: int = 0  # prompts asked for
    resumed: int = 0
    written: int = 0  # records written by this run (kept and dropped)
    questions: int = 0  # comparison questions asked (pairs x principles x 2 orders)
    parse_failures: int = 0  # questions whose options could not be read


def comparison(constitution: Constitution, prompt, question: str, first: str, second: str, cot: bool) -> list[dict]:
    """The conversation that asks ``question`` about ``first`` as (A) and ``second`` as (B)."""
    text = constitution.comparison_template.format(conversation=_prompt_text(prompt), question=question,
                                                   first=first, second=second)
    return [{"role": "user", "content": text + ("\n\n" + COT_REQUEST if cot else "")}]


def ask_judge(judge: ChatLM, questions: list[list[dict]], seeds: Sequence[int], sampling: SamplingParams,
              chain_of_thought: bool) -> list[float | None]:
    """P(A) for each comparison conversation (None: unreadable). With ``chain_of_thought`` the judge first writes
    its reasoning (sampled with ``sampling`` and ``seeds``) and is then asked for its final choice."""
    if not questions:
        return []
    if chain_of_thought:
        reasons = judge.chat(questions, sampling, seeds)
        questions = [c + [{"role": "assistant", "content": clean_reply(r, sampling.stop, preamble=False)},
                          {"role": "user", "content": FINAL_REQUEST}] for c, r in zip(questions, reasons)]
    return [option_probability(lp) for lp in judge.option_logprobs(questions, ("A", "B"))]


def label_pairs(policy: ChatLM, judge: ChatLM, prompts: Sequence[tuple[str, object]], constitution: Constitution,
                log: JsonlLog, *, sampling: SamplingParams = SamplingParams(), judge_sampling: SamplingParams | None = None,
                seed: int = 0, principles_per_pair: int = 1, chain_of_thought: bool = False, tie_margin: float = 0.0,
                batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> LabelStats:
    """RL-CAI labels over ``prompts`` (see the module docstring), one record per prompt appended to ``log``.

    A record: ``{"id", "prompt", "a", "b", "status"}`` with status ``kept``, ``identical``, ``tie`` or
    ``unparsed``; a kept or tied record also has ``p_a`` (probability that ``a`` is better) and the provenance
    ``principles`` (ids used), ``p_ab``/``p_ba`` (P(A) in each order, per principle), ``agreed`` (per principle:
    both orders named the same winner) and ``judge``."""
    stops = tuple(dict.fromkeys((*sampling.stop, *constitution.stop, *TURN_MARKERS)))
    sampling = replace(sampling, stop=stops)
    judge_sampling = replace(judge_sampling or sampling, stop=stops)
    k = min(principles_per_pair, len(constitution.principles))
    stats = LabelStats(pairs=len(prompts))

    def make(batch):
        convs = [_user(p) for _, p in batch]
        a = [clean_reply(t, stops, preamble=False) for t in
             policy.chat(convs, sampling, [stable_seed(seed, pid, "a") for pid, _ in batch])]
        b = [clean_reply(t, stops, preamble=False) for t in
             policy.chat(convs, sampling, [stable_seed(seed, pid, "b") for pid, _ in batch])]
        records = [{"id": pid, "prompt": p, "a": x, "b": y} for (pid, p), x, y in zip(batch, a, b)]
        asks = []  # (record index, principle id, order, conversation)
        for i, ((pid, p), rec) in enumerate(zip(batch, records)):
            if rec["a"] == rec["b"]:
                rec["status"] = "identical"
                continue
            for pr in draw_principles(constitution.ids, seed, pid, k, replace_=False):
                q = constitution.principle(pr).comparison_question
                asks.append((i, pr, "ab", comparison(constitution, p, q, rec["a"], rec["b"], chain_of_thought)))
                asks.append((i, pr, "ba", comparison(constitution, p, q, rec["b"], rec["a"], chain_of_thought)))
        seeds = [stable_seed(seed, batch[i][0], pr, order, "reasoning") for i, pr, order, _ in asks]
        probs = ask_judge(judge, [c for *_, c in asks], seeds, judge_sampling, chain_of_thought)
        stats.questions += len(asks)
        stats.parse_failures += sum(p is None for p in probs)
        got: dict[int, dict[str, dict[str, float | None]]] = {}
        for (i, pr, order, _), prob in zip(asks, probs):
            got.setdefault(i, {}).setdefault(pr, {})[order] = prob
        for i, per in got.items():
            ids = list(per)
            lab = pair_label([per[j]["ab"] for j in ids], [per[j]["ba"] for j in ids], clamp=chain_of_thought)
            rec = records[i]
            if lab["p"] is None:
                rec.update(status="unparsed", principles=ids)
                continue
            rec.update(p_a=lab["p"], principles=[ids[j] for j in lab["used"]], p_ab=lab["p_ab"], p_ba=lab["p_ba"],
                       agreed=lab["agreed"], judge=judge.name, chain_of_thought=chain_of_thought)
            rec["status"] = "tie" if abs(lab["p"] - 0.5) <= tie_margin else "kept"
        return records

    stats.resumed, stats.written = run_resumable(log, prompts, batch_size, make, on_batch)
    return stats


def preference_rows(records: list[dict]) -> list[dict]:
    """Kept records in alignkit's preference format (``prompt``/``chosen``/``rejected`` as messages) with
    ``soft_label`` = the probability that ``chosen`` is the better answer (> 1/2), and the provenance:
    ``principles``, ``judge``, ``p_chosen_first``/``p_chosen_second`` (per principle, the probability that the
    chosen answer is better when shown as (A) and when shown as (B)), ``agreed``."""
    rows = []
    for r in records:
        if r.get("status") != "kept":
            continue
        a_wins = r["p_a"] > 0.5
        chosen, rejected = (r["a"], r["b"]) if a_wins else (r["b"], r["a"])
        first = r["p_ab"] if a_wins else r["p_ba"]  # P(chosen better | chosen shown as (A))
        second = [1 - x for x in (r["p_ba"] if a_wins else r["p_ab"])]  # ... | chosen shown as (B)
        rows.append({
            "prompt": _user(r["prompt"]),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "soft_label": r["p_a"] if a_wins else 1 - r["p_a"],
            "id": r["id"], "principles": r["principles"], "judge": r["judge"],
            "p_chosen_first": first, "p_chosen_second": second, "agreed": r["agreed"],
            "chain_of_thought": r.get("chain_of_thought", False),
        })
    return rows
