"""The loop's claims on a tabular problem, through the same store, crowd, filter and export as the loop, with a
Bradley-Terry fit over the responses standing in for the reward model (fast and exact, so the comparisons are
about the data path, not about training noise): votes from a hidden utility with noise and adversaries; dropping
low-agreement annotators raises the fitted model's accuracy; showing the pairs the current fit is least sure of
reaches a target accuracy with fewer votes than a random order. The language-model version of each claim is
``scripts/feedback_demo.py`` (README)."""

import itertools
import math
import random

import numpy as np

from alignkit.feedback.crowd import SimulatedCrowd
from alignkit.feedback.export import export_rows
from alignkit.feedback.ratings import bradley_terry
from alignkit.feedback.store import SQLiteStore

N = 30  # responses, each with a hidden utility


def utilities(seed):
    rng = np.random.default_rng(seed)
    return {f"r{i}": float(u) for i, u in enumerate(rng.normal(0, 1, N))}


def setup(tmp_path, seed, pairs, **crowd):
    u = utilities(seed)
    store = SQLiteStore(tmp_path / f"fb{seed}.sqlite", seed=seed)
    store.create_project("p", "pairwise", overlap=crowd.pop("overlap", 3), gold_rate=0.0)
    store.add_items("p", [{"prompt": "which is better?", "responses": [a, b]} for a, b in pairs])
    sim = SimulatedCrowd(store, "p", lambda p, texts, c=None: [u[t] for t in texts], seed=seed, **crowd)
    return store, sim, u


def fit(rows):
    """Bradley-Terry strengths of the responses from exported pairs (soft labels as weights)."""
    battles = [b for r in rows for b in ({"model_a": r["chosen"], "model_b": r["rejected"], "winner": "a",
                                          "weight": r["soft_label"]},
                                         {"model_a": r["chosen"], "model_b": r["rejected"], "winner": "b",
                                          "weight": 1 - r["soft_label"]}) if b["weight"] > 0]
    return bradley_terry(battles, reg=1e-2) if battles else {}


def accuracy(ratings, u):
    """Share of all response pairs the fit orders as the hidden utility does (an unrated response: 1000)."""
    pairs = list(itertools.combinations(u, 2))
    return sum((ratings.get(a, 1000.0) - ratings.get(b, 1000.0)) * (u[a] - u[b]) > 0 for a, b in pairs) / len(pairs)


def test_dropping_low_agreement_annotators_raises_accuracy(tmp_path):
    gains = []
    for seed in range(3):
        rng = random.Random(seed)
        pairs = [tuple(rng.sample(sorted(utilities(seed)), 2)) for _ in range(120)]
        store, sim, u = setup(tmp_path, seed, pairs, n=8, adversarial=0.25, temperature=0.3)
        sim.collect()
        kept = accuracy(fit(export_rows(store, "p", "pairs")), u)
        dropped = accuracy(fit(export_rows(store, "p", "pairs", min_annotator_agreement=0.5)), u)
        gains.append(dropped - kept)
    assert min(gains) > 0.02 and np.mean(gains) > 0.04, gains


def votes_to_reach(tmp_path, seed, selection, target, batch=15, rounds=12):
    rng = random.Random(seed)
    pool = list(itertools.combinations(sorted(utilities(seed)), 2))
    rng.shuffle(pool)
    store, sim, u = setup(tmp_path / selection, seed, pool, n=4, temperature=0.3, overlap=1)
    items = store.items("p")
    for r in range(rounds):
        ratings = fit(export_rows(store, "p", "pairs"))
        if accuracy(ratings, u) >= target:
            return len(store.votes("p"))
        if selection == "uncertain" and ratings:
            prio = {}
            for it in items:
                a, b = (x["text"] for x in it["responses"])
                d = (ratings.get(a, 1000.0) - ratings.get(b, 1000.0)) * math.log(10) / 400
                prio[it["id"]] = -abs(1 / (1 + math.exp(-d)) - 0.5) - 1e-6 * rng.random()
        else:
            prio = {it["id"]: rng.random() for it in items}
        store.set_priority(prio)
        sim.collect(batch)
    return math.inf


def test_active_selection_needs_fewer_votes_than_uniform(tmp_path):
    uniform = [votes_to_reach(tmp_path / str(s), s, "uniform", 0.85) for s in range(3)]
    active = [votes_to_reach(tmp_path / str(s), s, "uncertain", 0.85) for s in range(3)]
    assert sum(active) < sum(uniform) and all(a <= u for a, u in zip(active, uniform)), (active, uniform)
