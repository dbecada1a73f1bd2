"""Numeric answers in free text: extraction and comparison.

A small, dependency-free checker used to label ASDiv answers. It reads the last number of a response
(integers, decimals, thousands separators, simple fractions ``a/b``) and compares it exactly as a fraction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """``"1,250"`` -> 1250, ``"3.5"`` -> 7/2, ``"-1/3"`` -> -1/3; None if it is not a number."""
    t = text.strip().replace(",", "").replace(" ", "")
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return Fraction(Fraction(num), Fraction(den)) if Fraction(den) != 0 else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def number_strings(text: str) -> Iterator[str]:
    """The numbers written in ``text`` as strings, last first (trailing ``,`` and ``.`` removed)."""
    for match in reversed(_NUMBER.findall(text)):
        yield match.rstrip(",.").strip()


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text`` that parses (None if there is none)."""
    for s in number_strings(text):
        value = parse_number(s)
        if value is not None:
            return value
    return None


def is_correct(response: str, answer: str) -> bool:
    """Whether the last number of ``response`` equals the reference ``answer`` exactly."""
    ref = parse_number(answer)
    return ref is not None and last_number(response) == ref
