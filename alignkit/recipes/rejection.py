"""Rejection-sampling fine-tuning, iterated: ``alignkit rejection mode=raft|rest_em|best_ever``.

Iteration ``k`` (of ``iterations``) samples ``num_generations`` completions of every prompt from the model of
iteration ``k - 1`` (the base model for ``k = 1``), keeps some of them, and fine-tunes with the SFT recipe
(:mod:`alignkit.recipes.sft`, every training key of this config applies) on the kept rows:

- ``raft`` (Dong et al. 2304.06767): each prompt's best sample of this iteration (by reward, or by ``judge=``);
  fine-tuning continues from the previous iteration's model;
- ``rest_em`` (Singh et al. 2312.06585): every distinct sample the reward verifies (``reward >= threshold``; with
  ``accumulate=true`` those of all iterations so far); fine-tuning starts from the BASE model every iteration,
  so the iterations do not drift on the model's own overfitting, only the data improves;
- ``best_ever`` (Llama 2, Touvron et al. 2307.09288): each prompt's best sample over all iterations so far, so a
  worse iteration cannot lose an earlier good answer; fine-tuning continues from the previous model.

``start=base|previous`` overrides where fine-tuning starts. An iteration with nothing kept trains nothing: its
model is the one fine-tuning would have started from.

Everything of iteration ``k`` is in ``output_dir/iter_k``: ``samples.jsonl`` (all samples with rewards),
``kept.jsonl`` (what the rule kept), ``train.jsonl`` (what was trained on: SFT rows), the SFT run's files
(``metrics.jsonl``, ``checkpoints/``, ``final/``) and ``done.json``. With ``resume=true`` finished iterations are
skipped and an unfinished one reuses its samples and resumes its SFT run from its last checkpoint. Held-out
prompts (``eval_data`` or ``eval_fraction``) are answered greedily by the base model and after every iteration,
and the mean of each reward over them is recorded. ``summary.json`` lists every iteration's record.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alignkit.config import RejectionConfig, SFTConfig
from alignkit.recipes import sft
from alignkit.recipes.common import split_eval
from alignkit.recipes.sampled import encode, iterate, pairwise_judge, policy, sample, sft_row, start, sub_config
from alignkit.rl.best_of_n import keep_best, keep_verified, tournament, with_previous_best
from alignkit.train.iterations import iteration_dir, prepare_iterations, read_jsonl, write_jsonl

log = logging.getLogger("alignkit")


def choose(cfg: RejectionConfig, samples: list[list[dict]], previous: list[dict], judge=None,
           examples=None) -> list[dict]:
    """This iteration's kept samples under ``cfg.mode`` (the selection rules of :mod:`alignkit.rl.best_of_n`).

    ``previous``: the kept samples of the iteration before (best_ever: each prompt's best so far)."""
    if cfg.mode == "rest_em":
        return keep_verified(samples, cfg.threshold, cfg.max_per_prompt)
    if cfg.mode == "best_ever":
        samples = with_previous_best(samples, previous)
    winners = None
    if judge is not None:
        prompts = [examples[g[0]["prompt_index"]].prompt if g else "" for g in samples]
        winners = tournament(judge, prompts, [[s["text"] for s in g] for g in samples])
    return keep_best(samples, winners)


def training_rows(cfg: RejectionConfig, kept: list[dict], out: Path, k: int) -> list[dict]:
    """What iteration ``k`` fine-tunes on: the kept samples, or with rest_em and ``accumulate`` those of
    iterations 1..k."""
    if cfg.mode != "rest_em" or not cfg.accumulate:
        return kept
    rows = [s for j in range(1, k) for s in read_jsonl(iteration_dir(out, j) / "kept.jsonl")]
    return rows + kept


def run(cfg: RejectionConfig) -> dict:
    rewards, examples = start(cfg)
    train_ex, held_ex = split_eval(cfg, examples, "prompt")
    out = prepare_iterations(cfg)
    judge = pairwise_judge(cfg)

    def one_iteration(k: int, it: Path, current: str) -> dict:
        previous = read_jsonl(iteration_dir(out, k - 1) / "kept.jsonl") if k > 1 else []
        return _iteration(cfg, k, it, current, train_ex, rewards, previous, judge)

    return iterate(cfg, out, f"rejection:{cfg.mode}", one_iteration, held_ex, rewards)


def _iteration(cfg, k: int, it: Path, current: str, train_ex, rewards, previous, judge) -> dict:
    if (it / "samples.jsonl").exists():  # sampled before an interruption: the same samples again
        flat = read_jsonl(it / "samples.jsonl")
        samples = [[s for s in flat if s["prompt_index"] == i] for i in range(len(train_ex))]
    else:
        _, tok, engine = policy(current, cfg)
        samples = sample(engine, rewards, encode(train_ex, tok, cfg), cfg, cfg.num_generations, k)
        engine.close()
        write_jsonl(it / "samples.jsonl", [s for g in samples for s in g])
    kept = choose(cfg, samples, previous, judge, train_ex)
    write_jsonl(it / "kept.jsonl", kept)
    rows = [sft_row(train_ex[s["prompt_index"]], s) for s in training_rows(cfg, kept, it.parent, k)]
    write_jsonl(it / "train.jsonl", rows)
    init = cfg.model if cfg.from_base else current
    record = {"iteration": k, "sampled_by": current, "trained_from": init, "kept": len(kept), "trained_on": len(rows),
              "prompts_kept": len({s["prompt_index"] for s in kept}), "prompts": len(samples)}
    scored = [s["reward"] for g in samples for s in g if s["reward"] is not None]
    record["reward/sample_mean"] = sum(scored) / len(scored) if scored else None
    kept_r = [s["reward"] for s in kept if s["reward"] is not None]
    record["reward/kept_mean"] = sum(kept_r) / len(kept_r) if kept_r else None
    if rows:
        sub = sub_config(SFTConfig, cfg, model=init, data=str(it / "train.jsonl"), output_dir=str(it), eval_data="",
                         eval_fraction=0.0, resume=True, overwrite=False)
        record["train"] = sft.run(sub)
        record["model"] = str(it / "final")
    else:
        log.warning("iteration %d kept no sample: nothing to fine-tune on, its model is %s", k, init)
        record["model"] = init
    log.info("iteration %d: kept %d samples of %d prompts; model %s", k, len(kept), len(samples), record["model"])
    return record

