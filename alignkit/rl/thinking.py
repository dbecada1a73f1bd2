"""Thinking mode and thinking budget of the rollout engine (:class:`alignkit.rl.rollout.LocalEngine`).

A reasoning model's completion is a thinking block and an answer, ``<think>\\n...\\n</think>\\n\\nanswer``
(:mod:`alignkit.data.thinking`).

Mode switch (Qwen3, 2505.09388):

- hard: ``SamplingParams.thinking`` or the request's per-prompt ``thinking`` (which wins): ``True`` feeds
  ``<think>\\n`` after the generation prompt, so the model thinks; ``False`` feeds the empty block
  ``<think>\\n\\n</think>\\n\\n`` (Qwen3's ``enable_thinking=False`` form), so it answers directly; ``None`` feeds
  nothing and the model decides;
- soft: ``/think`` or ``/no_think`` in the conversation's user or system messages, the last one wins
  (:func:`alignkit.data.thinking.requested_mode`); the caller turns it into the request's mode where no hard
  flag is set (:func:`resolve_mode`).

A prompt that already opens a thinking block (a template that ends with ``<think>\\n``, as DeepSeek-R1's does)
starts inside it; one that already ends with a closed block starts in the answer.

Thinking budget, per row and counted in tokens: the thinking block is the completion's tokens from its first
through the one that completes ``</think>`` (its tags, a forced transition and any "Wait" included), or all of
them when it never closes. With ``max_thinking_tokens = B`` the engine starts feeding the budget action's tokens
when the block holds ``B - c`` tokens, ``c`` being the action's tokens through its ``</think>``, so the block
ends at exactly ``B`` tokens and never passes it:

- ``force_end``: ``\\n</think>\\n\\n``, then the model answers;
- ``transition``: Qwen3's natural-language hand-over, ``\\n\\nConsidering the limited time by the user, I have to
  give the solution based on the thinking directly now.\\n</think>\\n\\n``.

``min_thinking_tokens = m`` is s1's budget forcing (2501.19393): when the model ends its thinking (completes
``</think>``, or emits EOS) with a block shorter than ``m`` tokens, that end is replaced by ``Wait`` and the
model goes on thinking. The tokens of a ``</think>`` written over several tokens are taken back first: their
positions are masked out of the attention and their position ids reused, so the model continues exactly as if
they had never been fed, and the completion does not hold them.

Forced tokens are fed instead of the sampled one, one a step, for their row only; they are part of the
completion, their log-probs are computed from the same logits as a sampled token's, and
``Completion.forced`` flags them (training may mask them). Stop strings apply to the answer only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignkit.data.thinking import THINK_CLOSE, THINK_OPEN, requested_mode

BUDGET_ACTIONS = ("force_end", "transition")
OPEN = THINK_OPEN + "\n"
EMPTY_BLOCK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"
FORCE_END = "\n" + THINK_CLOSE + "\n\n"
TRANSITION = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
              "directly now.\n" + THINK_CLOSE + "\n\n")
WAIT = "Wait"
TAIL = 64  # prompt tokens decoded to see whether the prompt opens or closes a thinking block


def resolve_mode(hard: bool | None, messages) -> bool | None:
    """A request's mode: the hard flag when it is set, else the conversation's soft switch
    (:func:`alignkit.data.thinking.requested_mode`: the last ``/think`` or ``/no_think`` wins), else None."""
    if hard is not None:
        return hard
    soft = requested_mode(messages)
    return None if soft is None else soft == "think"


@dataclass(frozen=True)
class ThinkingTokens:
    """The forced sequences as one tokenizer writes them, and how many tokens each takes through ``</think>``."""

    open: list[int]
    empty: list[int]
    force_end: list[int]
    transition: list[int]
    wait: list[int]

    @classmethod
    def of(cls, tokenizer) -> ThinkingTokens:
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return cls(ids(OPEN), ids(EMPTY_BLOCK), ids(FORCE_END), ids(TRANSITION), ids(WAIT))

    def action(self, budget_action: str) -> list[int]:
        if budget_action not in BUDGET_ACTIONS:
            raise ValueError(f"budget_action must be one of {BUDGET_ACTIONS}, not {budget_action!r}")
        return self.force_end if budget_action == "force_end" else self.transition


def smallest_budget(tokenizer, budget_action: str = "force_end") -> int:
    """The fewest thinking tokens a budget can hold with this tokenizer: the opening, then the budget action
    through its ``</think>`` (a smaller budget is refused)."""
    seqs = ThinkingTokens.of(tokenizer)
    return len(seqs.open) + through_close(tokenizer, seqs.action(budget_action))


def through_close(tokenizer, ids: list[int]) -> int:
    """How many of ``ids`` it takes to complete ``</think>`` (``len(ids)`` when they never do)."""
    return next((k for k in range(1, len(ids) + 1) if THINK_CLOSE in tokenizer.decode(ids[:k])), len(ids))


def prompt_state(tokenizer, prompt: Sequence[int]) -> str | None:
    """``"open"`` when the prompt ends inside a thinking block, ``"closed"`` when it ends with one, else None."""
    text = tokenizer.decode(list(prompt[-TAIL:]))
    if text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE):
        return "open"
    return "closed" if text.rstrip().endswith(THINK_CLOSE) else None


def tempered_logps(logits_AV: torch.Tensor, tokens_A: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` at ``tokens_A`` (``T = 1`` when greedy): what :func:`sample_next` reports."""
    z_AV = logits_AV.float() / (temperature if temperature > 0 else 1.0)
    return z_AV.gather(-1, tokens_A[:, None]).squeeze(-1) - z_AV.logsumexp(-1)


class Row:
    """One row's thinking state: its phase (``pending`` until a model that decides shows it, ``think``,
    ``answer``), the tokens queued to be forced, and where its thinking block ends."""

    def __init__(self, phase: str, queue: list[int], closing: bool, budget: int | None, minimum: int):
        self.phase, self.queue, self.closing = phase, list(queue), closing
        self.budget, self.minimum = budget, minimum
        self.end = 0  # tokens of the thinking block, once it closed
        self.forced: list[bool] = []
        self.wait_lp: dict[int, float] = {}  # position -> log-prob of Wait's first token there (with a minimum)


class Thinking:
    """The thinking state of a chunk's rows, driven by the engine's decoding loop (module docstring)."""

    def __init__(self, tokenizer, sampling, prompts: list[list[int]], n: int, modes: Sequence | None,
                 budgets: Sequence | None, eos_ids: set[int]):
        self.tokenizer, self.temperature, self.eos_ids = tokenizer, sampling.temperature, eos_ids
        self.seqs = ThinkingTokens.of(tokenizer)
        action = self.seqs.action(sampling.budget_action)
        self.action, self.close_at = action, through_close(tokenizer, action)
        self.window = len(tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]) + 8
        self.rows: list[Row] = []
        minimum = sampling.min_thinking_tokens or 0
        for i, prompt in enumerate(prompts):
            mode = sampling.thinking if modes is None or modes[i] is None else modes[i]
            budget = sampling.max_thinking_tokens if budgets is None or budgets[i] is None else budgets[i]
            state = prompt_state(tokenizer, prompt)
            if mode is True:
                phase, queue, closing = "think", ([] if state == "open" else self.seqs.open), False
            elif mode is False:
                phase, queue = ("answer", []) if state == "closed" else (
                    "think", self.seqs.force_end if state == "open" else self.seqs.empty)
                closing = True
            else:
                phase, queue, closing = {"open": "think", "closed": "answer"}.get(state, "pending"), [], False
            if budget is not None and phase != "answer":
                need = through_close(tokenizer, queue) if closing else len(queue) + self.close_at
                if budget < need:
                    raise ValueError(f"max_thinking_tokens={budget} is below the {need} tokens that opening and "
                                     f"closing a thinking block take with this tokenizer")
            self.rows += [Row(phase, queue, closing, budget, minimum) for _ in range(n)]

    def choose(self, active: list[int], tokens: list[list[int]], logps: list[list[float]], toks: list[int],
               lps: list[float], logits_AV: torch.Tensor) -> list[tuple[int, int]]:
        """Replace, in place, the sampled ``toks``/``lps`` of the active rows by the tokens they force; returns
        ``(position in active, n)`` for each row whose last ``n`` tokens are taken back (already removed from
        ``tokens`` and ``logps``; the caller masks their positions out of the cache)."""
        forced_at: list[int] = []
        retract: list[tuple[int, int]] = []
        wait0 = self.seqs.wait[0]
        wait_lp_A = None
        if any(self.rows[r].minimum and self.rows[r].phase == "think" for r in active):
            wait_lp_A = tempered_logps(logits_AV, torch.full((len(active),), wait0, device=logits_AV.device),
                                       self.temperature).tolist()
        for j, r in enumerate(active):
            row, ids = self.rows[r], tokens[r]
            if wait_lp_A is not None and row.minimum and row.phase == "think":
                row.wait_lp[len(ids)] = wait_lp_A[j]
            if (row.phase != "answer" and row.budget is not None and not row.closing
                    and len(ids) >= row.budget - self.close_at):
                row.queue, row.closing = list(self.action), True  # the budget: close now, ending at exactly B
            forced = bool(row.queue)
            if forced:
                toks[j] = row.queue.pop(0)
                forced_at.append(j)
            elif row.phase == "think" and len(ids) + 1 < row.minimum:
                back = self._early_end(ids, row.forced, toks[j])
                if back is not None:  # s1: the early end becomes "Wait", its partial </think> taken back
                    forced = True
                    toks[j], row.queue = wait0, list(self.seqs.wait[1:])
                    if back:
                        lps[j] = row.wait_lp[len(ids) - back]  # chosen where the first token taken back was
                        del ids[-back:], logps[r][-back:], row.forced[-back:]
                        retract.append((j, back))
                    else:
                        forced_at.append(j)
            row.forced.append(forced)
        if forced_at:
            sel = torch.tensor(forced_at, device=logits_AV.device)
            got = tempered_logps(logits_AV[sel], torch.tensor([toks[j] for j in forced_at], device=sel.device),
                                 self.temperature)
            for j, lp in zip(forced_at, got.tolist()):
                lps[j] = lp
        return retract

    def _early_end(self, ids: list[int], forced: list[bool], token: int) -> int | None:
        """None when ``token`` does not end the thinking; else how many of the last tokens (sampled ones) it
        completes ``</think>`` with (0: EOS, or a one-token ``</think>``)."""
        if token in self.eos_ids:
            return 0
        for back in range(min(self.window, len(ids)) + 1):
            if back and forced[-back]:
                break
            if THINK_CLOSE in self.tokenizer.decode(ids[len(ids) - back :] + [token]):
                return back
        return None

    def appended(self, r: int, ids: list[int]) -> None:
        """Update row ``r``'s phase after its token was appended to ``ids``."""
        row = self.rows[r]
        if row.phase == "pending":
            text = self.tokenizer.decode(ids).lstrip()
            if text.startswith(THINK_OPEN):
                row.phase = "think"
            elif text and not THINK_OPEN.startswith(text):
                row.phase = "answer"
        elif row.phase == "think" and THINK_CLOSE in self.tokenizer.decode(ids[-self.window :]):
            row.phase, row.end = "answer", len(ids)

    def answer_start(self, r: int) -> int | None:
        """Where row ``r``'s answer starts (stop strings are checked from there), or None while it thinks."""
        row = self.rows[r]
        return None if row.phase == "think" else row.end

    def thinking_tokens(self, r: int, length: int) -> int:
        """The tokens of row ``r``'s thinking block in a completion of ``length`` tokens."""
        row = self.rows[r]
        return length if row.phase == "think" else row.end

    def forced(self, r: int) -> list[bool]:
        return self.rows[r].forced


def split_completion(tokenizer, token_ids: list[int], thinking: int, text_of) -> tuple[str, str]:
    """``(reasoning, answer)`` texts of a completion whose first ``thinking`` tokens are its thinking block:
    the block without its tags, and ``text_of(answer tokens)`` (the caller cuts it at a stop string)."""
    block = tokenizer.decode(token_ids[:thinking], skip_special_tokens=True).strip()
    reasoning = block.removeprefix(THINK_OPEN).partition(THINK_CLOSE)[0].strip()
    return reasoning, text_of(token_ids[thinking:]).strip()
