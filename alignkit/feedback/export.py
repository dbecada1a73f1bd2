"""Votes to training data, with provenance and the agreement filters.

Formats (:data:`FORMATS`), each row carrying ``item``, ``external_id``, ``annotators``, ``votes`` and ``agreement``:

- ``pairs``: alignkit's (and TRL's) preference rows ``prompt``/``chosen``/``rejected`` with ``soft_label`` = the
  share of the item's judgements that prefer ``chosen`` (a tie counts half to each side). Pairwise and arena items
  give one pair; ranking items give every two responses the annotators ordered (each annotator's ranking counts
  once for each of its K(K-1)/2 ordered pairs). Pairs the annotators split evenly, and "both bad" votes, give none;
- ``rankings``: alignkit's ranking rows ``prompt``/``responses``/``ranking`` (1 = best), one per ranking vote;
- ``kto``: ``prompt``/``completion``/``label`` from thumbs votes, one per item, by majority (split items dropped);
- ``sft``: ``prompt``/``completion`` from the corrections written with a thumbs down, one per correction;
- ``votes``: every vote as stored (answers in the items' own order), for audits.

Filters (:func:`export_rows`): annotators whose agreement with the others' consensus, or whose accuracy on the gold
items, is under a threshold are dropped with all their votes; then items whose judgements agree less than a
threshold. Gold items are left out of training data unless ``include_gold`` is set.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

import numpy as np

from alignkit.feedback import agreement
from alignkit.feedback.store import FeedbackError, SQLiteStore

FORMATS = ("pairs", "rankings", "kto", "sft", "votes")
PAIR_LABEL = {"a": 0, "b": 1, "tie": 2, "both_bad": 3}


def judgements(item: dict, kind: str, answer: dict) -> dict[tuple, float]:
    """One vote as units and labels for the agreement metrics: pairwise/arena -> ``{(item,): 0 a | 1 b | 2 tie |
    3 both bad}``; ranking -> ``{(item, i, j): 1 if i is ranked above j else 0}`` for every i < j; thumbs ->
    ``{(item,): 1 up | 0 down}``."""
    if kind in ("pairwise", "arena"):
        return {(item["id"],): PAIR_LABEL[answer["choice"]]}
    if kind == "ranking":
        pos = {r: p for p, r in enumerate(answer["ranking"])}
        return {(item["id"], i, j): float(pos[i] < pos[j]) for i, j in combinations(range(len(pos)), 2)}
    return {(item["id"],): float(answer["thumb"] == "up")}


def rating_matrix(store: SQLiteStore, project: str) -> dict:
    """The project's votes as an (annotators x units) matrix with nan where an annotator did not judge a unit,
    the gold labels per unit (nan where none), and the names of the rows and columns."""
    p = store.project(project)
    items = {it["id"]: it for it in store.items(project)}
    cells: dict[tuple[str, tuple], float] = {}
    gold: dict[tuple, float] = {}
    for v in store.votes(project):
        item = items[v["item"]]
        for unit, label in judgements(item, p["kind"], v["answer"]).items():
            cells[(v["annotator"], unit)] = label
        if item["gold"] is not None:
            gold.update(judgements(item, p["kind"], _gold_answer(p["kind"], item["gold"])))
    names = sorted({a for a, _ in cells})
    units = sorted({u for _, u in cells})
    row, col = {a: i for i, a in enumerate(names)}, {u: j for j, u in enumerate(units)}
    matrix = np.full((len(names), len(units)), np.nan)
    for (a, u), label in cells.items():
        matrix[row[a], col[u]] = label
    return {"annotators": names, "units": units, "ratings": matrix,
            "gold": np.array([gold.get(u, np.nan) for u in units]), "items": items, "kind": p["kind"]}


def _gold_answer(kind: str, gold) -> dict:
    return {"choice": gold} if kind in ("pairwise", "arena") else {"ranking": gold} if kind == "ranking" else {"thumb": gold}


def kept_votes(store: SQLiteStore, project: str, *, min_annotator_agreement: float | None = None,
               gold_min_accuracy: float | None = None, min_item_agreement: float | None = None) -> tuple[list[dict], dict]:
    """The votes that pass the filters, and what was dropped and why."""
    votes = store.votes(project)
    if min_annotator_agreement is None and gold_min_accuracy is None and min_item_agreement is None:
        return votes, {"annotators": [], "items": []}
    m = rating_matrix(store, project)
    if not m["annotators"]:
        return votes, {"annotators": [], "items": []}
    keep_a, keep_u, reasons = agreement.filter_ratings(
        m["ratings"], min_item_agreement=min_item_agreement, min_annotator_agreement=min_annotator_agreement,
        gold_min_accuracy=gold_min_accuracy, gold=m["gold"])
    dropped_annotators = {a for a, k in zip(m["annotators"], keep_a) if not k}
    dropped_items = {u[0] for u, k in zip(m["units"], keep_u) if not k}
    kept = [v for v in votes if v["annotator"] not in dropped_annotators and v["item"] not in dropped_items]
    return kept, {"annotators": sorted(dropped_annotators), "items": sorted(dropped_items), "reasons": reasons}


def export_rows(store: SQLiteStore, project: str, fmt: str = "pairs", *, include_gold: bool = False,
                **filters) -> list[dict]:
    """Rows of ``fmt`` (see the module's docstring) from the votes that pass ``filters`` (:func:`kept_votes`)."""
    if fmt not in FORMATS:
        raise FeedbackError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    kind = store.project(project)["kind"]
    items = {it["id"]: it for it in store.items(project)}
    votes, _ = kept_votes(store, project, **filters)
    if not include_gold:
        votes = [v for v in votes if items[v["item"]]["gold"] is None]
    by_item: dict[int, list[dict]] = defaultdict(list)
    for v in votes:
        by_item[v["item"]].append(v)
    if fmt == "votes":
        return [{**v, "prompt": items[v["item"]]["prompt"]} for v in votes]
    wants = {"pairs": ("pairwise", "arena", "ranking"), "rankings": ("ranking",), "kto": ("thumbs",), "sft": ("thumbs",)}
    if kind not in wants[fmt]:
        raise FeedbackError(f"format {fmt} needs a {' or '.join(wants[fmt])} project; {project!r} is {kind}")
    rows = []
    for item_id, vs in by_item.items():
        item = items[item_id]
        base = {"prompt": item["prompt"]}
        prov = {"item": item_id, "external_id": item["external_id"], "annotators": [v["annotator"] for v in vs]}
        if fmt == "pairs":
            rows += _pairs(item, kind, vs, base, prov)
        elif fmt == "rankings":
            for v in vs:
                ranks = [0] * len(item["responses"])
                for place, r in enumerate(v["answer"]["ranking"]):
                    ranks[r] = place + 1
                rows.append({**base, "responses": [r["text"] for r in item["responses"]], "ranking": ranks,
                             **prov, "annotators": [v["annotator"]], "vote": v["vote"]})
        elif fmt == "kto":
            ups = Counter(v["answer"]["thumb"] for v in vs)
            if ups["up"] == ups["down"]:
                continue
            label = ups["up"] > ups["down"]
            rows.append({**base, "completion": _as_reply(base["prompt"], item["responses"][0]["text"]), "label": label, **prov,
                         "votes": dict(ups), "agreement": max(ups.values()) / len(vs)})
        else:
            rows += [{**base, "completion": _as_reply(base["prompt"], v["answer"]["correction"]), **prov, "annotators": [v["annotator"]],
                      "vote": v["vote"], "corrects": item["responses"][0]["text"]}
                     for v in vs if v["answer"]["thumb"] == "down" and v["answer"].get("correction")]
    return rows


def _pairs(item: dict, kind: str, votes: list[dict], base: dict, prov: dict) -> list[dict]:
    """Aggregate the item's judgements into one row per pair of responses the annotators did not split evenly."""
    wins: dict[tuple[int, int], Counter] = defaultdict(Counter)  # (i, j), i < j -> {"i": n, "j": n, "tie": n}
    for v in votes:
        if kind == "ranking":
            pos = {r: p for p, r in enumerate(v["answer"]["ranking"])}
            for i, j in combinations(range(len(pos)), 2):
                wins[(i, j)]["i" if pos[i] < pos[j] else "j"] += 1
        else:
            c = v["answer"]["choice"]
            wins[(0, 1)][{"a": "i", "b": "j", "tie": "tie", "both_bad": "both_bad"}[c]] += 1
    rows = []
    for (i, j), n in sorted(wins.items()):
        judged = n["i"] + n["j"] + n["tie"]
        if n["i"] == n["j"] or judged == 0:
            continue
        c, r = (i, j) if n["i"] > n["j"] else (j, i)
        share = (max(n["i"], n["j"]) + n["tie"] / 2) / judged
        resp = item["responses"]
        rows.append({**base, "chosen": _as_reply(base["prompt"], resp[c]["text"]),
                     "rejected": _as_reply(base["prompt"], resp[r]["text"]), "soft_label": share, **prov,
                     "chosen_model": resp[c]["model"], "rejected_model": resp[r]["model"],
                     "votes": {"chosen": max(n["i"], n["j"]), "rejected": min(n["i"], n["j"]), "tie": n["tie"],
                               "both_bad": n["both_bad"]},
                     "agreement": max(n["i"], n["j"], n["tie"]) / (judged + n["both_bad"])})
    return rows


def _as_reply(prompt, text: str):
    """A response in the prompt's form: text after a text prompt, an assistant turn after chat messages (as
    alignkit's loader and TRL's conversational format both expect)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def battles(store: SQLiteStore, project: str, votes: list[dict] | None = None) -> list[dict]:
    """Pairwise and arena votes between two named models as battles for the Bradley-Terry ratings."""
    kind = store.project(project)["kind"]
    if kind not in ("pairwise", "arena"):
        return []
    items = {it["id"]: it for it in store.items(project)}
    out = []
    for v in store.votes(project) if votes is None else votes:
        a, b = (r["model"] for r in items[v["item"]]["responses"])
        if a and b and a != b:
            out.append({"model_a": a, "model_b": b, "winner": v["answer"]["choice"]})
    return out
