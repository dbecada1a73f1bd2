"""``alignkit loop`` (also ``alignkit feedback loop``): the continuous loop from votes to a promoted policy.

Round ``k`` (directory ``OUTPUT/round_k``) takes the current policy (the base model first) and the current
reward model (none first):

1. **propose**: two samples of the current policy for each of ``items_per_round`` x ``pool_factor`` training
   prompts become pairwise items of the feedback project (responses named ``policy-vN``, the order each
   annotator sees randomised by the store). They are shown before any item left open by an earlier round. With
   ``selection=uncertain`` and a reward model, the items where it is least sure (``|P(a > b) - 1/2|`` smallest)
   are shown first (their store priority); ``uniform`` shows them in random order;
2. **collect**: people vote in the app (``alignkit feedback serve STORE``), or, with ``crowd=`` set, a simulated
   crowd (:mod:`alignkit.feedback.crowd`) whose votes come from that hidden utility, with noise and adversaries;
3. **gate**: at least ``min_items`` of the round's items completed (``overlap`` votes each) and their pairwise
   agreement at least ``min_agreement``. Without enough votes the run stops with status ``waiting`` (exit 0; run
   it again with ``resume=true`` once people have voted); with too little agreement it stops with ``blocked``;
4. **reward model**: trained on every vote so far (:mod:`alignkit.feedback.export`'s pairs, soft-labelled by the
   share of votes, annotators under ``min_annotator_agreement`` with the others' consensus dropped), starting
   from the last round's reward model (warm start); its accuracy on a frozen gold set is recorded: pairs labelled
   by the hidden utility on held-out prompts with a simulated crowd, the project's gold items otherwise, or a file
   of pairs (``gold_data``);
5. **re-align**: DPO from the current policy on the round's voted pairs (``align=dpo``), or on on-policy pairs
   the new reward model labels, best against worst of ``num_generations`` samples (``align=rm``), or online RL
   against the new reward model (``align=grpo``: ``rl_steps`` GRPO steps with ``rewards=rm:...``); ``align=none``
   trains the reward model only (the policy stays, and nothing is compared);
6. **compare**: the new policy against the current one on ``compare_prompts`` held-out prompts (one sample each,
   same seeds), judged by the hidden utility (simulated crowd) or the new reward model: the win rate (a tie is
   half) with its Wilson interval (:func:`alignkit.feedback.ratings.win_rate`);
7. **promote** the new policy when the win rate is at least ``promote_min_win_rate``, otherwise **roll back**
   (the current policy stays; the reward model is kept either way: it learned from the votes).

``round_k/done.json`` records the round: the hashes of the vote snapshot, the reward model, the policy and the
round's report, the figures, and the decision. A finished round is skipped on ``resume=true``; a round stopped
by a crash is redone from its own files (the items it proposed stay in the store, the votes are kept, the
training runs restart). ``summary.json`` lists the rounds, the promoted policy and the reward model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

from alignkit.config import DPOConfig, LoopConfig, RLConfig, RMConfig
from alignkit.errors import ConfigError
from alignkit.feedback import ratings
from alignkit.feedback.crowd import SimulatedCrowd, utility_from_spec
from alignkit.feedback.export import export_rows, kept_votes, rating_matrix
from alignkit.feedback.store import NotFound, SQLiteStore
from alignkit.recipes import dpo, rl, rm
from alignkit.recipes.common import split_eval
from alignkit.recipes.sampled import as_response, encode, policy, sample, start, sub_config
from alignkit.train.iterations import finish, finished, prepare_iterations, read_jsonl, write_json, write_jsonl

log = logging.getLogger("alignkit")


def file_hash(path: Path) -> str | None:
    """sha256 (16 hex digits) of a file, or of a directory's files in name order; None if missing."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _own_files(cfg: LoopConfig, out: Path) -> list[Path]:
    """The loop's files besides the common run files: its rounds, the gold set and (when it is the loop's own,
    not one given as ``store=``) the feedback store."""
    store = [] if cfg.store else [out / f"feedback.sqlite{x}" for x in ("", "-wal", "-shm")]
    return [p for p in [*sorted(out.glob("round_*")), out / "gold_pairs.jsonl", *store] if p.exists()]


def prepare(cfg: LoopConfig) -> Path:
    """The output directory as every run's (a fresh run refuses another run's files, ``overwrite=true`` removes
    them, ``resume=true`` continues a run of the same settings), the loop's own files included."""
    out = Path(cfg.output_dir)
    owned = _own_files(cfg, out)
    if owned and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output_dir={out} already holds a loop ({', '.join(p.name for p in owned)}): pass "
                          f"resume=true to continue it, overwrite=true to replace it, or choose another output_dir")
    out = prepare_iterations(cfg)
    if cfg.overwrite:
        for p in owned:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def run_id(cfg: LoopConfig) -> str:
    """Names this loop's items in the store (a shared store may hold other loops' items)."""
    return str(Path(cfg.output_dir).resolve())


def open_project(cfg: LoopConfig, out: Path) -> SQLiteStore:
    store = SQLiteStore(cfg.store or out / "feedback.sqlite", seed=cfg.seed)
    try:
        p = store.project(cfg.project)
        if p["kind"] != "pairwise":
            raise ConfigError(f"project {cfg.project!r} in {store.path} is {p['kind']}; the loop needs a pairwise one")
    except NotFound:
        store.create_project(cfg.project, "pairwise", overlap=cfg.overlap, lease_seconds=cfg.lease_seconds,
                             gold_rate=cfg.gold_rate, instructions="Which answer is better?")
    return store


def round_items(store: SQLiteStore, cfg: LoopConfig, k: int) -> list[dict]:
    loop = run_id(cfg)
    return [it for it in store.items(cfg.project) if it["meta"].get("round") == k and it["meta"].get("loop") == loop]


def _columns(example) -> dict:
    """The prompt row's other columns (``answer``, ...): what a hidden utility may read, as the RL trainer's
    reward functions do."""
    return dict(example.extra)


def propose(store, cfg: LoopConfig, k: int, current: str, version: int, train_ex, rm_path: str | None) -> list[dict]:
    """The round's items (already in the store after a crash: kept), prioritised for the annotators."""
    items = round_items(store, cfg, k)
    if not items:
        rng = random.Random(cfg.seed * 1000 + k)
        n = min(len(train_ex), cfg.items_per_round * cfg.pool_factor)
        chosen = rng.sample(range(len(train_ex)), n)
        exs = [train_ex[i] for i in chosen]
        _, tok, engine = policy(current, cfg)
        samples = sample(engine, None, encode(exs, tok, cfg), cfg, 2, k)
        engine.close()
        rows = []
        for ex, g in zip(exs, samples):
            a, b = g[0]["text"], g[1]["text"]
            if a == b or not a.strip() or not b.strip():
                continue  # nothing to choose between
            rows.append({"prompt": ex.prompt, "responses": [{"text": a, "model": f"policy-v{version}"},
                                                            {"text": b, "model": f"policy-v{version}"}],
                         "meta": {"loop": run_id(cfg), "round": k, "columns": _columns(ex)}})
        store.add_items(cfg.project, rows)
        items = round_items(store, cfg, k)
        # the round's items come before any left open from earlier rounds (older policies), in the order chosen
        store.set_priority({i: k + p for i, p in priorities(items, cfg, rm_path, rng).items()})
    return items


def priorities(items: list[dict], cfg: LoopConfig, rm_path: str | None, rng: random.Random) -> dict[int, float]:
    """Priorities in [-1, 0] (higher first): the reward model's uncertainty ``-|P(a > b) - 1/2|`` with
    ``selection=uncertain`` (once there is a reward model), else a random order."""
    if cfg.selection == "uncertain" and rm_path:
        from alignkit.models.reward import RewardScorer

        scorer = RewardScorer.load(rm_path, precision=cfg.precision)
        prompts = [it["prompt"] for it in items for _ in range(2)]
        texts = [as_response(it["prompt"], r["text"]) for it in items for r in it["responses"]]
        s = scorer.score(prompts, texts).tolist()
        return {it["id"]: -abs(1 / (1 + math.exp(-(s[2 * i] - s[2 * i + 1]))) - 0.5) for i, it in enumerate(items)}
    return {it["id"]: -rng.random() for it in items}


def gate(store: SQLiteStore, cfg: LoopConfig, items: list[dict]) -> dict:
    """Completed items of the round and their pairwise agreement."""
    from alignkit.feedback import agreement

    ids = {it["id"] for it in items}
    votes = [v for v in store.votes(cfg.project) if v["item"] in ids]
    per_item: dict[int, int] = {}
    for v in votes:
        per_item[v["item"]] = per_item.get(v["item"], 0) + 1
    complete = sum(1 for n in per_item.values() if n >= cfg.overlap)
    m = rating_matrix(store, cfg.project)
    cols = [j for j, u in enumerate(m["units"]) if u[0] in ids]
    agree = agreement.pairwise_agreement(m["ratings"][:, cols]) if cols else float("nan")
    return {"items": len(items), "complete": complete, "votes": len(votes),
            "agreement": None if math.isnan(agree) else float(agree)}


def gold_pairs(cfg: LoopConfig, out: Path, held_ex, utility) -> list[dict]:
    """The frozen gold set the reward model is measured on: with a hidden utility, two samples of the base
    policy per held-out prompt, the better by the utility as ``chosen`` (equal utilities dropped); made once."""
    path = out / "gold_pairs.jsonl"
    if path.exists():
        return read_jsonl(path)
    rows = []
    if utility is not None and held_ex:
        _, tok, engine = policy(cfg.model, cfg)
        samples = sample(engine, None, encode(held_ex, tok, cfg), cfg, 2, 0)
        engine.close()
        for ex, g in zip(held_ex, samples):
            a, b = g[0]["text"], g[1]["text"]
            cols = {c: [v, v] for c, v in _columns(ex).items()}
            ua, ub = utility([ex.prompt, ex.prompt], [a, b], cols)
            if ua != ub:
                good, bad = (a, b) if ua > ub else (b, a)
                rows.append({"prompt": ex.prompt, "chosen": as_response(ex.prompt, good),
                             "rejected": as_response(ex.prompt, bad)})
    write_jsonl(path, rows)
    return rows


def read_gold(path: str) -> list[dict]:
    """A frozen gold set from a file of preference pairs (validated: a bad row names its file, line and field)."""
    from alignkit.data.formats import load_examples

    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
            for e in load_examples(path, "preference").examples]


def rm_accuracy(rm_path: str, pairs: list[dict], precision: str) -> float | None:
    """Share of pairs the reward model orders as the gold label does."""
    if not pairs:
        return None
    from alignkit.models.reward import RewardScorer

    scorer = RewardScorer.load(rm_path, precision=precision)
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]).tolist()
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]).tolist()
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def store_gold_pairs(store: SQLiteStore, project: str) -> list[dict]:
    """The project's gold items as pairs (real annotators: the gold set is what the admin marked)."""
    out = []
    for it in store.items(project):
        if it["gold"] in ("a", "b"):
            c, r = (0, 1) if it["gold"] == "a" else (1, 0)
            out.append({"prompt": it["prompt"], "chosen": as_response(it["prompt"], it["responses"][c]["text"]),
                        "rejected": as_response(it["prompt"], it["responses"][r]["text"])})
    return out


def compare(cfg: LoopConfig, new: str, old: str, examples, judge, k: int) -> dict:
    """One sample of each policy per prompt (the same seeds), judged: the new one's win rate."""
    texts = []
    for path in (new, old):
        _, tok, engine = policy(path, cfg)
        texts.append([g[0]["text"] for g in sample(engine, None, encode(examples, tok, cfg), cfg, 1, 10_000 + k)])
        engine.close()
    u_new, u_old = judge(examples, texts[0]), judge(examples, texts[1])
    outcomes = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(u_new, u_old)]
    return {**ratings.win_rate(outcomes), "utility/new": sum(u_new) / len(u_new), "utility/old": sum(u_old) / len(u_old)}


def run(cfg: LoopConfig) -> dict:
    _, examples = start(cfg, scored=False)
    train_ex, held_ex = split_eval(cfg, examples, "prompt")
    if not held_ex:
        raise ConfigError("the loop compares policies and measures the reward model on held-out prompts: set "
                          "eval_fraction > 0 or eval_data")
    frozen = read_gold(cfg.gold_data) if cfg.gold_data else None  # a bad file stops the run before any model loads
    out = prepare(cfg)
    store = open_project(cfg, out)
    utility = utility_from_spec(cfg.crowd, cfg.crowd_weights, cfg.max_new_tokens) if cfg.crowd else None
    crowd = (SimulatedCrowd(store, cfg.project, utility, n=cfg.crowd_size, adversarial=cfg.crowd_adversarial,
                            temperature=cfg.crowd_temperature, seed=cfg.seed) if utility is not None else None)
    gold = (frozen if frozen is not None else gold_pairs(cfg, out, held_ex, utility) if utility is not None
            else store_gold_pairs(store, cfg.project))
    compare_ex = held_ex[: cfg.compare_prompts] if cfg.compare_prompts else held_ex

    def judge_by(rm_path):
        if utility is not None:
            return lambda exs, texts: utility([e.prompt for e in exs], texts,
                                              {c: [e.extra.get(c) for e in exs] for c in exs[0].extra})
        from alignkit.models.reward import RewardScorer

        scorer = RewardScorer.load(rm_path, precision=cfg.precision)
        return lambda exs, texts: scorer.score([e.prompt for e in exs],
                                               [as_response(e.prompt, t) for e, t in zip(exs, texts)]).tolist()

    records, current, version, rm_path = [], cfg.model, 0, None
    status = "done"
    for k in range(1, cfg.rounds + 1):
        it = out / f"round_{k}"
        done = finished(it)
        if done is not None:
            log.info("round %d finished before (%s): skipped", k, it / "done.json")
        else:
            it.mkdir(parents=True, exist_ok=True)
            items = propose(store, cfg, k, current, version, train_ex, rm_path)
            if crowd is not None:
                crowd.collect(cfg.crowd_votes or None)
            g = gate(store, cfg, items)
            log.info("round %d: %d of %d items complete, %d votes, agreement %s", k, g["complete"], g["items"],
                     g["votes"], g["agreement"])
            if g["complete"] < min(cfg.min_items, len(items)) or not items:
                status = "waiting"
                write_json(it / "gate.json", {**g, "status": status})
                log.warning("round %d waits for votes: %d of the %d completed items it needs (annotators vote in "
                            "`alignkit feedback serve %s`); run again with resume=true", k, g["complete"],
                            cfg.min_items, store.path)
                break
            if g["agreement"] is not None and g["agreement"] < cfg.min_agreement:
                status = "blocked"
                write_json(it / "gate.json", {**g, "status": status})
                log.error("round %d: the votes agree too little (%.3f < min_agreement %.3f): not trained on; look "
                          "at the annotators (`alignkit feedback stats %s %s`)", k, g["agreement"],
                          cfg.min_agreement, store.path, cfg.project)
                break
            done = one_round(cfg, store, it, k, current, rm_path, g, gold, train_ex, compare_ex, judge_by)
            finish(it, done)
        records.append(done)
        rm_path = done["reward_model"]
        if done["promoted"]:
            current, version = done["policy"], k
    summary = {"method": "loop", "status": status, "policy": current, "reward_model": rm_path, "rounds": records,
               "store": str(store.path), "project": cfg.project}
    write_json(out / "summary.json", summary)
    return summary


def one_round(cfg, store, it: Path, k: int, current: str, rm_path, g: dict, gold, train_ex, compare_ex,
              judge_by) -> dict:
    filters = {"min_annotator_agreement": cfg.min_annotator_agreement or None}
    votes, dropped = kept_votes(store, cfg.project, **filters)
    pairs = export_rows(store, cfg.project, "pairs", **filters)
    write_jsonl(it / "pairs.jsonl", pairs)
    round_ids = {i["id"] for i in round_items(store, cfg, k)}
    new_pairs = [p for p in pairs if p["item"] in round_ids]
    write_jsonl(it / "new_pairs.jsonl", new_pairs)
    if not pairs:
        raise ConfigError(f"round {k}: the votes gave no pair (every item split evenly or judged 'both bad')")
    # the reward model, warm-started from the last round's, on every vote so far
    rm_dir = it / "rm"
    if not (rm_dir / "final" / "alignkit_rm.json").exists():
        sub = sub_config(RMConfig, cfg, model=rm_path or cfg.rm_model or cfg.model, data=str(it / "pairs.jsonl"),
                         output_dir=str(rm_dir), lr=cfg.rm_lr, epochs=cfg.rm_epochs, eval_data="", eval_fraction=0.0,
                         lora=False, overwrite=True, resume=False, max_steps=-1)
        rm.run(sub)
    new_rm = str(rm_dir / "final")
    accuracy = rm_accuracy(new_rm, gold, cfg.precision)
    # the policy, re-aligned from the current one (None: nothing to train on, or align=none)
    new_policy, n_rows = realign(cfg, it, k, current, new_rm, new_pairs, train_ex)
    verdict = compare(cfg, new_policy, current, compare_ex, judge_by(new_rm), k) if new_policy else None
    promoted = verdict is not None and verdict["win_rate"] >= cfg.promote_min_win_rate
    report = {"round": k, "gate": g, "votes_used": len(votes), "dropped_annotators": dropped["annotators"],
              "pairs": len(pairs), "new_pairs": len(new_pairs), "align_rows": n_rows,
              "rm_gold_accuracy": accuracy, "gold_pairs": len(gold), "compare": verdict,
              "promoted": promoted, "policy_before": current, "candidate": new_policy or current}
    write_json(it / "report.json", report)
    outcome = ("no candidate policy (nothing to train on, or align=none): the current one stays" if verdict is None
               else f"the new policy wins {verdict['win_rate']:.3f} [{verdict['lower']:.3f}, {verdict['upper']:.3f}] "
               f"against the current one: {'promoted' if promoted else 'rolled back'}")
    log.info("round %d: reward model accuracy on the gold set %s; %s", k, accuracy, outcome)
    return {**report, "policy": new_policy or current, "reward_model": new_rm,
            "versions": {"votes": store.snapshot_hash(cfg.project), "reward_model": file_hash(rm_dir / "final"),
                         "policy": file_hash(Path(new_policy)) if new_policy else None,
                         "report": file_hash(it / "report.json")}}


def realign(cfg: LoopConfig, it: Path, k: int, current: str, new_rm: str, new_pairs: list[dict],
            train_ex) -> tuple[str | None, int]:
    """Train the candidate policy from ``current`` (module docstring, step 5): its final directory (None when
    there was nothing to train on, or with ``align=none``) and the rows (pairs, or prompts for GRPO) it used."""
    pol_dir = it / "policy"
    done = (pol_dir / "final" / "alignkit.json").exists()  # trained before a crash: kept
    if cfg.align == "grpo":
        if not done:
            rl.run(sub_config(RLConfig, cfg, model=current, rewards=f"rm:{new_rm}", reward_weights="",
                              output_dir=str(pol_dir), max_steps=cfg.rl_steps, eval_data="", eval_fraction=0.0,
                              overwrite=True, resume=False, batch_size=2))
        return str(pol_dir / "final"), cfg.rl_steps * cfg.prompts_per_step
    rows = {"dpo": lambda: new_pairs, "rm": lambda: rm_pairs(cfg, train_ex, current, new_rm, k),
            "none": lambda: []}[cfg.align]()
    write_jsonl(it / "align_pairs.jsonl", [{key: r[key] for key in ("prompt", "chosen", "rejected", "soft_label")
                                            if key in r} for r in rows])
    if not rows:
        return None, 0
    if not done:
        dpo.run(sub_config(DPOConfig, cfg, model=current, data=str(it / "align_pairs.jsonl"), output_dir=str(pol_dir),
                           eval_data="", eval_fraction=0.0, overwrite=True, resume=False))
    return str(pol_dir / "final"), len(rows)


def rm_pairs(cfg: LoopConfig, train_ex, current: str, rm_path: str, k: int) -> list[dict]:
    """``align=rm``: best against worst of ``num_generations`` samples of the current policy per training
    prompt, by the new reward model (equal scores dropped)."""
    from alignkit.models.reward import RewardScorer

    rng = random.Random(cfg.seed * 1000 + k + 500)
    exs = [train_ex[i] for i in rng.sample(range(len(train_ex)), min(len(train_ex), cfg.items_per_round))]
    _, tok, engine = policy(current, cfg)
    samples = sample(engine, None, encode(exs, tok, cfg), cfg, cfg.num_generations, k)
    engine.close()
    scorer = RewardScorer.load(rm_path, precision=cfg.precision)
    rows = []
    for ex, g in zip(exs, samples):
        texts = [s["text"] for s in g]
        s = scorer.score([ex.prompt] * len(texts), [as_response(ex.prompt, t) for t in texts]).tolist()
        best, worst = max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)
        if s[best] > s[worst] and texts[best] != texts[worst]:
            rows.append({"prompt": ex.prompt, "chosen": as_response(ex.prompt, texts[best]),
                         "rejected": as_response(ex.prompt, texts[worst])})
    return rows
