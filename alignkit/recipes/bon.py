"""Best-of-n sampling: ``alignkit bon``.

Every prompt gets ``num_generations`` (n) completions from the rollout engine (seeded per prompt, so the same
samples for the same seed whatever the batching); the reward functions score them, and the best is kept
(:func:`alignkit.rl.best_of_n.best_index`: highest reward, the earliest of a tie, unscored and blank ones never).
With ``judge=`` (``llm:MODEL`` or an endpoint) a knockout of pairwise duels, each asked in both orders, picks it
instead (:func:`alignkit.rl.best_of_n.tournament`).

Written to ``output_dir``: ``best.jsonl`` (one prompt/completion row per prompt with a kept sample, in the
prompt's form, with the row's columns and the ``reward``: ready for ``alignkit sft``), ``samples.jsonl`` (every
sample with its reward), ``summary.json`` and ``config.yaml``.

The KL reported (docs/ai_feedback.md):

- ``kl/bound`` = ``log n - (n-1)/n``, the KL of best-of-n against the sampling policy for a continuous reward and
  an upper bound for any reward;
- ``kl/estimate``: the mean over prompts of the exact best-of-n KL on the empirical distribution of the prompt's
  own n rewards (:func:`alignkit.rl.best_of_n.bon_kl`), ties merged into levels. It is at most the bound, 0 for a
  prompt whose samples all score alike, exact for a reward with few levels when the samples show their
  frequencies, and for n distinct values a coarse, low estimate of the continuous value. Absent with a judge,
  whose pairwise verdicts give no reward distribution.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from alignkit.config import BoNConfig, to_dict
from alignkit.errors import ConfigError
from alignkit.recipes.sampled import encode, pairwise_judge, policy, sample, sft_row, start
from alignkit.rl.best_of_n import bon_kl, keep_best, kl_bound, tournament
from alignkit.train.iterations import write_json, write_jsonl

log = logging.getLogger("alignkit")

FILES = ("best.jsonl", "samples.jsonl", "summary.json", "config.yaml")


def _prepare_dir(cfg: BoNConfig) -> Path:
    out = Path(cfg.output_dir)
    used = [name for name in FILES if (out / name).exists()]
    if used and not cfg.overwrite:
        raise ConfigError(f"output_dir={out} already holds a bon run ({', '.join(used)}): pass overwrite=true to "
                          f"replace it, or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def summarise(samples: list[list[dict]], kept: list[dict], n: int, judged: bool) -> dict:
    """Rewards of one sample and of the kept best, and the KL of best-of-n (module docstring)."""
    scored = [[s["reward"] for s in g if s["reward"] is not None] for g in samples]
    flat = [r for g in scored for r in g]
    best = [s["reward"] for s in kept if s["reward"] is not None]
    out = {"prompts": len(samples), "n": n, "kept": len(kept), "unscored": sum(len(g) for g in samples) - len(flat),
           "reward/sample_mean": sum(flat) / len(flat) if flat else None,
           "reward/best_mean": sum(best) / len(best) if best else None, "kl/bound": kl_bound(n)}
    with_rewards = [g for g in scored if g]
    if not judged and with_rewards:
        out["kl/estimate"] = sum(bon_kl(g, n) for g in with_rewards) / len(with_rewards)
    return out


def run(cfg: BoNConfig) -> dict:
    rewards, examples = start(cfg)
    out = _prepare_dir(cfg)
    judge = pairwise_judge(cfg)
    _, tok, engine = policy(cfg.model, cfg)
    samples = sample(engine, rewards, encode(examples, tok, cfg), cfg, cfg.num_generations, 0)
    engine.close()
    winners = None
    if judge is not None:
        columns = {k: [ex.extra.get(k) for ex in examples] for k in set().union(*(ex.extra for ex in examples))}
        winners = tournament(judge, [ex.prompt for ex in examples], [[s["text"] for s in g] for g in samples],
                             **columns)
    kept = keep_best(samples, winners)
    write_jsonl(out / "samples.jsonl", [s for g in samples for s in g])
    write_jsonl(out / "best.jsonl", [sft_row(examples[s["prompt_index"]], s) for s in kept])
    summary = summarise(samples, kept, cfg.num_generations, judge is not None)
    write_json(out / "summary.json", summary)
    log.info("best-of-%d: %d of %d prompts kept; reward %s per sample, %s kept; KL bound %.4f%s", cfg.num_generations,
             len(kept), len(samples), _fmt(summary["reward/sample_mean"]), _fmt(summary["reward/best_mean"]),
             summary["kl/bound"], f", estimate {summary['kl/estimate']:.4f}" if "kl/estimate" in summary else "")
    return summary


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
