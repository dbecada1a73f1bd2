"""Toy data for tests: small JSONL files about ``max(a, b)`` with rows of deliberately different lengths.

Every function writes a file into ``directory`` and returns its path. Output is deterministic in ``seed``.
Prompts come in several wordings and completions in several paddings, so token counts differ from row to row
(and chosen from rejected): anything that weights rows by the wrong count, or depends on how rows are grouped
into micro-batches, shows up in a test.

- :func:`preference_jsonl`: ``prompt``/``chosen``/``rejected`` (chosen = the larger digit, rejected = the smaller);
- :func:`sft_jsonl`: ``prompt``/``completion`` (the larger digit);
- :func:`unpaired_jsonl`: ``prompt``/``completion``/``label`` (KTO; true for the larger digit, alternating).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPTS = (
    "max({a},{b})=",
    "Q: max({a}, {b})? A:",
    "Which is larger, {a} or {b}? Answer:",
    "Consider the two digits {a} and {b}. Write the larger one. Answer:",
)
ANSWERS = (
    " {x}",
    " {x}.",
    " It is {x}.",
    " The larger of the two is {x}, clearly.",
)


def _pairs(n: int, seed: int):
    """``n`` (prompt, larger, smaller, k) tuples with two distinct digits; ``k`` picks the answer wording."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(range(10), 2)
        prompt = PROMPTS[i % len(PROMPTS)].format(a=a, b=b)
        out.append((prompt, max(a, b), min(a, b), rng.randrange(len(ANSWERS))))
    return out


def _write(directory, name: str, rows: list[dict]) -> Path:
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference_jsonl(directory, n: int = 16, seed: int = 0, name: str = "preference.jsonl") -> Path:
    """Preference rows; chosen and rejected use different wordings, so their lengths differ too."""
    rows = []
    for prompt, hi, lo, k in _pairs(n, seed):
        chosen = ANSWERS[k].format(x=hi)
        rejected = ANSWERS[(k + 1) % len(ANSWERS)].format(x=lo)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return _write(directory, name, rows)


def belief_jsonl(directory, n: int = 16, seed: int = 0, name: str = "belief.jsonl") -> Path:
    """Belief-conditioned pairs (GDPO): each prompt has 2 or 3 beliefs (digits) with shares; the chosen answer
    names the pair's belief, the rejected another, in different wordings."""
    rows = []
    for i, (prompt, hi, lo, k) in enumerate(_pairs(n, seed)):
        beliefs = {str(hi): 0.6, str(lo): 0.4} if i % 2 else {str(hi): 0.5, str(lo): 0.3, "x": 0.2}
        rows.append({"prompt": prompt, "beliefs": beliefs, "belief": str(hi), "chosen": ANSWERS[k].format(x=hi),
                     "rejected": ANSWERS[(k + 1) % len(ANSWERS)].format(x=lo)})
    return _write(directory, name, rows)


def sft_jsonl(directory, n: int = 16, seed: int = 0, name: str = "sft.jsonl") -> Path:
    """Prompt/completion rows whose completions (the larger digit) have 2 to 40 tokens."""
    rows = [{"prompt": p, "completion": ANSWERS[k].format(x=hi)} for p, hi, _, k in _pairs(n, seed)]
    return _write(directory, name, rows)


def unpaired_jsonl(directory, n: int = 16, seed: int = 0, name: str = "unpaired.jsonl") -> Path:
    """KTO rows: even rows answer with the larger digit (label true), odd rows with the smaller (false)."""
    rows = []
    for i, (prompt, hi, lo, k) in enumerate(_pairs(n, seed)):
        good = i % 2 == 0
        rows.append({"prompt": prompt, "completion": ANSWERS[k].format(x=hi if good else lo), "label": good})
    return _write(directory, name, rows)


def prompt_jsonl(directory, n: int = 32, seed: int = 0, name: str = "prompts.jsonl") -> Path:
    """Prompt-only rows for online RL: ``prompt`` plus the ``answer`` column (the larger digit)."""
    rows = [{"prompt": prompt, "answer": str(hi)} for prompt, hi, _, _ in _pairs(n, seed)]
    return _write(directory, name, rows)


def max_digit_reward(prompts, completions, answer, **_):
    """A learnable reward for tiny random models: 1 if the completion starts with the larger digit, 0.2 if it
    starts with another digit, 0 otherwise (the 0.2 gives a random policy some signal to climb)."""
    out = []
    for c, a in zip(completions, answer):
        first = c.lstrip()[:1]
        out.append(1.0 if first == a else 0.2 if first.isdigit() else 0.0)
    return out


class Crash(RuntimeError):
    """What :func:`crash_at_loss_call` raises."""


def crash_at_loss_call(monkeypatch, recipe, n: int) -> None:
    """Make ``recipe.train`` raise :class:`Crash` at the ``n``-th call of its task's loss (1-based): a crash at the
    start of that micro-batch, after the checkpoints written before it."""
    real_train, calls = recipe.train, {"n": 0}

    def crashing(task, *args, **kwargs):
        original = task.loss

        def loss(model, rows, normaliser):
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash("simulated crash")
            return original(model, rows, normaliser)

        task.loss = loss
        return real_train(task, *args, **kwargs)

    monkeypatch.setattr(recipe, "train", crashing)


def run_until_crash(monkeypatch, recipe, n: int, run) -> None:
    """Call ``run()`` with :func:`crash_at_loss_call` in place for it (undone after), and check that it crashed."""
    import pytest

    with monkeypatch.context() as m:
        crash_at_loss_call(m, recipe, n)
        with pytest.raises(Crash):
            run()
