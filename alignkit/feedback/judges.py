"""Pairwise judges: which of two answers to a prompt is better.

One interface serves evaluation (win rates), Online DPO (labelling sampled pairs) and AI-feedback work.

Interface
---------
A :class:`PairwiseJudge` has a ``name`` and ``compare(prompts, first, second) -> list[float]``: for each
prompt, a value in [0, 1] saying how much the FIRST answer is preferred (1: first, 0: second, 0.5: a tie
or no verdict). Prompts are strings or message lists (``[{"role", "content"}, ...]``); answers are strings.

Position bias
-------------
Judges, language models above all, tend to favour one position. :func:`judge_both_orders` asks twice, with
``a`` first and then with ``b`` first, and :func:`combine_orders` turns the two verdicts into one preference
for ``a``: ``(v_ab + (1 - v_ba)) / 2``. A judge that always prefers the first position gives ``v_ab = 1`` and
``v_ba = 1``, hence 0.5 (no information) for every prompt; :func:`agreement` tells which prompts got the same
verdict in both orders (ALGORITHMS.md: keep agreeing verdicts).

Judges here
-----------
- :class:`RewardJudge`: scores each answer with reward functions (``rm:PATH``, ``correctness``, a user
  function; see :mod:`alignkit.rl.rewards`) and compares the scores: 1/0/0.5, or ``sigmoid(r1 - r2)`` with
  ``soft=True``. An answer without a score (``None``) makes the pair a tie (0.5).
- :class:`LLMJudge`: asks a language model "which answer is better, A or B?" with :data:`JUDGE_TEMPLATE`.
  Two backends: a local transformers model, read through the next-token log-probabilities of ``A`` and ``B``
  right after the question (one batched forward pass, no sampling: ``sigmoid(logp_A - logp_B)``); or an
  OpenAI-compatible ``/v1/chat/completions`` endpoint, whose reply is parsed for the letter (0.5 when no
  letter can be read; counted in ``LLMJudge.unparsed``).
- :func:`judge_from_spec` builds one from a config string.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.errors import ConfigError

__all__ = [
    "JUDGE_TEMPLATE",
    "JudgeError",
    "LLMJudge",
    "PairwiseJudge",
    "RewardJudge",
    "agreement",
    "combine_orders",
    "judge_both_orders",
    "judge_from_spec",
    "parse_verdict",
]


class JudgeError(RuntimeError):
    """A judge could not give verdicts (for example, its endpoint cannot be reached)."""


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with a ``name`` and ``compare``; values in [0, 1] = preference for the FIRST answer."""

    name: str

    def compare(self, prompts: list, first: list[str], second: list[str]) -> list[float]: ...


def _check_lengths(prompts: Sequence, first: Sequence, second: Sequence) -> None:
    if not (len(prompts) == len(first) == len(second)):
        raise ValueError(f"prompts ({len(prompts)}), first ({len(first)}) and second ({len(second)}) answers "
                         "must have the same length")


def judge_both_orders(judge: PairwiseJudge, prompts: list, a: list[str], b: list[str],
                      **kwargs: Any) -> tuple[list[float], list[float]]:
    """``(v_ab, v_ba)``: the judge's verdicts with ``a`` shown first, then with ``b`` shown first.

    ``v_ab[i]`` is the preference for ``a[i]``, ``v_ba[i]`` the preference for ``b[i]``. Extra keyword
    arguments (data columns such as ``answer``) go to both calls."""
    _check_lengths(prompts, a, b)
    v_ab = [float(v) for v in judge.compare(list(prompts), list(a), list(b), **kwargs)]
    v_ba = [float(v) for v in judge.compare(list(prompts), list(b), list(a), **kwargs)]
    return v_ab, v_ba


def combine_orders(v_ab: Sequence[float], v_ba: Sequence[float]) -> list[float]:
    """Preference for ``a`` from both orders: ``(v_ab + 1 - v_ba) / 2`` (position bias cancels)."""
    return [(x + 1.0 - y) / 2.0 for x, y in zip(v_ab, v_ba)]


def agreement(v_ab: Sequence[float], v_ba: Sequence[float]) -> list[bool]:
    """Whether both orders name the same winner decisively (``v_ab > 0.5`` and ``v_ba < 0.5``, or the
    reverse); ties and position-driven verdicts give False."""
    return [(x > 0.5 and y < 0.5) or (x < 0.5 and y > 0.5) for x, y in zip(v_ab, v_ba)]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


# ------------------------------------------------------------------------------------------ reward judge


class RewardJudge:
    """A judge that scores each answer with reward functions and compares the scores.

    ``rewards``: a :class:`~alignkit.rl.rewards.RewardSet`, a reward function
    ``fn(prompts, completions, **columns) -> list[float | None]``, or a spec string for
    :func:`~alignkit.rl.rewards.build_reward_set` (``rm:PATH``, ``correctness``, ``pkg.mod:fn``, comma
    separated). ``compare`` takes the data columns the functions read as keyword arguments, one value per
    prompt (``answer=[...]`` for ``correctness``). Verdict: 1 if the first answer scores higher, 0 if lower,
    0.5 if equal or either score is None; with ``soft=True``, ``sigmoid((r1 - r2) / temperature)``.
    """

    def __init__(self, rewards: Any, *, soft: bool = False, temperature: float = 1.0, name: str | None = None,
                 ctx: Any = None):
        from alignkit.rl.rewards import RewardContext, RewardSet, build_reward_set

        if isinstance(rewards, str):
            spec = rewards
            rewards = build_reward_set(rewards, "", ctx or RewardContext())
            default_name = f"reward:{spec}"
        elif isinstance(rewards, RewardSet):
            default_name = "reward:" + "+".join(rewards.names)
        elif callable(rewards):
            fn_name = getattr(rewards, "__name__", type(rewards).__name__)
            rewards = RewardSet([(fn_name, rewards, 1.0)], timeout=(ctx or RewardContext()).timeout)
            default_name = f"reward:{fn_name}"
        else:
            raise ConfigError(f"RewardJudge needs a RewardSet, a reward function or a spec string, "
                              f"got {type(rewards).__name__}")
        if temperature <= 0:
            raise ConfigError(f"RewardJudge temperature must be positive, got {temperature}")
        self.rewards, self.soft, self.temperature = rewards, soft, temperature
        self.name = name or default_name

    def scores(self, prompts: list, answers: list[str], **columns: Sequence) -> list[float | None]:
        """Each answer's total reward (None where no function gave a value)."""
        return self.rewards(list(prompts), list(answers), {k: list(v) for k, v in columns.items()}).total

    def compare(self, prompts: list, first: list[str], second: list[str], **columns: Sequence) -> list[float]:
        _check_lengths(prompts, first, second)
        n = len(prompts)
        both = self.scores(list(prompts) * 2, list(first) + list(second),
                           **{k: list(v) * 2 for k, v in columns.items()})
        out = []
        for r1, r2 in zip(both[:n], both[n:]):
            if r1 is None or r2 is None:
                out.append(0.5)
            elif self.soft:
                out.append(_sigmoid((r1 - r2) / self.temperature))
            else:
                out.append(1.0 if r1 > r2 else 0.0 if r1 < r2 else 0.5)
        return out


# --------------------------------------------------------------------------------------------- LLM judge

JUDGE_TEMPLATE = (
    "You are judging two answers to the same request. Decide which answer is better: more helpful, "
    "more correct and more honest, while declining only what is really harmful.\n\n"
    "[Request]\n{prompt}\n\n"
    "[Answer A]\n{first}\n\n"
    "[Answer B]\n{second}\n\n"
    "Which answer is better, A or B? Reply with the single letter A or B."
)
"""The question an :class:`LLMJudge` asks. ``{prompt}`` is the request (a message list is written one
``role: content`` line per message), ``{first}`` is shown as answer A and ``{second}`` as answer B. The
local backend sends it as one user message through the model's chat template (plain text when the tokenizer
has none) and reads the next token; the endpoint backend sends it as one user message."""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def _answer_text(answer: Any) -> str:
    if isinstance(answer, list):  # an assistant message list
        return "\n".join(str(m.get("content", "")) for m in answer)
    return str(answer)


_VERDICT_PATTERNS = (
    re.compile(r"^\W*(?:(?i:answer)\s*)?\(?([AB])\)?(?![A-Za-z])"),  # "A", "B.", "(A)", "Answer B"
    re.compile(r"\[\[([AB])\]\]"),  # "[[A]]"
    re.compile(r"(?i:answer|verdict|choice|winner)\s*(?i:is|:)?\s*\**\s*\(?([AB])\)?(?![A-Za-z])"),
    re.compile(r"\b([AB])\s+is\s+(?:the\s+)?better\b"),
)


def parse_verdict(reply: str) -> float | None:
    """1.0 when ``reply`` picks A, 0.0 when it picks B, None when no verdict can be read.

    Tried in order: the reply starts with the letter (``"A"``, ``"(B)"``, ``"Answer A"``), ``[[A]]``,
    ``answer/verdict/choice/winner is A``, ``A is better``."""
    text = reply.strip()
    for pattern in _VERDICT_PATTERNS:
        m = pattern.search(text)
        if m:
            return 1.0 if m.group(1) == "A" else 0.0
    return None


class LLMJudge:
    """A language model asked "which answer is better, A or B?" (:data:`JUDGE_TEMPLATE`).

    Build it with :meth:`local` (a transformers model and tokenizer: verdict ``sigmoid(logp_A - logp_B)``
    of the first generated token, deterministic, batched by ``batch_size``) or :meth:`endpoint` (an
    OpenAI-compatible server: the reply is parsed with :func:`parse_verdict`; 0.5 when unreadable).
    """

    def __init__(self, *, name: str, template: str = JUDGE_TEMPLATE):
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in template:
                raise ConfigError(f"judge template must contain {key}")
        self.name, self.template = name, template
        self._backend: Callable[[list[str]], list[float]] | None = None
        self.unparsed = 0  # endpoint replies without a readable verdict
        self.last_replies: list[str] = []

    # ---------------------------------------------------------------------------------------- builders

    @classmethod
    def local(cls, model, tokenizer, *, name: str = "llm", template: str = JUDGE_TEMPLATE, batch_size: int = 8,
              answer_prefix: str = "", device: str | torch.device | None = None) -> LLMJudge:
        """A judge reading ``model``'s next-token log-probs of ``A`` and ``B`` after the question.

        ``answer_prefix``: text put after the assistant turn's start before reading the token (e.g.
        ``"The better answer is "``; empty by default). The tokens read are the first token of ``"A"`` and
        of ``"B"``, plus the ``" A"``/``" B"`` tokens when the prefix does not end in white space and the
        tokenizer has them as single tokens (their probabilities are added)."""
        judge = cls(name=name, template=template)
        judge.model, judge.tokenizer = model, tokenizer
        judge.batch_size, judge.answer_prefix = max(1, batch_size), answer_prefix
        judge.device = torch.device(device) if device is not None else next(model.parameters()).device
        judge.letter_ids = {letter: judge._letter_ids(letter) for letter in "AB"}
        if set(judge.letter_ids["A"]) & set(judge.letter_ids["B"]):
            raise ConfigError("the judge tokenizer gives A and B the same first token")
        judge._backend = judge._local_scores
        return judge

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> LLMJudge:
        """:meth:`local` with ``alignkit.models.loading.load_model(name_or_path)`` (``"tiny"`` works)."""
        from alignkit.models.loading import load_model

        model, tok = load_model(name_or_path)
        model.eval()
        return cls.local(model, tok, name=kwargs.pop("name", f"llm:{name_or_path}"), **kwargs)

    @classmethod
    def endpoint(cls, url: str, model: str, *, name: str | None = None, template: str = JUDGE_TEMPLATE,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 3,
                 max_tokens: int = 16, workers: int = 4, backoff: float = 1.0) -> LLMJudge:
        """A judge asking an OpenAI-compatible server.

        ``url``: the server (``http://host:port``, ``.../v1`` or the full ``.../v1/chat/completions``).
        ``model``: the model name sent. The API key, if any, is read from the environment variable
        ``api_key_env`` at each request (never stored). Each request has ``timeout`` seconds; connection
        errors, timeouts, 429 and 5xx answers are retried ``retries`` times with exponential backoff
        (``backoff`` seconds, doubled each time); other HTTP errors fail at once. Failure raises
        :class:`JudgeError` naming the URL. Requests run on ``workers`` threads; temperature is 0."""
        if not model:
            raise ConfigError(f"judge endpoint {url}: a model name is needed (judge_model)")
        judge = cls(name=name or f"{model}@{url}", template=template)
        judge.url = _chat_url(url)
        judge.model_name, judge.api_key_env, judge.timeout = model, api_key_env, timeout
        judge.retries, judge.max_tokens, judge.workers, judge.backoff = retries, max_tokens, max(1, workers), backoff
        judge._backend = judge._endpoint_scores
        return judge

    # ----------------------------------------------------------------------------------------- compare

    def questions(self, prompts: list, first: list[str], second: list[str]) -> list[str]:
        return [self.template.format(prompt=_prompt_text(p), first=_answer_text(a), second=_answer_text(b))
                for p, a, b in zip(prompts, first, second)]

    def compare(self, prompts: list, first: list[str], second: list[str], **_: Any) -> list[float]:
        _check_lengths(prompts, first, second)
        if self._backend is None:
            raise ConfigError("LLMJudge has no backend: build it with LLMJudge.local or LLMJudge.endpoint")
        if not prompts:
            return []
        return self._backend(self.questions(list(prompts), list(first), list(second)))

    # --------------------------------------------------------------------------------------- local model

    def _letter_ids(self, letter: str) -> list[int]:
        return letter_token_ids(self.tokenizer, letter, self.answer_prefix)

    def _render(self, question: str) -> list[int]:
        from alignkit.data.tokenize import prompt_ids

        if getattr(self.tokenizer, "chat_template", None):
            ids = prompt_ids(self.tokenizer, [{"role": "user", "content": question}])
        else:
            ids = prompt_ids(self.tokenizer, question + "\n")
        if self.answer_prefix:
            ids = ids + self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"]
        return ids

    @torch.no_grad()
    def _local_scores(self, questions: list[str]) -> list[float]:
        seqs = [self._render(q) for q in questions]
        lp = letter_logprobs(self.model, self.tokenizer, seqs, [self.letter_ids["A"], self.letter_ids["B"]],
                             batch_size=self.batch_size, device=self.device)
        return torch.sigmoid(lp[:, 0] - lp[:, 1]).tolist()

    # ------------------------------------------------------------------------------------------ endpoint

    def _request(self, question: str) -> str:
        payload = post_chat(self.url, {
            "model": self.model_name,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }, api_key_env=self.api_key_env, timeout=self.timeout, retries=self.retries, backoff=self.backoff)
        return reply_text(self.url, payload)

    def _endpoint_scores(self, questions: list[str]) -> list[float]:
        if self.workers == 1 or len(questions) == 1:
            replies = [self._request(q) for q in questions]
        else:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(questions))) as pool:
                replies = list(pool.map(self._request, questions))
        self.last_replies = replies
        out = []
        for r in replies:
            v = parse_verdict(r)
            if v is None:
                self.unparsed += 1
                v = 0.5
            out.append(v)
        return out


def post_chat(url: str, body: dict, *, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
              retries: int = 3, backoff: float = 1.0) -> dict:
    """POST ``body`` as JSON to an OpenAI-compatible ``url`` and return the decoded answer.

    The API key, if any, is read from ``api_key_env`` at each request (never stored). Connection errors,
    timeouts, 429 and 5xx answers are retried ``retries`` times with exponential backoff (``backoff`` seconds,
    doubled each time); other HTTP errors fail at once. Failure raises :class:`JudgeError` naming the URL."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            last = e
            if e.code == 429 or e.code >= 500:
                continue
            detail = e.read()[:300].decode("utf-8", "replace")
            raise JudgeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last = e
            continue
        except ValueError as e:
            raise JudgeError(f"judge endpoint {url} did not return JSON: {e}") from None
    raise JudgeError(f"judge endpoint {url} failed after {retries + 1} attempt(s): {type(last).__name__}: {last}")


def reply_text(url: str, payload: dict, index: int = 0) -> str:
    """``choices[index].message.content`` of a chat-completions answer (:class:`JudgeError` if absent)."""
    try:
        return str(payload["choices"][index]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint {url} returned no choices[{index}].message.content: "
                         f"{str(payload)[:300]}") from None


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def letter_token_ids(tokenizer, letter: str, prefix: str = "") -> list[int]:
    """The token ids that spell ``letter`` right after ``prefix``: the first token of the bare letter, plus the
    ``" " + letter`` token when ``prefix`` does not end in white space and the tokenizer has it as one token."""
    ids: list[int] = []
    variants = [letter] if prefix.endswith((" ", "\n")) else [letter, " " + letter]
    for k, v in enumerate(variants):
        toks = tokenizer(v, add_special_tokens=False)["input_ids"]
        # the bare letter: its first token; a variant: only if it is one token of its own
        if toks and (k == 0 or len(toks) == 1) and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ConfigError(f"the judge tokenizer cannot encode {letter!r}")
    return ids


@torch.no_grad()
def letter_logprobs(model, tokenizer, seqs: list[list[int]], letters: list[list[int]], *, batch_size: int = 8,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """``[len(seqs), len(letters)]``: for each token sequence, the next-token log-probability of each option,
    an option's being the log-sum-exp over its token ids (``letter_token_ids``). One forward pass per batch of
    ``batch_size`` left-padded sequences, no sampling; the model's train/eval state is restored."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(seqs), max(1, batch_size)):
            chunk = seqs[start : start + max(1, batch_size)]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):  # left padding: every sequence ends at the last column
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=pos.to(device)).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(torch.stack([torch.logsumexp(logp[:, t], dim=-1) for t in letters], dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, len(letters)))


# ------------------------------------------------------------------------------------------------- specs


def judge_from_spec(spec: str, *, judge_model: str | None = None, soft: bool = False, ctx: Any = None,
                    **kwargs: Any) -> PairwiseJudge:
    """A judge from a config string.

    - ``http://...`` / ``https://...``: :meth:`LLMJudge.endpoint` (``judge_model`` names the model; required);
    - ``llm:MODEL_NAME_OR_PATH``: :meth:`LLMJudge.from_pretrained` (a local model; ``llm:tiny`` for tests);
    - anything else is a reward spec for :class:`RewardJudge` (``rm:PATH``, ``correctness``,
      ``pkg.mod:function``, ``file.py:function``, comma-separated), ``soft`` and ``ctx`` passed on.

    ``kwargs`` go to the LLM builders. Raises :class:`~alignkit.errors.ConfigError` for a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty judge spec; use rm:PATH, a reward function, llm:MODEL or an http(s):// URL, "
                          f"got {spec!r}")
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        if not judge_model:
            raise ConfigError(f"judge {spec!r}: an endpoint judge needs judge_model (the model name to send)")
        return LLMJudge.endpoint(spec, judge_model, **kwargs)
    if spec.startswith("llm:"):
        name = spec[4:].strip()
        if not name:
            raise ConfigError(f"judge {spec!r}: llm: needs a model name or path, e.g. llm:tiny")
        return LLMJudge.from_pretrained(name, **kwargs)
    if "://" in spec:
        raise ConfigError(f"judge {spec!r}: only http:// and https:// endpoints are supported")
    if kwargs:
        raise ConfigError(f"judge {spec!r}: options {sorted(kwargs)} apply to LLM judges only")
    return RewardJudge(spec, soft=soft, ctx=ctx)
