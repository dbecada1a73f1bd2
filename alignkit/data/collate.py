"""Padding a micro-batch of (prompt, response) sequences into tensors."""

from __future__ import annotations

import torch

from alignkit.data.tokenize import Encoded


def sequences(rows: list[Encoded], response: int) -> list[tuple[list[int], list[bool]]]:
    """``prompt + responses[response]`` of each row, with its loss mask (true on response tokens)."""
    out = []
    for row in rows:
        resp = row.responses[response]
        mask = row.response_masks[response] if row.response_masks else [True] * len(resp)
        out.append((row.prompt + resp, [False] * len(row.prompt) + mask))
    return out


def pad(seqs: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask`` and ``loss_mask``, all ``[B, T]``."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (s, m) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[b, : len(s)] = 1
        loss[b, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def collate(rows: list[Encoded], responses: tuple[int, ...], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch holding, for each response index in ``responses`` in turn, every row's sequence.

    With ``responses=(0, 1)`` on preference rows the first B sequences are the chosen ones and the next B the
    rejected ones, so one forward pass serves both.
    """
    seqs = [s for r in responses for s in sequences(rows, r)]
    return pad(seqs, pad_id)
