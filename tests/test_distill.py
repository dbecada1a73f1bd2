"""Reasoning distillation (``alignkit distill``): the verifier and DeepSeek-R1's rules on hand-built traces, the
think / no-think mix with its exact counts for a seed, the teachers (a program, an endpoint), and the recipe
through the CLI on the tiny model with a program teacher, resumed from its trace file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from _fake_http import reply_json, serving
from _teacher import spoilt
from _toy import _pairs
from alignkit.cli import main
from alignkit.data.formats import load_examples
from alignkit.data.thinking import requested_mode
from alignkit.feedback.teachers import EndpointTeacher, ProgramTeacher, as_trace, teacher_kind
from alignkit.rl.distill import fusion_rows, keep, mix_counts, with_flag
from alignkit.rl.rollout import SamplingParams

HERE = Path(__file__).parent
TEACHER = f"teacher={HERE / '_teacher.py'}:max_teacher"


def t(i, reasoning, answer, reward=1.0, tokens=10, sample=0):
    return {"prompt_index": i, "sample": sample, "reasoning": reasoning, "answer": answer, "reward": reward,
            "thinking_tokens": tokens}


RULES = dict(verified=True, threshold=1.0, language="en", min_language=0.99, thinking_limit=50)


def test_filters_drop_wrong_mixed_language_over_long_empty_and_repeated_traces():
    traces = [t(0, "3 + 4 = 7", "The answer is 7."),
              t(1, "3 + 4 = 8", "The answer is 8.", reward=0.0),  # wrong
              t(2, "3 + 4 = 7, 所以答案是 7", "The answer is 7."),  # mixed languages in the thinking
              t(3, "3 + 4 = 7", "答案是 7"),  # ... or in the answer
              t(4, "3 + 4 = 7 " * 30, "The answer is 7.", tokens=51),  # over the limit
              t(5, "3 + 4 = 7 " * 25, "The answer is 7.", tokens=50),  # at the limit: kept
              t(6, "3 + 4 = 7", "The answer is 7.", reward=None),  # not scored: not verified
              t(7, "", "The answer is 7."), t(8, "3 + 4 = 7", " "),  # nothing to think, nothing to answer
              t(0, "3 + 4 = 7", "The answer is 7.", sample=1),  # the same trace of prompt 0 again
              t(9, "Wait, 3 + 4 = 7 " * 30, "答案是 8", reward=0.0, tokens=90)]  # fails three rules at once
    kept, counts = keep(traces, **RULES)
    assert [(k["prompt_index"], k["sample"]) for k in kept] == [(0, 0), (5, 0)]
    assert counts == {"traces": 11, "kept": 2, "dropped": 9, "dropped/empty": 2, "dropped/verifier": 3,
                      "dropped/language": 3, "dropped/length": 2, "dropped/duplicate": 1}
    assert traces[-1]["failed"] == ["verifier", "language", "length"]
    # every rule can be turned off
    kept, counts = keep(traces, verified=False, min_language=0.0, thinking_limit=0)
    assert counts["kept"] == 8 and counts["dropped"] == counts["dropped/empty"] + counts["dropped/duplicate"] == 3


def _examples(prompts):
    from types import SimpleNamespace

    return [SimpleNamespace(prompt=p, extra={"answer": "7"}) for p in prompts]


def test_mode_mix_has_exact_counts_and_every_row_obeys_its_last_flag(tmp_path):
    kept = [t(i, f"step {i}", f"The answer is {i}.") for i in range(20)]
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(19)]
    prompts.append([{"role": "user", "content": "First? /no_think"}, {"role": "assistant", "content": "1"},
                    {"role": "user", "content": "Second?"}])  # asks for no thinking in an earlier turn
    rows = fusion_rows(kept, _examples(prompts), no_think_fraction=0.25, flag_fraction=0.5, seed=3)
    assert rows == fusion_rows(kept, _examples(prompts), 0.25, 0.5, seed=3)  # fixed by the seed
    counts = mix_counts(rows)
    # 5 of 20 no-think. Seed 3 makes row 19 (asking for no thinking in an earlier turn) a think row: its /think is
    # required, and the optional flags go to round(0.5 * 14) = 7 of the 14 other think rows
    assert rows[19]["mode"] == "think" and rows[19]["flag"] == "/think"
    assert counts["rows/no_think"] == 5 and counts["rows/think_flagged"] == 7 + 1 and counts["rows/think_default"] == 7
    rows5 = fusion_rows(kept, _examples(prompts), 0.25, 0.5, seed=5)
    # seed 5: row 19 is a no-think row, its flag optional: round(0.5 * 16) = 8 of the 15 think rows and row 19
    assert rows5[19]["mode"] == "no_think"
    c5 = mix_counts(rows5)
    assert c5["rows/no_think"] == 5 and c5["rows/no_think_unflagged"] == (rows5[19]["flag"] is None)
    assert c5["rows/think_flagged"] == 8 - (rows5[19]["flag"] is not None) and c5["rows/think_default"] == 15 - c5["rows/think_flagged"]
    for row in rows:
        user = row["prompt"][-1]["content"]
        said = requested_mode(row["prompt"])
        reply = row["completion"][0]
        if row["mode"] == "no_think":
            assert user.endswith(" /no_think") == (row["flag"] is not None) and reply["reasoning_content"] == ""
            assert said == "no_think"
        else:
            assert reply["reasoning_content"] == f"step {row['prompt_index']}" and said in ("think", None)
            assert user.endswith(" /think") == (row["flag"] == "/think")
        assert reply["content"] == f"The answer is {row['prompt_index']}." and row["answer"] == "7"
    other = fusion_rows(kept, _examples(prompts), 0.25, 0.5, seed=4)
    assert [r["mode"] for r in other] != [r["mode"] for r in rows]
    # the rows are valid SFT data with their modes
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_examples(str(path), "sft").examples
    assert [ex.mode for ex in loaded] == [r["mode"] for r in rows]
    # all or nothing
    assert mix_counts(fusion_rows(kept, _examples(prompts), 1.0, 0.5, 0))["rows/no_think"] == 20
    none = fusion_rows(kept[:19], _examples(prompts), 0.0, 0.0, 0)
    assert mix_counts(none) == {"rows": 19, "rows/no_think": 0, "rows/no_think_unflagged": 0, "rows/think_flagged": 0,
                                "rows/think_default": 19}


def test_flags_go_on_the_last_user_turn_or_the_end_of_a_text_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi? "},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum?"}]
    flagged = with_flag(msgs, "/no_think")
    assert flagged[3]["content"] == "Sum? /no_think" and msgs[3]["content"] == "Sum?" and flagged[1] == msgs[1]
    assert with_flag("Q: 2+2?\n", "/think") == "Q: 2+2? /think" and with_flag(msgs, None) is msgs


def test_teacher_specs_and_outputs(tmp_path):
    assert teacher_kind("https://api.example/v1") == "endpoint"
    assert teacher_kind("pkg.mod:fn") == teacher_kind("dir/t.py:fn") == "program"
    assert teacher_kind("smollm2-135m-instruct") == teacher_kind("HuggingFaceTB/x") == teacher_kind("tiny") == "model"
    assert as_trace(("  r ", " a "), "x") == ("r", "a")
    assert as_trace({"reasoning": "r", "answer": "a"}, "x") == ("r", "a")
    assert as_trace("<think>\nr\n</think>\n\na", "x") == ("r", "a")
    with pytest.raises(TypeError, match="expected"):
        as_trace(42, "x")
    teacher = ProgramTeacher(f"{HERE / '_teacher.py'}:max_teacher")
    out = teacher.traces([{"prompt": "max(3,8)=", "answer": "8"}], 2, [0])
    assert out == [[("The digits are 3 and 8.\n8 > 3, so the larger is 8.", "The answer is 8.")] * 2]


def test_endpoint_teacher_reads_reasoning_content_or_inline_thinking():
    from http.server import BaseHTTPRequestHandler

    asked = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            q = body["messages"][-1]["content"]
            message = ({"content": "7", "reasoning_content": "3 + 4 = 7"} if "sum" in q else
                       {"content": "<think>\n2 * 3 = 6\n</think>\n\n6"})
            reply_json(self, {"choices": [{"message": {"role": "assistant", **message}}]})

    with serving(Handler) as url:
        teacher = EndpointTeacher(url, "teacher-model", SamplingParams(temperature=0.6, max_new_tokens=99))
        out = teacher.traces([{"prompt": "sum 3 4"}, {"prompt": [{"role": "user", "content": "product 2 3"}]}], 1, [1, 2])
    assert out == [[("3 + 4 = 7", "7")], [("2 * 3 = 6", "6")]]
    assert {b["model"] for b in asked} == {"teacher-model"} and {b["max_tokens"] for b in asked} == {99}
    assert {b["temperature"] for b in asked} == {0.6} and len({b["seed"] for b in asked}) == 2


def _data(tmp_path, n=16):
    rows = [{"prompt": [{"role": "user", "content": p}], "answer": str(hi)} for p, hi, _, _ in _pairs(n, 0)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [tuple(int(d) for d in re.findall(r"\d", p)[:2]) for p, *_ in _pairs(n, 0)]


def _run(tmp_path, data, *args):
    return main(["distill", "model=tiny", TEACHER, f"data={data}", f"output_dir={tmp_path / 'd'}", "progress=false",
                 "thinking_limit=100", "no_think_fraction=0.25", "flag_fraction=0.5", "seed=1", "lr=1e-3",
                 "max_length=256", "rollout_batch=5", *args])


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_distill_with_a_program_teacher_through_the_cli_and_resumed_from_its_traces(tmp_path, monkeypatch):
    data, digits = _data(tmp_path)
    assert _run(tmp_path, data) == 0
    it = tmp_path / "d" / "iter_1"
    expected = {rule: sum(spoilt(d) == rule for d in digits) for rule in ("verifier", "language", "length")}
    assert expected == {"verifier": 1, "language": 2, "length": 1}
    traces = _jsonl(it / "traces.jsonl")
    assert [tr["failed"] for tr in traces] == [[spoilt(d)] if spoilt(d) else [] for d in digits]
    done = json.loads((it / "done.json").read_text())
    assert {k: done[f"dropped/{k}"] for k in expected} == expected
    assert (done["traces"], done["kept"], done["dropped"], done["dropped/empty"], done["dropped/duplicate"]) == (16, 12, 4, 0, 0)
    # 12 kept: round(0.25 * 12) = 3 no-think rows, round(0.5 * 9) = 4 think rows with /think, 5 without a flag
    assert (done["rows"], done["rows/no_think"], done["rows/think_flagged"], done["rows/think_default"]) == (12, 3, 4, 5)
    rows = _jsonl(it / "train.jsonl")
    assert sum(r["prompt"][-1]["content"].endswith("/no_think") for r in rows) == 3
    assert sum(r["prompt"][-1]["content"].endswith(" /think") for r in rows) == 4
    assert all(r["completion"][0]["reasoning_content"] == "" for r in rows if r["mode"] == "no_think")
    assert (it / "final" / "config.json").exists() and done["model"] == str(it / "final")
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["final_model"] == str(it / "final")

    # an interruption while the teacher was answering: the traces of whole prompts stay, a torn line is dropped,
    # and the teacher is asked only for the prompts it had not answered
    import alignkit.recipes.distill as distill

    lines = (it / "traces.jsonl").read_text().splitlines()
    (it / "traces.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    (it / "done.json").unlink()
    shutil.rmtree(it / "final")  # interrupted before fine-tuning
    asked = []
    real = distill.build_teacher

    def recording(cfg, sampling):
        teacher = real(cfg, sampling)
        inner = teacher.traces
        teacher.traces = lambda rows, n, seeds: asked.extend(r["prompt"][-1]["content"] for r in rows) or inner(rows, n, seeds)
        return teacher

    monkeypatch.setattr(distill, "build_teacher", recording)
    assert _run(tmp_path, data, "resume=true") == 0
    assert asked == [_pairs(16, 0)[i][0] for i in range(7, 16)]
    assert _jsonl(it / "train.jsonl") == rows and json.loads((it / "done.json").read_text())["kept"] == 12


def test_bad_distill_configs_exit_2(tmp_path, capsys):
    data, _ = _data(tmp_path, 4)
    base = ["distill", "model=tiny", f"data={data}", f"output_dir={tmp_path / 'x'}"]
    assert main(base) == 2 and "teacher= is required" in capsys.readouterr().err
    assert main([*base, "teacher=http://localhost:1"]) == 2 and "teacher_model" in capsys.readouterr().err
    assert main([*base, TEACHER, "no_think_fraction=1.5"]) == 2
    assert main([*base, TEACHER, "thinking=off"]) == 2
    assert main([*base, "teacher=no_such_module_x:fn"]) == 2 and "teacher 'no_such_module_x:fn'" in capsys.readouterr().err
