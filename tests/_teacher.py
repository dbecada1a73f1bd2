"""A program standing in as the teacher in the distillation tests: it answers ``max(a, b)`` rows (tests/_toy.py)
with worked steps, and spoils some traces by design so that every filter has something to drop. Which trace is
spoilt is fixed by the prompt: a wrong answer (prompts whose smaller digit is 0), thinking in two languages (the
smaller digit is 1), thinking far too long (the smaller digit is 2)."""

from __future__ import annotations

import re


def max_teacher(row):
    a, b = (int(x) for x in re.findall(r"\d", row["prompt"] if isinstance(row["prompt"], str)
                                       else row["prompt"][-1]["content"])[:2])
    hi, lo = max(a, b), min(a, b)
    reasoning = f"The digits are {a} and {b}.\n{hi} > {lo}, so the larger is {hi}."
    answer = f"The answer is {hi}."
    if lo == 0:
        answer = f"The answer is {lo}."
    elif lo == 1:
        reasoning += " 所以答案是最大的数字。"
    elif lo == 2:
        reasoning += " Let me check again." * 40
    return reasoning, answer


def spoilt(prompt_digits: tuple[int, int]) -> str | None:
    """The filter that drops the trace of a prompt with these two digits (None: kept)."""
    return {0: "verifier", 1: "language", 2: "length"}.get(min(prompt_digits))
