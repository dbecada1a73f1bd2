"""``alignkit feedback generate``: items for the feedback app, sampled by the rollout engine.

Each prompt of ``data`` gets ``responses`` (K) samples: from one policy, or from two, taking turns (response
``j`` from policy ``j mod 2``), each response named by its policy (``model``) so that the votes rate the
policies too. Prompts whose samples repeat (two identical responses cannot be told apart) or come back empty
are left out and counted. The store shows every annotator the responses in a fresh random order and records it.
"""

from __future__ import annotations

import logging
import math

from alignkit.config import FeedbackItemsConfig
from alignkit.errors import ConfigError
from alignkit.feedback.store import NotFound, SQLiteStore
from alignkit.recipes.sampled import encode, policy, sample, start

log = logging.getLogger("alignkit")
WANT = {"pairwise": (2, 2), "arena": (2, 2), "ranking": (2, 8), "thumbs": (1, 1)}


def run(cfg: FeedbackItemsConfig) -> dict:
    store = SQLiteStore(cfg.store)
    try:
        kind = store.project(cfg.project)["kind"]
    except NotFound:
        raise ConfigError(f"no project {cfg.project!r} in {cfg.store}: create it with `alignkit feedback init`") from None
    lo, hi = WANT[kind]
    if not lo <= cfg.responses <= hi:
        raise ConfigError(f"a {kind} project's items have {lo}-{hi} responses, not responses={cfg.responses}")
    _, examples = start(cfg, scored=False)  # the prompts checked before any model loads
    models = cfg.model_list
    texts: list[list[str]] = [[] for _ in examples]
    for m, name in enumerate(models):
        n = math.ceil((cfg.responses - m) / len(models))  # this policy's share of the K responses
        _, tok, engine = policy(name, cfg)
        for i, g in enumerate(sample(engine, None, encode(examples, tok, cfg), cfg, n, m)):
            texts[i].append([s["text"] for s in g])
        engine.close()
    rows, dropped = [], 0
    for ex, per_model in zip(examples, texts):
        responses = [{"text": per_model[j % len(models)][j // len(models)], "model": models[j % len(models)]}
                     for j in range(cfg.responses)]
        if len({r["text"] for r in responses}) < len(responses) or any(not r["text"].strip() for r in responses):
            dropped += 1
            continue
        rows.append({"prompt": ex.prompt, "responses": responses, "meta": {"columns": dict(ex.extra)}})
    ids = store.add_items(cfg.project, rows)
    log.info("%d items added to %s (%d prompts left out: repeated or empty responses)", len(ids), cfg.project, dropped)
    return {"items": len(ids), "dropped": dropped, "project": cfg.project, "store": cfg.store, "models": models}
