"""What the sample-then-select recipes share (``bon``, ``rejection``, ``self-rewarding``): prompts and rewards
checked before any model loads, a policy and its rollout engine, samples as records, and the rows written for
the SFT and DPO recipes that train on them."""

from __future__ import annotations

import dataclasses
import logging

from alignkit.data.formats import load_examples
from alignkit.errors import ConfigError
from alignkit.models.loading import load_model
from alignkit.recipes.common import log_data, seed_everything, setup_logging
from alignkit.recipes.rl import check_reward_columns, encode_prompts, evaluator, reward_context
from alignkit.rl.best_of_n import sample_groups
from alignkit.rl.engines import build_engine
from alignkit.rl.rewards import build_reward_set
from alignkit.train import dist, strategy
from alignkit.train.iterations import finish, finished, iteration_dir, write_json

log = logging.getLogger("alignkit")


def start(cfg, scored: bool = True):
    """Logging and seeds, then the reward set (None without ``rewards``) and the prompt examples, all checked
    (a bad row or reward spec exits 2 naming it) before any model is loaded. ``scored``: the method ranks
    samples, so it needs ``rewards`` or a ``judge``."""
    dist.init()
    setup_logging()
    seed_everything(cfg.seed)
    if scored and not cfg.rewards and not cfg.judge:
        raise ConfigError("set rewards= (reward functions that score each sample, e.g. correctness) or judge= (a "
                          "pairwise judge: llm:MODEL or an http(s):// endpoint)")
    rewards = None
    if cfg.rewards:
        rewards = build_reward_set(cfg.rewards, cfg.reward_weights, reward_context(cfg))
    loaded = load_examples(cfg.data, "prompt", skip_invalid=cfg.skip_invalid)
    log_data(loaded)
    if rewards is not None:
        check_reward_columns(rewards, loaded.examples, cfg.data)
    return rewards, loaded.examples


def pairwise_judge(cfg):
    """The pairwise judge ``cfg.judge`` names (None without one); loaded after the output directory is claimed."""
    if not cfg.judge:
        return None
    from alignkit.feedback.judges import judge_from_spec

    return judge_from_spec(cfg.judge, judge_model=cfg.judge_model or None)


def policy(path: str, cfg):
    """``(model, tokenizer, engine)``: the model at ``path`` in eval mode on the run's device, with a rollout
    engine (``rollout_backend``, local when the config has none) holding its weights."""
    model, tok = load_model(path, seed=cfg.seed)
    model.eval().requires_grad_(False)
    strategy.place(model, getattr(cfg, "device", "auto"))
    if not hasattr(cfg, "rollout_backend"):
        cfg = _WithLocal(cfg)
    return model, tok, build_engine(model, tok, cfg)


class _WithLocal:
    """A config without engine keys, read as ``rollout_backend=local``."""

    def __init__(self, cfg):
        self._cfg = cfg
        self.rollout_backend = "local"

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def encode(examples, tok, cfg):
    limit = cfg.max_prompt_length or cfg.max_length // 2  # as the online recipes keep prompts
    return encode_prompts(examples, tok, limit, cfg.data)


def sample(engine, rewards, prompts, cfg, n: int, round_: int) -> list[list[dict]]:
    """``n`` scored samples of each prompt as records: ``prompt_index``, ``sample``, ``text``, ``tokens``,
    ``finish_reason``, ``reward`` (None: unscored; every reward None without reward functions), ``round``."""
    if rewards is None:
        from alignkit.rl.rewards import RewardSet

        rewards = RewardSet([("none", lambda prompts, completions, **_: [None] * len(completions), 1.0)], timeout=0)
    groups = sample_groups(engine, rewards, prompts, cfg, n, round_)
    return [[{"prompt_index": g.index, "sample": j, "text": c.text, "tokens": len(c.token_ids),
              "finish_reason": c.finish_reason, "reward": r, "round": round_}
             for j, (c, r) in enumerate(zip(g.completions, g.raw))] for g in groups]


def as_response(prompt, text: str):
    """A completion in the form of its prompt: an assistant message for a message-list prompt, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sft_row(example, sample: dict) -> dict:
    """A prompt/completion row for the SFT recipe, keeping the prompt row's columns and the sample's reward."""
    return {**example.extra, "prompt": example.prompt, "completion": as_response(example.prompt, sample["text"]),
            "reward": sample["reward"], "prompt_index": sample["prompt_index"], "round": sample["round"]}


def sub_config(cls, cfg, **changes):
    """A ``cls`` config (SFTConfig, DPOConfig) with every field ``cfg`` shares, then ``changes``; validated."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    sub = cls(**{**values, **changes})
    sub.validate()
    return sub


def held_out(model_path: str, held_ex, rewards, cfg) -> dict:
    """Greedy answers of ``model_path`` to the held-out prompts: ``{eval/reward/<name>: mean, eval/length}``
    (nothing without reward functions)."""
    if rewards is None or not held_ex:
        return {}
    model, tok, engine = policy(model_path, cfg)
    scores = evaluator(engine, rewards, encode(held_ex, tok, cfg), model, cfg)()
    engine.close()
    return {f"eval/{k}": v for k, v in scores.items()}


def iterate(cfg, out, method: str, one_iteration, held_ex=(), rewards=None) -> dict:
    """Run iterations ``1..cfg.iterations`` into ``out/iter_k`` (:mod:`alignkit.train.iterations`): a finished
    one is skipped, reading back its record; ``one_iteration(k, iter_dir, current_model_path)`` does the others
    and returns a record with the ``model`` it produced. The held-out rewards of the base model and of each
    iteration's model are added to the records; ``summary.json`` lists them all."""
    records: list[dict] = []
    current = cfg.model
    if held_ex and rewards is not None:
        records.append({"iteration": 0, "model": current, **held_out(current, held_ex, rewards, cfg)})
    for k in range(1, cfg.iterations + 1):
        it = iteration_dir(out, k)
        done = finished(it)
        if done is None:
            it.mkdir(parents=True, exist_ok=True)
            done = one_iteration(k, it, current)
            done.update(held_out(done["model"], held_ex, rewards, cfg))
            finish(it, done)
        else:
            log.info("iteration %d finished before (%s): skipped", k, it / "done.json")
        records.append(done)
        current = done["model"]
    summary = {"method": method, "final_model": current, "iterations": records}
    write_json(out / "summary.json", summary)
    return summary
