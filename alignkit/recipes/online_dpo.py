"""Online DPO (Guo et al. 2402.04792): ``alignkit online-dpo``.

Each step samples ``num_generations`` completions per prompt from the current policy; the judge (the reward
functions: a rule such as ``correctness``, a trained reward model ``rm:PATH``, or any ``module:function``) scores
them, and the best and the worst form a (chosen, rejected) pair; a prompt whose samples all score the same gives
no pair. The pairs are trained with the DPO loss (or another paired loss of the preference registry) against the
frozen initial model: with LoRA the base with adapters off, otherwise the initial weights loaded again.
"""

from __future__ import annotations

import logging
import math
import time

from alignkit.config import OnlineDPOConfig
from alignkit.data.tokenize import Encoded
from alignkit.models.loading import LoraSettings, load_model
from alignkit.recipes.common import save_final, seed_everything, setup_logging, write_config
from alignkit.recipes.dpo import PreferenceTask, Reference
from alignkit.recipes.rl import evaluator, load_prompts
from alignkit.rl.rewards import RewardContext, build_reward_set
from alignkit.rl.rollout import LocalEngine
from alignkit.rl.sampling import PromptSampler
from alignkit.rl.trainer import Collector, Group, Sums
from alignkit.train import dist
from alignkit.train.loop import Metrics, train

log = logging.getLogger("alignkit")


def judged_pair(g: Group) -> Encoded | None:
    """(best, worst) completion of a group by reward; None when no two completions differ in reward."""
    scored = [(r, i) for i, r in enumerate(g.raw) if r is not None]
    if len(scored) < 2:
        return None
    (lo, worst), (hi, best) = min(scored), max(scored)
    if hi <= lo:
        return None
    comps = g.completions
    return Encoded(g.prompt.ids, [list(comps[best].token_ids), list(comps[worst].token_ids)], g.index)


class JudgedPairs:
    """A :class:`~alignkit.train.loop.StepSource`: each optimizer step's pairs, sampled and judged on the spot."""

    def __init__(self, collector: Collector, reference: Reference, cfg: OnlineDPOConfig, n_steps: int):
        self.collector, self.reference, self.cfg, self.n_steps = collector, reference, cfg, n_steps
        self._metrics: Metrics = {}

    def rows(self, step: int, model) -> list[Encoded]:
        m = Sums()
        t0 = time.perf_counter()
        self.collector.engine.update_weights(model)
        groups = self.collector.collect(step, self.cfg.prompts_per_step, m)
        pairs = [p for p in map(judged_pair, groups) if p is not None]
        m.add("pairs/judged", float(len(pairs)), float(max(1, len(groups))))
        if pairs:
            self.reference.fill(model, pairs, desc="reference")
        m.add("time/rollout", time.perf_counter() - t0, 1.0)
        self._metrics = m.out()
        return pairs

    def metrics(self) -> Metrics:
        m, self._metrics = self._metrics, {}
        return m

    def state_dict(self) -> dict:
        return {"sampler": self.collector.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.collector.sampler.load_state_dict(state["sampler"])


def run(cfg: OnlineDPOConfig) -> dict:
    dist.init()
    setup_logging()
    seed_everything(cfg.seed)
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target) if cfg.lora else None
    policy, tok = load_model(cfg.model, lora=lora, seed=cfg.seed)
    prompts, held = load_prompts(cfg, tok)
    write_config(cfg)
    reference = Reference(policy, "cached", tok.pad_token_id, cfg.logits_chunk, cfg.batch_size, cfg.precision,
                          cfg.share_prompt)
    if lora is None:  # the initial weights, also after a resume (a copy of the policy would not be)
        reference.frozen = load_model(cfg.model, seed=cfg.seed)[0].eval().requires_grad_(False)
    ctx = RewardContext(max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer or max(1, cfg.max_new_tokens // 4),
                        language=cfg.language, timeout=cfg.reward_timeout)
    judge = build_reward_set(cfg.rewards, cfg.reward_weights, ctx)
    judge.warm_up()
    engine = LocalEngine(policy, tok, precision=cfg.rollout_precision, max_batch=cfg.rollout_batch)
    collector = Collector(engine, judge, prompts, PromptSampler(len(prompts), cfg.seed), cfg)
    n_steps = cfg.max_steps if cfg.max_steps > 0 else max(
        1, math.ceil(cfg.epochs * len(prompts) / (cfg.prompts_per_step * dist.world())))
    task = PreferenceTask(cfg, tok.pad_token_id, reference)
    evaluate = evaluator(engine, judge, held, policy, cfg) if held else None
    summary: dict = {}
    if evaluate is not None and not cfg.resume:
        summary["eval_before"] = evaluate()
        log.info("held-out before training: %s", summary["eval_before"])
    result = train(task, policy, JudgedPairs(collector, reference, cfg, n_steps), cfg, evaluate=evaluate)
    last = result.history[-1] if result.history else {}
    summary.update({k: v for k, v in last.items() if isinstance(v, (int, float))})
    summary["steps"] = result.steps
    if evaluate is not None:
        summary["eval_after"] = {k[5:]: v for k, v in last.items() if k.startswith("eval/")}
    save_final(policy, tok, cfg, "online-dpo", {"steps": result.steps})
    return summary
