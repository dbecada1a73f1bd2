"""Constitutional AI data stages (alignkit.feedback.cai, alignkit cai): constitutions, SL-CAI critique and
revision, RL-CAI labels, with a scripted fake language model, a fake OpenAI-compatible server on loopback and
one tiny-model run through the CLI."""

import dataclasses
import json
import math
import random
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from _fake_http import reply_json, serving
from scipy.stats import chi2

from alignkit.cli import main
from alignkit.config import CAIConfig, build
from alignkit.data.formats import load_examples
from alignkit.errors import ConfigError, DataError
from alignkit.feedback.cai import (
    JsonlLog, clean_reply, critique_revise, draw_principles, label_pairs, option_probability, preference_rows,
    sft_rows, stable_seed,
)
from alignkit.feedback import alignment
from alignkit.feedback.constitution import load_constitution
from alignkit.feedback.lm import EndpointChatLM
from alignkit.recipes import cai as cai_recipe
from alignkit.rl.rollout import SamplingParams

CONSTITUTION = """
name: test-rules
principles:
  - id: kind
    critique_request: CRIT-kind
    revision_request: REV-kind
    comparison_question: CMP-kind
  - id: honest
    critique_request: CRIT-honest
    revision_request: REV-honest
    comparison_question: CMP-honest
  - id: brief
    critique_request: CRIT-brief
    revision_request: REV-brief
    comparison_question: CMP-brief
few_shot:
  - prompt: SHOT-prompt
    response: SHOT-response
    principle: honest
    critique: SHOT-critique
    revision: SHOT-revision
"""


@pytest.fixture
def constitution(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(CONSTITUTION)
    return load_constitution(path)


class ScriptedLM:
    """A fake ChatLM. Replies are a function of the conversation, so every test can predict them:

    - to a prompt: ``answer(<prompt>)``;
    - to ``CRIT-x``: ``critique-x(<the answer before it>)``;
    - to ``REV-x``: ``Sure, here is a revised response: rev-x(<answer>)`` followed by a fake next turn, which
      the stage must strip (preamble) and cut (turn marker);
    - option log-probs: ``judge_lps(question_text)`` (a function the test sets).

    ``die_after``: raise after that many ``chat`` calls (a killed run)."""

    name = "scripted"

    def __init__(self, judge_lps=None, die_after=None, pairs=None):
        self.chats, self.questions, self.judge_lps, self.die_after, self.pairs = [], [], judge_lps, die_after, pairs

    def chat(self, conversations, sampling, seeds):
        if self.die_after is not None and len(self.chats) >= self.die_after:
            raise RuntimeError("killed")
        self.chats.append(([list(c) for c in conversations], list(seeds)))  # as asked: the stage extends them
        out = []
        for conv, seed in zip(conversations, seeds):
            last = conv[-1]["content"]
            if last.startswith("CRIT-"):
                out.append(f"critique-{last[5:]}({conv[-2]['content']})")
            elif last.startswith("REV-"):
                out.append(f"Sure, here is a revised response: rev-{last[4:]}({conv[-4]['content']})\nUser: more")
            elif self.pairs is not None:  # the label stage's policy: two answers per prompt, by seed
                out.append(self.pairs(last, seed))
            else:
                out.append(f"answer({last})")
        return out

    def option_logprobs(self, conversations, options=("A", "B")):
        self.questions += [c[0]["content"] for c in conversations]
        return [self.judge_lps(c[0]["content"]) for c in conversations]


def prompts(n, start=0):
    return [(f"p{i}", f"question {i}") for i in range(start, start + n)]


# ----------------------------------------------------------------------------------------------- SL-CAI


def test_trace_and_sft_contents(tmp_path, constitution):
    """The whole chain with a scripted model: the answer, each round's critique and revision built on the previous
    one, the principle drawn for each round, the preamble and the fake next turn removed; the SFT set pairs the
    prompt with the final revision in alignkit's messages format."""
    lm = ScriptedLM()
    log = JsonlLog(tmp_path / "trace.jsonl")
    stats = critique_revise(lm, prompts(3), constitution, log, rounds=2, seed=5, batch_size=2)
    assert stats.written == 3 and stats.resumed == 0
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    for r in records:
        drawn = draw_principles(constitution.ids, 5, r["id"], 2)
        q = r["prompt"]
        ans = f"answer({q})"
        assert r["response"] == ans
        for rd, pid in zip(r["rounds"], drawn):
            assert rd["principle"] == pid
            assert rd["critique"] == f"critique-{pid}({ans})"
            assert rd["revision"] == f"rev-{pid}({ans})"  # no "Sure, here is...", no "\nUser: more"
            ans = rd["revision"]
        assert r["final"] == ans and r["revised"] is True
    # the few-shot example comes first, with its principle's requests
    first_conv = lm.chats[0][0][0]
    assert [m["content"] for m in first_conv[:6]] == [
        "SHOT-prompt", "SHOT-response", "CRIT-honest", "SHOT-critique", "REV-honest", "SHOT-revision"]
    assert first_conv[6] == {"role": "user", "content": "question 0"}
    rows = sft_rows(records)
    assert rows[1] == {"messages": [{"role": "user", "content": "question 1"},
                                    {"role": "assistant", "content": records[1]["final"]}], "id": "p1"}
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples(str(path), "sft").examples) == 3


@pytest.mark.parametrize("raw, clean", [
    ("Sure, here is a revised response: The capital is Paris.", "The capital is Paris."),
    ("Certainly! Here's the revised answer:\nDo not mix them.", "Do not mix them."),
    ("Revision: \"Be kind.\"", "Be kind."),
    ("Okay. Here is a better version: Hi.<|im_start|>user", "Hi."),
    ("Paris is the capital.\nUser: and Spain?", "Paris is the capital."),
    ("Sure thing is, water is wet.", "Sure thing is, water is wet."),  # not a preamble: kept
])
def test_clean_reply(raw, clean):
    from alignkit.feedback.cai import TURN_MARKERS

    assert clean_reply(raw, TURN_MARKERS) == clean


def test_principles_drawn_uniformly(tmp_path, constitution):
    """Chi-square tests on the principles the stage actually asked for (read back from the conversations):
    each round's principle uniform over the 3, and the (round 1, round 2) pairs uniform over the 9 cells
    (independent rounds). Also reproducible: the same seed draws the same principles."""
    lm = ScriptedLM()
    n = 900
    critique_revise(lm, prompts(n), constitution, JsonlLog(tmp_path / "t.jsonl"), rounds=2, seed=1, batch_size=300,
                    few_shot=0)
    asked = [[c[-1]["content"][4:] for c in convs] for convs, _ in lm.chats if convs[0][-1]["content"].startswith("REV-")]
    r1 = [x for batch in asked[0::2] for x in batch]
    r2 = [x for batch in asked[1::2] for x in batch]
    assert len(r1) == len(r2) == n
    for draws in (r1, r2):
        counts = Counter(draws)
        stat = sum((counts[p] - n / 3) ** 2 / (n / 3) for p in constitution.ids)
        assert stat < chi2.ppf(0.999, 2), counts
    cells = Counter(zip(r1, r2))
    stat = sum((cells[(a, b)] - n / 9) ** 2 / (n / 9) for a in constitution.ids for b in constitution.ids)
    assert stat < chi2.ppf(0.999, 8), cells
    again = ScriptedLM()
    critique_revise(again, prompts(n), constitution, JsonlLog(tmp_path / "u.jsonl"), rounds=2, seed=1, batch_size=300,
                    few_shot=0)
    assert (tmp_path / "t.jsonl").read_text() == (tmp_path / "u.jsonl").read_text()
    other = [json.loads(x)["rounds"][0]["principle"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert other != [draw_principles(constitution.ids, 2, f"p{i}", 1)[0] for i in range(n)]  # the seed matters


def test_killed_generation_resumes_without_duplicates_or_gaps(tmp_path, constitution):
    """A run killed after its second batch (mid-chain of the third), then a partial last line as a kill during a
    write leaves it: the rerun discards the partial line, skips the prompts done and writes exactly what an
    uninterrupted run writes."""
    whole = tmp_path / "whole.jsonl"
    critique_revise(ScriptedLM(), prompts(7), constitution, JsonlLog(whole), rounds=2, seed=3, batch_size=2)
    cut = tmp_path / "cut.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        critique_revise(ScriptedLM(die_after=12), prompts(7), constitution, JsonlLog(cut), rounds=2, seed=3,
                        batch_size=2)  # 5 chats a batch: dies inside the third batch
    assert [json.loads(x)["id"] for x in cut.read_text().splitlines()] == ["p0", "p1", "p2", "p3"]
    with open(cut, "a") as f:
        f.write('{"id": "p4", "prompt": "quest')
    lm = ScriptedLM()
    stats = critique_revise(lm, prompts(7), constitution, JsonlLog(cut), rounds=2, seed=3, batch_size=2)
    assert stats.resumed == 4 and stats.written == 3
    assert all("question 0" not in str(convs) for convs, _ in lm.chats)  # done prompts were not asked again
    ids = [json.loads(x)["id"] for x in cut.read_text().splitlines()]
    assert ids == [f"p{i}" for i in range(7)]
    assert cut.read_text() == whole.read_text()


def test_damaged_trace_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2"):
        JsonlLog(path).recover()
    path.write_text('{"id": "a"}\n{"id": "b"')  # a partial last line only: dropped, file cut back
    assert [r["id"] for r in JsonlLog(path).recover()] == ["a"]
    assert path.read_text() == '{"id": "a"}\n'


# ------------------------------------------------------------------------------------------------ labels

# Hand-set judge log-probs (lp_A, lp_B) by principle and by which answer is shown as (A).
LPS = {("CMP-kind", "good"): (-0.2, -1.8), ("CMP-kind", "bad"): (-1.0, -0.5),
       ("CMP-honest", "good"): (-2.0, -0.1), ("CMP-honest", "bad"): (-0.3, -2.3)}


def _lps_of(question):
    shown_first = "good" if "(A) good" in question else "bad"
    for (q, first), lps in LPS.items():
        if q in question and first == shown_first:
            return lps
    return None


def _kind_and_true(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(CONSTITUTION.split("  - id: brief")[0])
    return load_constitution(path)


class TwoAnswers(ScriptedLM):
    """A policy: label_pairs asks it for every prompt's first answers, then for the second ones;
    ``answers(prompt) -> (first, second)``."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def chat(self, conversations, sampling, seeds):
        which = len(self.chats) % 2
        self.chats.append((conversations, list(seeds)))
        return [self.answers(c[-1]["content"])[which] for c in conversations]


def _policy(n=None):
    return TwoAnswers(lambda prompt: ("good", "bad"))


def test_soft_labels_golden_both_orders(tmp_path):
    """Golden: with hand-set log-probs, P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) in each order, the label the
    mean of P_ab(A) and 1 - P_ba(A), ensembled over principles by the mean.

    kind: P_ab = e^-0.2 / (e^-0.2 + e^-1.8) = 0.8320183851, P_ba = e^-1.0 / (e^-1.0 + e^-0.5) = 0.3775406688,
          p_a = (0.8320183851 + 0.6224593312) / 2 = 0.7272388582 ("good", shown as a, is chosen);
    honest: P_ab = 0.1301084744, P_ba = 0.8807970780, p_a = 0.1246556982 ("bad" chosen, soft 0.8753443018);
    both: p_a = (0.7272388582 + 0.1246556982) / 2 = 0.4259472782: "bad" chosen with soft label 0.5740527218."""
    cons = _kind_and_true(tmp_path)
    judge = ScriptedLM(judge_lps=_lps_of)
    for k, expect_chosen, expect in ((1, None, None), (2, "bad", 0.5740527218)):
        log = JsonlLog(tmp_path / f"labels{k}.jsonl")
        n = 40
        stats = label_pairs(_policy(n), judge, prompts(n), cons, log, seed=0, principles_per_pair=k)
        assert stats.questions == n * k * 2 and stats.parse_failures == 0
        rows = preference_rows(log.recover())
        assert len(rows) == n
        for r in rows:
            if k == 1:
                if r["principles"] == ["kind"]:
                    assert r["chosen"][0]["content"] == "good"
                    assert r["soft_label"] == pytest.approx(0.7272388582, abs=1e-9)
                    assert r["p_chosen_first"] == pytest.approx([0.8320183851], abs=1e-9)
                    assert r["p_chosen_second"] == pytest.approx([0.6224593312], abs=1e-9)
                else:
                    assert r["chosen"][0]["content"] == "bad"
                    assert r["soft_label"] == pytest.approx(0.8753443018, abs=1e-9)
                    assert r["p_chosen_first"] == pytest.approx([0.8807970780], abs=1e-9)
                    assert r["p_chosen_second"] == pytest.approx([1 - 0.1301084744], abs=1e-9)
                assert r["agreed"] == [True]
            else:
                assert sorted(r["principles"]) == ["honest", "kind"]
                assert r["chosen"][0]["content"] == expect_chosen
                assert r["soft_label"] == pytest.approx(expect, abs=1e-9)
            assert r["judge"] == "scripted" and r["chosen"] != r["rejected"]
        if k == 1:
            assert {tuple(r["principles"]) for r in rows} == {("kind",), ("honest",)}
    # both orders asked: each (pair, principle) once with good as (A) and once with bad as (A)
    qs = Counter(("(A) good" in q, "(B) bad" in q, "(A) bad" in q, "(B) good" in q) for q in judge.questions)
    assert qs[(True, True, False, False)] == qs[(False, False, True, True)] == len(judge.questions) // 2


def test_chain_of_thought_clamps(tmp_path):
    """With reasoning, each order's P(A) is clamped to [0.4, 0.6]: kind gives (0.6 + 1 - 0.4) / 2 = 0.6; the
    judge is asked for its reasoning first and then for the option."""
    path = tmp_path / "one.yaml"
    path.write_text("principles:\n  - {id: kind, critique_request: c, revision_request: r, comparison_question: CMP-kind}\n")
    judge = ScriptedLM(judge_lps=_lps_of)
    log = JsonlLog(tmp_path / "cot.jsonl")
    label_pairs(_policy(3), judge, prompts(3), load_constitution(path), log, chain_of_thought=True)
    rows = preference_rows(log.recover())
    assert [r["soft_label"] for r in rows] == pytest.approx([0.6] * 3)
    assert all(r["chain_of_thought"] for r in rows)
    assert len(judge.chats) == 1 and len(judge.chats[0][0]) == 6  # 3 pairs x 2 orders reasoned


def test_ties_and_parse_failures_dropped_and_counted(tmp_path):
    """Identical answers, a tie (equal log-probs in both orders) and unreadable options (None, or both -inf) are
    dropped and counted; no written pair has chosen == rejected."""
    path = tmp_path / "one.yaml"
    path.write_text("principles:\n  - {id: kind, critique_request: c, revision_request: r, comparison_question: CMP-kind}\n")
    answers = {"q-tie": ("tie-a", "tie-b"), "q-none": ("none-a", "none-b"), "q-inf": ("inf-a", "inf-b"),
               "q-same": ("same", "same"), "q-ok": ("good", "bad"), "q-half": ("half-a", "half-b")}

    def lps(question):
        if "tie-" in question:
            return (-0.7, -0.7)
        if "none-" in question:
            return None
        if "inf-" in question:
            return (-math.inf, -math.inf)
        if "half-" in question:  # readable in one order only: a parse failure for the pair
            return (-0.1, -2.0) if "(A) half-a" in question else None
        return _lps_of(question)

    policy = TwoAnswers(answers.__getitem__)
    ids = list(answers)
    judge = ScriptedLM(judge_lps=lps)
    log = JsonlLog(tmp_path / "l.jsonl")
    stats = label_pairs(policy, judge, [(i, i) for i in ids], load_constitution(path), log)
    status = {r["id"]: r["status"] for r in log.recover()}
    assert status == {"q-tie": "tie", "q-none": "unparsed", "q-inf": "unparsed", "q-same": "identical",
                      "q-ok": "kept", "q-half": "unparsed"}
    assert stats.questions == 10 and stats.parse_failures == 5  # none x2, inf x2, half x1
    rows = preference_rows(log.recover())
    assert [r["id"] for r in rows] == ["q-ok"]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert option_probability((-0.7, -0.7)) == 0.5 and option_probability((0.0, -math.inf)) == 1.0


# ------------------------------------------------------------------------------------- fake endpoint


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Chat completions. The judge question's answer depends on which answer is shown as (A): with log-probs it
    returns lp(A), lp(B) as top_logprobs of the second reply token (the first is "("); without, it answers
    "(A)" for 6 of the seeds 0..7 when "good" is (A), else "(B)" for those."""

    with_logprobs = True
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        question = body["messages"][-1]["content"]
        good_first = "(A) good" in question
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}
        if "CMP-kind" not in question:
            choice["message"]["content"] = "an answer"
        elif self.with_logprobs and body.get("logprobs"):
            la, lb = (-0.2, -1.8) if good_first else (-1.0, -0.5)
            choice["message"]["content"] = "(A)" if la > lb else "(B)"
            choice["logprobs"] = {"content": [
                {"token": "(", "logprob": -0.01, "top_logprobs": [{"token": "(", "logprob": -0.01}]},
                {"token": "A" if la > lb else "B", "logprob": max(la, lb),
                 "top_logprobs": [{"token": "A", "logprob": la}, {"token": " B", "logprob": lb},
                                  {"token": "C", "logprob": -5.0}]}]}
        else:
            majority = body.get("seed", 0) < 6
            pick = ("A" if majority else "B") if good_first else ("B" if majority else "A")
            choice["message"]["content"] = f"The answer is ({pick})"
            choice["logprobs"] = None
        reply_json(self, {"choices": [choice]})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _FakeOpenAI.requests = []
    with serving(_FakeOpenAI) as url:
        yield url


@pytest.mark.parametrize("with_logprobs, expect", [(True, 0.7272388582), (False, 0.75)])
def test_endpoint_judge_with_and_without_logprobs(tmp_path, fake_server, with_logprobs, expect):
    """Through the server: with log-probs the label is the golden 0.7272388582 (the option letters read at the
    first reply token that names one: "A" and " B", "C" ignored); without, the share of (A) over 8 sampled answers
    in each order: (6/8 + 1 - 2/8) / 2 = 0.75."""
    _FakeOpenAI.with_logprobs = with_logprobs
    path = tmp_path / "one.yaml"
    path.write_text("principles:\n  - {id: kind, critique_request: c, revision_request: r, comparison_question: CMP-kind}\n")
    judge = EndpointChatLM(fake_server, "fake-model", samples=8, retries=0)
    log = JsonlLog(tmp_path / "e.jsonl")
    label_pairs(_policy(2), judge, prompts(2), load_constitution(path), log)
    rows = preference_rows(log.recover())
    assert [r["soft_label"] for r in rows] == pytest.approx([expect] * 2, abs=1e-9)
    assert all(r["chosen"][0]["content"] == "good" and r["judge"] == f"fake-model@{fake_server}" for r in rows)
    asked = [b for b in _FakeOpenAI.requests if b.get("logprobs")]
    assert len(asked) == 4  # 2 pairs x 2 orders
    assert judge.modes == ({"logprobs": 4, "samples": 0} if with_logprobs else {"logprobs": 0, "samples": 4})
    assert len(_FakeOpenAI.requests) == (4 if with_logprobs else 4 + 4 * 8)
    reply = judge.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=5, stop=("sw",)), [1])
    assert reply == ["an an"] and _FakeOpenAI.requests[-1]["stop"] == ["sw"]


# ------------------------------------------------------------------------------------------------- CLI


def test_bad_constitution_exits_2_naming_file_principle_field(tmp_path, capsys, monkeypatch):
    import alignkit.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - id: fair\n    critique_request: c\n    revision_request: r\n"
                   "  - id: kind\n    critique_request: c\n    revision_request: r\n    comparison_question: 3\n")
    for text, field in ((bad.read_text(), "comparison_question"),
                        (bad.read_text().replace("comparison_question: 3", "comparison_question: q\n    critque: x")
                         .replace("  - id: fair\n    critique_request: c\n    revision_request: r\n", ""), "critque")):
        bad.write_text(text)
        code = main(["cai", f"data={data}", f"constitution={bad}", f"output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert code == 2
        assert str(bad) in err and field in err
        assert "principle 'fair'" in err if field == "comparison_question" else "principle 'kind'" in err
    data.write_text('{"prompt": "hi"}\n{"prompt": 5}\n')
    assert main(["cai", f"data={data}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_constitution_validation(tmp_path):
    cases = {
        "principles: []\n": "principles",
        "principles:\n  - {id: a b, critique_request: c, revision_request: r, comparison_question: q}\n": "'id'",
        "principles:\n  - {id: a, critique_request: c, revision_request: r, comparison_question: q}\n"
        "  - {id: a, critique_request: c, revision_request: r, comparison_question: q}\n": "twice",
        "principles:\n  - {id: a, critique_request: c, revision_request: r, comparison_question: q}\n"
        "few_shot:\n  - {prompt: p, response: r, critique: c, revision: v, principle: zz}\n": "few_shot[0]",
        "principles:\n  - {id: a, critique_request: c, revision_request: r, comparison_question: q}\n"
        "comparison_template: '{first} {second}'\n": "{conversation}",
    }
    for text, needle in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=None) as e:
            load_constitution(path)
        assert needle in str(e.value) and str(path) in str(e.value)
    default = load_constitution("default")
    assert len(default.principles) >= 6 and default.few_shot


def test_cai_cli_tiny_model_both_stages(tmp_path, capsys):
    """`alignkit cai` through the CLI with the tiny random model: critique then label, files and cards written,
    the preference file readable as preference data; a rerun resumes (nothing written again) and other settings
    are refused."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about {w}."}) + "\n"
                            for i, w in enumerate(["cats", "rain", "bread"])))
    out = tmp_path / "out"
    common = [f"data={data}", f"output_dir={out}", "model=tiny", "max_new_tokens=6", "precision=fp32", "few_shot=0"]
    assert main(["cai", "stage=critique", "rounds=2", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 3 and summary["written_now"] == 3
    trace = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert [r["id"] for r in trace] == ["q0", "q1", "q2"] and all(len(r["rounds"]) == 2 for r in trace)
    assert "## Counts" in (out / "sft_card.md").read_text() and (out / "sft.jsonl").exists()
    assert main(["cai", "stage=critique", "rounds=2", *common]) == 0
    assert json.loads(capsys.readouterr().out)["written_now"] == 0
    assert main(["cai", "stage=critique", "rounds=3", *common]) == 2
    assert "rounds" in capsys.readouterr().err
    assert main(["cai", "stage=label", "principles_per_pair=2", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] + summary["ties"] + summary["parse_failures"] + summary["identical"] == 3
    rows = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert all(0.5 < r["soft_label"] <= 1 and len(r["principles"]) == 2 and r["judge"] == "tiny" for r in rows)
    if rows:
        assert len(load_examples(str(out / "preferences.jsonl"), "preference").examples) == len(rows)
    assert "judge: `tiny`" in (out / "preferences_card.md").read_text()


def test_cai_help_documents_the_constitution(capsys):
    assert main(["cai", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("critique_request", "revision_request", "comparison_question", "few_shot", "stage=", "rounds="):
        assert key in text


def test_config_validation():
    with pytest.raises(ConfigError, match="temperature"):
        build(CAIConfig, None, ["data=x", "stage=label", "temperature=0"])
    with pytest.raises(ConfigError, match="judge_model"):
        build(CAIConfig, None, ["data=x", "judge=http://localhost:1"])
    assert cai_recipe.FILES["label"][1] == "preferences.jsonl"


# ------------------------------------------------------------------------------------------ labeler alignment


def _labelled(tmp_path, n=40):
    """A preference file whose chosen answers are the better ones: ``good-i`` beats ``bad-i``."""
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": f"good-{i}", "rejected": f"bad-{i}"})
                            + "\n" for i in range(n)))
    return path


def biased_judge(question: str):
    """Option log-probs for a judge that knows the better answer (+1 logit) under CMP-kind and CMP-honest, gets it
    backwards under CMP-brief (-4), and favours whatever is shown as (A) by +2 logits. With the better answer
    shown first P(A) = sigmoid(3) under kind/honest; shown second, sigmoid(2 - 1) = sigmoid(1)."""
    first = question.split("(A) ")[1].split("\n")[0]
    know = -4.0 if "CMP-brief" in question else 1.0
    return [2.0 + (know if first.startswith("good") else -know), 0.0]


def test_labeler_alignment_three_modes_from_hand_set_log_probs(tmp_path, constitution):
    """measure(): from the same answers, one order (a seeded coin picks which), both orders, and the principle
    ensemble. Derivation with biased_judge, principle kind: better first P(A) = s(3) = 0.9526 (right); better
    second P(A) = s(1) = 0.7311, so the better answer's probability is 0.2689 (wrong): one order is right
    exactly on the pairs whose coin shows the better answer first; both orders give (0.9526 + 0.2689) / 2 =
    0.6107 > 1/2 on every pair (1.0); position bias = (0.9526 + 0.7311) / 2 - 1/2 = 0.3418; the two orders
    never agree. Under brief: better first P(A) = s(2 - 4) = 0.1192, second s(2 + 4) = 0.9975, so both orders
    give (0.1192 + 0.0025) / 2 = 0.0608: wrong. The ensemble of kind, honest and brief averages 0.6107, 0.6107
    and 0.0608 = 0.4274: wrong on every pair, though two principles of three are right."""
    pairs, how = alignment.labelled_pairs(str(_labelled(tmp_path)))
    assert len(pairs) == 40 and "chosen beats rejected" in how
    judge = ScriptedLM(judge_lps=biased_judge)
    r = alignment.measure(judge, pairs, constitution, principles=["kind"], seed=3)
    coins = [random.Random(stable_seed(3, "order", p.id)).random() < 0.5 for p in pairs]
    assert r["one_order"]["accuracy"] == pytest.approx(sum(coins) / 40) and 0 < sum(coins) < 40
    assert r["both_orders"]["accuracy"] == 1.0 and r["both_orders"]["n"] == 40
    assert r["position_bias"] == pytest.approx((sig(3) + sig(1)) / 2 - 0.5) and r["orders_agree"] == 0.0
    lo, hi = r["one_order"]["ci"]
    assert lo < r["one_order"]["accuracy"] < hi
    assert len(judge.questions) == 80  # one principle, two orders, per pair
    # a judge that favours (B) instead: better first P(A) = s(-2 + 1) = 0.2689 (wrong when asked once), better
    # second s(-2 - 1) = 0.0474; both orders (0.2689 + 0.9526) / 2 = 0.6107 (right)
    favours_b = lambda q: [biased_judge(q)[0] - 4.0, 0.0]  # noqa: E731
    r = alignment.measure(ScriptedLM(judge_lps=favours_b), pairs, constitution, principles=["kind"], seed=3)
    assert r["both_orders"]["accuracy"] == 1.0 and r["one_order"]["accuracy"] == pytest.approx(1 - sum(coins) / 40)
    assert r["position_bias"] == pytest.approx((sig(-1) + sig(-3)) / 2 - 0.5)
    r = alignment.measure(ScriptedLM(judge_lps=biased_judge), pairs, constitution, principles=["brief"], seed=3)
    assert r["both_orders"]["accuracy"] == 0.0
    r = alignment.measure(ScriptedLM(judge_lps=biased_judge), pairs, constitution, k=3, seed=3)
    assert r["ensemble"]["accuracy"] == 0.0 and r["k"] == 3
    assert alignment.gate_mode(3) == "ensemble" and alignment.gate_mode(1) == "both_orders"


def test_unreadable_judge_answers_are_counted_not_scored(tmp_path, constitution):
    pairs, _ = alignment.labelled_pairs(str(_labelled(tmp_path, 4)))
    judge = ScriptedLM(judge_lps=lambda q: None if "good-0" in q else [1.0, 0.0])
    r = alignment.measure(judge, pairs, constitution, principles=["kind"])
    assert r["both_orders"]["unreadable"] == 1 and r["both_orders"]["n"] == 3


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_a_judge_below_min_alignment_writes_no_labels_unless_forced(tmp_path, constitution, capsys):
    """stage=label with min_alignment: the anti-aligned judge (principle brief) is measured first, the run stops
    with exit 2 before any pair is labelled; with force=true it labels, and the report beside the labels says
    it failed, which check_labels turns into a stop before training unless force."""
    labelled = _labelled(tmp_path, 6)
    rules = tmp_path / "rules.yaml"
    rules.write_text(CONSTITUTION)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    two = lambda prompt, seed: f"answer-{seed % 7}"  # noqa: E731
    cfg = build(CAIConfig, None, [f"data={prompts_file}", f"output_dir={out}", "stage=label", f"constitution={rules}",
                                  f"alignment_set={labelled}", "alignment_principles=brief", "min_alignment=0.7"])
    with pytest.raises(ConfigError, match="below min_alignment=0.7"):
        cai_recipe.run(cfg, policy=ScriptedLM(pairs=two), judge=ScriptedLM(judge_lps=biased_judge))
    assert not (out / "preferences.jsonl").exists()
    report = json.loads((out / alignment.REPORT_FILE).read_text())
    assert report["passed"] is False and report["accuracy"] == 0.0 and report["mode"] == "both_orders"
    forced = dataclasses.replace(cfg, force=True)
    summary = cai_recipe.run(forced, policy=ScriptedLM(pairs=two), judge=ScriptedLM(judge_lps=biased_judge))
    assert "passed: False" in summary["labeler_alignment"] and (out / "preferences.jsonl").exists()
    with pytest.raises(ConfigError, match="force=true"):
        alignment.check_labels(str(out / "preferences.jsonl"), force=False)
    assert alignment.check_labels(str(out / "preferences.jsonl"), force=True)["passed"] is False
    good = dataclasses.replace(cfg, alignment_principles="kind", output_dir=str(tmp_path / "good"))
    cai_recipe.run(good, policy=ScriptedLM(pairs=two), judge=ScriptedLM(judge_lps=biased_judge))
    assert alignment.check_labels(str(tmp_path / "good" / "preferences.jsonl"), force=False)["passed"] is True


def test_rm_and_dpo_refuse_labels_whose_judge_failed_unless_forced(tmp_path, capsys):
    """A labeler-alignment report that failed, beside a preference file: alignkit rm and dpo exit 2 naming it,
    before any model loads; with force=true they train."""
    prefs = tmp_path / "preferences.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "soft_label": 0.8})
                             + "\n" for i in range(4)))
    (tmp_path / alignment.REPORT_FILE).write_text(json.dumps(
        {"passed": False, "accuracy": 0.4, "mode": "both_orders", "set": "refusal", "min_alignment": 0.7}))
    for method in ("rm", "dpo"):
        common = [method, "model=tiny", f"data={prefs}", "max_steps=1", "batch_size=2", "progress=false"]
        assert main([*common, f"output_dir={tmp_path / method}"]) == 2
        err = capsys.readouterr().err
        assert "below min_alignment=0.7" in err and alignment.REPORT_FILE in err
        assert not (tmp_path / method).exists()
        assert main([*common, f"output_dir={tmp_path / (method + '_forced')}", "force=true"]) == 0
