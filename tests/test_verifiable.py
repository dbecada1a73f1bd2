"""Verifiable rewards: extraction, safe equivalence, hostile inputs, DAPO overlong, Kimi length, L1 budgets, format,
language."""

import os
import time

import pytest

from alignkit.rl import verifiable as V
from alignkit.rl.verifiable import (
    answers_equal,
    correctness_reward,
    extract_answer,
    format_reward,
    l1_exact,
    l1_max,
    language_consistency,
    length_control,
    length_control_reward,
    make_l1_reward,
    make_language_reward,
    make_overlong_reward,
    overlong_penalty,
)

TIMEOUT = 2.0


@pytest.fixture(scope="module", autouse=True)
def _worker():
    # Spawn start-up (importing sympy) is not charged to any timeout; start it once here.
    assert V.warm_up_worker()
    yield


# ------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so x = \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\frac{\\sqrt{2}}{\\left(3\\right)}}", "\\frac{\\sqrt{2}}{\\left(3\\right)}"),
        ("<think>7</think><answer> 42 </answer>", "42"),
        ("\\boxed{5} beats <answer>6</answer>", "5"),
        ("We get 3 apples. The answer is 12.", "12"),
        ("Answer: $-7$\nmore text 99", "-7"),
        ("I have 3 cats and 1,250 dogs.", "1,250"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_unbalanced_boxed_falls_back():
    assert extract_answer("\\boxed{1 + {2} and 7") == "7"


# ------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "a, b",
    [
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\frac12", "0.5"),
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\sqrt{4}", "2"),
        ("\\sqrt[3]{8}", "2"),
        ("2^{10}", "1024"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("\\left(x+1\\right)^2", "x^2+2*x+1"),
        ("2\\pi", "2 \\cdot \\pi"),
        ("$\\boxed{3}$", "3"),
        ("(1,2)", "\\left(1, 2\\right)"),
        ("50%", "0.5"),  # documented: x% equals x/100 ...
        ("50\\%", "50"),  # ... and x, when only one side has a percent sign
        ("50%", "50%"),
    ],
)
def test_equal(a, b):
    assert answers_equal(a, b, timeout=TIMEOUT)
    assert answers_equal(b, a, timeout=TIMEOUT)


@pytest.mark.parametrize(
    "a, b",
    [("-3", "3"), ("2\\pi", "6.2832"), ("3.14", "\\pi"), ("1/3", "0.333"), ("50%", "5%"), ("x", "y"), ("", "0")],
)
def test_not_equal(a, b):
    assert not answers_equal(a, b, timeout=TIMEOUT)


HOSTILE = [
    "9**9**9**9",
    "(9**9)**(9**9)",
    "9^{9^{9^{9}}}",
    "1e999999999",
    "1" * 1_000_000,
    "{" * 1_000_000,
    "\\boxed{" + "{" * 1_000_000,
    "\\frac{1}{",
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "eval('1')",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_return_fast_and_false(text):
    start = time.monotonic()
    assert extract_answer(text) is None or isinstance(extract_answer(text), str)
    assert answers_equal(text, "1", timeout=TIMEOUT) is False
    assert answers_equal("1", text, timeout=TIMEOUT) is False
    assert time.monotonic() - start < TIMEOUT + 1.0


def test_hostile_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for text in (payload, f"\\boxed{{{payload}}}", f"The answer is {payload}"):
        for pred in (text, extract_answer(text) or ""):
            assert not answers_equal(pred, "12345", timeout=TIMEOUT)
    assert not os.path.exists(marker)


def test_worker_is_killed_and_replaced_on_timeout():
    # Bypass the pre-filter to exercise the time limit itself: the worker must be killed, not waited for.
    start = time.monotonic()
    assert V._WORKER.compare("9**9**9**9", "1", timeout=1.0) is False
    assert time.monotonic() - start < 1.0 + 1.0
    assert V.warm_up_worker()  # a replacement worker comes up and answers
    assert answers_equal("\\sqrt{9}", "3", timeout=TIMEOUT)


# ------------------------------------------------------------------------------------------- rewards


def test_correctness_reward():
    completions = ["... \\boxed{\\frac{1}{2}}", "the answer is 0.4", "<answer>1,000</answer>", "x"]
    answers = ["0.5", "0.5", "1000", None]
    assert correctness_reward([""] * 4, completions, answer=answers) == [1.0, 0.0, 1.0, None]
    # chat-format completion and a worked-solution reference
    chat = [[{"role": "assistant", "content": "so \\boxed{4}"}]]
    assert correctness_reward(["p"], chat, answer=["2+2 = \\boxed{4}"], extra=[1]) == [1.0]


def test_format_reward():
    completions = [
        "<think>a\nb</think>\n<answer>42</answer>",
        "  <think></think><answer></answer>\n",
        "<think>x</think> text <answer>1</answer>",
        "<answer>1</answer>",
        "<think>x</think><answer>1</answer> trailing",
        "<think>x</think><answer>1",
    ]
    assert format_reward([""] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_reward_hostile_is_fast():
    s = "<think>" + "</think>" * 200_000 + "</answer>"
    start = time.monotonic()
    assert format_reward([""], [s]) == [0.0]
    assert time.monotonic() - start < 1.0


def test_overlong_penalty_golden():
    # L = 100, B = 20: 0 up to 80; ((L-B) - n)/B in (80, 100]; -1 beyond 100.
    got = overlong_penalty([50, 80, 85, 90, 100, 101, 500], max_len=100, buffer=20)
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        overlong_penalty([1], 10, 0)


def test_overlong_reward_function():
    fn = make_overlong_reward(max_len=10, buffer=4)
    assert fn(["p", "p"], ["abc", "abcdefghi"]) == pytest.approx([0.0, -0.75])  # character lengths 3, 9
    assert fn(["p"], ["abc"], lengths=[8]) == pytest.approx([-0.5])  # token lengths from the column


def test_length_control_golden():
    # min 100, max 300: lam = 0.5 - (len-100)/200 -> 0.5, 0.0, -0.5
    got = length_control([100, 200, 300, 100, 300], [True, True, True, False, False])
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, -0.5])
    assert length_control([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]  # equal lengths: no signal
    assert length_control([], []) == []


def test_length_control_hand_values_from_the_paper():
    """Kimi k1.5 (2501.12599, "Length Penalty"): lam = 0.5 - (len - min_len)/(max_len - min_len) over the group's
    k responses, right or wrong; reward lam if correct, min(0, lam) if wrong. Lengths 120..400 (range 280):
    150 -> 0.5 - 30/280 = 11/28 (wrong: 0), 220 -> 0.5 - 100/280 = 1/7 (wrong: 0), 300 -> 0.5 - 180/280 = -1/7
    (correct: kept), 350 -> 0.5 - 230/280 = -9/28 (wrong: kept, a long wrong answer is penalised)."""
    got = length_control([120, 150, 400, 220, 300, 350], [True, False, True, False, True, False])
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, -1 / 7, -9 / 28])
    assert length_control([150, 220], [True, True]) == pytest.approx([0.5, -0.5])  # the group sets the scale


def test_l1_golden():
    """L1 (2503.04697), alpha 0.0003, delta 0.5, hand values of the docstrings and the ends of the clip."""
    assert l1_exact(True, 1200, 1000) == pytest.approx(0.94)
    assert l1_exact(True, 800, 1000) == pytest.approx(0.94)  # |n_gold - n_y|: under or over alike
    assert l1_exact(False, 700, 1000) == pytest.approx(-0.09)
    assert l1_exact(True, 1000, 1000) == 1.0
    assert l1_max(True, 1000, 1000) == pytest.approx(0.5)  # delta at the budget
    assert l1_max(True, 500, 1000) == pytest.approx(0.65)
    assert l1_max(True, 1500, 1000) == pytest.approx(0.35)
    assert l1_max(True, 4000, 1000) == 0.0  # clipped at 0 from delta/alpha = 1666.7 tokens over
    assert l1_max(True, 100, 4000) == 1.0  # clipped at 1 from (1 - delta)/alpha tokens under
    assert l1_max(False, 500, 1000) == 0.0 and l1_max(False, 4000, 1000) == 0.0
    assert l1_max(True, 1100, 1000, alpha=0.001, delta=0.2) == pytest.approx(0.1)
    assert l1_exact(True, 1100, 1000, alpha=0.001) == pytest.approx(0.9)


def test_l1_reward_function():
    """Correctness from the answer, the budget from its column, the length from ``lengths``; no answer or no
    budget -> None."""
    completions = ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}", "\\boxed{4}"]
    cols = dict(answer=["4", "4", None, "4", "4"], budget=[1000, 1000, 1000, None, "2000"],
                lengths=[1500, 1500, 10, 10, 2000])
    exact = make_l1_reward("exact")([""] * 5, completions, **cols)
    assert exact == pytest.approx([1 - 0.15, -0.15, None, None, 1.0])
    assert make_l1_reward("max")([""] * 5, completions, **cols) == pytest.approx([0.35, 0.0, None, None, 0.5])
    assert make_l1_reward("max", alpha=0.001, delta=0.9)([""], ["\\boxed{4}"], answer=["4"], budget=[100],
                                                           lengths=[150]) == pytest.approx([0.85])
    for bad in (dict(mode="min"), dict(mode="exact", alpha=-1.0)):
        with pytest.raises(ValueError):
            make_l1_reward(**bad)


def test_length_control_reward_groups_by_prompt():
    prompts = ["a", "a", "b", "b"]
    completions = ["\\boxed{1}", "so long... \\boxed{1}", "\\boxed{2}", "\\boxed{3}"]
    got = length_control_reward(prompts, completions, answer=["1", "1", "2", "2"], lengths=[10, 30, 5, 5])
    assert got == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_language_consistency():
    assert language_consistency("<think>all english here</think><answer>是</answer>") == 1.0
    assert language_consistency("<think>abcd中文</think>") == pytest.approx(4 / 6)
    assert language_consistency("<think>abcd中文</think>", target="zh") == pytest.approx(2 / 6)
    assert language_consistency("no think tag, ñ") == pytest.approx(10 / 11)
    assert language_consistency("<think>1 + 1 = 2</think>") == 1.0  # no letters: nothing off-language
    assert make_language_reward("zh")([""], ["<think>中文</think>"]) == [1.0]
    with pytest.raises(ValueError):
        language_consistency("x", target="fr")
