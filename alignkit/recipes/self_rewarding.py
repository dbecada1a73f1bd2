"""Self-rewarding language models (Yuan et al. 2401.10020): ``alignkit self-rewarding``.

Iteration ``k`` takes the model ``M_(k-1)`` (the base model ``M_0`` first) and:

1. samples ``num_generations`` (N) responses to every prompt (the rollout engine, seeded per prompt);
2. has ``M_(k-1)`` itself judge each response with the additive 0-5 prompt of
   :data:`alignkit.feedback.self_judge.SCORE_TEMPLATE` (``judge_samples`` judgements a response, averaged;
   an unparsable judgement counts as a parse failure and adds nothing);
3. pairs each prompt's best and worst scored responses; ties (all scores equal, or fewer than two scored) are
   dropped, never made into pairs;
4. trains ``M_k`` from ``M_(k-1)`` with the DPO recipe (:mod:`alignkit.recipes.dpo`: every preference key of
   this config applies; its reference is the model it starts from, ``M_(k-1)``, as in the paper).

Each iteration records the judge's parse-failure rate, judge collapse (the share of prompts whose scored
responses all got the same score), the pairs made and dropped, and the chosen and rejected mean lengths in
tokens (self-rewarding is known to lengthen answers; the judge may favour length); it warns when collapse
passes ``collapse_threshold``, since a collapsed judge gives no pairs and the loop stops learning. Optional
``rewards=`` (e.g. ``correctness``) are only logged. Files and resume as for ``alignkit rejection``:
``iter_k/samples.jsonl`` (each response with its judgements and score), ``iter_k/pairs.jsonl``, the DPO run's
files, ``iter_k/done.json``; ``summary.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alignkit.config import DPOConfig, SelfRewardConfig
from alignkit.feedback import self_judge
from alignkit.recipes import dpo
from alignkit.recipes.common import split_eval
from alignkit.recipes.sampled import as_response, encode, iterate, policy, sample, start, sub_config
from alignkit.rl.rollout import SamplingParams
from alignkit.rl.trainer import rollout_seed
from alignkit.train.iterations import prepare_iterations, read_jsonl, write_jsonl

log = logging.getLogger("alignkit")


def judge(engine, tok, examples, samples: list[list[dict]], cfg: SelfRewardConfig, k: int) -> None:
    """Add ``judgements`` and ``score`` to every sample, judged by the policy behind ``engine``."""
    flat = [s for g in samples for s in g]
    questions = self_judge.score_questions([examples[s["prompt_index"]].prompt for s in flat],
                                           [s["text"] for s in flat])
    sampling = SamplingParams(temperature=cfg.judge_temperature, max_new_tokens=cfg.judge_max_new_tokens)
    seeds = [rollout_seed(cfg.seed, k, 1, i) for i in range(len(flat))]  # round 1: not the responses' seeds
    replies = self_judge.judge_replies(engine, tok, questions, cfg.judge_samples, sampling, seeds)
    for s, texts in zip(flat, replies):
        s["judgements"] = texts
        s["score"] = self_judge.mean_score(texts) if s["text"].strip() else None  # a blank answer is not paired


def pairs(examples, samples: list[list[dict]]) -> tuple[list[dict], dict]:
    """Best-vs-worst preference rows and the iteration's judge statistics (module docstring)."""
    rows, chosen_len, rejected_len = [], [], []
    for g in samples:
        bw = self_judge.best_worst([s["score"] for s in g], [s["text"] for s in g])
        if bw is None:
            continue
        best, worst = g[bw[0]], g[bw[1]]
        ex = examples[best["prompt_index"]]
        rows.append({"prompt": ex.prompt, "chosen": as_response(ex.prompt, best["text"]),
                     "rejected": as_response(ex.prompt, worst["text"]), "chosen_score": best["score"],
                     "rejected_score": worst["score"], "prompt_index": best["prompt_index"]})
        chosen_len.append(best["tokens"])
        rejected_len.append(worst["tokens"])
    stats = self_judge.judge_stats([[s["judgements"] for s in g] for g in samples],
                                   [[s["score"] for s in g] for g in samples])
    stats.update({"pairs": len(rows), "pairs/dropped": len(samples) - len(rows),
                  "length/chosen": sum(chosen_len) / len(rows) if rows else None,
                  "length/rejected": sum(rejected_len) / len(rows) if rows else None})
    return rows, stats


def run(cfg: SelfRewardConfig) -> dict:
    rewards, examples = start(cfg, scored=False)
    train_ex, held_ex = split_eval(cfg, examples, "prompt")
    out = prepare_iterations(cfg)

    def one_iteration(k: int, it: Path, current: str) -> dict:
        if (it / "samples.jsonl").exists():  # judged before an interruption: the same samples and scores
            flat = read_jsonl(it / "samples.jsonl")
            samples = [[s for s in flat if s["prompt_index"] == i] for i in range(len(train_ex))]
        else:
            _, tok, engine = policy(current, cfg)
            samples = sample(engine, rewards, encode(train_ex, tok, cfg), cfg, cfg.num_generations, k)
            judge(engine, tok, train_ex, samples, cfg, k)
            engine.close()
            write_jsonl(it / "samples.jsonl", [s for g in samples for s in g])
        rows, stats = pairs(train_ex, samples)
        write_jsonl(it / "pairs.jsonl", rows)
        record = {"iteration": k, "sampled_by": current, "prompts": len(samples), **stats}
        scored = [s["reward"] for g in samples for s in g if s["reward"] is not None]
        if scored:
            record["reward/sample_mean"] = sum(scored) / len(scored)
        log.info("iteration %d: %d pairs from %d prompts; judge parse failures %.3f, collapse %.3f; chosen %s, "
                 "rejected %s tokens", k, len(rows), len(samples), stats["judge/parse_failure"],
                 stats["judge/collapse"], stats["length/chosen"], stats["length/rejected"])
        if stats["judge/collapse"] > cfg.collapse_threshold:
            log.warning("iteration %d: the judge collapsed: %.0f%% of the prompts got the same score for all their "
                        "responses (collapse_threshold=%.2f), so they give no pairs; a stronger or sampled judge "
                        "(judge_samples > 1, judge_temperature > 0) may help", k, 100 * stats["judge/collapse"],
                        cfg.collapse_threshold)
        if rows:
            sub = sub_config(DPOConfig, cfg, model=current, data=str(it / "pairs.jsonl"), output_dir=str(it),
                             eval_data="", eval_fraction=0.0, resume=True, overwrite=False)
            record["train"] = {k2: v for k2, v in dpo.run(sub).get("train_last", {}).items()}
            record["model"] = str(it / "final")
        else:
            log.warning("iteration %d made no pair: nothing to train on, its model stays %s", k, current)
            record["model"] = current
        return record

    return iterate(cfg, out, "self-rewarding", one_iteration, held_ex, rewards)
