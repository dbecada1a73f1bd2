"""The ``<think>`` convention of reasoning models (Qwen3, DeepSeek-R1): a completion is
``<think>reasoning</think>answer``. Every part of alignkit that reads or writes a thinking segment (data
loading, chat rendering, the rollout engine, distillation) takes the markers and the rules from here.

:func:`split_thinking` separates the two parts of a completion's text. It is tolerant: a completion that
opens thinking but never closes it (cut at the token limit) is all reasoning and no answer; a completion
without an opening tag whose close tag appears (the opening tag was in the prompt, as Qwen3's template puts
it there) splits at the close tag; a completion without either tag is all answer.

:func:`join_thinking` writes the two parts back in one fixed layout, ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``;
with empty reasoning that is Qwen3's no-think form, ``<think>\\n\\n</think>\\n\\n{answer}`` (:data:`EMPTY_THINKING`).
A chat template with no thinking form of its own (SmolLM2's ChatML, the default model's) gets the assistant
content in this layout (:func:`for_template`); a template that has one (it reads ``reasoning_content`` or
``enable_thinking``, as Qwen3's does) gets the reasoning in the message's ``reasoning_content`` field and lays it
out itself.

Modes: an assistant turn thinks (``think``: non-empty reasoning), answers after an empty thinking block
(``no_think``: reasoning ``""``) or has no thinking block at all (reasoning ``None``: data without thinking,
rendered as before). A conversation can ask for a mode with the soft switches ``/think`` and ``/no_think`` in
its user or system messages; the last one wins (:func:`requested_mode`).
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_KEY = "reasoning_content"  # the assistant message's thinking, as transformers and vLLM name it
MODES = ("think", "no_think")
THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"


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


def join_thinking(reasoning: str, answer: str) -> str:
    """``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``: the inverse of :func:`split_thinking` for stripped parts
    without tags. Empty reasoning gives Qwen3's no-think form ``<think>\\n\\n</think>\\n\\n{answer}``."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


EMPTY_THINKING = join_thinking("", "")  # what a no-think answer starts with: "<think>\n\n</think>\n\n"


def has_thinking(text: str) -> bool:
    """Whether ``text`` holds either marker."""
    return THINK_OPEN in text or THINK_CLOSE in text


def mode_of(reasoning: str | None) -> str | None:
    """The mode of a turn with this reasoning: ``think`` if it is non-blank, ``no_think`` if it is empty, None
    when the turn has no thinking block at all."""
    if reasoning is None:
        return None
    return "think" if reasoning.strip() else "no_think"


_FLAG = re.compile(r"(?<!\S)(/think|/no_think)(?!\S)")


def requested_mode(messages: list[dict] | str) -> str | None:
    """The mode a conversation asks for with the soft switches: the last ``/think`` or ``/no_think`` (a word of
    its own) in its user and system messages, or in a plain-text prompt; None when it has neither."""
    texts = [messages] if isinstance(messages, str) else [
        m.get("content") or "" for m in messages if m.get("role") in ("user", "system")]
    flags = [flag for text in texts for flag in _FLAG.findall(text)]
    return None if not flags else ("think" if flags[-1] == THINK_FLAG else "no_think")


def template_thinks(tok) -> bool:
    """Whether ``tok``'s chat template has a thinking form of its own: it reads ``reasoning_content`` or
    ``enable_thinking`` (Qwen3's does; SmolLM2's ChatML does not)."""
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(template.values())
    return REASONING_KEY in template or "enable_thinking" in template


def for_template(tok, messages: list[dict]) -> list[dict]:
    """``messages`` as ``tok``'s chat template should see them: unchanged for a template with a thinking form;
    otherwise each assistant message's ``reasoning_content`` is folded into its content with
    :func:`join_thinking` (and the field removed), so the default model's template renders the convention."""
    if template_thinks(tok) or not any(m.get(REASONING_KEY) is not None for m in messages):
        return messages
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get(REASONING_KEY) is not None:
            reasoning = m[REASONING_KEY]
            m = {k: v for k, v in m.items() if k != REASONING_KEY}
            m["content"] = join_thinking(reasoning, m["content"])
        out.append(m)
    return out


def reasoning_span(text: str, reasoning: str, start: int = 0) -> tuple[int, int] | None:
    """The characters ``[a, b)`` of ``text`` that hold ``reasoning`` as rendered: its first occurrence after the
    first opening marker at or after ``start`` (or after ``start`` itself when the opening marker is not there,
    as in a continuation of a prompt that opened the block). None when the template did not render it."""
    opened = text.find(THINK_OPEN, start)
    a = text.find(reasoning, start if opened < 0 else opened + len(THINK_OPEN))
    return None if a < 0 else (a, a + len(reasoning))


def opens_thinking(prompt: str) -> bool:
    """Whether a plain-text prompt ends by opening a thinking block (an R1-style prefill, ``...<think>\\n``)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def completion_text(reasoning: str | None, answer: str, prompt: str = "") -> str:
    """A plain-text completion with its thinking: :func:`join_thinking`, or, after a ``prompt`` that opened the
    block (:func:`opens_thinking`), the rest of it (``{reasoning}\\n</think>\\n\\n{answer}`` after ``<think>\\n``).
    ``reasoning`` None: the answer alone."""
    if reasoning is None:
        return answer
    text = join_thinking(reasoning, answer)
    if not opens_thinking(prompt):
        return text
    rest, opened_with = text[len(THINK_OPEN):], prompt[len(prompt.rstrip()):]
    return rest[len(opened_with):] if rest.startswith(opened_with) else rest.lstrip()
