"""Does bf16 autocast change the gradient of a DPO-LoRA step? The LoRA B gradient in bf16 (shared-prompt and
separate layouts) against fp32, on SmolLM2-135M-Instruct and the first 8 pairs of ``asdiv-prefs``.

    python bench/dpo_bf16_grad.py

The B matrices get seeded random values (std 1e-3), so the policy is away from the reference; the reference
log-probs are computed in fp32 for every run, so the losses printed differ by the policy pass's precision.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from alignkit.config import DPOConfig, build
from alignkit.data.formats import load_examples
from alignkit.data.sources import fetch
from alignkit.data.tokenize import encode_all
from alignkit.models.loading import LoraSettings, load_model
from alignkit.models.logprobs import autocast
from alignkit.recipes.dpo import PreferenceTask, Reference


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct", lora=LoraSettings(16, 32, 0.0, "all-linear"))
    pairs = (fetch("asdiv-prefs") / "train.jsonl").read_text().splitlines()[:8]
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(line + "\n" for line in pairs))
    rows = encode_all(load_examples(str(data), "preference").examples, tok, max_length=1024, max_prompt_length=None,
                      truncation="truncate").rows
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.normal_(0, 1e-3)
    b_params = [p for n, p in model.named_parameters() if n in names]

    def gradient(precision: str, share: bool) -> tuple[float, torch.Tensor]:
        cfg = build(DPOConfig, overrides=dict(data="-", precision=precision, share_prompt=share, batch_size=8, lora=True))
        ref = Reference(model, "cached", tok.pad_token_id, cfg.logits_chunk, 8, "fp32", share)
        ref.fill(model, rows)
        model.zero_grad()
        with autocast(precision):
            loss, _ = PreferenceTask(cfg, tok.pad_token_id, ref).loss(model, rows, 8.0)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in b_params])

    loss32, g32 = gradient("fp32", True)
    print(f"fp32, shared prompt: loss {loss32:.6f}")
    for precision, share in (("fp32", False), ("bf16", True), ("bf16", False)):
        loss, g = gradient(precision, share)
        cos = torch.nn.functional.cosine_similarity(g, g32, dim=0).item()
        signs = (g.sign() == g32.sign()).float().mean().item()
        print(f"{precision}, share_prompt={share}: loss {loss:.6f}; B gradient against fp32 shared: cosine {cos:.4f}, "
              f"signs equal {signs:.3f}, norm ratio {(g.norm() / g32.norm()).item():.3f}")


if __name__ == "__main__":
    main()
