"""Supervised fine-tuning: NLL of response tokens, normalised by the response tokens of the whole step."""

from __future__ import annotations

import logging

from alignkit.config import SFTConfig
from alignkit.data.collate import collate, collate_packed, loss_weights, response_mask, token_weights
from alignkit.data.tokenize import Encoded
from alignkit.losses.sft import nll_sum
from alignkit.models.device import on_model
from alignkit.models.logprobs import token_logps, unwrap
from alignkit.models.packing import enable_packing, supports_packing
from alignkit.recipes.common import prepare, save_final
from alignkit.train.loop import evaluate, train

log = logging.getLogger("alignkit")


class SFTTask:
    """``thinking_weight`` (``thinking_loss``): the loss weight of thinking tokens. At 1 the loss is the plain
    token mean; otherwise each token's NLL is weighted and the step divided by the summed weights, and tokens of
    weight 0 leave the mask (so ``off`` is exactly the loss with the thinking masked out)."""

    def __init__(self, pad_id: int, chunk: int, packed: bool = False, thinking_weight: float = 1.0):
        self.pad_id, self.chunk, self.packed, self.thinking_weight = pad_id, chunk, packed, thinking_weight

    def weight(self, row: Encoded) -> float:
        if self.thinking_weight == 1.0:
            return float(sum(response_mask(row, 0)))
        return sum(w for m, w in zip(response_mask(row, 0), token_weights(row, 0, self.thinking_weight)) if m)

    def loss(self, model, rows, normaliser):
        batch = collate_packed(rows, 0) if self.packed else collate(rows, (0,), self.pad_id)
        weighted = self.thinking_weight != 1.0
        if weighted:
            batch["loss_weight"] = loss_weights(rows, 0, self.thinking_weight, self.packed)
            batch["loss_mask"] = batch["loss_mask"] & (batch["loss_weight"] > 0)
        batch = on_model(batch, model)
        layout = {"position_ids_BT": batch["position_ids"], "packed_layout": batch["packed_layout"]} if self.packed else {}
        lp_BT = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk=self.chunk,
                            **layout)
        nll = nll_sum(lp_BT, batch["loss_mask"], batch["loss_weight"] if weighted else None)
        n = float(batch["loss_weight"][batch["loss_mask"]].sum() if weighted else batch["loss_mask"].sum())
        return nll / normaliser, {"loss": (nll.item(), n)}


def run(cfg: SFTConfig) -> dict:
    p = prepare(cfg, "sft")
    packed = cfg.packing and _packable(p.model)
    if cfg.thinking_weight != 1.0 and not any(row.thinking_masks for row in p.train):
        log.warning("thinking_loss=%s has no effect: no training row has thinking tokens", cfg.thinking_loss)
    task = SFTTask(p.tokenizer.pad_token_id, cfg.logits_chunk, packed, cfg.thinking_weight)
    evaluate_fn = (lambda: evaluate(task, p.model, p.eval, cfg.batch_size)) if p.eval else None
    result = train(task, p.model, p.train, cfg, evaluate=evaluate_fn)
    summary = {k: v for k, v in (result.history[-1] if result.history else {}).items()}
    save_final(p.model, p.tokenizer, cfg, "sft", {"steps": result.steps})
    return summary


def _packable(model) -> bool:
    why_not = supports_packing(unwrap(model))
    if why_not:
        log.warning("packing=true is not used for this model (%s): micro-batches are padded instead", why_not)
        return False
    enable_packing(unwrap(model))
    return True
