import json
from http.server import BaseHTTPRequestHandler

import pytest
from _fake_http import reply_json, serving
import torch

from alignkit.errors import ConfigError
from alignkit.feedback import (
    JUDGE_TEMPLATE,
    JudgeError,
    LLMJudge,
    PairwiseJudge,
    RewardJudge,
    combine_orders,
    judge_both_orders,
    judge_from_spec,
    parse_verdict,
)
from alignkit.feedback.judges import agreement
from alignkit.models.loading import load_model
from alignkit.rl.rewards import RewardContext, RewardSet


class FirstPositionJudge:
    """Always prefers whatever is shown first: pure position bias."""

    name = "first"

    def compare(self, prompts, first, second, **_):
        return [1.0] * len(prompts)


class LongerJudge:
    name = "longer"

    def compare(self, prompts, first, second, **_):
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


def test_position_biased_judge_gives_no_information():
    prompts, a, b = ["p1", "p2", "p3"], ["x", "yy", "z"], ["aaa", "b", "c"]
    judge = FirstPositionJudge()
    assert isinstance(judge, PairwiseJudge)
    v_ab, v_ba = judge_both_orders(judge, prompts, a, b)
    assert v_ab == [1.0, 1.0, 1.0] and v_ba == [1.0, 1.0, 1.0]
    assert combine_orders(v_ab, v_ba) == [0.5, 0.5, 0.5]
    assert agreement(v_ab, v_ba) == [False, False, False]


def test_consistent_judge_survives_order_swap():
    v_ab, v_ba = judge_both_orders(LongerJudge(), ["p", "q", "r"], ["long", "s", "eq"], ["s", "long", "qe"])
    assert v_ab == [1.0, 0.0, 0.5] and v_ba == [0.0, 1.0, 0.5]
    assert combine_orders(v_ab, v_ba) == [1.0, 0.0, 0.5]
    assert agreement(v_ab, v_ba) == [True, True, False]
    with pytest.raises(ValueError):
        judge_both_orders(LongerJudge(), ["p"], ["a", "b"], ["c"])


def _shortness(prompts, completions, **_):
    return [None if c == "skip" else -float(len(c)) for c in completions]


def test_reward_judge_hard_and_soft():
    judge = RewardJudge(_shortness)
    assert judge.name == "reward:_shortness"
    assert judge.compare(["p"] * 4, ["ab", "abcd", "xy", "skip"], ["abc", "ab", "zw", "a"]) == [1.0, 0.0, 0.5, 0.5]
    soft = RewardJudge(RewardSet([("short", _shortness, 1.0)], timeout=0), soft=True)
    v = soft.compare(["p", "p"], ["ab", "skip"], ["abc", "a"])
    assert v[0] == pytest.approx(1 / (1 + torch.e ** -1)) and v[1] == 0.5


def test_reward_judge_from_correctness_spec_uses_columns():
    judge = judge_from_spec("correctness", ctx=RewardContext(timeout=0))
    assert isinstance(judge, RewardJudge)
    v_ab, v_ba = judge_both_orders(judge, ["1+1?", "2+2?"], ["The answer is 2", "5"], ["3", "\\boxed{4}"],
                                   answer=["2", "4"])
    assert v_ab == [1.0, 0.0] and v_ba == [0.0, 1.0]


@pytest.fixture(scope="module")
def tiny_judge():
    model, tok = load_model("tiny", seed=1)
    return LLMJudge.local(model, tok, batch_size=2)


def test_llm_judge_local_is_deterministic_probability(tiny_judge):
    prompts = ["What is 2+2?", [{"role": "user", "content": "Say hi"}], "Name a colour."]
    first, second = ["4", "hi", "blue"], ["5", "hello there", "a number"]
    v = tiny_judge.compare(prompts, first, second)
    assert len(v) == 3 and all(0.0 < x < 1.0 for x in v)
    assert tiny_judge.compare(prompts, first, second) == v
    tiny_judge.batch_size = 1  # left padding must not change the verdicts
    assert tiny_judge.compare(prompts, first, second) == pytest.approx(v, abs=1e-5)
    tiny_judge.batch_size = 2
    # check against a direct computation for one item
    from alignkit.data.tokenize import prompt_ids

    q = JUDGE_TEMPLATE.format(prompt="What is 2+2?", first="4", second="5")
    ids = torch.tensor([prompt_ids(tiny_judge.tokenizer, [{"role": "user", "content": q}])])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_judge.model(input_ids=ids).logits[0, -1].float(), -1)
    a, b = tiny_judge.letter_ids["A"], tiny_judge.letter_ids["B"]
    expected = torch.sigmoid(torch.logsumexp(logp[a], -1) - torch.logsumexp(logp[b], -1)).item()
    assert v[0] == pytest.approx(expected, abs=1e-5)
    assert tiny_judge.compare([], [], []) == []


def test_parse_verdict():
    assert parse_verdict("A") == 1.0
    assert parse_verdict(" (B).") == 0.0
    assert parse_verdict("Answer B") == 0.0
    assert parse_verdict("After thinking, my verdict: [[A]]") == 1.0
    assert parse_verdict("The better answer is B because it is correct.") == 0.0
    assert parse_verdict("A is better") == 1.0
    assert parse_verdict("Both are fine.") is None
    assert parse_verdict("") is None


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers the shorter answer; the first request with
    'flaky' in it fails once with 503."""

    seen: list = []
    failed_once = False

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        q = body["messages"][0]["content"]
        if "flaky" in q and not type(self).failed_once:
            type(self).failed_once = True
            self.send_error(503)
            return
        a = q.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = q.split("[Answer B]\n")[1].split("\n\nWhich answer")[0]
        reply = "I cannot decide." if a == b else ("A" if len(a) < len(b) else "The better answer is B.")
        reply_json(self, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _FakeChat.seen, _FakeChat.failed_once = [], False
    with serving(_FakeChat) as url:
        yield url


def test_llm_judge_http_endpoint(fake_server, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-test")
    judge = judge_from_spec(fake_server, judge_model="judge-1", api_key_env="ALIGNKIT_TEST_KEY", backoff=0.01)
    assert isinstance(judge, LLMJudge) and judge.url == fake_server + "/v1/chat/completions"
    v_ab, v_ba = judge_both_orders(judge, ["p", "flaky q", "r"], ["short", "a much longer one", "same"],
                                   ["longer answer", "tiny", "same"])
    assert v_ab == [1.0, 0.0, 0.5] and v_ba == [0.0, 1.0, 0.5]
    assert judge.unparsed == 2  # the tie reply "I cannot decide." twice
    assert _FakeChat.failed_once  # the 503 was retried
    path, auth, body = _FakeChat.seen[0]
    assert auth == "Bearer sk-test" and body["model"] == "judge-1" and body["temperature"] == 0


def test_llm_judge_http_errors_name_the_url(fake_server):
    bad_path = LLMJudge.endpoint(fake_server + "/other/chat/completions", "m", api_key_env=None, backoff=0.01)
    with pytest.raises(JudgeError, match="127.0.0.1.*HTTP 404"):
        bad_path.compare(["p"], ["a"], ["b"])
    # a port nobody listens on: connection refused, retried, then a clear error
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = LLMJudge.endpoint(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, retries=1, backoff=0.01,
                             timeout=2)
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 2"):
        down.compare(["p"], ["a"], ["b"])


@pytest.mark.parametrize("spec, kwargs, message", [
    ("", {}, "empty judge spec"),
    ("   ", {}, "empty judge spec"),
    ("http://localhost:8000", {}, "judge_model"),
    ("llm:", {}, "llm: needs a model"),
    ("ftp://host/x", {}, "only http"),
    ("no_such_reward", {}, "unknown reward function"),
    ("rm:/nonexistent/dir", {}, "not an alignkit reward model"),
    ("correctness", {"batch_size": 2}, "LLM judges only"),
])
def test_bad_specs(spec, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        judge_from_spec(spec, **kwargs)


def test_llm_spec_loads_local_model():
    judge = judge_from_spec("llm:tiny", batch_size=4)
    assert isinstance(judge, LLMJudge) and judge.name == "llm:tiny"
    assert all(0 < x < 1 for x in judge.compare(["q"], ["a"], ["b"]))
