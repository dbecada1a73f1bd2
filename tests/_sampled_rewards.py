"""Deterministic rewards of a completion's text for the best-of-n, rejection-sampling and self-rewarding tests:
a tiny random model's samples are random strings, so a hash of the text gives scores that differ between samples
and are the same whenever the same text comes back."""

from __future__ import annotations

import hashlib


def _unit(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") / 2**32


def text_score(prompts, completions, **_):
    """A continuous score in [0, 1)."""
    return [_unit(c) for c in completions]


def coin_verifier(prompts, completions, **_):
    """A binary verdict: 1 for about half of the texts, 0 for the others."""
    return [1.0 if _unit(c) < 0.5 else 0.0 for c in completions]
