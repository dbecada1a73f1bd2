"""On-policy iterative DPO with a reward as the judge (RLHFlow, Dong et al. 2405.07863; Xiong et al. 2312.11456):
``alignkit iterative-dpo``.

Iteration ``k`` takes the model ``M_(k-1)`` (the base model first) and:

1. samples ``num_generations`` (N) completions of every training prompt (the rollout engine, seeded per prompt);
2. scores them with ``rewards`` (e.g. ``correctness`` against the row's ``answer``: a program as the judge);
3. pairs each prompt's best against its worst; prompts whose samples all score the same (all right, all wrong)
   give no pair: ties are dropped, never trained on;
4. trains ``M_k`` from ``M_(k-1)`` with the DPO recipe (every preference key of this config applies; the
   reference is the model it starts from, ``M_(k-1)``).

Files and resume as for ``alignkit rejection``: ``iter_k/samples.jsonl``, ``iter_k/pairs.jsonl``, the DPO run's
files, ``iter_k/done.json``; ``summary.json`` with the held-out rewards (greedy) of every iteration's model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alignkit.config import DPOConfig, IterativeDPOConfig
from alignkit.feedback.self_judge import best_worst
from alignkit.recipes import dpo
from alignkit.recipes.common import split_eval
from alignkit.recipes.sampled import as_response, encode, iterate, policy, sample, start, sub_config
from alignkit.train.iterations import prepare_iterations, read_jsonl, write_jsonl

log = logging.getLogger("alignkit")


def pairs(examples, samples: list[list[dict]]) -> list[dict]:
    """Each prompt's best-scored sample against its worst (None-scored samples left out; ties give none)."""
    rows = []
    for g in samples:
        bw = best_worst([s["reward"] for s in g], [s["text"] for s in g])
        if bw is None:
            continue
        best, worst = g[bw[0]], g[bw[1]]
        ex = examples[best["prompt_index"]]
        rows.append({"prompt": ex.prompt, "chosen": as_response(ex.prompt, best["text"]),
                     "rejected": as_response(ex.prompt, worst["text"]), "chosen_reward": best["reward"],
                     "rejected_reward": worst["reward"], "prompt_index": best["prompt_index"]})
    return rows


def run(cfg: IterativeDPOConfig) -> dict:
    rewards, examples = start(cfg)
    train_ex, held_ex = split_eval(cfg, examples, "prompt")
    out = prepare_iterations(cfg)

    def one_iteration(k: int, it: Path, current: str) -> dict:
        if (it / "samples.jsonl").exists():  # sampled before an interruption: the same samples and rewards
            flat = read_jsonl(it / "samples.jsonl")
            samples = [[s for s in flat if s["prompt_index"] == i] for i in range(len(train_ex))]
        else:
            _, tok, engine = policy(current, cfg)
            samples = sample(engine, rewards, encode(train_ex, tok, cfg), cfg, cfg.num_generations, k)
            engine.close()
            write_jsonl(it / "samples.jsonl", [s for g in samples for s in g])
        rows = pairs(train_ex, samples)
        write_jsonl(it / "pairs.jsonl", rows)
        scored = [s["reward"] for g in samples for s in g if s["reward"] is not None]
        record = {"iteration": k, "sampled_by": current, "prompts": len(samples), "pairs": len(rows),
                  "pairs/dropped": len(samples) - len(rows),
                  "reward/sample_mean": sum(scored) / len(scored) if scored else None}
        log.info("iteration %d: %d pairs from %d prompts (%d ties dropped); mean sample reward %s", k, len(rows),
                 len(samples), len(samples) - len(rows), record["reward/sample_mean"])
        if rows:
            sub = sub_config(DPOConfig, cfg, model=current, data=str(it / "pairs.jsonl"), output_dir=str(it),
                             eval_data="", eval_fraction=0.0, resume=True, overwrite=False)
            record["train"] = dict(dpo.run(sub).get("train_last", {}))
            record["model"] = str(it / "final")
        else:
            log.warning("iteration %d made no pair (every prompt's samples scored alike): its model stays %s", k,
                        current)
            record["model"] = current
        return record

    return iterate(cfg, out, "iterative-dpo", one_iteration, held_ex, rewards)
