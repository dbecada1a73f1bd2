"""What reasoning distillation keeps of a teacher's traces, and the think / no-think rows it writes
(``alignkit distill``, docs/reasoning.md).

Filters (DeepSeek-R1, 2501.12948, section 2.3.3: rejection sampling for the SFT data keeps "only the correct
responses" and filters out "chain-of-thought with mixed languages, long paragraphs, and code blocks"). A trace is a
dict with ``reasoning``, ``answer``, ``reward`` (the verifier's total; None: not scored) and ``thinking_tokens``
(its reasoning's tokens in the student's tokenizer). :func:`failed_rules` names every rule it fails:

- ``empty``: no reasoning or no answer (neither a think row nor any SFT row can be made of it);
- ``verifier``: ``reward`` below ``threshold``, or None while a verifier is set (an unscored trace is not verified);
- ``language``: :func:`~alignkit.rl.verifiable.language_consistency` of the reasoning, or of the answer, below
  ``min_language`` (the share of letters in the target language; the language reward's rule);
- ``length``: more than ``thinking_limit`` thinking tokens;
- ``duplicate``: the same reasoning and answer as a kept trace of the same prompt.

Thinking-mode fusion (Qwen3, 2505.09388, section 4.3): one model trained on both modes, the user choosing with
``/think`` and ``/no_think``. :func:`fusion_rows` writes ``round(no_think_fraction * n)`` of the ``n`` kept traces,
drawn by seed, as no-think rows (the answer after an empty thinking block, ``/no_think`` appended to the last user
turn) and the others as think rows, of which ``round(flag_fraction * n_think)``, drawn by seed, get ``/think``
appended and the rest no flag: a prompt without a flag is answered with thinking, so thinking is the default, as
in Qwen3. Every row obeys the last flag of its conversation (:func:`~alignkit.data.thinking.requested_mode`): in
general the flag of a row's mode is appended where its prompt does not already ask for that mode (thinking when
it asks nothing), and is optional where it does, those rows getting it in the share ``flag_fraction``
(``round(flag_fraction * n_optional)`` of them, drawn by seed). So a think row after an earlier ``/no_think`` always
gets ``/think``, and a no-think row after an earlier ``/no_think`` may have no flag of its own: multi-turn prompts
teach that a flag stands until the next one. With single-turn prompts the optional rows are the think rows.
"""

from __future__ import annotations

import random
from collections import Counter

from alignkit.data.thinking import NO_THINK_FLAG, REASONING_KEY, THINK_FLAG, completion_text, requested_mode
from alignkit.rl.verifiable import language_consistency

RULES = ("empty", "verifier", "language", "length", "duplicate")


def failed_rules(trace: dict, *, verified: bool, threshold: float = 1.0, language: str = "en",
                 min_language: float = 0.0, thinking_limit: int = 0) -> list[str]:
    """The rules of the module docstring that ``trace`` fails (``duplicate`` is :func:`keep`'s); ``verified``:
    a verifier scored the traces."""
    failed = []
    if not trace["reasoning"].strip() or not trace["answer"].strip():
        failed.append("empty")
    if verified and (trace["reward"] is None or trace["reward"] < threshold):
        failed.append("verifier")
    if min_language > 0 and min(language_consistency(trace["reasoning"], language),
                                language_consistency(trace["answer"], language)) < min_language:
        failed.append("language")
    if thinking_limit > 0 and trace["thinking_tokens"] > thinking_limit:
        failed.append("length")
    return failed


def keep(traces: list[dict], **rules) -> tuple[list[dict], dict]:
    """The traces that fail no rule, in order, and the counts: ``traces``, ``kept``, ``dropped`` and
    ``dropped/<rule>`` (traces failing that rule; one trace may fail several). Each trace gets its ``failed``
    list."""
    kept, seen, counts = [], set(), Counter()
    for t in traces:
        failed = failed_rules(t, **rules)
        key = (t["prompt_index"], t["reasoning"], t["answer"])
        if key in seen:
            failed.append("duplicate")
        t["failed"] = failed
        counts.update(failed)
        if not failed:
            kept.append(t)
            seen.add(key)
    return kept, {"traces": len(traces), "kept": len(kept), "dropped": len(traces) - len(kept),
                  **{f"dropped/{r}": counts[r] for r in RULES}}


def with_flag(prompt, flag: str | None):
    """``prompt`` with ``flag`` appended to its last user turn (a message list), or to its end (plain text)."""
    if flag is None:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt.rstrip()} {flag}"
    out = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    out[last]["content"] = f"{str(out[last]['content']).rstrip()} {flag}"
    return out


def fusion_rows(kept: list[dict], examples, no_think_fraction: float, flag_fraction: float, seed: int) -> list[dict]:
    """SFT rows of the kept traces, both modes mixed (module docstring). ``examples[t["prompt_index"]]`` is the
    trace's prompt row (``.prompt``, ``.extra``). Each row has ``mode`` and ``flag`` (None: none appended)."""
    rng = random.Random(seed)
    n = len(kept)
    no_think = set(rng.sample(range(n), round(no_think_fraction * n)))
    modes = ["no_think" if i in no_think else "think" for i in range(n)]
    # a flag is optional where the conversation already asks for the row's mode (thinking when it asks nothing)
    optional = [i for i, t in enumerate(kept) if modes[i] == (requested_mode(examples[t["prompt_index"]].prompt)
                                                              or "think")]
    flagged = set(rng.sample(optional, round(flag_fraction * len(optional))))
    rows = []
    for i, t in enumerate(kept):
        ex, mode = examples[t["prompt_index"]], modes[i]
        reasoning = t["reasoning"] if mode == "think" else ""
        flag = None if i in optional and i not in flagged else (THINK_FLAG if mode == "think" else NO_THINK_FLAG)
        prompt = with_flag(ex.prompt, flag)
        completion = ([{"role": "assistant", REASONING_KEY: reasoning, "content": t["answer"]}]
                      if isinstance(prompt, list) else completion_text(reasoning, t["answer"], prompt))
        rows.append({**ex.extra, "prompt": prompt, "completion": completion, "mode": mode, "flag": flag,
                     "prompt_index": t["prompt_index"], "sample": t["sample"]})
    return rows


def mix_counts(rows: list[dict]) -> dict:
    """``rows``, ``rows/no_think`` (of which ``rows/no_think_unflagged`` rely on an earlier turn's /no_think),
    ``rows/think_flagged`` (with /think) and ``rows/think_default`` (no flag of their own)."""
    c = Counter((r["mode"], r["flag"] is not None) for r in rows)
    return {"rows": len(rows), "rows/no_think": c[("no_think", True)] + c[("no_think", False)],
            "rows/no_think_unflagged": c[("no_think", False)], "rows/think_flagged": c[("think", True)],
            "rows/think_default": c[("think", False)]}
