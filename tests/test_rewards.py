"""Reward-function plumbing: weighted totals, None handling, failures, timeouts, spec parsing, registry wiring."""

import logging
import math
import textwrap
import time

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl import rewards as R
from alignkit.rl.rewards import (
    REWARD_FUNCTIONS,
    RewardContext,
    RewardScores,
    RewardSet,
    build_reward_set,
    get_reward,
    load_reward_function,
)

CTX = RewardContext(max_new_tokens=100, overlong_buffer=20, language="en", timeout=5.0)


def const(value):
    return lambda prompts, completions, **_: [value] * len(completions)


def by_text(prompts, completions, **_):
    return [float(len(c)) for c in completions]


# ------------------------------------------------------------------------------------------ totals and None


def test_weighted_total_and_per_function():
    rs = RewardSet([("a", const(1.0), 2.0), ("b", by_text, 0.5)], timeout=5)
    out = rs(["p", "p"], ["xx", "xxxx"], {})
    assert out.per_function == {"a": [1.0, 1.0], "b": [2.0, 4.0]}
    assert out.total == [2 * 1 + 0.5 * 2, 2 * 1 + 0.5 * 4]
    assert out.failures == {"a": 0, "b": 0}


def test_none_from_one_function_keeps_the_others_and_all_none_gives_none():
    def some_none(prompts, completions, **_):
        return [None, 1.0, None]

    rs = RewardSet([("a", some_none, 1.0), ("b", const(None), 1.0), ("c", lambda p, c, **_: [3.0, None, None], 2.0)],
                   timeout=5)
    out = rs(["p"] * 3, ["x", "y", "z"], {})
    assert out.total == [6.0, 1.0, None]
    assert out.failures == {"a": 0, "b": 0, "c": 0}  # None on purpose is not a failure


def test_columns_are_passed_as_keywords():
    seen = {}

    def fn(prompts, completions, answer, lengths, **_):
        seen.update(answer=answer, lengths=lengths)
        return [0.0] * len(completions)

    RewardSet([("f", fn, 1.0)], timeout=5)(["p", "q"], ["a", "b"], {"answer": ["1", "2"], "lengths": [3, 4]})
    assert seen == {"answer": ["1", "2"], "lengths": [3, 4]}
    with pytest.raises(ValueError, match="one entry per completion"):
        RewardSet([("f", fn, 1.0)], timeout=5)(["p", "q"], ["a", "b"], {"answer": ["1"]})


# ------------------------------------------------------------------------------------------ failures


def test_raising_function_only_nulls_offending_completions(caplog):
    calls = []

    def picky(prompts, completions, **_):
        calls.append(len(completions))
        if any("bad" in c for c in completions):
            raise RuntimeError("cannot score bad text")
        return [1.0] * len(completions)

    rs = RewardSet([("picky", picky, 1.0), ("ok", const(0.5), 1.0)], timeout=5)
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.rewards"):
        out = rs(["p"] * 4, ["good", "bad", "fine", "bad too"], {})
    assert out.per_function["picky"] == [1.0, None, 1.0, None]
    assert out.total == [1.5, 0.5, 1.5, 0.5]
    assert out.failures == {"picky": 2, "ok": 0}
    assert calls == [4, 1, 1, 1, 1]  # whole batch, then one completion at a time
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per function per call
    assert "picky" in warnings[0].getMessage() and "RuntimeError: cannot score bad text" in warnings[0].getMessage()


def test_group_aware_function_is_retried_by_prompt_group():
    def grouped(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise ValueError("boom")
        # a group-aware value: rank within the prompt's completions in this call
        return [float(sum(1 for q, d in zip(prompts, completions) if q == p and len(d) < len(c)))
                for p, c in zip(prompts, completions)]

    grouped.group_aware = True
    out = RewardSet([("g", grouped, 1.0)], timeout=5)(["p", "p", "q", "q"], ["a", "aaa", "b", "boom"], {})
    assert out.per_function["g"] == [0.0, 1.0, None, None]  # p's group kept its within-group values
    assert out.failures == {"g": 2}


def test_timeout_returns_none_within_the_limit(caplog):
    def slow(prompts, completions, **_):
        time.sleep(10)
        return [1.0] * len(completions)

    timeout = 0.5
    rs = RewardSet([("slow", slow, 1.0), ("ok", const(1.0), 1.0)], timeout=timeout)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="alignkit.rl.rewards"):
        out = rs(["p", "p"], ["a", "b"], {})
    assert time.monotonic() - t0 < timeout + 1.0
    assert out.per_function["slow"] == [None, None] and out.total == [1.0, 1.0]
    assert out.failures["slow"] == 2
    assert "timed out" in caplog.text


def test_retries_share_the_deadline():
    def raise_then_hang(prompts, completions, **_):
        if len(completions) > 1:
            raise RuntimeError("batch")
        if completions[0] == "hang":
            time.sleep(10)
        return [2.0]

    t0 = time.monotonic()
    out = RewardSet([("f", raise_then_hang, 1.0)], timeout=0.5)(["p"] * 3, ["a", "hang", "c"], {})
    assert time.monotonic() - t0 < 1.5
    assert out.per_function["f"] == [2.0, None, None]  # "c" was never reached before the deadline
    assert out.failures["f"] == 2


@pytest.mark.parametrize(
    "returned, expected, failed",
    [
        ([1.0], [None, None], 2),  # wrong length
        ("12", [None, None], 2),  # not a list
        ([float("nan"), 1.0], [None, 1.0], 1),
        ([float("inf"), -float("inf")], [None, None], 2),
        (["1.0", 2], [None, 2.0], 1),  # a string is not a number
        ([True, 0], [1.0, 0.0], 0),
        (torch.tensor([0.5, 1.5]), [0.5, 1.5], 0),
        ([torch.tensor(0.5), None], [0.5, None], 0),
    ],
)
def test_bad_return_values(returned, expected, failed):
    out = RewardSet([("f", lambda p, c, **_: returned, 1.0)], timeout=5)(["p", "p"], ["a", "b"], {})
    assert out.per_function["f"] == expected
    assert out.failures["f"] == failed


def test_no_timeout_runs_inline():
    out = RewardSet([("f", const(1.0), 1.0)], timeout=0)(["p"], ["a"], {})
    assert out.total == [1.0]


def test_metrics():
    s = RewardScores(total=[1.0, 3.0, None], per_function={"a": [1.0, 3.0, None], "b": [None, None, None]},
                     failures={"a": 0, "b": 3})
    m = s.metrics()
    assert m["reward/a/mean"] == 2.0 and m["reward/a/std"] == 1.0 and m["reward/a/failed"] == 0.0
    assert math.isnan(m["reward/b/mean"]) and m["reward/b/failed"] == 3.0
    assert m["reward/total/mean"] == 2.0


# ------------------------------------------------------------------------------------------ specs


def test_registry_names_and_unknown_name_lists_choices():
    for name in REWARD_FUNCTIONS:
        got, fn = load_reward_function(name, CTX)
        assert got == name and callable(fn)
    assert get_reward("length").group_aware and not get_reward("correctness").group_aware
    with pytest.raises(ConfigError, match="unknown reward function 'corectness'.*correctness.*rm:PATH"):
        load_reward_function("corectness", CTX)
    with pytest.raises(ConfigError, match="empty reward spec"):
        load_reward_function("  ", CTX)


def test_module_function_spec():
    name, fn = load_reward_function("alignkit.rl.verifiable:format_reward", CTX)
    assert name == "format_reward"
    assert fn([""], ["<think>a</think><answer>b</answer>"]) == [1.0]


def test_file_function_spec(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shout(prompts, completions, **_):
            return [float(c.isupper()) for c in completions]
    """))
    name, fn = load_reward_function(f"{tmp_path / 'my_rewards.py'}:shout", CTX)
    assert name == "shout" and fn(["p", "p"], ["HI", "hi"]) == [1.0, 0.0]
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    assert load_reward_function("my_rewards.py:shout", CTX)[0] == "shout"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'.*ModuleNotFoundError"),
        ("alignkit.rl.verifiable:nope", "has no attribute 'nope'"),
        ("alignkit.rl.verifiable:_MAX_POWERS", "is not callable"),
        ("missing/file.py:fn", "cannot import 'missing/file.py'.*no such file"),
        ("rm:/no/such/dir", "not an alignkit reward model"),
        ("pkg.mod:", "unknown reward function"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_reward_function(spec, CTX)
    assert spec.split(":")[0] in str(e.value)


def test_file_with_syntax_error(tmp_path):
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        load_reward_function(f"{tmp_path / 'broken.py'}:f", CTX)


def test_build_reward_set_weights_and_errors():
    rs = build_reward_set("correctness, format", "1, 0.1", CTX)
    assert [(n, w) for n, _, w in rs.functions] == [("correctness", 1.0), ("format", 0.1)]
    assert rs.timeout == CTX.timeout
    assert [w for *_, w in build_reward_set("correctness,format", "", CTX).functions] == [1.0, 1.0]
    assert build_reward_set("format,format", "", CTX).names == ["format", "format_2"]
    with pytest.raises(ConfigError, match="2 reward weights.*3 reward functions"):
        build_reward_set("correctness,format,language", "1,2", CTX)
    with pytest.raises(ConfigError, match="numbers"):
        build_reward_set("format", "heavy", CTX)
    with pytest.raises(ConfigError, match="comma-separated"):
        build_reward_set("format,,language", "", CTX)
    with pytest.raises(ConfigError, match="overlong"):
        build_reward_set("overlong", "", RewardContext(max_new_tokens=10, overlong_buffer=50))
    with pytest.raises(ConfigError, match="language"):
        build_reward_set("language", "", RewardContext(language="fr"))


# ------------------------------------------------------------------------------------------ registry wiring


def _score(name, prompts, completions, **columns):
    _, fn = load_reward_function(name, CTX)
    return RewardSet([(name, fn, 1.0)], timeout=5)(prompts, completions, columns).per_function[name]


def test_correctness_wired():
    assert _score("correctness", ["q"] * 3, ["so \\boxed{42}", "The answer is 41.", "\\boxed{1/2}"],
                  answer=["42", "42", None]) == [1.0, 0.0, None]


def test_format_wired():
    assert _score("format", ["q", "q"], ["<think>x</think> <answer>1</answer>", "1"]) == [1.0, 0.0]


def test_length_wired_groups_by_prompt():
    # prompt a: lengths 10 (correct) and 30 (correct): lam = 0.5, -0.5; prompt b: wrong answer, shortest -> min(0, 0.5)
    out = _score("length", ["a", "a", "b", "b"], ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{3}"],
                 answer=["1", "1", "3", "3"], lengths=[10, 30, 5, 15])
    assert out == [0.5, -0.5, 0.0, -0.5]


def test_overlong_wired_uses_context():
    # L=100, B=20: 0 up to 80 tokens, (80 - n)/20 up to 100, -1 beyond
    assert _score("overlong", ["q"] * 3, ["a", "b", "c"], lengths=[80, 90, 120]) == [0.0, -0.5, -1.0]


def test_l1_wired_uses_context():
    """The registry's L1 rewards read answer, budget and lengths (declared, so a row without a budget is refused
    before training) and take alpha and delta from the context."""
    for name in ("l1_exact", "l1_max"):
        assert REWARD_FUNCTIONS[name].columns == ("answer", "budget", "lengths")
        assert load_reward_function(name, CTX)[1].columns == ("answer", "budget", "lengths")
    cols = dict(answer=["7", "7"], budget=[100, 100], lengths=[150, 150])
    assert _score("l1_exact", ["q", "q"], ["\\boxed{7}", "\\boxed{8}"], **cols) == pytest.approx([0.985, -0.015])
    assert _score("l1_max", ["q", "q"], ["\\boxed{7}", "\\boxed{8}"], **cols) == pytest.approx([0.485, 0.0])
    ctx = RewardContext(l1_alpha=0.002, l1_delta=0.25)
    fn = load_reward_function("l1_max", ctx)[1]
    one = {"answer": ["7"], "budget": [100], "lengths": [50]}
    assert RewardSet([("l1_max", fn, 1.0)], timeout=5)(["q"], ["\\boxed{7}"], one).total == pytest.approx([0.35])
    with pytest.raises(ConfigError, match="l1_exact"):
        build_reward_set("l1_exact", "", RewardContext(l1_alpha=-1.0))


def test_language_wired():
    assert _score("language", ["q", "q"], ["<think>hello</think>", "<think>你好</think>"]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ reward model


def test_rm_reward_scores_like_the_scorer_and_loads_once(tmp_path, monkeypatch):
    from alignkit.models.reward import (
        RewardMeta,
        RewardScorer,
        load_reward_backbone,
        save_meta,
    )

    model, tok = load_reward_backbone("tiny", 1, seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    save_meta(tmp_path, RewardMeta(mean=[0.1], std=[2.0]))

    loads = []
    real_load = RewardScorer.load.__func__
    monkeypatch.setattr(RewardScorer, "load", classmethod(lambda cls, p, **kw: loads.append(p) or real_load(cls, p, **kw)))
    name, fn = load_reward_function(f"rm:{tmp_path}", CTX)
    assert name == "rm" and loads == []  # lazy: nothing loaded yet
    prompts, completions = ["2+2=", "2+2="], ["4", "five"]
    rs = RewardSet([(name, fn, 1.0)], timeout=60)
    got = rs(prompts, completions, {}).per_function["rm"]
    again = rs(prompts, completions, {}).per_function["rm"]
    assert len(loads) == 1
    expected = real_load(RewardScorer, tmp_path).score(prompts, completions).tolist()
    assert got == pytest.approx(expected, abs=1e-5) and again == got


def test_rm_reward_with_fake_scorer(monkeypatch, tmp_path):
    from alignkit.models import reward as RM

    class Fake:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

    (tmp_path / RM.META).write_text("{}")
    monkeypatch.setattr(RM.RewardScorer, "load", classmethod(lambda cls, p, **kw: Fake()))
    rs = build_reward_set(f"format,rm:{tmp_path}", "1,0.5", CTX)
    out = rs(["p"], ["abcd"], {})
    assert out.per_function["rm"] == [4.0] and out.total == [2.0]


def test_warm_up_calls_lazy_loaders():
    called = []

    class Lazy:
        def warm_up(self):
            called.append(True)

        def __call__(self, prompts, completions, **_):
            return [0.0] * len(completions)

    RewardSet([("lazy", Lazy(), 1.0), ("plain", const(1.0), 1.0)], timeout=5).warm_up()
    assert called == [True]
    assert callable(R.REWARD_FUNCTIONS["correctness"].factory(CTX).warm_up)
