"""Supervised fine-tuning: NLL of response tokens, normalised by the response tokens of the whole step."""

from __future__ import annotations

from alignkit.config import SFTConfig
from alignkit.data.collate import collate
from alignkit.data.tokenize import Encoded
from alignkit.losses.sft import nll_sum
from alignkit.models.logprobs import token_logps
from alignkit.recipes.common import prepare, save_final
from alignkit.train.loop import evaluate, train


class SFTTask:
    def __init__(self, pad_id: int, chunk: int):
        self.pad_id, self.chunk = pad_id, chunk

    def weight(self, row: Encoded) -> float:
        return float(sum(row.response_masks[0]) if row.response_masks else len(row.responses[0]))

    def loss(self, model, rows, normaliser):
        batch = collate(rows, (0,), self.pad_id)
        lp_BT = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk=self.chunk)
        nll = nll_sum(lp_BT, batch["loss_mask"])
        n = float(batch["loss_mask"].sum())
        return nll / normaliser, {"loss": (nll.item(), n)}


def run(cfg: SFTConfig) -> dict:
    p = prepare(cfg, "sft")
    task = SFTTask(p.tokenizer.pad_token_id, cfg.logits_chunk)
    evaluate_fn = (lambda: evaluate(task, p.model, p.eval, cfg.batch_size)) if p.eval else None
    result = train(task, p.model, p.train, cfg, evaluate=evaluate_fn)
    summary = {k: v for k, v in (result.history[-1] if result.history else {}).items()}
    save_final(p.model, p.tokenizer, cfg, "sft", {"steps": result.steps})
    return summary
