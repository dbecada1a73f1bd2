"""Self-rewarding: the judge's score parser (golden cases, failures included), best-vs-worst pairing with ties
dropped, the per-iteration judge statistics, and ``alignkit self-rewarding`` on the tiny model with a scripted
judge (pairs built from its scores and trained with DPO from the current model; the collapse warning)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest

from _toy import prompt_jsonl
from alignkit.cli import main
from alignkit.feedback import self_judge
from alignkit.feedback.self_judge import best_worst, judge_stats, mean_score, parse_score, score_questions


@pytest.mark.parametrize("text, want", [
    ("The answer is relevant and useful.\nScore: 4", 4.0),
    ("score: 3/5", 3.0),
    ("Score:5", 5.0),
    ("**Score:** 2", 2.0),
    ("Score: **1**", 1.0),
    ("SCORE = 0", 0.0),
    ("First I thought Score: 2, but on reflection\nScore: 5", 5.0),  # the last one counts
    ("Score: 6", None),  # out of range
    ("Score: -1", None),
    ("Score: 4.5", None),  # additive points are whole
    ("I would give it four points.", None),
    ("", None),
    ("Score: five", None),
])
def test_parse_score_golden(text, want):
    assert parse_score(text) == want


def test_mean_score_averages_parsed_judgements_only():
    assert mean_score(["Score: 4", "garbage", "Score: 1"]) == 2.5
    assert mean_score(["nothing", "Score: 9"]) is None


def test_best_worst_pairs_and_drops_ties():
    assert best_worst([2.0, 5.0, 1.0, 5.0]) == (1, 2)  # earliest of the tied best
    assert best_worst([3.0, 3.0, 3.0]) is None  # all equal: a tie, no pair
    assert best_worst([None, 4.0, None]) is None  # one scored response is no pair
    assert best_worst([None, 4.0, 1.0]) == (1, 2)
    assert best_worst([4.0, 1.0], texts=["same", "same"]) is None  # chosen would equal rejected


def test_judge_stats_golden():
    judgements = [[["Score: 3"], ["Score: 3"]], [["Score: 1"], ["no"]], [["Score: 2"], ["Score: 5"]]]
    scores = [[3.0, 3.0], [1.0, None], [2.0, 5.0]]
    st = judge_stats(judgements, scores)
    assert st["judge/parse_failure"] == pytest.approx(1 / 6)
    assert st["judge/comparable_prompts"] == 2 and st["judge/collapse"] == pytest.approx(0.5)
    assert st["judge/score_mean"] == pytest.approx(14 / 5)


def test_score_questions_hold_prompt_and_response():
    q = score_questions(["What is 2+2?"], ["4"])[0]
    assert "What is 2+2?" in q and "\n4\n" in q and "Score: N" in q


def _score_of(question: str) -> int:
    answer = question.split("Answer:\n", 1)[1].rsplit("\n\nGive your reasons", 1)[0]
    return int.from_bytes(hashlib.blake2b(answer.encode(), digest_size=2).digest(), "little") % 6


def _run(tmp_path, *args, out="sr"):
    data = prompt_jsonl(tmp_path, n=4)
    return main(["self-rewarding", "model=tiny", f"data={data}", f"output_dir={tmp_path / out}", "max_new_tokens=4",
                 "judge_max_new_tokens=4", "rollout_precision=fp32", "num_generations=4", "progress=false",
                 "seed=1", "lr=1e-3", *args])


def test_self_rewarding_cli_pairs_best_and_worst_and_trains_dpo(tmp_path, monkeypatch):
    asked = []

    def scripted(engine, tok, questions, n, sampling, seeds):
        asked.append(engine.model)
        return [[f"Reasons.\nScore: {_score_of(q)}"] * n for q in questions]

    monkeypatch.setattr(self_judge, "judge_replies", scripted)
    assert _run(tmp_path, "iterations=2", "rewards=correctness") == 0
    out = tmp_path / "sr"
    for k in (1, 2):
        it = out / f"iter_{k}"
        samples = [json.loads(x) for x in (it / "samples.jsonl").read_text().splitlines()]
        pairs = [json.loads(x) for x in (it / "pairs.jsonl").read_text().splitlines()]
        done = json.loads((it / "done.json").read_text())
        assert pairs and done["pairs"] == len(pairs) and done["judge/parse_failure"] == 0.0
        for p in pairs:
            mine = [x for x in samples if x["prompt_index"] == p["prompt_index"] and x["text"].strip()]
            assert p["chosen_score"] == max(x["score"] for x in mine) > p["rejected_score"] == min(x["score"] for x in mine)
            assert p["chosen"] == next(x["text"] for x in mine if x["score"] == p["chosen_score"])
        n_tied = sum(len({x["score"] for x in samples if x["prompt_index"] == i and x["text"].strip()}) < 2
                     for i in range(4))
        assert done["pairs/dropped"] == n_tied and done["length/chosen"] > 0
        assert (it / "final" / "config.json").exists() and "reward/sample_mean" in done
    done2 = json.loads((out / "iter_2" / "done.json").read_text())
    assert done2["sampled_by"] == str(out / "iter_1" / "final") and len(asked) == 2  # M_1 samples, judges it 2
    metrics = [json.loads(x) for x in (out / "iter_1" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margin" in m for m in metrics)  # the DPO recipe trained the pairs


def test_collapsed_judge_warns_and_makes_no_pairs(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(self_judge, "judge_replies", lambda e, t, qs, n, s, seeds: [["Score: 3"] * n for _ in qs])
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        assert _run(tmp_path, "iterations=1", "collapse_threshold=0.5") == 0
    assert any(re.search(r"judge collapsed: 100%", r.getMessage()) for r in caplog.records)
    done = json.loads((tmp_path / "sr" / "iter_1" / "done.json").read_text())
    assert done["judge/collapse"] == 1.0 and done["pairs"] == 0 and done["model"] == "tiny"


def test_unparsable_judge_counts_failures(tmp_path):
    """The tiny model's own judgements are random bytes: every one is a parse failure, and no pair is made."""
    assert _run(tmp_path, "iterations=1") == 0
    done = json.loads((tmp_path / "sr" / "iter_1" / "done.json").read_text())
    assert done["judge/parse_failure"] == 1.0 and done["pairs"] == 0 and done["judge/judgements"] == 16


def test_config_errors_exit_2(tmp_path):
    assert _run(tmp_path, "loss=kto") == 2
    assert _run(tmp_path, "num_generations=1") == 2
    assert _run(tmp_path, "judge_samples=3") == 2  # greedy judgements asked three times
