"""How bf16 autocast measures a DPO-LoRA step, on SmolLM2-135M-Instruct and the first 8 pairs of ``asdiv-prefs``.

    python bench/dpo_bf16_lora.py

1. The gradient. The LoRA B matrices get seeded random values (std 1e-3), so the policy is away from the
   reference; the B gradient in bf16 (shared-prompt and separate layouts) is compared with fp32's.
2. The log-ratios after one update. From B = 0, one fp32 AdamW step (lr 1e-5 and 1e-4, clipping at 1.0) moves
   the policy; then each pair's margin ``(log pi - log ref)(chosen) - (log pi - log ref)(rejected)`` is measured
   in fp32 and in bf16, the reference taken in the same precision and layout (the base with adapters off), with
   alignkit's LoRA layers (the base + adapter sum in float32, ``alignkit/models/lora.py``) and with peft's own
   forward. ``seen`` is the least-squares slope of the bf16 margins on the fp32 ones (1 = the whole update is
   seen); an error that does not shrink with the learning rate is rounding noise, one that grows with it is bias.
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
from alignkit.models.lora import ExactSumLinear
from alignkit.recipes.dpo import PreferenceTask, Reference, reference_off, response_logps


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct", lora=LoraSettings(16, 32, 0.0, "all-linear"))
    pad = tok.pad_token_id
    pairs = (fetch("asdiv-prefs") / "train.jsonl").read_text().splitlines()[:8]
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(line + "\n" for line in pairs))
    rows = encode_all(load_examples(str(data), "preference").examples, tok, max_length=1024, max_prompt_length=None,
                      truncation="truncate").rows
    b_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad(precision: str, share: bool) -> tuple[float, torch.Tensor]:
        cfg = build(DPOConfig, overrides=dict(data="-", precision=precision, share_prompt=share, batch_size=8, lora=True))
        ref = Reference(model, "cached", pad, cfg.logits_chunk, 8, "fp32", share)
        ref.fill(model, rows, progress=False)
        model.zero_grad()
        with autocast(precision):
            loss, _ = PreferenceTask(cfg, pad, ref).loss(model, rows, 8.0)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in b_params])

    print("1. The B gradient at random B (std 1e-3), against fp32 with the shared prompt")
    with torch.no_grad():
        for p in b_params:
            p.normal_(0, 1e-3)
    loss32, g32 = loss_and_grad("fp32", True)
    print(f"   fp32, share_prompt=True: loss {loss32:.6f}")
    for precision, share in (("fp32", False), ("bf16", True), ("bf16", False)):
        loss, g = loss_and_grad(precision, share)
        cos = torch.nn.functional.cosine_similarity(g, g32, dim=0).item()
        signs = (g.sign() == g32.sign()).float().mean().item()
        print(f"   {precision}, share_prompt={share}: loss {loss:.6f}; cosine {cos:.4f}, signs equal {signs:.3f}, "
              f"norm ratio {(g.norm() / g32.norm()).item():.3f}")

    def margins(precision: str, share: bool, peft_sum: bool = False) -> torch.Tensor:
        from peft.tuners.lora.layer import Linear

        layers = [m for m in model.modules() if isinstance(m, ExactSumLinear)]
        for m in layers if peft_sum else ():
            m.__class__ = Linear
        try:
            with torch.no_grad(), autocast(precision):
                policy = response_logps(model, rows, (0, 1), pad, 1024, share)[0].float()
                with reference_off(model):
                    ref = response_logps(model, rows, (0, 1), pad, 1024, share)[0].float()
        finally:
            for m in layers:
                m.__class__ = ExactSumLinear
        ratio = policy - ref
        return ratio[:, 0] - ratio[:, 1]

    print("2. Each pair's margin after one fp32 AdamW step from B = 0")
    for lr in (1e-5, 1e-4):
        with torch.no_grad():
            for p in b_params:
                p.zero_()
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        loss_and_grad("fp32", True)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        m32 = margins("fp32", True)
        print(f"   lr {lr:g}: fp32 margins {[round(x, 3) for x in m32.tolist()]} (rms {m32.square().mean().sqrt():.3f})")
        for precision, share, peft_sum in (("fp32", False, False), ("bf16", True, False), ("bf16", False, False),
                                           ("bf16", True, True), ("bf16", False, True)):
            m = margins(precision, share, peft_sum)
            err = m - m32
            seen = (m * m32).sum() / (m32 * m32).sum()
            print(f"     {precision}, share_prompt={share}{', peft sum' if peft_sum else ''}: seen {seen:.2f}, "
                  f"error rms {err.square().mean().sqrt():.4f}, max {err.abs().max():.4f}")


if __name__ == "__main__":
    main()
