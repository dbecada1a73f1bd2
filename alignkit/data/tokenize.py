"""Turning canonical examples into token ids, with the loss on response tokens only.

Plain strings are concatenated as they are (prompt, then completion followed by EOS), like TRL's "standard"
format; a ``text`` row is all response and also ends with EOS (unless it already does), so a model trained on
it learns to stop. Message lists go through the tokenizer's chat template; the response is whatever the template adds
after the prompt rendered with ``add_generation_prompt=True``. Prompt and response are tokenized separately, at
that text boundary: this is exactly what the model sees when it generates a response to the prompt.

Thinking (:mod:`alignkit.data.thinking`): assistant messages' ``reasoning_content`` goes to a chat template that
has a thinking form (it reads ``reasoning_content`` or ``enable_thinking``), and is folded into the content as
``<think>\n{reasoning}\n</think>\n\n{answer}`` for one that has none (the default model's); a plain-text
completion's reasoning is laid out the same way, or continues a prompt that opened the block. Every turn that is
trained on keeps its thinking, and the training rendering stays prefix-preserving (a template that drops the
thinking of a trained turn, or of earlier turns in a multi-turn row, is refused with a DataError). ``Encoded``'s
``thinking_masks`` marks the response tokens that lie inside a turn's reasoning (a token whose first character
does, by the tokenizer's offsets), so a recipe can weight them (``thinking_loss``); the markers, the newlines
around the reasoning, the empty block of a no-think answer and the answer are not thinking tokens.

Truncation policy (``max_length`` counts prompt + response tokens): with ``truncation="truncate"`` the prompt
keeps its last ``max_prompt_length`` tokens (default ``max_length // 2``) and then each response keeps its
first tokens up to ``max_length``; with ``truncation="drop"`` over-long examples are left out. Either way the
number of affected examples is reported.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from alignkit.data.thinking import REASONING_KEY, completion_text, for_template, reasoning_span
from alignkit.errors import DataError

Text = str | list


@dataclass
class Encoded:
    """One training example as token ids: a prompt and one or more responses to it.

    SFT rows have one response (for multi-turn chats the prompt is empty and ``response_masks`` marks the
    assistant turns); preference rows have two (chosen, rejected), with the pair's optional ``margin`` and
    ``soft_label``; KTO rows have one plus a label. ``thinking_masks`` (one per response, like
    ``response_masks``; None when no response has thinking tokens) is true on the tokens of the reasoning.
    """

    prompt: list[int]
    responses: list[list[int]]
    index: int
    response_masks: list[list[bool]] | None = None
    label: bool | None = None
    margin: float | None = None
    truncated: bool = False
    extra: dict = field(default_factory=dict)
    soft_label: float | None = None
    thinking_masks: list[list[bool]] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(r) for r in self.responses)


def _chat_text(tok, messages: list, generation_prompt: bool) -> str:
    return tok.apply_chat_template(for_template(tok, messages), tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tok, text: str, *, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _located(message: str, origin) -> DataError:
    return DataError(message, path=getattr(origin, "path", None), line=getattr(origin, "line", None))


def _thinking_ids(tok, text: str, reasonings: list, origin=None) -> tuple[list[int], list[bool] | None]:
    """Ids of a response ``text`` that renders turns with these reasonings (in order; None or ``""``: no
    thinking tokens), and which ids are thinking tokens (None: none is). The ids are :func:`_ids`'s."""
    spans, start = [], 0
    for reasoning in filter(None, reasonings):
        span = reasoning_span(text, reasoning, start)
        if span is None:
            raise _located("the chat template does not render the thinking of a trained assistant turn (it drops or "
                           "changes it, as DeepSeek-R1-Distill's template does): use a template that keeps "
                           "reasoning_content, or one without a thinking form (then the <think> convention applies)",
                           origin)
        spans.append(span)
        start = span[1]
    if not spans:
        return _ids(tok, text), None
    if not getattr(tok, "is_fast", False):
        raise TypeError("thinking data needs a fast tokenizer (character offsets), got " + type(tok).__name__)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]


def _reasonings(messages: list) -> list:
    return [m.get(REASONING_KEY) for m in messages if m.get("role") == "assistant"]


def _chat_split(tok, prompt: Text | None, completion: Text, origin=None) -> tuple[str, str]:
    """``(prompt text, response text)`` of a chat-rendered example: the prompt with the generation prompt,
    and whatever the template adds after it for the completion (its end-of-turn tokens included)."""
    p_msgs = prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])
    c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    p_text = _chat_text(tok, p_msgs, True) if p_msgs else ""
    full = _chat_text(tok, p_msgs + c_msgs, False)
    if not full.startswith(p_text):
        raise _located("the chat template does not render the prompt as a prefix of prompt + response", origin)
    return p_text, full[len(p_text) :]


def prompt_ids(tok, prompt: Text) -> list[int]:
    """Token ids of a prompt to generate from: a message list through the chat template with the generation
    prompt, plain text as it is (with the tokenizer's special tokens), as :func:`render` renders prompts."""
    if isinstance(prompt, list):
        return _ids(tok, _chat_text(tok, prompt, True))
    return _ids(tok, prompt, special=True)


def render(tok, prompt: Text | None, completion: Text, origin=None) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``completion`` as a response to it."""
    return _render(tok, prompt, completion, origin)[:2]


def _render(tok, prompt: Text | None, completion: Text, origin=None, reasoning: str | None = None):
    """:func:`render`'s ids and the response's thinking flags; ``reasoning``: a plain-text completion's."""
    if isinstance(prompt, list) or isinstance(completion, list):
        p_text, r_text = _chat_split(tok, prompt, completion, origin)
        c_msgs = completion if isinstance(completion, list) else []
        return (_ids(tok, p_text), *_thinking_ids(tok, r_text, _reasonings(c_msgs), origin))
    p_ids = _ids(tok, prompt, special=True) if prompt else []
    ids, thinking = _thinking_ids(tok, completion_text(reasoning, completion, prompt or ""), [reasoning], origin)
    return p_ids, ids + [tok.eos_token_id], thinking and thinking + [False]


def render_steps(
    tok, prompt: str, steps: list[str], sep: str = "\n", origin=None
) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, response_ids, step_end_positions)`` of a stepwise (process reward) example.

    The response is ``sep.join(steps)``, laid out as :func:`render` does it: with a chat template, the prompt
    is a user message rendered with the generation prompt and the steps are the assistant's content (the
    response ids then also hold what the template adds after it, e.g. ``<|im_end|>\n``); without one, prompt
    and response are plain text and the response ends with EOS. The ids are exactly ``render``'s.

    ``step_end_positions[i]`` indexes ``response_ids``: the token holding the last character of step i, where
    a PRM reads that step's score (Lightman et al. 2023). It comes from the character offsets of the response
    tokenized once (fast tokenizers only), not from tokenizing steps apart, so it stays right when BPE merges
    a step's end with the separator or the next step into one token (``"4\n"``): the position is the last
    token that starts before the step's end, which is also the last byte-level token of a multi-byte
    character. If two steps end inside the same token (a step shorter than a merged token), both get the same
    position. Tokenizers that trim offsets (a ``ByteLevel`` post-processor with ``trim_offsets``) may place a
    step that ends in whitespace one token early.
    """
    if not getattr(tok, "is_fast", False):
        raise TypeError("render_steps needs a fast tokenizer (character offsets), got " + type(tok).__name__)
    content = sep.join(steps)
    if getattr(tok, "chat_template", None):
        p_text, r_text = _chat_split(tok, prompt, content, origin)
        prompt_ids, eos = _ids(tok, p_text), []
        start = r_text.find(content)
        if start < 0:
            raise DataError(
                "the chat template changes the assistant content, so the steps cannot be located in it",
                path=getattr(origin, "path", None), line=getattr(origin, "line", None),
            )
    else:
        r_text, start = content, 0
        prompt_ids, eos = (_ids(tok, prompt, special=True) if prompt else []), [tok.eos_token_id]
    enc = tok(r_text, add_special_tokens=False, return_offsets_mapping=True)
    response_ids, token_starts = list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
    positions, end = [], start
    for i, step in enumerate(steps):
        end += len(step)  # one past the step's last character in r_text
        positions.append(bisect.bisect_left(token_starts, end) - 1)  # starts are non-decreasing
        end += len(sep)
    return prompt_ids, response_ids + eos, positions


def render_chat(tok, messages: list) -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation, with a mask that is true on the assistant turns' tokens."""
    return _render_chat(tok, messages)[:2]


def _render_chat(tok, messages: list, origin=None) -> tuple[list[int], list[bool], list[bool] | None]:
    """:func:`render_chat`'s ids and mask, and the thinking flags (None: no thinking token)."""
    ids: list[int] = []
    mask: list[bool] = []
    thinking: list[bool] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _chat_text(tok, messages[:k], True)
        after = _chat_text(tok, messages[: k + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            why = "the chat template does not render earlier turns as a prefix of later ones"
            if any(_reasonings(messages[:k])):
                why += (" (it drops the thinking of earlier turns, as Qwen3's does, so a multi-turn thinking row "
                        "cannot be trained as one sequence: give each assistant turn as a prompt/completion row)")
            raise _located(why, origin)
        ctx = _ids(tok, before[len(done) :])
        resp, flags = _thinking_ids(tok, after[len(before) :], [msg.get(REASONING_KEY)], origin)
        ids += ctx + resp
        mask += [False] * len(ctx) + [True] * len(resp)
        thinking += [False] * len(ctx) + (flags or [False] * len(resp))
        done = after
    return ids, mask, (thinking if any(thinking) else None)


def _ending_with_eos(tok, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's EOS appended, unless they already end with it (the text ended with the EOS
    token, or the tokenizer adds one itself) or the tokenizer has none."""
    eos = tok.eos_token_id
    return ids if eos is None or ids[-1:] == [eos] else ids + [eos]


def encode(example, tok, index: int) -> Encoded:
    """Encode a canonical example (``alignkit.data.formats``) into ids."""
    kind = type(example).__name__
    origin = getattr(example, "origin", None)
    if kind == "SFTExample":
        if example.messages is not None:
            ids, mask, thinking = _render_chat(tok, example.messages, origin)
            return Encoded([], [ids], index, response_masks=[mask], thinking_masks=thinking and [thinking])
        if example.text is not None:
            return Encoded([], [_ending_with_eos(tok, _ids(tok, example.text, special=True))], index)
        p, c, thinking = _render(tok, example.prompt, example.completion, origin, example.reasoning)
        return Encoded(p, [c], index, thinking_masks=thinking and [thinking])
    if kind == "PreferenceExample":
        p, c = render(tok, example.prompt, example.chosen, origin)
        p2, r = render(tok, example.prompt, example.rejected, origin)
        assert p == p2
        return Encoded(p, [c, r], index, margin=example.margin, soft_label=example.soft_label)
    if kind == "UnpairedExample":
        p, c = render(tok, example.prompt, example.completion, origin)
        return Encoded(p, [c], index, label=bool(example.label))
    raise TypeError(f"cannot encode {kind}")


def fit(enc: Encoded, max_length: int, max_prompt_length: int | None, policy: str) -> Encoded | None:
    """Apply the truncation policy; None means the example is dropped."""
    if enc.length <= max_length:
        return enc
    if policy == "drop":
        return None
    keep_prompt = min(len(enc.prompt), max_prompt_length or max_length // 2)
    prompt = enc.prompt[len(enc.prompt) - keep_prompt :]
    room = max_length - len(prompt)
    responses = [r[:room] for r in enc.responses]
    masks = [m[:room] for m in enc.response_masks] if enc.response_masks else None
    if any(len(r) == 0 for r in responses) or (masks and not any(masks[0])):
        return None
    thinking = [t[:room] for t in enc.thinking_masks] if enc.thinking_masks else None
    return Encoded(prompt, responses, enc.index, masks, enc.label, enc.margin, True, enc.extra, enc.soft_label, thinking)


@dataclass
class EncodedData:
    rows: list[Encoded]
    n_truncated: int
    n_dropped: int


def encode_all(examples, tok, *, max_length: int, max_prompt_length: int | None, truncation: str,
               encoder=None) -> EncodedData:
    """Encode and fit every example; ``encoder(example, tok, index)``, if given, replaces :func:`encode`."""
    rows, n_trunc, n_drop = [], 0, 0
    for i, ex in enumerate(examples):
        enc = fit((encoder or encode)(ex, tok, i), max_length, max_prompt_length, truncation)
        if enc is None:
            n_drop += 1
            continue
        n_trunc += enc.truncated
        enc.index = len(rows)
        rows.append(enc)
    return EncodedData(rows, n_trunc, n_drop)
