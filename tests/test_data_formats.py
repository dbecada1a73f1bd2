"""Reading data files into canonical records, and rejecting each kind of bad row with file, line and field."""

import csv
import json
import sys
import types

import pytest

from alignkit.data.formats import (
    LoadedData,
    Origin,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
    describe,
    load_examples,
    read_rows,
    soft_label,
)
from alignkit.errors import DataError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    """Rows are dicts (dumped) or raw strings (written as they are), one per line."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ good rows, per format


def test_sft_formats_and_origins(tmp_path):
    path = write_jsonl(tmp_path, [
        {"messages": [user("hi"), assistant("hello")], "id": 7},
        "",
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": [user("hi")], "completion": [assistant("hello")]},
        {"text": "plain text"},
    ])
    loaded = load_examples(path, "sft")
    chat, pc, pc_chat, text = loaded.examples
    assert chat == SFTExample(None, None, [user("hi"), assistant("hello")], None, Origin(path, 1, 0), {"id": 7})
    assert (pc.prompt, pc.completion, pc.shape) == ("2+2=", "4", "prompt_completion")
    assert (pc.origin.line, pc.origin.row) == (3, 1)
    assert pc_chat.completion == [assistant("hello")] and pc_chat.messages is None
    assert (text.text, text.shape, text.origin.line) == ("plain text", "text", 5)
    assert (loaded.n_rows, loaded.n_skipped) == (4, 0)


def test_sft_example_needs_exactly_one_shape():
    with pytest.raises(ValueError):
        SFTExample("p", None, None, "t", Origin("x", 1, 0))


def test_preference_explicit_with_margin(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2, "src": "a"}])
    [pair] = load_examples(path, "preference").examples
    assert pair == PreferenceExample("p", "good", "bad", 2.0, 0, Origin(path, 1, 0), {"src": "a"})


def test_preference_soft_label(tmp_path):
    """The judge's probability that chosen is better, on explicit and implicit pairs; absent or null is None (a
    hard label). Read for KTO, a pair's soft label stays in both examples' extra."""
    path = write_jsonl(tmp_path, [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "soft_label": 0.75, "margin": 1},
        {"chosen": "Q: 4", "rejected": "Q: 5", "soft_label": 1},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "soft_label": None},
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "soft_label": 0},
    ])
    pairs = load_examples(path, "preference").examples
    assert pairs[0] == PreferenceExample("p", "good", "bad", 1.0, 0, Origin(path, 1, 0), {}, 0.75)
    assert [p.soft_label for p in pairs] == [0.75, 1.0, None, None, 0.0]
    assert [soft_label(p) for p in pairs] == [0.75, 1.0, None, None, 0.0]
    unpaired = load_examples(path, "unpaired").examples
    assert [soft_label(ex) for ex in unpaired] == [0.75, 0.75, 1.0, 1.0, None, None, None, None, 0.0, 0.0]
    assert unpaired[0].extra == {"soft_label": 0.75} and unpaired[4].extra == {}


def test_implicit_prompt_for_strings_leaves_the_space_with_the_responses(tmp_path):
    path = write_jsonl(tmp_path, [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five"}])
    [pair] = load_examples(path, "preference").examples
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: 2+2? A:", " 4", " five")


def test_implicit_prompt_for_message_lists(tmp_path):
    shared = [{"role": "system", "content": "be brief"}, user("hi")]
    row = {"chosen": shared + [assistant("hello")], "rejected": shared + [assistant("go away")]}
    path = write_jsonl(tmp_path, [row])
    [pair] = load_examples(path, "preference").examples
    assert pair.prompt == shared
    assert (pair.chosen, pair.rejected) == ([assistant("hello")], [assistant("go away")])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ranking_expands_to_all_pairs_in_rank_order(tmp_path, k):
    ranking = list(range(k, 0, -1))  # responses listed worst first: response i has rank k - i
    responses = [f"r{i}" for i in range(k)]
    path = write_jsonl(tmp_path, [{"prompt": "p", "chosen": "x", "rejected": "y"},
                                  {"prompt": "q", "responses": responses, "ranking": ranking}])
    pairs = load_examples(path, "preference").examples[1:]
    assert len(pairs) == k * (k - 1) // 2
    by_rank = {rank: responses[i] for i, rank in enumerate(ranking)}
    expected = [(by_rank[a], by_rank[b]) for a in range(1, k + 1) for b in range(a + 1, k + 1)]
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    assert {(p.group, p.prompt, p.origin.line, p.margin) for p in pairs} == {(1, "q", 2, None)}


def test_unpaired_labels_and_preference_rows(tmp_path):
    path = write_jsonl(tmp_path, [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "b", "label": 0},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ])
    examples = load_examples(path, "unpaired").examples
    assert [(e.completion, e.label) for e in examples] == [("a", True), ("b", False), ("good", True), ("bad", False)]
    assert all(isinstance(e, UnpairedExample) for e in examples)
    assert examples[3].origin == Origin(path, 3, 2)


def test_prompt_only_keeps_other_columns(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": [user("2+2?")], "answer": "4"}])
    [ex] = load_examples(path, "prompt").examples
    assert ex == PromptExample([user("2+2?")], Origin(path, 1, 0), {"answer": "4"})


# ------------------------------------------------------------------------------------------- file types


def test_csv_with_json_messages_column(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "note"])
        w.writerow([json.dumps([user("hi"), assistant("hello")]), "[not json]"])
        w.writerow(["[]", ""])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "sft")
    assert "data.csv:3: field 'messages'" in str(err.value)
    loaded = load_examples(str(path), "sft", skip_invalid=True)
    [ex] = loaded.examples
    assert ex.messages == [user("hi"), assistant("hello")] and ex.extra == {"note": "[not json]"}
    assert ex.origin == Origin(str(path), 2, 0)


def test_csv_cells_over_128_kib_are_read(tmp_path):
    path = tmp_path / "big.csv"  # csv's default field_size_limit is 131072 characters
    path.write_text('prompt,completion\np,"' + "x" * 300_000 + '"\n')
    [ex] = load_examples(str(path), "sft").examples
    assert len(ex.completion) == 300_000


def test_csv_row_spanning_lines_is_located_where_it_starts(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,n\n"a\nb\nc",1\n\n"x\ny",2\n,3\n')
    loaded = load_examples(str(path), "sft", skip_invalid=True)
    assert [(e.text, e.origin.line, e.origin.row) for e in loaded.examples] == [("a\nb\nc", 2, 0), ("x\ny", 6, 1)]
    assert [msg.split(": ")[0] for msg in loaded.skipped] == [f"{path}:8"]  # "no recognised sft format"


def test_csv_json_cells_python_cannot_read_stay_text(tmp_path):
    path = tmp_path / "kto.csv"
    deep = "[" * 50_000 + "]" * 50_000  # under csv's default field limit, over the recursion limit
    path.write_text(f"prompt,completion,label\np,a,{'1' * 5000}\n{deep},b,1\n")
    loaded = load_examples(str(path), "unpaired", skip_invalid=True)
    [skipped] = loaded.skipped
    assert skipped.startswith(f"{path}:2: field 'label': expected a boolean") and "found string" in skipped
    assert [ex.prompt for ex in loaded.examples] == [deep]


def test_csv_label_and_margin_cells(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\np,a,true\np,b,0\np,c,yes\n")
    loaded = load_examples(str(path), "unpaired", skip_invalid=True)
    assert [e.label for e in loaded.examples] == [True, False]
    assert loaded.skipped[0].startswith(f"{path}:4: field 'label'") and "'yes'" in loaded.skipped[0]
    path = tmp_path / "pref.csv"
    path.write_text("prompt,chosen,rejected,margin\np,a,b,0.5\np,a,b,\n")
    assert [e.margin for e in load_examples(str(path), "preference").examples] == [0.5, None]
    path.write_text("prompt,chosen,rejected,soft_label\np,a,b,0.8\np,a,b,\np,a,b,1\n")
    assert [e.soft_label for e in load_examples(str(path), "preference").examples] == [0.8, None, 1]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "data.parquet")
    rows = [{"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
            {"prompt": [user("hi")], "chosen": [assistant("same")], "rejected": [assistant("same")]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as err:
        load_examples(path, "preference")
    assert str(err.value).startswith(f"{path} row 1: field 'rejected'") and err.value.path == path
    [pair] = load_examples(path, "preference", skip_invalid=True).examples
    assert pair.chosen == [assistant("yes")] and pair.origin == Origin(path, None, 0)


def test_json_array_spanning_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {\n    "text": "b"\n  },   {"text": "c"},\n\n  [1]\n]\n')
    loaded = load_examples(str(path), "sft", skip_invalid=True)
    assert [(e.text, e.origin.line, e.origin.row) for e in loaded.examples] == [("a", 2, 0), ("b", 3, 1), ("c", 5, 2)]
    assert loaded.n_skipped == 1 and loaded.skipped[0].startswith(f"{path}:7: expected a JSON object")


def test_json_array_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n   "x": 1}\n]')
    with pytest.raises(DataError, match=r"data\.json:4: malformed JSON"):
        load_examples(str(path), "sft", skip_invalid=True)
    path.write_text('[{"text": "a"}\n {"text": "b"}]')
    with pytest.raises(DataError, match=r"data\.json:2: malformed JSON: expected ',' or ']'"):
        list(read_rows(str(path)))


def test_json_array_values_python_cannot_read_name_their_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": ' + "1" * 4400 + '}\n]')
    with pytest.raises(DataError, match=r"data\.json:3: malformed JSON: an integer has more than 4300 digits"):
        load_examples(str(path), "sft")
    path.write_text('[{"text": "a"},\n' + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError, match=r"data\.json:2: malformed JSON: arrays or objects nested too deeply"):
        load_examples(str(path), "sft")


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "a"}, "", {"text": "b"}], name="data.json")
    assert [e.origin.line for e in load_examples(path, "sft").examples] == [1, 3]


def test_hub_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "missing/set":
            raise ConnectionError("offline")
        return [{"prompt": "p", "answer": "4"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    [ex] = load_examples("org/math:test", "prompt").examples
    assert ex.origin == Origin("org/math:test", None, 0) and ex.extra == {"answer": "4"}
    with pytest.raises(DataError, match=r"missing/set.*split 'train'.*ConnectionError: offline"):
        load_examples("missing/set", "prompt")
    assert calls == [("org/math", "test"), ("missing/set", "train")]


def test_unreadable_sources_are_errors_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read file"):
        load_examples(str(tmp_path / "nope.jsonl"), "sft", skip_invalid=True)
    (tmp_path / "data.txt").write_text("{}\n")
    with pytest.raises(DataError, match="unknown file extension '.txt'"):
        load_examples(str(tmp_path / "data.txt"), "sft", skip_invalid=True)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(str(tmp_path / "bin.jsonl"), "sft", skip_invalid=True)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet file"):
        load_examples(str(tmp_path / "bad.parquet"), "sft")


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv"])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path, name):
    header = "text\r\n" if name.endswith(".csv") else ""
    rows = [b'"fine"' if name.endswith(".csv") else b'{"text": "fine"}'] * 3
    rows[2] = rows[2].replace(b"fine", b"f\xe9e")  # Latin-1, not UTF-8
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + header.encode() + b"\r\n".join(rows) + b"\r\n")
    with pytest.raises(DataError) as err:
        load_examples(str(tmp_path / name), "sft")
    line = 3 + bool(header)
    assert str(err.value).startswith(f"{tmp_path / name}:{line}: not UTF-8 text: invalid continuation byte")
    assert "bytes e9" in str(err.value) and err.value.line == line


def test_parquet_values_python_cannot_hold_name_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "data.parquet")
    days = pa.array([0, 2**31 - 1, 1], pa.int32()).cast(pa.date32())  # day 2**31 - 1 is past datetime.MAXYEAR
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "when": days}), path)
    with pytest.raises(DataError) as err:
        load_examples(path, "prompt")
    assert str(err.value).startswith(f"{path} row 1: field 'when': cannot convert the date32[day] value")
    loaded = load_examples(path, "prompt", skip_invalid=True)
    assert [(ex.prompt, ex.origin.row) for ex in loaded.examples] == [("a", 0), ("c", 2)]


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path, ["", "  "])
    with pytest.raises(DataError, match=r"data\.jsonl: no rows"):
        load_examples(path, "sft")
    (tmp_path / "empty.json").write_text("[ ]")
    with pytest.raises(DataError, match="no rows"):
        load_examples(str(tmp_path / "empty.json"), "prompt")


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="sft, preference, unpaired, prompt"):
        load_examples(write_jsonl(tmp_path, [{"text": "a"}]), "rl")


# --------------------------------------------------------------------------------------------- bad rows

GOOD = {
    "sft": {"text": "fine"},
    "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "unpaired": {"prompt": "p", "completion": "a", "label": True},
    "prompt": {"prompt": "p"},
}
RANK = {"prompt": "p", "responses": ["a", "b", "c"]}

BAD_ROWS = [  # (kind, row on line 3, field named or None, words the message must contain)
    ("sft", '{"text": "unterminated', None, "malformed JSON"),
    ("sft", '["text", "a"]', None, "found list"),
    ("sft", {"question": "q"}, None, "messages | prompt/completion | text; found keys: question"),
    ("sft", {"prompt": "p"}, "completion", "missing"),
    ("sft", {"prompt": "p", "completion": None}, "completion", "null"),
    ("preference", {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ("preference", {"chosen": "a"}, "rejected", "missing"),
    ("prompt", {"prompt": 3}, "prompt", "found integer 3"),
    ("sft", {"text": ["a"]}, "text", "expected a string, found list"),
    ("sft", {"text": "a\ud800b"}, "text", "lone surrogate '\\ud800' at character 1"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 10**400}, "margin", "found integer"),
    ("sft", {"messages": [user("\udc00"), assistant("a")]}, "messages[0].content", "lone surrogate"),
    ("sft", {"prompt": "p", "completion": "  \n"}, "completion", "empty response"),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty response"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": " "}, "rejected", "empty response"),
    ("sft", {"messages": [user("hi"), assistant(" ")]}, "messages[1].content", "empty response"),
    ("sft", {"messages": [user("hi")]}, "messages", "at least one assistant message"),
    ("sft", {"messages": []}, "messages", "non-empty list of messages"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical to chosen"),
    ("preference", {"chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ("sft", {"messages": ["hi", assistant("a")]}, "messages[0]", "found string 'hi'"),
    ("sft", {"messages": [{"content": "hi"}, assistant("a")]}, "messages[0].role", "missing"),
    ("sft", {"messages": [{"role": "user"}, assistant("a")]}, "messages[0].content", "missing"),
    ("sft", {"messages": [{"role": "bot", "content": "x"}, assistant("a")]}, "messages[0].role", "unknown role"),
    ("sft", {"messages": [user(["part"]), assistant("a")]}, "messages[0].content", "expected a string, found list"),
    ("preference", {"prompt": [user("p")], "chosen": "a", "rejected": "b"}, "chosen", "is a string but prompt"),
    ("preference", {"chosen": "abc", "rejected": "xyz"}, "chosen", "share no prefix"),
    ("preference", {"chosen": "same", "rejected": "same but longer"}, "chosen", "nothing is left once"),
    ("preference", {**RANK, "ranking": [1, 1, 2]}, "ranking", "tie: rank 1"),
    ("preference", {**RANK, "ranking": [1, 2, 4]}, "ranking", "gap"),
    ("preference", {**RANK, "ranking": [1, 2]}, "ranking", "has 2 ranks but responses has 3"),
    ("preference", {**RANK, "ranking": [1, 2.5, 3]}, "ranking[1]", "found number 2.5"),
    ("preference", {"prompt": "p", "responses": ["a"], "ranking": [1]}, "responses", "at least 2"),
    ("preference", {"prompt": "p", "responses": ["a", "a"], "ranking": [1, 2]}, "responses", "identical"),
    ("preference", {"prompt": "p", "responses": ["a", ""], "ranking": [1, 2]}, "responses[1]", "empty response"),
    ("unpaired", {"prompt": "p", "completion": "a", "label": "yes"}, "label", "found string 'yes'"),
    ("unpaired", {"prompt": "p", "completion": "a", "label": 2}, "label", "found integer 2"),
    ("preference", {**GOOD["preference"], "margin": "high"}, "margin", "expected a finite number"),
    ("preference", {**GOOD["preference"], "margin": True}, "margin", "found boolean"),
    ("preference", {**GOOD["preference"], "soft_label": 1.7}, "soft_label", "probability in [0, 1]"),
    ("preference", {**GOOD["preference"], "soft_label": -0.25}, "soft_label", "found number -0.25"),
    ("preference", {"chosen": "Q: 4", "rejected": "Q: 5", "soft_label": "0.7"}, "soft_label", "expected a finite number"),
    ("preference", {**GOOD["preference"], "soft_label": True}, "soft_label", "found boolean"),
    ("unpaired", {**GOOD["preference"], "soft_label": 2}, "soft_label", "found integer 2"),
]


@pytest.mark.parametrize("kind,row,field,words", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, kind, row, field, words):
    path = write_jsonl(tmp_path, [GOOD[kind], "", row, GOOD[kind]])
    with pytest.raises(DataError) as err:
        load_examples(path, kind)
    where = f"{path}:3: " + (f"field '{field}': " if field else "")
    assert str(err.value).startswith(where), str(err.value)
    assert words in str(err.value)
    assert (err.value.path, err.value.line, err.value.field) == (path, 3, field)

    loaded = load_examples(path, kind, skip_invalid=True)
    assert (loaded.n_rows, loaded.n_skipped, loaded.skipped) == (3, 1, [str(err.value)])


@pytest.mark.parametrize("line,words", [
    ('{"text": ' + "9" * 5000 + "}", "malformed JSON: an integer has more than 4300 digits"),
    ("[" * 100_000, "malformed JSON: arrays or objects nested too deeply"),
], ids=["long-integer", "deep-nesting"])
def test_json_python_cannot_read_is_a_bad_row(tmp_path, line, words):
    """json.loads raises ValueError or RecursionError here, not JSONDecodeError."""
    path = write_jsonl(tmp_path, [GOOD["sft"], "", line, GOOD["sft"]])
    with pytest.raises(DataError) as err:
        load_examples(path, "sft")
    assert str(err.value) == f"{path}:3: {words}"
    assert load_examples(path, "sft", skip_invalid=True).n_skipped == 1


def test_lone_surrogate_in_a_step_names_the_step(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "p", "steps": ["a", "b\ud800"], "labels": [1, 0]}])
    with pytest.raises(DataError) as err:
        load_examples(path, "stepwise")
    assert str(err.value).startswith(f"{path}:1: field 'steps[1]': not valid Unicode: a lone surrogate")


def test_skip_invalid_counts_and_keeps_the_first_messages(tmp_path):
    rows = [GOOD["preference"]] + ["{oops"] * 3 + [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 4
    loaded = load_examples(write_jsonl(tmp_path, rows), "preference", skip_invalid=True)
    assert (len(loaded.examples), loaded.n_rows, loaded.n_skipped, len(loaded.skipped)) == (1, 8, 7, 5)
    assert "data.jsonl:2: malformed JSON" in loaded.skipped[0] and "data.jsonl:5: field 'rejected'" in loaded.skipped[3]


def test_all_rows_invalid_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"all 2 rows are invalid; the first: .*data\.jsonl:1: malformed"):
        load_examples(write_jsonl(tmp_path, ["{", "}"]), "sft", skip_invalid=True)


def test_read_rows_yields_raw_dicts_and_raises_on_malformed_json(tmp_path):
    path = write_jsonl(tmp_path, [{"a": 1}, "", "{bad"])
    rows = read_rows(path)
    assert next(rows) == (Origin(path, 1, 0), {"a": 1})
    with pytest.raises(DataError, match=r"data\.jsonl:3: malformed JSON"):
        next(rows)


def test_describe(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}, "{", GOOD["preference"]]
    loaded = load_examples(write_jsonl(tmp_path, rows), "preference", skip_invalid=True)
    assert describe(loaded) == f"4 preference pairs from {tmp_path / 'data.jsonl'} (2 rows, 1 row skipped)"
    big = LoadedData([None] * 1234, n_rows=1236, n_skipped=2, skipped=[], source="data.jsonl", kind="preference")
    assert describe(big) == "1,234 preference pairs from data.jsonl (2 rows skipped)"
