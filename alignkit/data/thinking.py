"""The ``<think>`` convention of reasoning models (Qwen3, DeepSeek-R1): a completion is
``<think>reasoning</think>answer``.

:func:`split_thinking` separates the two parts of a completion's text. It is tolerant: a completion that
opens thinking but never closes it (cut at the token limit) is all reasoning and no answer; a completion
without an opening tag whose close tag appears (the opening tag was in the prompt, as Qwen3's template puts
it there) splits at the close tag; a completion without either tag is all answer.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_thinking(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of ``text``, each stripped of surrounding whitespace; see the module docstring.
    Text before an opening tag is kept in the answer."""
    head, opened, rest = text.partition(THINK_OPEN)
    if not opened:  # the opening tag may have been in the prompt
        head, rest = "", text
    reasoning, closed, answer = rest.partition(THINK_CLOSE)
    if not closed:
        if not opened:
            return "", text.strip()
        reasoning, answer = rest, ""
    return reasoning.strip(), " ".join(part for part in (head.strip(), answer.strip()) if part)
