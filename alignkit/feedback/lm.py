"""Language models for AI feedback, behind one small interface that tests can replace with a scripted fake.

A :class:`ChatLM` has a ``name`` and two methods:

- ``chat(conversations, sampling, seeds) -> list[str]``: one reply per conversation (a list of
  ``{"role", "content"}`` messages ending with a user turn), sampled with ``sampling``
  (:class:`~alignkit.rl.rollout.SamplingParams`); ``seeds[i]`` makes reply ``i`` reproducible on its own;
- ``option_logprobs(conversations, options) -> list[list[float] | None]``: for each conversation, the
  log-probability of each option letter as the first thing the model answers, or None when no option can be
  read. Only the difference between options matters: callers normalise over the options.

:class:`LocalChatLM` runs a transformers model in process: replies from :class:`~alignkit.rl.rollout.LocalEngine`
(seeded per reply), option log-probs from one forward pass after the conversation and :data:`ANSWER_PREFIX`
(:func:`~alignkit.feedback.judges.letter_logprobs`). :class:`EndpointChatLM` asks an OpenAI-compatible
``/v1/chat/completions`` server: option log-probs from the reply's ``logprobs``/``top_logprobs`` when the
server returns them, otherwise from ``samples`` sampled replies, ``log(count(option) / count(any option))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from alignkit.errors import ConfigError
from alignkit.feedback.judges import _chat_url, letter_logprobs, letter_token_ids, post_chat, reply_text
from alignkit.rl.rollout import SamplingParams

__all__ = ["ANSWER_PREFIX", "ChatLM", "EndpointChatLM", "LocalChatLM", "logsumexp", "read_option"]

ANSWER_PREFIX = "The better answer is ("
"""What a local model's reply is made to start with before its option letter is read."""

Conversation = list[dict]


@runtime_checkable
class ChatLM(Protocol):
    name: str

    def chat(self, conversations: list[Conversation], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]: ...

    def option_logprobs(self, conversations: list[Conversation],
                        options: Sequence[str] = ("A", "B")) -> list[list[float] | None]: ...


def logsumexp(values: Sequence[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def read_option(token: str, options: Sequence[str]) -> str | None:
    """The option a reply token names: ``"A"``, ``" A"``, ``"(A"``, ``"A)"`` all name A; None otherwise."""
    core = token.strip().strip("()[]*.:").strip()
    return core if core in options else None


def _plain(conversation: Conversation) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"


class LocalChatLM:
    """A transformers causal LM in this process (see the module docstring).

    ``precision``: the rollout engine's (``bf16`` copy or the ``fp32`` model). A conversation longer than the
    model's context is cut from the left so that ``max_new_tokens`` still fit."""

    def __init__(self, model, tokenizer, *, name: str = "local", precision: str = "fp32", batch_size: int = 16,
                 answer_prefix: str = ANSWER_PREFIX):
        from alignkit.rl.rollout import LocalEngine

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.answer_prefix = max(1, batch_size), answer_prefix
        self.engine = LocalEngine(model, tokenizer, precision=precision, max_batch=self.batch_size)
        self.context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)

    def _ids(self, conversation: Conversation) -> list[int]:
        from alignkit.data.tokenize import prompt_ids

        if getattr(self.tokenizer, "chat_template", None):
            return prompt_ids(self.tokenizer, conversation)
        return self.tokenizer(_plain(conversation), add_special_tokens=True)["input_ids"]

    def _fit(self, ids: list[int], room: int) -> list[int]:
        if self.context and len(ids) + room > self.context:
            return ids[-max(1, self.context - room):]
        return ids

    def chat(self, conversations, sampling, seeds):
        ids = [self._fit(self._ids(c), sampling.max_new_tokens) for c in conversations]
        done = self.engine.generate(ids, 1, sampling, seeds=list(seeds))
        return [row[0].text for row in done]

    def option_logprobs(self, conversations, options=("A", "B")):
        prefix = self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"]
        seqs = [self._fit(self._ids(c) + prefix, 1) for c in conversations]
        letters = [letter_token_ids(self.tokenizer, o, self.answer_prefix) for o in options]
        lp = letter_logprobs(self.model, self.tokenizer, seqs, letters, batch_size=self.batch_size)
        return [row for row in lp.tolist()]


class EndpointChatLM:
    """An OpenAI-compatible chat-completions server (see the module docstring).

    ``samples``: replies sampled (temperature 1, seeded) per question when the server returns no log-probs.
    ``top_logprobs``: alternatives asked for at each reply token. The API key, if any, is read from
    ``api_key_env`` at each request; errors and retries as :func:`~alignkit.feedback.judges.post_chat`."""

    def __init__(self, url: str, model: str, *, name: str | None = None, samples: int = 8, top_logprobs: int = 5,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, workers: int = 4):
        if not model:
            raise ConfigError(f"endpoint {url}: a model name is needed (judge_model)")
        if samples < 1:
            raise ConfigError(f"endpoint {url}: samples must be at least 1, got {samples}")
        self.url, self.model_name, self.name = _chat_url(url), model, name or f"{model}@{url}"
        self.samples, self.top_logprobs, self.workers = samples, top_logprobs, max(1, workers)
        self._post = dict(api_key_env=api_key_env, timeout=timeout, retries=retries, backoff=backoff)
        self.modes = {"logprobs": 0, "samples": 0}  # how the option probabilities were read

    def _ask(self, body: dict) -> dict:
        return post_chat(self.url, {"model": self.model_name, **body}, **self._post)

    def _map(self, fn, items):
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(fn, items))

    def chat(self, conversations, sampling, seeds):
        def one(job):
            conv, seed = job
            body = {"messages": conv, "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "max_tokens": sampling.max_new_tokens, "seed": int(seed) % 2**31}
            if sampling.stop:
                body["stop"] = list(sampling.stop)[:4]  # the OpenAI API takes at most four
            text = reply_text(self.url, self._ask(body))
            cuts = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
            return text[: min(cuts)] if cuts else text

        return self._map(one, list(zip(conversations, seeds)))

    def option_logprobs(self, conversations, options=("A", "B")):
        return self._map(lambda c: self._one_option(c, tuple(options)), conversations)

    def _one_option(self, conv: Conversation, options: tuple[str, ...]) -> list[float] | None:
        payload = self._ask({"messages": conv, "temperature": 0, "max_tokens": 4, "logprobs": True,
                             "top_logprobs": self.top_logprobs})
        content = ((payload.get("choices") or [{}])[0].get("logprobs") or {}).get("content") if isinstance(payload, dict) else None
        if content:
            self.modes["logprobs"] += 1
            for position in content:  # the first reply token at which any option is among the alternatives
                found: dict[str, list[float]] = {}
                for alt in position.get("top_logprobs") or [position]:  # the sampled token is among the top ones
                    opt = read_option(str(alt.get("token", "")), options)
                    if opt is not None and alt.get("logprob") is not None:
                        found.setdefault(opt, []).append(float(alt["logprob"]))  # "A" and " A": both count
                if found:
                    return [logsumexp(found.get(o, [])) for o in options]
            return None
        self.modes["samples"] += 1
        counts = dict.fromkeys(options, 0)
        for j in range(self.samples):
            reply = reply_text(self.url, self._ask({"messages": conv, "temperature": 1.0, "max_tokens": 16, "seed": j}))
            opt = _first_option(reply, options)
            if opt is not None:
                counts[opt] += 1
        total = sum(counts.values())
        if total == 0:
            return None
        return [math.log(counts[o] / total) if counts[o] else -math.inf for o in options]


def _first_option(reply: str, options: Sequence[str]) -> str | None:
    """The option a sampled reply picks (:func:`~alignkit.feedback.judges.parse_verdict`'s rules for A/B)."""
    from alignkit.feedback.judges import parse_verdict

    v = parse_verdict(reply)
    picked = None if v is None else ("A" if v == 1.0 else "B")
    return picked if picked in options else None
