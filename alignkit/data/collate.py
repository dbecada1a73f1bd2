"""Padding a micro-batch of (prompt, response) sequences into tensors."""

from __future__ import annotations

import torch

from alignkit.data.tokenize import Encoded


def response_mask(row: Encoded, response: int) -> list[bool]:
    """Which tokens of ``responses[response]`` are scored. With an empty prompt the response's first token opens
    the sequence, so nothing predicts it and it is never scored."""
    mask = list(row.response_masks[response]) if row.response_masks else [True] * len(row.responses[response])
    if not row.prompt and mask:
        mask[0] = False
    return mask


def token_weights(row: Encoded, response: int, thinking_weight: float) -> list[float]:
    """The loss weight of each token of ``responses[response]``: ``thinking_weight`` on its thinking tokens
    (``thinking_masks``), 1 elsewhere."""
    if not row.thinking_masks:
        return [1.0] * len(row.responses[response])
    return [thinking_weight if t else 1.0 for t in row.thinking_masks[response]]


def loss_weights(rows: list[Encoded], response: int, thinking_weight: float, packed: bool = False) -> torch.Tensor:
    """Per-token loss weights laid out as :func:`collate`'s ``loss_mask`` ``[B, T]`` (or, ``packed``, as
    :func:`collate_packed`'s ``[1, N]``): :func:`token_weights` on the response, 1 on the prompt and 0 on padding
    (only masked positions are read)."""
    seqs = [[1.0] * len(row.prompt) + token_weights(row, response, thinking_weight) for row in rows]
    if packed:
        return torch.tensor([[w for s in seqs for w in s]], dtype=torch.float32)
    out = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.float32)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.float32)
    return out


def sequences(rows: list[Encoded], response: int) -> list[tuple[list[int], list[bool]]]:
    """``prompt + responses[response]`` of each row, with its loss mask (true on scored response tokens)."""
    return [(row.prompt + row.responses[response], [False] * len(row.prompt) + response_mask(row, response))
            for row in rows]


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


def soft_labels(rows: list[Encoded]) -> torch.Tensor:
    """Each pair's soft label ``[B]`` (float32): the probability that its chosen response is the better one,
    1.0 for a row without one (a hard label)."""
    return torch.tensor([1.0 if row.soft_label is None else row.soft_label for row in rows], dtype=torch.float32)


def collate(rows: list[Encoded], responses: tuple[int, ...], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch holding, for each response index in ``responses`` in turn, every row's sequence.

    With ``responses=(0, 1)`` on preference rows the first B sequences are the chosen ones and the next B the
    rejected ones, so one forward pass serves both.
    """
    seqs = [s for r in responses for s in sequences(rows, r)]
    return pad(seqs, pad_id)


def collate_shared(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Each row as ONE sequence ``prompt + response_0 + response_1 + ...`` whose prompt is computed once.

    A 4D boolean attention mask ``[B, 1, T, T]`` lets every response see the prompt and its own earlier tokens
    but no other response, and ``position_ids`` restart each response right after the prompt, so every
    response is scored exactly as if it followed the prompt alone. Because a response's first token is
    predicted from the prompt's last position (not from the previous response's last token), the batch
    carries explicit gather indices: ``source`` (flat index into ``B*T`` of the predicting position),
    ``target`` (the token id) and ``segment`` (``row * R + response``) for each response token, and ``ends``
    (flat index of each response's last token, in row-major order) for rewards read at the last token.
    Rows may have different numbers of responses only when ``ends`` alone is used. The scored tokens are
    those of :func:`response_mask`, as in the padded layout.
    """
    n_resp = len(rows[0].responses)
    width = max(len(r.prompt) + sum(map(len, r.responses)) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    allowed = torch.zeros((B, width, width), dtype=torch.bool)
    idx = torch.arange(width)
    allowed[:, idx, idx] = True  # padding rows see themselves (a fully masked row would give NaN)
    source, target, segment, ends = [], [], [], []
    for b, row in enumerate(rows):
        L = len(row.prompt)
        ids[b, :L] = torch.tensor(row.prompt, dtype=torch.long)
        pos[b, :L] = torch.arange(L)
        allowed[b, :L, :L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
        start = L
        for k, resp in enumerate(row.responses):
            n = len(resp)
            end = start + n
            ids[b, start:end] = torch.tensor(resp, dtype=torch.long)
            pos[b, start:end] = torch.arange(L, L + n)
            allowed[b, start:end, :L] = True
            allowed[b, start:end, start:end] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            # the position predicting each token; with an empty prompt nothing predicts the first, which
            # response_mask leaves unscored (as in the padded layout)
            prev = [L - 1] + list(range(start, end - 1))
            scored = [j for j, m in enumerate(response_mask(row, k)) if m]
            source += [b * width + prev[j] for j in scored]
            target += [resp[j] for j in scored]
            segment += [b * n_resp + k] * len(scored)
            ends.append(b * width + end - 1)
            start = end
    return {
        "input_ids": ids, "position_ids": pos, "attention_mask": allowed[:, None],
        "source": torch.tensor(source, dtype=torch.long), "target": torch.tensor(target, dtype=torch.long),
        "segment": torch.tensor(segment, dtype=torch.long), "n_segments": B * n_resp,
        "ends": torch.tensor(ends, dtype=torch.long),
    }


def collate_packed(rows: list[Encoded], response: int) -> dict:
    """Every row's ``prompt + responses[response]`` concatenated into ONE row ``[1, N]``, with no padding.

    ``position_ids`` restart at 0 for each sequence and ``packed_layout`` tells the attention
    (:mod:`alignkit.models.packing`) where each sequence lies, so every token is computed as in its own sequence.
    """
    seqs = sequences(rows, response)
    ids, pos, loss = [], [], []
    for s, m in seqs:
        ids += s
        pos += range(len(s))
        loss += m
    lengths = [len(s) for s, _ in seqs]
    width = max(lengths)
    gather = torch.zeros((len(seqs), width), dtype=torch.long)
    take, start = [], 0
    for k, n in enumerate(lengths):
        gather[k, :n] = torch.arange(start, start + n)
        take += range(k * width, k * width + n)
        start += n
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([pos], dtype=torch.long),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long), "loss_mask": torch.tensor([loss], dtype=torch.bool),
        "packed_layout": (gather, torch.tensor(take, dtype=torch.long)),
    }
