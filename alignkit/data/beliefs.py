"""Belief-structured responses (GDPO, arXiv:2412.20299): the model first states a belief, then answers given it.

An assistant turn is ``template.format(belief=b) + response``; the default template ``"Belief: {belief}\\n"``
puts the belief on a first line of its own. Every piece is tokenized on its own and the ids concatenated:
prompt (the chat template with the generation prompt, as :func:`alignkit.data.tokenize.prompt_ids` renders
it), then ``ids(template(b))``, then ``ids(the rest of the turn)``. That is exactly what a model sees when it is
given a sampled belief and asked to go on (two-stage generation), and what free generation produces when the
model has learned the form; ``tests/test_gdpo.py`` checks that the whole turn tokenized at once gives the same
ids for the default template.

A training row (:func:`encode_belief_pair`) holds, as responses to the prompt, the chosen and the rejected
turns (scored on the tokens after the belief only: the preference is conditioned on it) and then every belief
of the prompt on its own (scored whole: its sequence log-probability, which the calibration normalises over
the prompt's beliefs). Rows are padded to the same number of beliefs by repeating the first, so that batches
and cached reference log-probs have one shape; ``extra["n_beliefs"]`` says how many are real.
"""

from __future__ import annotations

from alignkit.data.tokenize import Encoded, _chat_split, _ids
from alignkit.errors import DataError

DEFAULT_TEMPLATE = "Belief: {belief}\n"
FIRST_RESPONSE = 2  # responses[0], [1]: chosen and rejected turns; responses[2:]: the beliefs


def check_template(template: str) -> None:
    """A template has exactly one ``{belief}`` field and text after it (so a belief's end can be told)."""
    if template.count("{belief}") != 1 or "{" in template.replace("{belief}", "") or "}" in template.replace("{belief}", ""):
        raise ValueError(f"a belief template holds '{{belief}}' once and no other braces, got {template!r}")
    if template.endswith("{belief}"):
        raise ValueError(f"a belief template needs text after '{{belief}}' to mark where the belief ends, got {template!r}")


def render_belief(template: str, belief: str) -> str:
    return template.replace("{belief}", belief)


def parse_belief(text: str, template: str, beliefs) -> tuple[str | None, str]:
    """``(belief, rest)`` of a generated turn: the belief it states if the text starts with the template around
    one of ``beliefs`` (the longest that fits), else ``(None, text)``."""
    for b in sorted(beliefs, key=len, reverse=True):
        head = render_belief(template, b)
        if text.startswith(head):
            return b, text[len(head):]
    return None, text


def as_user_turn(prompt) -> list:
    """A prompt as messages: a string becomes one user turn (as generation renders it)."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_and_rest(tok, prompt, belief_text: str, response: str, origin=None) -> tuple[list[int], list[int]]:
    """``(prompt ids, ids of the turn after the belief)``: with a chat template the prompt is a user turn and the
    rest holds what the template adds after the content (its end of turn); without one, plain text and EOS."""
    if getattr(tok, "chat_template", None):
        p_text, r_text = _chat_split(tok, as_user_turn(prompt), belief_text + response, origin)
        if not r_text.startswith(belief_text):
            raise DataError("the chat template changes the start of the assistant turn, so the belief cannot be "
                            "placed in it", path=getattr(origin, "path", None), line=getattr(origin, "line", None))
        return _ids(tok, p_text), _ids(tok, r_text[len(belief_text):])
    if not isinstance(prompt, str):
        raise DataError("a message-list prompt needs a tokenizer with a chat template",
                        path=getattr(origin, "path", None), line=getattr(origin, "line", None))
    return _ids(tok, prompt, special=True), _ids(tok, response) + [tok.eos_token_id]


def belief_ids(tok, template: str, beliefs) -> list[list[int]]:
    return [_ids(tok, render_belief(template, b)) for b in beliefs]


def encode_belief_pair(example, tok, index: int, template: str, n_beliefs: int) -> Encoded:
    """A :class:`~alignkit.data.formats.BeliefExample` as one row: responses ``[belief + chosen, belief +
    rejected, belief_1, ..., belief_K]`` (K padded to ``n_beliefs`` with the first belief), the pair scored after
    the belief only. ``extra``: ``n_beliefs`` (real K), ``belief`` (index of the pair's belief), ``target`` (the
    group's shares, padded with zeros)."""
    origin = example.origin
    head = render_belief(template, example.belief)
    p, chosen = prompt_and_rest(tok, example.prompt, head, example.chosen, origin)
    p2, rejected = prompt_and_rest(tok, example.prompt, head, example.rejected, origin)
    assert p == p2
    opts = belief_ids(tok, template, example.beliefs)
    k = len(opts)
    if k > n_beliefs:
        raise ValueError(f"row has {k} beliefs, more than n_beliefs={n_beliefs}")
    own = opts[example.beliefs.index(example.belief)]
    opts = opts + [opts[0]] * (n_beliefs - k)
    masks = [[False] * len(own) + [True] * len(chosen), [False] * len(own) + [True] * len(rejected)]
    masks += [[True] * len(o) for o in opts]
    target = list(example.target) + [0.0] * (n_beliefs - k)
    return Encoded(p, [own + chosen, own + rejected, *opts], index, response_masks=masks,
                   extra={"n_beliefs": k, "belief": example.beliefs.index(example.belief), "target": target})
