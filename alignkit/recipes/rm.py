"""Reward models: ``alignkit rm`` (Bradley-Terry on pairs and rankings; ``process=true`` for step labels).

Pairs of the same prompt group (a ranking's K(K-1)/2 pairs, InstructGPT's batching) form one training row:
each distinct response goes through the model once and every pair of the group is scored from those rewards.
A row's weight in the step's normaliser is its number of labelled (pair, aspect) entries.

Aspects: with ``aspects=helpfulness,safety`` the model has one head per aspect. A preference row may carry
``"aspects": {"helpfulness": 1, "safety": -1}`` (1: chosen is better on that aspect, -1: rejected is better,
0 or absent: not labelled, masked) or ``"aspect": "safety"`` (labelled for that aspect only); a row with
neither is labelled for every aspect. ``aspect_weights`` combine the heads into one reward when scoring.

Soft labels: a pair row's ``soft_label`` s (the probability that the row's label is right, as an AI judge gives
it) is the Bradley-Terry target of each of its labelled aspects, ``-(s log sigma(d) + (1 - s) log sigma(-d))``,
so the reward gap is fitted to ``sigma(d) = s`` rather than pushed apart without end (``soft_labels=ignore``:
hard labels). Ranking rows have none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignkit.config import RMConfig
from alignkit.data.collate import collate_shared, pad
from alignkit.data.tokenize import Encoded, fit, render, render_steps
from alignkit.errors import DataError
from alignkit.losses.reward import bradley_terry, prm_bce
from alignkit.models.loading import LoraSettings
from alignkit.models.device import model_device, on_model
from alignkit.models.logprobs import autocast
from alignkit.models.reward import (
    RewardMeta, load_reward_backbone, position_rewards, save_meta, sequence_rewards, shared_rewards,
)
from alignkit.recipes.common import load_training_data, seed_everything, setup_logging, split_eval, write_config
from alignkit.train.checkpoint import prepare_output_dir
from alignkit.train import dist, strategy
from alignkit.train.loop import derive_std, evaluate, micro_batches, train

log = logging.getLogger("alignkit")


def aspect_labels(example, aspects: list[str]) -> list[int]:
    """+1 / -1 / 0 (masked) for each aspect of a preference example."""
    extra = example.extra
    if "aspects" in extra and extra["aspects"] is not None:
        given = extra["aspects"]
        if not isinstance(given, dict):
            raise example.origin.error(f"expected an object of aspect: 1 | -1 | 0, found {type(given).__name__}", "aspects")
        unknown = [a for a in given if a not in aspects]
        if unknown:
            raise example.origin.error(f"unknown aspect(s) {unknown}; the model's aspects are {aspects}", "aspects")
        labels = []
        for a in aspects:
            v = given.get(a)
            if v not in (None, 0, 1, -1) or isinstance(v, bool):
                raise example.origin.error(f"aspect '{a}': expected 1, -1, 0 or null, found {v!r}", "aspects")
            labels.append(int(v or 0))
        return labels
    if extra.get("aspect") is not None:
        if extra["aspect"] not in aspects:
            raise example.origin.error(f"unknown aspect {extra['aspect']!r}; the model's aspects are {aspects}", "aspect")
        return [1 if a == extra["aspect"] else 0 for a in aspects]
    return [1] * len(aspects)


def encode_groups(examples, tok, aspects: list[str], cfg: RMConfig) -> list[Encoded]:
    """One row per prompt group: its distinct responses and its pairs ``(i, j, margin, soft_label, labels)``
    (soft label 1.0 for a hard label, or with ``soft_labels=ignore``)."""
    groups: dict[int, list] = {}
    for ex in examples:
        groups.setdefault(ex.group, []).append(ex)
    rows = []
    for exs in groups.values():
        responses: list[list[int]] = []
        where: dict[tuple, int] = {}
        pairs = []
        for ex in exs:
            prompt, chosen = render(tok, ex.prompt, ex.chosen, ex.origin)
            _, rejected = render(tok, ex.prompt, ex.rejected, ex.origin)
            ij = []
            for ids in (chosen, rejected):
                ij.append(where.setdefault(tuple(ids), len(responses)))
                if ij[-1] == len(responses):
                    responses.append(ids)
            labels = aspect_labels(ex, aspects)
            if any(labels):
                soft = 1.0 if ex.soft_label is None or cfg.soft_labels == "ignore" else ex.soft_label
                pairs.append((ij[0], ij[1], float(ex.margin or 0.0), soft, labels))
        enc = fit(Encoded(prompt, responses, len(rows), extra={"pairs": pairs}), cfg.max_length,
                  cfg.max_prompt_length or None, cfg.truncation)
        if enc is not None and pairs:
            enc.index = len(rows)
            rows.append(enc)
    return rows


def encode_steps(examples, tok, cfg: RMConfig) -> list[Encoded]:
    rows = []
    for ex in examples:
        prompt, response, positions = render_steps(tok, ex.prompt, ex.steps, cfg.step_separator)
        enc = fit(Encoded(prompt, [response], len(rows)), cfg.max_length, cfg.max_prompt_length or None, cfg.truncation)
        if enc is None:
            continue
        kept = [(p, lab) for p, lab in zip(positions, ex.labels) if p < len(enc.responses[0])]
        if kept:
            enc.extra = {"positions": [p for p, _ in kept], "labels": [float(lab) for _, lab in kept]}
            enc.index = len(rows)
            rows.append(enc)
    return rows


def _forward(model, rows: list[Encoded], pad_id: int, shared: bool = True) -> list[torch.Tensor]:
    """Rewards ``[R_i, K]`` of every response of every row, on the model's device.

    With ``shared`` each row is one sequence ``prompt + response_1 + ... + response_R`` whose prompt is computed
    once (``collate_shared``); otherwise every response is a padded sequence of its own.
    """
    if shared:
        r_SK = shared_rewards(model, on_model(collate_shared(rows, pad_id), model))
    else:
        batch = pad([(r.prompt + resp, [True] * (len(r.prompt) + len(resp))) for r in rows for resp in r.responses], pad_id)
        batch = on_model(batch, model)
        r_SK = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    return list(r_SK.split([len(r.responses) for r in rows]))


class PairRewardTask:
    """Bradley-Terry over every labelled (pair, aspect) of the rows."""

    def __init__(self, cfg: RMConfig, n_aspects: int, pad_id: int):
        self.cfg, self.K, self.pad_id = cfg, n_aspects, pad_id

    def weight(self, row: Encoded) -> float:
        return float(sum(sum(1 for v in labels if v) for *_, labels in row.extra["pairs"]))

    def loss(self, model, rows, normaliser):
        rewards = _forward(model, rows, self.pad_id, self.cfg.share_prompt)
        win, lose, margin, target, sign = [], [], [], [], []
        for r_RK, row in zip(rewards, rows):
            for i, j, m, s, labels in row.extra["pairs"]:
                win.append(r_RK[i])
                lose.append(r_RK[j])
                margin.append(m)
                target.append(s)
                sign.append(labels)
        a_PK, b_PK = torch.stack(win), torch.stack(lose)
        sign_PK = torch.tensor(sign, dtype=torch.float32, device=a_PK.device)
        # a label of -1 means the rejected response is the better one on that aspect
        better = torch.where(sign_PK < 0, b_PK, a_PK)
        worse = torch.where(sign_PK < 0, a_PK, b_PK)
        soft = None if all(s == 1.0 for s in target) else torch.tensor(target, device=a_PK.device)
        out = bradley_terry(better, worse, margin_P=torch.tensor(margin, device=a_PK.device), mask_PK=sign_PK != 0,
                            center_coef=self.cfg.center_coef, target_P=soft)
        total = out.losses.sum()
        all_r = torch.cat(rewards).detach()
        n = float(out.mask.sum())
        metrics = {
            "loss": (total.item(), n),
            "accuracy": (float(out.correct[out.mask].sum()), n),
            "margin": (float(out.margins[out.mask].sum()), n),
            "rewards/mean": (float(all_r.sum()), float(all_r.numel())),
            "rewards/sumsq": (float((all_r**2).sum()), float(all_r.numel())),
        }
        if self.K > 1:
            for k, name in enumerate(self.cfg.aspect_names):
                mk = out.mask[:, k]
                metrics[f"accuracy/{name}"] = (float(out.correct[:, k][mk].sum()), float(mk.sum()))
        return total / normaliser, metrics


class StepRewardTask:
    """Process reward model: binary cross-entropy at each step's last token."""

    def __init__(self, cfg: RMConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id

    def weight(self, row: Encoded) -> float:
        return float(len(row.extra["positions"]))

    def loss(self, model, rows, normaliser):
        batch = pad([(r.prompt + r.responses[0], [True] * (len(r.prompt) + len(r.responses[0]))) for r in rows], self.pad_id)
        batch = on_model(batch, model)
        pos = [[len(r.prompt) + p for p in r.extra["positions"]] for r in rows]
        logits = torch.cat([v[:, 0] for v in position_rewards(model, batch["input_ids"], batch["attention_mask"], pos)])
        labels = torch.tensor([lab for r in rows for lab in r.extra["labels"]], device=logits.device)
        losses = prm_bce(logits, labels)
        n = float(labels.numel())
        correct = ((logits > 0).float() == labels).float().sum().item()
        return losses.sum() / normaliser, {"loss": (losses.sum().item(), n), "step_accuracy": (correct, n)}


def reward_stats(model, rows: list[Encoded], pad_id: int, batch_size: int, precision: str, shared: bool, limit: int = 1024):
    """Mean and std ``[K]`` of the rewards of (up to ``limit``) training responses, for normalisation."""
    was_training = model.training
    model.eval()
    got = []
    with torch.no_grad(), autocast(precision, model_device(model)):
        for mb in micro_batches(rows[:limit], batch_size, True):
            got += strategy.call(model, _forward, model, mb, pad_id, shared)
    model.train(was_training)
    r_NK = torch.cat(got).float().cpu()
    return r_NK.mean(0).tolist(), r_NK.std(0).clamp_min(1e-6).tolist()


def run(cfg: RMConfig) -> dict:
    dist.init()
    setup_logging()
    seed_everything(cfg.seed)
    aspects = cfg.aspect_names
    kind = "stepwise" if cfg.process else "preference"
    examples, held = split_eval(cfg, load_training_data(cfg, kind).examples, kind)
    prepare_output_dir(cfg)
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target) if cfg.lora else None
    model, tok = load_reward_backbone(cfg.model, 1 if cfg.process else len(aspects), lora=lora, seed=cfg.seed)
    strategy.place(model, cfg.device)  # before any work outside the loop (the reward statistics)
    if cfg.process:
        train_rows, eval_rows = encode_steps(examples, tok, cfg), encode_steps(held, tok, cfg)
        task = StepRewardTask(cfg, tok.pad_token_id)
    else:
        train_rows, eval_rows = encode_groups(examples, tok, aspects, cfg), encode_groups(held, tok, aspects, cfg)
        task = PairRewardTask(cfg, len(aspects), tok.pad_token_id)
    if not train_rows:
        raise DataError("no training rows left after truncation", path=cfg.data)
    write_config(cfg)
    log.info("%s reward model (%s): %d train rows, %d eval rows", cfg.model, ",".join(aspects), len(train_rows), len(eval_rows))
    ev = (lambda: evaluate(task, model, eval_rows, cfg.batch_size)) if eval_rows else None
    result = train(task, model, train_rows, cfg, evaluate=ev)
    last = result.history[-1] if result.history else {}
    meta = RewardMeta(aspects=aspects, weights=cfg.weights, process=cfg.process, step_separator=cfg.step_separator,
                      aggregate=cfg.aggregate)
    if not cfg.process:
        meta.mean, meta.std = reward_stats(model, train_rows, tok.pad_token_id, cfg.batch_size, cfg.precision, cfg.share_prompt)
    summary = {"steps": result.steps,
               "train": derive_std({k: v for k, v in last.items() if not k.startswith("eval/")}),
               "eval": derive_std({k[5:]: v for k, v in last.items() if k.startswith("eval/")})}
    save(model, tok, meta, Path(cfg.output_dir) / "final", cfg.save_merged)
    return summary


def save(model, tok, meta: RewardMeta, out: Path, merge: bool = True) -> None:
    model = strategy.unsharded(model)  # gathered onto the main process when sharded (None elsewhere)
    if model is not None and hasattr(model, "merge_and_unload") and merge:
        model = model.merge_and_unload()
    if dist.rank() == 0:
        model.config.use_cache = True
        model.save_pretrained(out)
        tok.save_pretrained(out)
        save_meta(out, meta)
        log.info("reward model written to %s", out)

