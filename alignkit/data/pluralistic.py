"""A synthetic pluralistic preference set for GDPO (``alignkit data fetch pluralistic``).

GDPO (arXiv:2412.20299) trains a model to state a belief before it answers and calibrates the model's distribution
over a question's beliefs to the group's. Real opinion data needs a download and its stances cannot be checked
by a rule, so this set is generated: pure Python, seeded, no network, the same rows on every machine.

- Issues and questions: an issue is a stance family (``FAMILIES``: a set of 2 to 5 stances, support/oppose/
  undecided, a rating scale, ...) on a topic (``TOPICS``), with one group's shares; the number of stances cycles
  2, 3, 4, 5 over the issues (then shuffled), so each size holds about a quarter. A question is the topic put into
  one of the family's two wordings; held-out questions are the second wording of issues trained on in the first
  (:func:`build`), so the group's shares of a held-out question can be learned, and not as a string.
- Target shares (one draw per issue): drawn from a symmetric Dirichlet, redrawn until the largest share lies in
  [``MAJORITY_MIN``, ``MAJORITY_MAX``] and every share is at least ``MIN_SHARE`` (a share rounded to 0 would be a
  stance no annotator holds); rounded to 3 decimals, the largest adjusted so they sum to exactly 1. The stances
  of each question are shuffled, so the majority is not always listed first.
- Responses: each stance has keywords (whole words, none shared within a family, none a negation of another
  stance) and three one-sentence templates that name the topic and carry a keyword. :func:`stance_of` reads a
  response's stance back by that rule; every generated response is checked to read as its own stance only.
- Annotators: each of a question's annotators draws a belief from the target shares and gives one pair: chosen,
  a template of that belief; rejected, a template of another stance drawn uniformly (``rejected_belief``).
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.beliefs import DEFAULT_TEMPLATE, render_belief

NAME = "pluralistic"
VERSION = 3  # bump when the generator changes, so that a cached copy is rebuilt
MAJORITY_MIN, MAJORITY_MAX = 0.45, 0.75
MIN_SHARE = 0.02
FILES = ("train.jsonl", "test.jsonl", "pooled_train.jsonl", "pooled_soft_train.jsonl", "sft_train.jsonl")


@dataclass(frozen=True)
class Stance:
    """One belief of a family: its name (rendered as ``Belief: <name>``), keywords and response templates."""

    name: str
    keywords: tuple[str, ...]
    responses: tuple[str, ...]  # each holds ``{topic}`` once


@dataclass(frozen=True)
class Family:
    """Stances that answer the same questions; ``questions`` are templates holding ``{topic}``."""

    name: str
    questions: tuple[str, ...]
    stances: tuple[Stance, ...]


def _family(name: str, questions: tuple[str, ...], stances: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> Family:
    return Family(name, questions, tuple(Stance(n, kw, rs) for n, (kw, rs) in stances.items()))


TOPICS = (
    "remote work", "nuclear power", "electric cars", "school uniforms", "social media", "online classes",
    "bike lanes", "video games", "fast food", "public transport", "space travel", "self-driving cars",
    "homework", "wind farms", "plastic bags", "zoos", "organic farming", "city parks", "street art",
    "daylight saving time", "online shopping", "lab-grown meat", "tiny houses", "robot helpers",
    "year-round school", "free museums", "car-free city centres", "solar panels", "streaming services",
    "shorter work weeks",
)

FAMILIES = (
    _family("agreement", ("Do you agree or disagree with {topic}?", "Agree or disagree: the world needs more {topic}."), {
        "agree": (("agree", "convinced"), (
            "I agree with {topic}, because the benefits are clear and easy to see.",
            "I agree that {topic} makes daily life easier for most people.",
            "I am convinced that {topic} is worth it, so I agree with it.")),
        "disagree": (("disagree", "unconvinced"), (
            "I disagree with {topic}, because the costs are bigger than the benefits.",
            "I disagree that {topic} makes daily life easier for most people.",
            "I am unconvinced that {topic} is worth it, so I disagree with it.")),
    }),
    _family("good-bad", ("Is the effect of {topic} on society good or bad?",
                         "For ordinary families, is the rise of {topic} good or bad?"), {
        "good": (("good", "positive"), (
            "The effect of {topic} is good, because it gives people more choice.",
            "I see {topic} as a positive change that helps many families.",
            "Overall, {topic} is good for society and brings real benefits.")),
        "bad": (("bad", "negative"), (
            "The effect of {topic} is bad, because it costs people too much.",
            "I see {topic} as a negative change that hurts many families.",
            "Overall, {topic} is bad for society and brings real harm.")),
    }),
    _family("support", ("What is your view on {topic}?", "Do you support or oppose {topic}?"), {
        "support": (("support", "favour"), (
            "I support {topic}, since it helps people more than it costs.",
            "I am in favour of {topic} because it makes life better for many.",
            "I strongly support {topic} and would vote for it tomorrow.")),
        "oppose": (("oppose", "against"), (
            "I oppose {topic}, since it costs people more than it helps.",
            "I am against {topic} because it makes life harder for many.",
            "I strongly oppose {topic} and would vote against it tomorrow.")),
        "undecided": (("undecided", "unsure"), (
            "I am undecided about {topic}, as there are fair points on both sides.",
            "I am unsure about {topic} and want to learn more first.",
            "I remain undecided on {topic} until I see more evidence.")),
    }),
    _family("outlook", ("How do you feel about the future of {topic}?",
                        "What is your outlook for {topic} over the next ten years?"), {
        "optimistic": (("optimistic", "hopeful"), (
            "I am optimistic about {topic}, and I expect it to keep getting better.",
            "I feel hopeful that {topic} will improve life in the coming years.",
            "I am optimistic, since {topic} keeps improving every single year.")),
        "pessimistic": (("pessimistic", "worried"), (
            "I am pessimistic about {topic}, and I expect it to keep getting worse.",
            "I feel worried that {topic} will make life harder in the coming years.",
            "I am pessimistic, since {topic} keeps causing new problems every year.")),
        "neutral": (("neutral", "balanced"), (
            "I am neutral about {topic}, because it may get better or worse.",
            "My view of {topic} is balanced, with gains and losses in equal measure.",
            "I stay neutral on {topic} because its future is hard to predict.")),
    }),
    _family("importance", ("How important to you is the question of {topic}?",
                           "In your life, how much weight do you give to {topic}?"), {
        "essential": (("essential", "vital"), (
            "To me, {topic} is essential, and I could not do without it.",
            "I think {topic} is vital and deserves a lot of attention.",
            "For me, {topic} is an essential part of everyday life.")),
        "useful": (("useful", "helpful"), (
            "To me, {topic} is useful, though I could live without it.",
            "I think {topic} is helpful and deserves some of our attention.",
            "For me, {topic} is a useful part of life, but not the main one.")),
        "minor": (("minor", "small"), (
            "To me, {topic} is a minor issue that rarely comes up at all.",
            "I think {topic} matters only a small amount in my life.",
            "For me, {topic} is a minor concern compared with other things.")),
        "pointless": (("pointless", "useless"), (
            "To me, {topic} is pointless, and it adds nothing to my life.",
            "I think {topic} is useless and deserves no attention at all.",
            "For me, {topic} is a pointless subject that wastes my time.")),
    }),
    _family("decider", ("Who should decide on {topic}?", "Who should make the rules for {topic}?"), {
        "government": (("government", "national"), (
            "The national government should decide on {topic}, so the rules are the same everywhere.",
            "Decisions about {topic} belong to the government, which answers to all voters.",
            "I think the government should set the rules for {topic}.")),
        "local council": (("council", "local"), (
            "The local council should decide on {topic}, since needs differ from town to town.",
            "Decisions about {topic} belong to each council, which knows its own area.",
            "I think local leaders should set the rules for {topic}.")),
        "individuals": (("individuals", "personal"), (
            "Individuals should decide on {topic} for themselves, as it is a personal choice.",
            "Decisions about {topic} belong to individuals, who know their own lives best.",
            "I think {topic} is a personal matter that each person should settle.")),
        "experts": (("experts", "scientists"), (
            "Experts should decide on {topic}, since they understand the facts best.",
            "Decisions about {topic} belong to experts who have studied it closely.",
            "I think scientists should set the rules for {topic}, based on evidence.")),
    }),
    _family("rating", ("How would you rate {topic}?", "What grade would you give {topic}?"), {
        "excellent": (("excellent", "superb"), (
            "I would rate {topic} as excellent, since it does its job extremely well.",
            "My rating for {topic} is superb, with almost nothing to fix.",
            "I find {topic} excellent and would recommend it to anyone.")),
        "good": (("good", "decent"), (
            "I would rate {topic} as good, since it does its job well enough.",
            "My rating for {topic} is decent, with a few things to fix.",
            "I find {topic} good and would recommend it to most people.")),
        "fair": (("fair", "average"), (
            "I would rate {topic} as fair, since it does its job only sometimes.",
            "My rating for {topic} is average, with several things to fix.",
            "I find {topic} fair at best and would recommend it with care.")),
        "poor": (("poor", "weak"), (
            "I would rate {topic} as poor, since it rarely does its job.",
            "My rating for {topic} is weak, with many things to fix.",
            "I find {topic} poor and would hardly recommend it to anyone.")),
        "terrible": (("terrible", "awful"), (
            "I would rate {topic} as terrible, since it fails at its job.",
            "My rating for {topic} is awful, with almost everything to fix.",
            "I find {topic} terrible and would warn people away from it.")),
    }),
    _family("policy", ("What should the government do about {topic}?", "What policy on {topic} would you choose?"), {
        "ban": (("ban", "forbid"), (
            "The government should ban {topic}, and it is best to forbid it outright.",
            "I would ban {topic}, because the harm is too great to accept.",
            "A full ban on {topic} is the right policy for the whole country.")),
        "restrict": (("restrict", "limit"), (
            "The government should restrict {topic} with clear rules and a firm limit.",
            "I would restrict {topic}, because some use is fine but too much does harm.",
            "A strict limit on {topic} is the right policy for the whole country.")),
        "allow": (("allow", "permit"), (
            "The government should allow {topic} and let people choose freely.",
            "I would allow {topic}, because adults can decide for themselves.",
            "A rule to permit {topic} without fuss is the right policy for the country.")),
        "encourage": (("encourage", "promote"), (
            "The government should encourage {topic} with public campaigns and advice.",
            "I would encourage {topic}, because more of it would help everyone.",
            "A plan to promote {topic} is the right policy for the whole country.")),
        "fund": (("fund", "subsidise"), (
            "The government should fund {topic} with tax money every year.",
            "I would fund {topic}, because it deserves a share of public money.",
            "A plan to subsidise {topic} for every family is the right policy.")),
    }),
)


# ------------------------------------------------------------------------------------------ keyword rule


def _mentions(text: str, keyword: str) -> bool:
    return re.search(rf"\b{re.escape(keyword)}\b", text, re.IGNORECASE) is not None


def stance_of(text: str, keywords: dict[str, list[str]]) -> str | None:
    """The one stance whose keywords occur in ``text`` as whole words (case-insensitive); None when no stance's
    or several stances' keywords occur."""
    found = [name for name, words in keywords.items() if any(_mentions(text, w) for w in words)]
    return found[0] if len(found) == 1 else None


def consistent(text: str, belief: str, keywords: dict[str, list[str]]) -> bool:
    """Whether ``text`` takes stance ``belief`` and no other, by :func:`stance_of`."""
    return stance_of(text, keywords) == belief


# ------------------------------------------------------------------------------------------ generator


def target_shares(rng: random.Random, k: int, concentration: float) -> list[float]:
    """``k`` shares from a symmetric Dirichlet, redrawn until the majority lies in [MAJORITY_MIN, MAJORITY_MAX]
    and none is under MIN_SHARE; in thousandths, the largest adjusted so that they sum to exactly 1."""
    while True:
        draws = [rng.gammavariate(concentration, 1.0) for _ in range(k)]
        milli = [round(1000 * d / sum(draws)) for d in draws]
        top = milli.index(max(milli))
        milli[top] += 1000 - sum(milli)
        if MAJORITY_MIN <= milli[top] / 1000 <= MAJORITY_MAX and min(milli) >= 1000 * MIN_SHARE:
            return [m / 1000 for m in milli]


def _issues(rng: random.Random, n: int) -> list[tuple[Family, str]]:
    """``n`` distinct issues (family, topic), the number of stances cycling 2..5, shuffled."""
    sizes = sorted({len(f.stances) for f in FAMILIES})
    pools = {k: [(f, t) for f in FAMILIES if len(f.stances) == k for t in TOPICS] for k in sizes}
    for pool in pools.values():
        rng.shuffle(pool)
    order = [sizes[i % len(sizes)] for i in range(n)]
    rng.shuffle(order)
    need = Counter(order)
    if any(need[k] > len(pools[k]) for k in sizes):
        raise ValueError(f"{n} issues is more than the families and topics give ({sum(map(len, pools.values()))})")
    return [pools[k].pop() for k in order]


def _issue(rng: random.Random, family: Family, topic: str, concentration: float) -> dict:
    """An issue's group: its stances in a shuffled order, their target shares and keywords."""
    stances = list(family.stances)
    rng.shuffle(stances)
    return {"family": family, "topic": topic, "stances": stances,
            "shares": target_shares(rng, len(stances), concentration)}


def _question_row(rng: random.Random, qid: str, issue: dict, question: str, annotators: int) -> dict:
    """One belief row: a wording of the issue, its group's shares, keywords and the annotators' pairs."""
    stances, shares, topic = issue["stances"], issue["shares"], issue["topic"]
    keywords = {s.name: list(s.keywords) for s in stances}
    pairs = []
    for _ in range(annotators):
        own = rng.choices(stances, weights=shares)[0]
        other = rng.choice([s for s in stances if s is not own])
        pair = {"belief": own.name, "chosen": rng.choice(own.responses).format(topic=topic),
                "rejected": rng.choice(other.responses).format(topic=topic), "rejected_belief": other.name}
        assert consistent(pair["chosen"], own.name, keywords), pair
        assert consistent(pair["rejected"], other.name, keywords), pair
        pairs.append(pair)
    return {"id": qid, "prompt": question.format(topic=topic), "beliefs": dict(zip(keywords, shares)), "keywords": keywords,
            "pairs": pairs}


def check_templates() -> None:
    """Every response template, with every topic, reads as its own stance only (raises AssertionError if not)."""
    for family in FAMILIES:
        keywords = {s.name: list(s.keywords) for s in family.stances}
        for stance in family.stances:
            for template in stance.responses:
                for topic in TOPICS:
                    text = template.format(topic=topic)
                    assert consistent(text, stance.name, keywords), (family.name, text)


def build(n_issues: int = 150, n_test: int = 60, annotators: int = 6, seed: int = 0,
          concentration: float = 1.0) -> dict[str, list[dict]]:
    """The rows of every file: ``train``, ``test`` (belief rows), ``pooled_train`` (preference rows) and
    ``sft_train`` (messages rows), keyed by file stem. The same arguments give the same rows.

    Each issue (a family's stances on a topic, with one group's shares) is asked in both of its family's wordings:
    2 * ``n_issues`` questions. The held-out questions are the second wording of ``n_test`` issues whose first
    wording is trained on; every other question is trained on. A group's view belongs to the issue, not to a
    string, so held-out calibration shows that the model learned the group's shares, not a prompt's."""
    if annotators < 1 or n_issues < 1 or not 1 <= n_test <= n_issues or concentration <= 0:
        raise ValueError("n_issues and annotators must be >= 1, n_test in [1, n_issues], concentration > 0")
    check_templates()
    rng = random.Random(seed)
    issues = [_issue(rng, family, topic, concentration) for family, topic in _issues(rng, n_issues)]
    train_q = [(issue, issue["family"].questions[0]) for issue in issues]
    train_q += [(issue, issue["family"].questions[1]) for issue in issues[n_test:]]
    test_q = [(issue, issue["family"].questions[1]) for issue in issues[:n_test]]
    rng.shuffle(train_q)
    rows = [_question_row(rng, f"q{i + 1:04d}", issue, question, annotators)
            for i, (issue, question) in enumerate(train_q + test_q)]
    train, test = rows[:len(train_q)], rows[len(train_q):]
    pooled, sft = [], []
    for row in train:
        user = [{"role": "user", "content": row["prompt"]}]
        for p in row["pairs"]:
            own = render_belief(DEFAULT_TEMPLATE, p["belief"]) + p["chosen"]
            other = render_belief(DEFAULT_TEMPLATE, p["rejected_belief"]) + p["rejected"]
            pooled.append({"prompt": user, "chosen": [{"role": "assistant", "content": own}],
                           "rejected": [{"role": "assistant", "content": other}], "id": row["id"]})
            sft.append({"messages": [*user, {"role": "assistant", "content": own}], "id": row["id"]})
    return {"train": train, "test": test, "pooled_train": pooled, "pooled_soft_train": _pooled_soft(rng, train),
            "sft_train": sft}


def _pooled_soft(rng: random.Random, train: list[dict]) -> list[dict]:
    """The group's pooled preference itself, without the annotators' sampling noise: for every two stances a, b of
    a train question (share p_a >= p_b), one pair (a's answer over b's, each after its belief line) with
    ``soft_label = p_a / (p_a + p_b)``, the Bradley-Terry probability that the group prefers a to b. DPO's
    expected loss over annotators who hold a or b is this pair's soft-label loss, so the optimum is the same as on
    ``pooled_train`` (pi(a) / pi(b) = pi_ref(a) / pi_ref(b) * (p_a / p_b)^(1 / beta)) and it is reached in far
    fewer steps: each pair pushes one way instead of annotators pushing both ways."""
    families = {frozenset(st.name for st in f.stances): f for f in FAMILIES}
    user = lambda row: [{"role": "user", "content": row["prompt"]}]  # noqa: E731
    rows = []
    for row in train:
        topic = next(t for t in TOPICS if t in row["prompt"])
        by_name = {st.name: st for st in families[frozenset(row["beliefs"])].stances}
        ranked = sorted(row["beliefs"].items(), key=lambda kv: -kv[1])
        for i, (a, pa) in enumerate(ranked):
            for b, pb in ranked[i + 1:]:
                turn = lambda name: [{"role": "assistant", "content": render_belief(  # noqa: E731
                    DEFAULT_TEMPLATE, name) + rng.choice(by_name[name].responses).format(topic=topic)}]
                rows.append({"prompt": user(row), "chosen": turn(a), "rejected": turn(b),
                             "soft_label": round(pa / (pa + pb), 6), "id": row["id"]})
    return rows


def summary(rows: dict[str, list[dict]]) -> dict:
    """Statistics for the card: questions per number of stances, mean majority share, pairs per split, and how
    far the annotators' belief frequencies fall from the targets (mean absolute error over question x stance)."""
    out: dict = {}
    for split in ("train", "test"):
        part = rows[split]
        errors = [abs(Counter(p["belief"] for p in r["pairs"])[b] / len(r["pairs"]) - share)
                  for r in part for b, share in r["beliefs"].items()]
        out[split] = {
            "questions": len(part),
            "questions_by_stances": {str(k): n for k, n in sorted(Counter(len(r["beliefs"]) for r in part).items())},
            "mean_majority_share": round(sum(max(r["beliefs"].values()) for r in part) / len(part), 4),
            "pairs": sum(len(r["pairs"]) for r in part),
            "annotator_share_mae": round(sum(errors) / len(errors), 4),
        }
    return out


# ------------------------------------------------------------------------------------------ files


def _card(rows: dict[str, list[dict]], params: dict) -> dict:
    n_templates = sum(len(s.responses) for f in FAMILIES for s in f.stances)
    return {
        "name": NAME,
        "version": VERSION,
        "generator": "alignkit.data.pluralistic.build (pure Python, random.Random(seed); no downloads)",
        "parameters": params,
        "issues": f"{params['n_issues']} issues, each a stance family on a topic with one group's shares, asked in "
                  f"both of the family's wordings; held out: the second wording of {params['n_test']} issues whose "
                  "first wording is trained on (the held-out prompts never appear in training, their issues do)",
        "target_shares": f"one draw per issue from a symmetric Dirichlet(concentration={params['concentration']}) "
                         f"over its stances, redrawn until the majority share is in [{MAJORITY_MIN}, {MAJORITY_MAX}] "
                         f"and every share is >= {MIN_SHARE}; rounded to 3 decimals, the largest adjusted to sum to "
                         "1; stances shuffled per issue",
        "stance_families": {f.name: [s.name for s in f.stances] for f in FAMILIES},
        "topics": len(TOPICS),
        "question_templates": sum(len(f.questions) for f in FAMILIES),
        "response_templates": n_templates,
        "annotators": f"{params['annotators']} per question; each draws a belief from the target shares and gives "
                      "one pair: chosen = a random template of that belief, rejected = a random template of "
                      "another stance drawn uniformly (rejected_belief)",
        "keyword_rule": "a text takes stance s when a keyword of s, and of no other stance of the question, occurs "
                        "as a whole word (case-insensitive): alignkit.data.pluralistic.stance_of / consistent; "
                        "every generated response is checked to take its own stance",
        "files": {
            "train.jsonl, test.jsonl": "one row per question, alignkit kind 'belief': id, prompt (the question), "
                                       "beliefs {name: share}, keywords {name: [word, ...]}, pairs [{belief, "
                                       "chosen, rejected, rejected_belief}]",
            "pooled_train.jsonl": "the train pairs as plain DPO pairs (kind 'preference'): prompt [user], chosen / "
                                  "rejected [assistant: 'Belief: <belief>\\n' + response], id (the question)",
            "pooled_soft_train.jsonl": "the group's pooled preference without annotator noise (kind 'preference'): "
                                       "for every two stances a, b of a train question with p_a >= p_b, a's answer "
                                       "over b's (each after its belief line), soft_label = p_a / (p_a + p_b); id",
            "sft_train.jsonl": "one row per train annotation (kind 'sft'): messages [user, assistant: 'Belief: "
                               "<belief>\\n' + chosen], id (the question)",
        },
        "license": "generated by alignkit; same license as alignkit (Apache-2.0)",
        "summary": summary(rows),
    }


def _card_markdown(card: dict) -> str:
    families = "\n".join(f"  - {k}: {', '.join(v)}" for k, v in card["stance_families"].items())
    files = "\n".join(f"- `{k}`: {v}" for k, v in card["files"].items())
    stats = "\n".join(
        f"| {split} | {s['questions']} | {s['questions_by_stances']} | {s['mean_majority_share']} | {s['pairs']} | "
        f"{s['annotator_share_mae']} |" for split, s in card["summary"].items())
    return (
        f"# {NAME}\n\n{__doc__.strip()}\n\n## How it was made\n\n"
        f"- Generator: {card['generator']}; parameters {card['parameters']}\n"
        f"- Target shares: {card['target_shares']}\n"
        f"- {card['topics']} topics, {card['question_templates']} question templates, "
        f"{card['response_templates']} response templates; stance families:\n{families}\n"
        f"- Annotators: {card['annotators']}\n- Keyword rule: {card['keyword_rule']}\n"
        f"- License: {card['license']}\n\n## Files\n\n{files}\n\n## Summary\n\n"
        "| split | questions | questions by number of stances | mean majority share | pairs | "
        "annotator vs target share, mean abs. error |\n|---|---|---|---|---|---|\n" + stats + "\n"
    )


def fetch(force: bool = False) -> Path:
    """Write ``cache_dir()/data/pluralistic/`` (the four JSONL files and the card) with the default parameters;
    a cached copy of the same generator version is returned unless ``force``."""
    from alignkit.paths import cache_dir

    out = cache_dir() / "data" / NAME
    card_path = out / "card.json"
    if not force and card_path.is_file() and json.loads(card_path.read_text()).get("version") == VERSION:
        return out
    params = {k: p.default for k, p in inspect.signature(build).parameters.items()}
    rows = build(**params)
    tmp = out.with_name(f".{NAME}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stem, part in rows.items():
        with open(tmp / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    card = _card(rows, params)
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_card_markdown(card), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
