"""Batched greedy generation for evaluation (left padding, KV cache, optional bf16 autocast)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from alignkit.models.logprobs import autocast


def generate(model, tok, conversations: list[list[dict]], *, max_new_tokens: int = 64, batch_size: int = 32,
             precision: str = "bf16", desc: str = "generate") -> list[str]:
    """Greedy responses to chat ``conversations`` (each a message list ending with the user's turn)."""
    was_training, use_cache, side = model.training, model.config.use_cache, tok.padding_side
    model.eval()
    model.config.use_cache = True
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(texts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), autocast(precision):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for i, text in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
                out[i] = text.strip()
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
        tok.padding_side = side
    return out
