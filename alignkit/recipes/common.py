"""What every recipe does around the training loop: logging, data, model, config and final model on disk."""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from alignkit.config import TrainConfig, to_dict
from alignkit.data.formats import describe, load_examples
from alignkit.data.tokenize import Encoded, encode_all
from alignkit.models.loading import LoraSettings, base_model_path, compile_layers, load_model
from alignkit.train import dist, strategy
from alignkit.train.checkpoint import list_checkpoints, prepare_output_dir

log = logging.getLogger("alignkit")


def setup_logging() -> None:
    """Info messages from the main process only; other processes report warnings and errors."""
    if not logging.getLogger().handlers:
        level = logging.INFO if dist.rank() == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    model: object
    tokenizer: object
    train: list[Encoded]
    eval: list[Encoded]
    out: Path


def log_data(loaded) -> None:
    log.info(describe(loaded))


def split_eval(cfg: TrainConfig, examples: list, kind: str) -> tuple[list, list]:
    """(training, held-out) examples: ``eval_data`` if given, else an ``eval_fraction`` share of ``data``.

    The share is drawn by prompt group (a ranking's pairs stay on one side), seeded by ``cfg.seed``.
    """
    if cfg.eval_data:
        return examples, load_examples(cfg.eval_data, kind, skip_invalid=cfg.skip_invalid).examples
    if cfg.eval_fraction <= 0:
        return examples, []
    groups = sorted({getattr(ex, "group", i) for i, ex in enumerate(examples)})
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held_groups = {groups[i] for i in order[: max(1, int(round(cfg.eval_fraction * len(groups))))]}
    key = [getattr(ex, "group", i) for i, ex in enumerate(examples)]
    return ([ex for ex, k in zip(examples, key) if k not in held_groups],
            [ex for ex, k in zip(examples, key) if k in held_groups])


def resuming(cfg: TrainConfig) -> bool:
    """Whether this run continues from a checkpoint (``resume=true`` and one exists)."""
    return cfg.resume and bool(list_checkpoints(Path(cfg.output_dir) / "checkpoints"))


def write_config(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def load_training_data(cfg: TrainConfig, kind: str):
    """The run's data, validated and logged; AI labels whose judge failed its labeler-alignment gate
    (``labeler_alignment.json`` beside them, written by ``alignkit cai``) stop the run unless ``force=true``."""
    loaded = load_examples(cfg.data, kind, skip_invalid=cfg.skip_invalid)
    log_data(loaded)
    if hasattr(cfg, "force"):
        from alignkit.feedback.alignment import check_labels

        check_labels(cfg.data, cfg.force)
    return loaded


def prepare(cfg: TrainConfig, kind: str, check: Callable[[list], None] | None = None, encoder=None) -> Prepared:
    """Validate the data (all of it) and the output directory before any model is loaded, then load the model,
    tokenize, split, save config. ``check``: called with every example (training and held out) before anything
    is written, for a recipe's own checks of the data against its config. ``encoder``: a recipe's own
    ``(example, tok, index) -> Encoded`` in place of :func:`alignkit.data.tokenize.encode`."""
    dist.init()
    setup_logging()
    seed_everything(cfg.seed)
    examples, held = split_eval(cfg, load_training_data(cfg, kind).examples, kind)
    if check is not None:
        check(examples + held)
    prepare_output_dir(cfg)
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target) if cfg.lora else None
    model, tok = load_model(cfg.model, lora=lora, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)
    strategy.place(model, cfg.device)  # before any work outside the loop (DPO's reference pass, its "before" eval)
    if cfg.compile:
        log.info("torch.compile: %d decoder layers (compiled on the first step)", compile_layers(model))
    enc_args = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length or None, truncation=cfg.truncation,
                    encoder=encoder)
    train, ev = encode_all(examples, tok, **enc_args), encode_all(held, tok, **enc_args)
    if train.n_truncated or train.n_dropped:
        log.info("over max_length=%d: %d rows truncated, %d dropped (truncation=%s)",
                 cfg.max_length, train.n_truncated, train.n_dropped, cfg.truncation)
    if not train.rows:
        from alignkit.errors import DataError

        raise DataError("no training rows left after truncation", path=cfg.data)
    out = write_config(cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %d train rows, %d eval rows, %.2fM trainable parameters", cfg.model, len(train.rows), len(ev.rows), n_params / 1e6)
    return Prepared(model, tok, train.rows, ev.rows, out)


def save_final(model, tok, cfg: TrainConfig, method: str, summary: dict):
    """Write ``OUTPUT/final/``: merged weights (or the LoRA adapter naming its base), tokenizer, and a summary.

    Returns the model to keep using (the merged one when LoRA was merged).
    """
    out = Path(cfg.output_dir) / "final"
    model = strategy.unsharded(model)  # gathered onto the main process when sharded (None elsewhere)
    if model is not None and hasattr(model, "merge_and_unload") and cfg.save_merged:
        model = model.merge_and_unload()
    if dist.rank() == 0:
        if hasattr(model, "peft_config"):
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = base_model_path(cfg.model)
        model.config.use_cache = True
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "alignkit.json").write_text(json.dumps({"method": method, "base_model": cfg.model, **summary}, indent=2))
        log.info("final model written to %s", out)
    return model
