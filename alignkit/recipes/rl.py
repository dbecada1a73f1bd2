"""Online RL: ``alignkit grpo preset=grpo|dr_grpo|dapo|gspo|rloo|reinforce_pp|kimi`` and ``alignkit ppo``.

Prompt rows (``prompt`` as text or a message list, plus any columns the reward functions read, e.g. ``answer``)
-> rollouts (the in-process engine) -> rewards -> advantages -> the policy loss, all on the one training loop
(``alignkit.rl.trainer`` has the details). The models:

- policy: the model being trained (LoRA or full);
- reference (only when the objective uses a KL term): with LoRA the base with adapters off, costing no memory;
  otherwise the initial weights loaded again and frozen (so a resumed run still compares with them);
- reward: the reward functions, one of which may be a trained reward model (``rewards=rm:PATH``);
- value (only for ``advantage=gae``, i.e. PPO): a head on its own backbone (``value_model=separate``) or on
  the policy's trunk (``value_model=shared``).

Held-out prompts (``eval_data`` or ``eval_fraction``) are answered greedily before training, every
``eval_steps`` and at the end; the mean of every reward function over them is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import RLConfig, RolloutConfig
from alignkit.data.formats import load_examples
from alignkit.data.tokenize import prompt_ids
from alignkit.errors import ConfigError, DataError
from alignkit.models.loading import LoraSettings, compile_layers, load_model
from alignkit.recipes.common import (log_data, resuming, save_final, seed_everything, setup_logging, split_eval,
                                     write_config)
from alignkit.rl.objective import KLController
from alignkit.rl.rewards import SUPPLIED_COLUMNS, RewardContext, build_reward_set, completion_columns
from alignkit.rl.engines import build_engine
from alignkit.rl.pipeline import Serialised, pipelined
from alignkit.rl.rollout import RolloutEngine
from alignkit.rl.sampling import Curriculum, DynamicSampler, PromptSampler
from alignkit.rl.trainer import ActorCritic, Collector, PolicyTask, Prompt, Rollouts, ValueHead, sampling_params
from alignkit.train import dist, strategy
from alignkit.train.checkpoint import prepare_output_dir
from alignkit.train.loop import train

log = logging.getLogger("alignkit")


def encode_prompts(examples, tok, max_prompt_length: int, path: str) -> list[Prompt]:
    """Token ids of each prompt: message lists through the chat template (with the generation prompt), plain
    text as it is (TRL's conversational and standard formats). Over-long prompts keep their last tokens."""
    out = []
    for ex in examples:
        ids = prompt_ids(tok, ex.prompt)
        if not ids:
            raise DataError("empty prompt", path=path, line=getattr(ex.origin, "line", None), field="prompt")
        out.append(Prompt(ids[-max_prompt_length:], ex.prompt, dict(ex.extra)))
    return out


def load_prompts(cfg: RolloutConfig) -> tuple[list, list]:
    """The training and held-out prompt examples, validated (all of them, before any model is loaded)."""
    loaded = load_examples(cfg.data, "prompt", skip_invalid=cfg.skip_invalid)
    log_data(loaded)
    return split_eval(cfg, loaded.examples, "prompt")


def encode_split(cfg: RolloutConfig, tok, train_ex: list, held: list) -> tuple[list[Prompt], list[Prompt]]:
    limit = cfg.max_prompt_length or cfg.max_length // 2
    held_prompts = encode_prompts(held, tok, limit, cfg.eval_data or cfg.data)
    if cfg.eval_prompts > 0:
        held_prompts = held_prompts[: cfg.eval_prompts]
    return encode_prompts(train_ex, tok, limit, cfg.data), held_prompts


def reward_context(cfg, **extra) -> RewardContext:
    """The reward functions' settings from a run's config (the overlong buffer defaults to a quarter of the token
    limit); ``extra``: further :class:`RewardContext` fields."""
    return RewardContext(max_new_tokens=cfg.max_new_tokens, language=cfg.language, timeout=cfg.reward_timeout,
                         overlong_buffer=cfg.overlong_buffer or max(1, cfg.max_new_tokens // 4),
                         l1_alpha=cfg.l1_alpha, l1_delta=cfg.l1_delta, **extra)


def check_reward_columns(rewards, examples: list, path: str) -> None:
    """Every column a reward function reads (its declared ``columns``) is in every row: exit 2 naming the
    column, the reward and the first row without it, before any model is loaded. Without this a missing
    ``answer`` column makes every reward None, so no step has anything to learn from."""
    for name, fn, _ in rewards.functions:
        for column in getattr(fn, "columns", ()):
            if column in SUPPLIED_COLUMNS:
                continue
            for ex in examples:
                if ex.extra.get(column) is None:
                    raise DataError(f"reward function {name!r} reads column {column!r}, which this row lacks "
                                    f"(add it to every row, or choose other rewards=)", path=ex.origin.path,
                                    line=ex.origin.line, field=column)


def evaluator(engine, rewards, prompts: list[Prompt], policy, cfg):
    """Greedy answers to the held-out prompts, scored by every reward function: ``{reward/<name>: mean}``."""

    def evaluate() -> dict:
        engine.update_weights(policy)
        sampling = dataclasses.replace(sampling_params(cfg), temperature=0.0)  # greedy, thinking as configured
        comps = [g[0] for g in engine.generate([p.ids for p in prompts], 1, sampling)]
        cols: dict[str, list] = {}
        for p in prompts:
            for k, v in p.columns.items():
                cols.setdefault(k, []).append(v)
        scores = rewards([p.prompt for p in prompts], [c.text for c in comps], {**cols, **completion_columns(comps)})
        out = {}
        for name, vals in scores.per_function.items():
            got = [v for v in vals if v is not None]
            out[f"reward/{name}"] = sum(got) / len(got) if got else float("nan")
        out["length"] = sum(len(c.token_ids) for c in comps) / max(1, len(comps))
        return out

    return evaluate


@dataclass
class Online:
    """What every online method sets up: the policy, its prompts, the reward functions and the rollout engine."""

    policy: object
    tok: object
    lora: LoraSettings | None
    prompts: list[Prompt]
    held: list[Prompt]
    rewards: object
    engine: RolloutEngine
    evaluate: object  # () -> dict, or None without held-out prompts


def prepare_online(cfg: RolloutConfig) -> Online:
    """Rewards, data and output directory are checked first (a mistake there exits 2 before a model loads)."""
    dist.init()
    setup_logging()
    if cfg.rollout_backend == "ray" and dist.world() > 1:
        raise ConfigError("rollout_backend=ray with several training processes is not supported yet: launch the "
                          "trainer as one process (its Ray workers generate), or use rollout_backend=local")
    if pipelined(cfg) and dist.world() > 1:
        raise ConfigError(f"max_staleness={cfg.max_staleness} (asynchronous rollouts) with several training processes "
                          "is not supported yet: run one process, or max_staleness=0")
    seed_everything(cfg.seed)
    # a reward model: frozen, sharded
    rewards = build_reward_set(cfg.rewards, cfg.reward_weights,
                               reward_context(cfg, place_model=lambda model: strategy.prepare(model, cfg)))
    train_ex, held_ex = load_prompts(cfg)
    check_reward_columns(rewards, train_ex, cfg.data)
    check_reward_columns(rewards, held_ex, cfg.eval_data or cfg.data)
    prepare_output_dir(cfg)
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target) if cfg.lora else None
    policy, tok = load_model(cfg.model, lora=lora, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.compile:
        log.info("torch.compile: %d decoder layers (compiled on the first step)", compile_layers(policy))
    prompts, held = encode_split(cfg, tok, train_ex, held_ex)
    write_config(cfg)
    rewards.warm_up()
    # on its device before the engine copies it and the "before" evaluation generates (sharded later, by the loop)
    strategy.place(policy, cfg.device)
    engine = build_engine(policy, tok, cfg)
    if pipelined(cfg):  # the background rollouts and the held-out evaluation take turns with the engine
        engine = Serialised(engine)
    evaluate = evaluator(engine, rewards, held, policy, cfg) if held else None
    return Online(policy, tok, lora, prompts, held, rewards, engine, evaluate)


def initial_model(cfg: RolloutConfig):
    """The frozen initial weights (loaded again, so a resumed run still gets the initial model, not a copy), on
    the run's device and sharded like the policy under strategy=fsdp2 (no gradients, no optimizer state)."""
    model = load_model(cfg.model, seed=cfg.seed)[0].eval().requires_grad_(False)
    strategy.prepare(model, cfg)
    return model


def train_online(o: Online, task, model, source, cfg: RolloutConfig, method: str) -> dict:
    """Held-out evaluation before, the training loop, ``final/``; the summary the CLI prints."""
    summary: dict = {"method": method}
    if o.evaluate is not None and not resuming(cfg):
        summary["eval_before"] = o.evaluate()
        log.info("held-out before training: %s", summary["eval_before"])
    result = train(task, model, source, cfg, evaluate=o.evaluate)
    last = result.history[-1] if result.history else {}
    summary.update({k: v for k, v in last.items() if isinstance(v, (int, float))})
    summary["steps"] = result.steps
    if o.evaluate is not None:
        summary["eval_after"] = {k[5:]: v for k, v in last.items() if k.startswith("eval/")}
    save_final(o.policy, o.tok, cfg, method, {"steps": result.steps})
    return summary


def run(cfg: RLConfig) -> dict:
    o = prepare_online(cfg)
    obj = cfg.objective()
    reference = None
    if obj.uses_kl:
        reference = "adapters" if o.lora else initial_model(cfg)
    model = o.policy
    if obj.needs_value_model:
        critic = None if cfg.value_model == "shared" else load_model(
            cfg.model, lora=o.lora, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)[0]
        model = ActorCritic(o.policy, ValueHead(o.policy.config.hidden_size), critic)

    curriculum = Curriculum(len(o.prompts), min_attempts=cfg.curriculum_min_attempts,
                            success_threshold=cfg.success_threshold) if cfg.curriculum else None
    dynamic = DynamicSampler(cfg.max_sampling_rounds) if cfg.use_dynamic_sampling else None
    collector = Collector(o.engine, o.rewards, o.prompts, PromptSampler(len(o.prompts), cfg.seed, curriculum), cfg,
                          dynamic=dynamic, curriculum=curriculum)
    # max_steps counts optimizer steps, as everywhere; each rollout feeds ppo_epochs x mini_batches of them
    updates = cfg.ppo_epochs * cfg.mini_batches
    n_steps = cfg.max_steps if cfg.max_steps > 0 else updates * online_steps(cfg, len(o.prompts))
    kl = KLController(obj.kl_coef, cfg.kl_target, cfg.kl_horizon)
    source = Rollouts(collector, obj, kl, cfg, o.tok.pad_token_id, n_steps, reference=reference)
    task = PolicyTask(obj, kl, o.tok.pad_token_id, cfg.logits_chunk, vf_coef=cfg.vf_coef, value_clip=cfg.value_clip,
                      temperature=cfg.temperature, mismatch_threshold=cfg.mismatch_threshold,
                      mismatch_alarm=cfg.mismatch_alarm, mismatch_strict=cfg.mismatch_strict)
    if pipelined(cfg) and cfg.correction == "none":
        log.warning("max_staleness=%d: completions are sampled by weights up to %d rollouts old and trained on "
                    "without an off-policy correction; correction=tis (or icepop, ...) weighs them back "
                    "(docs/off_policy.md)", cfg.max_staleness, cfg.max_staleness)
    log.info("%s: %d prompts (%d held out), %d optimizer steps, %d per rollout; %s", cfg.preset, len(o.prompts),
             len(o.held), n_steps, updates, obj)
    summary = train_online(o, task, model, source, cfg, cfg.preset)
    if isinstance(model, ActorCritic):
        head = strategy.full_state_dict(model.head)  # gathered from the shards under fsdp2 (all processes)
        if dist.rank() == 0:
            torch.save(head, Path(cfg.output_dir) / "final" / "value_head.pt")
    return summary


def online_steps(cfg: RolloutConfig, n_prompts: int) -> int:
    """Rollouts in ``epochs`` passes over the prompts."""
    return max(1, math.ceil(cfg.epochs * n_prompts / (cfg.prompts_per_step * dist.world())))
