"""The ``thinking`` suite of ``alignkit eval``: ThinkFollow's scoring on hand-built answers (the last flag wins,
empty against non-empty thinking), the conversations it builds and how it plays them, the budget curve and thinking
on against off on a fake engine whose answers are known, and the suite end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignkit.cli import main
from alignkit.data.thinking import requested_mode
from alignkit.eval.thinking import (budget_sweep, conversations, follows, run_conversations, score_following,
                                    stopped_by_budget)
from alignkit.rl.rollout import Completion

THINKS, EMPTY, BARE = "<think>\n2 + 2 = 4\n</think>\n\n4", "<think>\n\n</think>\n\n4", "4"


def test_follows_empty_and_non_empty_thinking():
    assert follows("think", THINKS) and not follows("think", EMPTY) and not follows("think", BARE)
    assert follows("no_think", EMPTY) and follows("no_think", BARE) and not follows("no_think", THINKS)
    assert follows("think", "<think>\ncut at the limit")  # an unclosed block is thinking
    assert follows("think", "2 + 2 = 4\n</think>\n\n4")  # the prompt opened the block


def test_following_scores_the_last_flag_wherever_it_stands():
    convs = [["a /no_think", "b /think"],  # think
             ["a /think", "b"],  # think: the flag of an earlier turn still stands
             ["a /think", "b /no_think"],  # no_think
             ["a /no_think", "b", "c"],  # no_think
             ["a /no_think /think"]]  # think: the last of one turn's flags
    texts = [THINKS, EMPTY, EMPTY, THINKS, THINKS]
    s = score_following(convs, texts, n_boot=200)
    assert s["n"] == 5 and s["accuracy"] == pytest.approx(3 / 5)
    assert s["by_mode"]["think"]["n"] == 3 and s["by_mode"]["think"]["accuracy"] == pytest.approx(2 / 3)
    assert s["by_mode"]["no_think"]["n"] == 2 and s["by_mode"]["no_think"]["accuracy"] == 0.5
    lo, hi = s["ci"]
    assert lo <= 0.6 <= hi and lo < hi
    perfect = score_following(convs, [THINKS, THINKS, BARE, EMPTY, THINKS], n_boot=200)
    assert perfect["accuracy"] == 1.0 and perfect["ci"] == [1.0, 1.0]


def test_conversations_end_with_their_prompt_and_always_ask_for_a_mode():
    prompts = [[{"role": "user", "content": f"Problem {i}?"}] for i in range(7)]
    convs = conversations(prompts, 40, 3, seed=5)
    assert convs == conversations(prompts, 40, 3, seed=5) and convs != conversations(prompts, 40, 3, seed=6)
    assert len(convs) == 40 and {len(c) for c in convs} == {1, 2, 3}
    for i, c in enumerate(convs):
        assert c[-1].startswith(f"Problem {i % 7}?")
    modes = [requested_mode([{"role": "user", "content": t} for t in c]) for c in convs]
    assert None not in modes and set(modes) == {"think", "no_think"}
    assert any("/" not in c[-1] for c in convs)  # some requests stand in an earlier turn only


class FakeEngine:
    """Problem i needs ``need[i]`` thinking tokens (then closes its block by itself after 3 more) and answers right
    only when it got them; with thinking off it is right where ``need[i] == 0``. ``obey_budget=False`` ignores the
    budget (a broken hard stop). Records every call's modes."""

    def __init__(self, need, obey_budget=True):
        self.need, self.obey, self.calls = need, obey_budget, []

    def generate(self, prompts, n, sampling, seeds=None, version=None, *, thinking=None, max_thinking_tokens=None):
        self.calls.append((len(prompts), sampling.thinking, thinking, sampling.max_thinking_tokens))
        out = []
        for ids in prompts:
            i = ids[0]
            if sampling.thinking is False:
                k, right = 0, self.need[i] == 0
            else:
                natural = self.need[i] + 3
                b = sampling.max_thinking_tokens
                k = natural if b is None or not self.obey else min(natural, b)
                right = k == natural
            answer = f"The answer is {i if right else -1}."
            out.append([Completion(list(range(k + 5)), f"<think>\n{'x ' * k}\n</think>\n\n{answer}", [0.0] * (k + 5),
                                   "eos", forced=[b is not None and k < natural and sampling.thinking is not False]
                                   + [False] * (k + 4) if sampling.thinking is not False else [], thinking_tokens=k,
                                   reasoning="x " * k, answer=answer)])
        return out


def test_budget_curve_and_on_against_off_on_a_fake_engine():
    need = [0, 5, 5, 13, 29, 29, 61, 100]
    engine = FakeEngine(need)
    ids = [[i] for i in range(len(need))]
    res = budget_sweep(engine, ids, [str(i) for i in range(len(need))], [64, 8, 16, 32], answer_tokens=10,
                       n_boot=300)
    # right at budget b when need + 3 <= b
    assert [p["budget"] for p in res["curve"]] == [8, 16, 32, 64]
    assert [p["accuracy"] for p in res["curve"]] == [3 / 8, 4 / 8, 6 / 8, 7 / 8]
    assert [p["thinking_tokens"] for p in res["curve"]] == [np.mean([min(x + 3, b) for x in need]) for b in (8, 16, 32, 64)]
    assert res["within_budget"] == 1.0 and res["samples"] == 32 and all(p["within_budget"] == 1.0 for p in res["curve"])
    assert res["off"]["accuracy"] == 1 / 8 and res["on"] == {"budget": 64, "accuracy": 7 / 8, "ci": res["curve"][-1]["ci"]}
    assert res["on_minus_off"] == pytest.approx(6 / 8)
    lo, hi = res["on_minus_off_ci"]
    assert 0 < lo <= 6 / 8 <= hi  # paired: the off-correct problem is also on-correct
    # each budget gets its answer room; off answers with the room alone
    assert [(c[1], c[3]) for c in engine.calls] == [(True, 8), (True, 16), (True, 32), (True, 64), (False, None)]
    broken = budget_sweep(FakeEngine(need, obey_budget=False), ids, [str(i) for i in range(len(need))], [8, 64],
                          answer_tokens=10, n_boot=100)
    assert broken["curve"][0]["within_budget"] == 3 / 8 and broken["within_budget"] == (3 + 7) / 16


def test_history_turns_follow_their_request_and_the_last_turn_decides_alone():
    from alignkit.models.loading import load_tokenizer

    class Recorder(FakeEngine):
        def generate(self, prompts, n, sampling, seeds=None, version=None, *, thinking=None, max_thinking_tokens=None):
            self.calls.append(list(thinking))
            return [[Completion([1], "<think>\nr\n</think>\n\nok", [0.0], "eos", thinking_tokens=1, reasoning="r",
                                answer="ok")] for _ in prompts]

    engine = Recorder([])
    convs = [["a /no_think", "b"], ["a", "b /think", "c"], ["a /think"]]
    histories, last = run_conversations(engine, load_tokenizer("tiny"), convs, max_new_tokens=9, budget=5)
    assert engine.calls == [[False, None, None], [None, True], [None]]
    assert last == ["<think>\nr\n</think>\n\nok"] * 3
    assert [m["role"] for m in histories[1]] == ["user", "assistant", "user", "assistant", "user"]
    assert histories[1][1] == {"role": "assistant", "content": "ok", "reasoning_content": "r"}


def test_eval_thinking_suite_on_the_tiny_model(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]))
    out = tmp_path / "eval"
    assert main(["eval", "model=tiny", "reference=tiny", "suites=thinking", f"output_dir={out}", f"thinking_data={data}",
                 "thinking_budgets=40,20", "thinking_answer_tokens=4", "thinkfollow_conversations=5",
                 "bootstrap=100", "precision=fp32"]) == 0
    th = json.loads((out / "summary.json").read_text())["thinking"]
    assert th["budgets"] == [20, 40] and th["n"] == 4 and th["conversations"] == 5
    for who in ("model", "reference"):
        b = th[who]["budget"]
        assert b["within_budget"] == 1.0 and b["samples"] == 8 and [p["budget"] for p in b["curve"]] == [20, 40]
        assert th[who]["following"]["n"] == 5
    assert th["model"] == th["reference"]  # the same tiny model twice
    html = (out / "report.html").read_text()
    assert "<h2>Thinking</h2>" in html and (out / "thinking_budget.png").stat().st_size > 0
    assert main(["eval", "model=tiny", "suites=thinking", "thinking_budgets=0,8", f"output_dir={out}"]) == 2
    # a budget the tags do not fit in: exit 2 naming the setting, before anything is generated
    from alignkit.models.loading import load_tokenizer
    from alignkit.rl.thinking import smallest_budget

    need = smallest_budget(load_tokenizer("tiny"))
    assert need > 2
    assert main(["eval", "model=tiny", "suites=thinking", f"thinking_budgets={need - 1},40", f"output_dir={out}",
                 f"thinking_data={data}", "precision=fp32"]) == 2
    assert main(["eval", "model=tiny", "suites=thinking", f"thinking_budgets={need},40", f"output_dir={out}",
                 f"thinking_data={data}", "thinking_answer_tokens=2", "thinkfollow_conversations=2", "bootstrap=50",
                 "precision=fp32"]) == 0


def test_stopped_by_budget_counts_the_forced_close_not_the_forced_opening():
    """The engine forces the opening of a thinking block too: only a block that fills the budget and ends in forced
    tokens was stopped by it."""
    def comp(k, forced):
        return Completion(list(range(k + 3)), "", [0.0] * (k + 3), "eos", forced=forced, thinking_tokens=k)

    opened = [True, True] + [False] * 10  # forced <think>\n, then the model thinks and closes by itself
    assert not stopped_by_budget(comp(9, opened), 16)  # closed early by the model
    assert not stopped_by_budget(comp(9, opened), 9)  # closed by the model exactly at the budget
    cut = [True, True] + [False] * 11 + [True, True, True] + [False] * 3  # ... and the close forced at 16
    assert stopped_by_budget(comp(16, cut), 16)
    assert not stopped_by_budget(comp(0, []), 8)
