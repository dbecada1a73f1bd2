"""Online DPO (Guo et al. 2402.04792): ``alignkit online-dpo``.

Each step samples ``num_generations`` completions per prompt from the current policy; the judge (the reward
functions: a rule such as ``correctness``, a trained reward model ``rm:PATH``, or any ``module:function``) scores
them, and the best and the worst form a (chosen, rejected) pair; a prompt whose samples all score the same gives
no pair. With ``judge=`` (``llm:MODEL``, an ``http(s)://`` endpoint, ``rm:PATH``: the pairwise judges of
``alignkit.feedback.judges``, shared with ``alignkit eval``) the judge compares the first two samples in both
orders instead, and a tie gives no pair. The pairs are trained with the DPO loss (or another paired loss of the preference registry) against the
frozen initial model: with LoRA the base with adapters off, otherwise the initial weights loaded again.

Under several processes every process samples its share of the step's prompts and gets every group
(``alignkit.rl.trainer.Collector``), judges them all alike, and trains on its share ``[rank::world]`` of the
pairs, as one process would on all of them; ``prompts_per_step`` counts each process's prompts.
"""

from __future__ import annotations

import logging
import time

from alignkit.config import OnlineDPOConfig
from alignkit.data.tokenize import Encoded
from alignkit.recipes.dpo import PreferenceTask, Reference
from alignkit.recipes.rl import initial_model, online_steps, prepare_online, train_online
from alignkit.rl.sampling import PromptSampler
from alignkit.rl.trainer import Collector, Group, Sums
from alignkit.train import dist
from alignkit.train.loop import Metrics

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

    def __init__(self, collector: Collector, reference: Reference, cfg: OnlineDPOConfig, n_steps: int, judge=None):
        self.collector, self.reference, self.cfg, self.n_steps = collector, reference, cfg, n_steps
        self.judge = judge  # a pairwise judge (alignkit.feedback.judges); None: the reward functions decide
        self._metrics: Metrics = {}
        self._filler: Encoded | None = None

    def pairwise(self, groups: list[Group]) -> list[Encoded]:
        """The first two samples of each group, compared by the judge in both orders; ties give no pair."""
        from alignkit.eval.metrics import combine_swapped
        from alignkit.feedback.judges import judge_both_orders

        first_turn = [g.prompt.prompt[-1]["content"] if isinstance(g.prompt.prompt, list) else g.prompt.prompt
                      for g in groups]
        a, b = [g.completions[0].text for g in groups], [g.completions[1].text for g in groups]
        v_ab, v_ba = judge_both_orders(self.judge, first_turn, a, b)
        pairs = []
        for g, x, y in zip(groups, v_ab, v_ba):
            pref = combine_swapped(x, y)
            if pref != 0.5:
                win, lose = (0, 1) if pref > 0.5 else (1, 0)
                pairs.append(Encoded(g.prompt.ids, [list(g.completions[win].token_ids),
                                                    list(g.completions[lose].token_ids)], g.index))
        return pairs

    def rows(self, step: int, model) -> list[Encoded]:
        """This process's share ``[rank::world]`` of the step's pairs (judged alike on every process)."""
        m = Sums()
        t0 = time.perf_counter()
        self.collector.engine.update_weights(model, version=step)
        groups = self.collector.collect(step, self.cfg.prompts_per_step * dist.world(), m, version=step)
        if self.judge is not None:
            pairs = self.pairwise(groups) if groups else []
        else:
            pairs = [p for p in map(judged_pair, groups) if p is not None]
        m.add("pairs/judged", float(len(pairs)), float(max(1, len(groups))), shared=True)
        if pairs:  # every pair's, on every process (Reference.fill shares the work out)
            self.reference.fill(model, pairs, progress=False)
        self._filler = pairs[0] if pairs else None
        m.add("time/rollout", time.perf_counter() - t0, 1.0)
        self._metrics = m.out()
        return pairs[dist.rank() :: dist.world()]

    def filler(self) -> Encoded | None:
        """A pair with its reference log-probs, for a process that holds none this step; None without pairs."""
        return self._filler

    def metrics(self) -> Metrics:
        m, self._metrics = self._metrics, {}
        return m

    def state_dict(self) -> dict:
        return {"sampler": self.collector.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.collector.sampler.load_state_dict(state["sampler"])


def run(cfg: OnlineDPOConfig) -> dict:
    o = prepare_online(cfg)
    reference = Reference(o.policy, "cached", o.tok.pad_token_id, cfg.logits_chunk, cfg.batch_size, cfg.precision,
                          cfg.share_prompt)
    if o.lora is None:
        reference.frozen = initial_model(cfg)
    collector = Collector(o.engine, o.rewards, o.prompts, PromptSampler(len(o.prompts), cfg.seed), cfg)
    n_steps = cfg.max_steps if cfg.max_steps > 0 else online_steps(cfg, len(o.prompts))
    task = PreferenceTask(cfg, o.tok.pad_token_id, reference)
    judge = None
    if cfg.judge:
        from alignkit.feedback.judges import judge_from_spec

        judge = judge_from_spec(cfg.judge, judge_model=cfg.judge_model or None)
    source = JudgedPairs(collector, reference, cfg, n_steps, judge)
    return train_online(o, task, o.policy, source, cfg, "online-dpo")
