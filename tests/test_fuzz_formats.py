"""Property-based fuzzing of ``load_examples``: every data kind, every file type, hostile input.

The property: any file either loads (and gives records of the kind asked for) or raises ``DataError`` naming
the file, and, when the problem is in a row, the line (text files) or ``row N`` (Parquet) and the field.
Nothing else may escape: no ``ValueError``, ``RecursionError``, ``csv.Error`` or pyarrow error.

Two oracles, neither a second implementation of the validator:

* A *structured* file (well-formed rows, however wrong their values) must behave like its rows read one
  by one: it loads exactly when every row loads alone, and otherwise fails on the first row that fails alone,
  with that row's field and message, located at the line where that row starts (``row i`` for Parquet).
* A *damaged* file (cut at a random byte, garbage lines or bytes spliced in, empty, random bytes) only has
  to load or raise a located ``DataError``.

Either way an error about a row carries its line (text files) or ``row N`` (Parquet), and a field unless it
is about the row as a whole (malformed JSON, not an object, no recognised format, ...).

Every loaded string a tokenizer will see must be valid Unicode (JSON escapes can smuggle in lone surrogates,
which tokenizers reject with a TypeError far from the data).

The CLI is driven too: bad data exits 2 before any model is loaded, and fuzzed SFT data trains (0) or is
rejected (2), never a traceback (1).

Runs are reproducible (``derandomize=True``, no example database). For a longer run by hand::

    FUZZ_EXAMPLES=2000 python tests/test_fuzz_formats.py      # or: python tests/test_fuzz_formats.py 2000

which gives each kind 2000 structured and 2000 damaged files (spread over the four file types), more huge
fields and CLI runs (capped, they are slower), and prints how many inputs of each kind loaded or raised
DataError (``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_formats.py -s`` prints the same table).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

if __name__ == "__main__" and len(sys.argv) > 1:
    os.environ["FUZZ_EXAMPLES"] = sys.argv[1]

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alignkit.data import formats
from alignkit.data.formats import KINDS, load_examples
from alignkit.errors import DataError

FUZZ = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
RECORD = {
    "sft": formats.SFTExample, "preference": formats.PreferenceExample, "unpaired": formats.UnpairedExample,
    "prompt": formats.PromptExample, "stepwise": formats.StepwiseExample, "belief": formats.BeliefExample,
}
ALL_KEYS = sorted({k for fmts in formats._FORMATS.values() for fmt in fmts for k in fmt.keys + fmt.optional})

# outcomes[(test, kind, suffix)][outcome]; printed after a FUZZ_EXAMPLES run
OUTCOMES: dict[tuple[str, str, str], Counter] = defaultdict(Counter)


def fuzz(n: int, share: int = 1, cap: int | None = None):
    """Hypothesis settings: ``n`` examples, or with ``FUZZ_EXAMPLES`` that many split over ``share`` test cases
    (up to ``cap``); reproducible, no deadline, no example database."""
    examples = min(FUZZ // share, cap or FUZZ) if FUZZ else n
    return settings(max_examples=max(examples, n), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_every_kind_has_a_record_type():
    # the fuzzing below is generated from _FORMATS; a new kind needs its record type here to be checked
    assert set(KINDS) == set(formats._FORMATS) == set(RECORD)


# ------------------------------------------------------------------------------------------ values

ODD = [
    "", " ", "\t", "\u200b", "\u200d", "\u2060", "\u202e", "\u2067", "\u200f", "\ufeff", "\u00a0", "\u2028",
    "\u2029", "\x85", "\x00", "\x1f", "\x7f", "\r", "\n", "\r\n", "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd",
    "e\u0301", "Z\u0324\u0354\u0367\u0311\u0313", "\U0010ffff", "\ufffd", "\\", '"', "'", ",", "[", "]", "{",
    "}", "[]", "{}", "NaN", "Infinity", "null", "true", "1e999", "-0", "<|im_end|>", "<|endoftext|>", "\x1b[31m",
]
SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]  # lone halves: only JSON escapes can carry them

odd_text = st.one_of(
    st.sampled_from(ODD),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(st.sampled_from(ODD + ["a", "b", " "]), max_size=6).map("".join),
)
texts = st.one_of(odd_text, odd_text, odd_text, st.sampled_from(SURROGATES))
# always has a visible character, so it is a valid response unless a mutation spoils it
nonblank = st.tuples(odd_text, st.sampled_from(["hi", "x", "\u7b54", "\U0001f642", "ok", "4"]), odd_text).map("".join)
keys = st.one_of(st.sampled_from(ALL_KEYS + ["role", "content", "id", "answer"]), texts)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), texts,
    st.sampled_from([0, 1, -1, 2, 2**63, -(2**64), 10**40, 0.5, 1e308, float("nan"), float("inf"), -float("inf")]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=8
)


def message(role):
    return st.fixed_dictionaries(
        {"role": st.just(role), "content": nonblank}, optional={"name": texts, "tool_calls": json_values}
    )


chat = st.tuples(
    st.lists(st.one_of(message("system"), message("user"), message("tool")), max_size=2),
    message("user"), message("assistant"),
).map(lambda t: [*t[0], t[1], t[2]])
prompt_chat = st.lists(st.one_of(message("system"), message("user")), min_size=1, max_size=2)
labels = st.one_of(st.booleans(), st.sampled_from([0, 1]))


@st.composite
def valid_fields(draw, kind: str, names: tuple[str, ...]) -> dict:
    """Well-typed values for one format's keys (a row may still be invalid, e.g. chosen == rejected)."""
    row: dict = {}
    as_chat = draw(st.booleans()) and kind != "stepwise"
    for key in names:
        if key == "messages":
            row[key] = draw(chat)
        elif key == "prompt":
            row[key] = draw(prompt_chat if as_chat else nonblank)
        elif key in ("chosen", "rejected") and "prompt" not in names:  # an implicit prompt: a shared prefix
            if "chosen" not in row:
                shared = draw(prompt_chat if as_chat else nonblank)
                ends = draw(st.lists(message("assistant") if as_chat else nonblank, min_size=2, max_size=2))
                row["chosen"], row["rejected"] = [shared + [end] if as_chat else f"{shared} {end}" for end in ends]
        elif key in ("completion", "chosen", "rejected"):
            row[key] = draw(st.builds(lambda m: [m], message("assistant")) if as_chat else nonblank)
        elif key == "text":
            row[key] = draw(nonblank)
        elif key == "label":
            row[key] = draw(labels)
        elif key == "margin":
            row[key] = draw(st.one_of(st.none(), st.integers(-5, 5), st.floats(-10, 10)))
        elif key == "soft_label":
            row[key] = draw(st.one_of(st.none(), st.sampled_from([0, 1]), st.floats(0, 1)))
        elif key == "responses":
            responses = draw(st.lists(nonblank, min_size=2, max_size=4, unique=True))
            row[key] = [[{"role": "assistant", "content": r}] for r in responses] if as_chat else responses
            row["ranking"] = list(draw(st.permutations(range(1, len(responses) + 1))))
        elif key == "steps":
            steps = draw(st.lists(nonblank, min_size=1, max_size=4))
            row[key] = steps
            row["labels"] = draw(st.lists(labels, min_size=len(steps), max_size=len(steps)))
        elif key not in row:
            row[key] = draw(json_values)
    return row


# JSON that Python's json module cannot turn into values (an integer too long to convert, nesting deeper than
# the recursion limit) or reads as non-finite floats; written into a row's text as they are
RAW_LITERALS = ["9" * 5000, "-" + "1" * 4400, "[" * 50_000 + "]" * 50_000, '{"a":' * 30_000 + "1" + "}" * 30_000,
                "NaN", "-Infinity", "1e999", "[NaN, Infinity]", "-0.0"]


@dataclass(frozen=True)
class Raw:
    """A value written into the file as the JSON text ``literal`` (a CSV cell holds the literal itself)."""

    literal: str


def _to_json(value, **kw) -> str:
    """json.dumps, with each Raw value written as its literal."""
    text = json.dumps(value, allow_nan=True, default=lambda raw: f"\x00RAW{RAW_LITERALS.index(raw.literal)}\x00", **kw)
    return re.sub(r'"\\u0000RAW(\d+)\\u0000"', lambda m: RAW_LITERALS[int(m.group(1))], text)


def _with_surrogate(value, half: str):
    """``value`` with a lone surrogate in its text (a string, the last message's content, the first step)."""
    if isinstance(value, str):
        return value + half
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[:-1] + [{**value[-1], "content": f"{value[-1].get('content')}{half}"}]
    if isinstance(value, list) and value:
        return [_with_surrogate(value[0], half), *value[1:]]
    return half


@st.composite
def rows_of(draw, kind: str, objects_only: bool = False):
    """A row for ``kind``: usually one of its formats with valid values, sometimes mutated, sometimes junk."""
    choice = draw(st.integers(0, 15))
    if choice == 15:
        return draw(st.dictionaries(keys, json_values, max_size=4))
    if choice == 14 and not objects_only:
        return draw(json_values)
    fmt = draw(st.sampled_from(formats._FORMATS[kind]))
    row = draw(valid_fields(kind, fmt.keys + fmt.optional))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 1, 2]))):
        key = draw(st.sampled_from(sorted(row) + ["role"]))
        op = draw(st.sampled_from(["garbage", "null", "drop", "extra", "blank", "raw", "raw", "surrogate"]))
        if op == "raw":
            row[key] = Raw(draw(st.sampled_from(RAW_LITERALS)))
        elif op == "surrogate":
            row[key] = _with_surrogate(row.get(key), draw(st.sampled_from(SURROGATES)))
        elif op == "garbage":
            row[key] = draw(json_values)
        elif op == "null":
            row[key] = None
        elif op == "drop":
            row.pop(key, None)
        elif op == "extra":
            row[draw(keys)] = draw(json_values)
        elif op == "blank":
            row[key] = draw(st.sampled_from(["", " ", "\u200b", "\n\t", [], {}, [{}], [{"role": "assistant"}]]))
    return row


# ------------------------------------------------------------------------------------------ files


@dataclass
class Fuzzed:
    """A file's bytes; for a structured file, each row alone as a file and where that row is in the whole."""

    suffix: str
    data: bytes
    singles: list[tuple[bytes, int]] | None = None  # (one-row file, line or Parquet row); None: damaged
    notes: list[str] = field(default_factory=list)


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> int:
    return len(_LINE_BREAK.findall(text))


def _scrub(value):
    """Lone surrogates replaced, for file types that cannot hold them."""
    if isinstance(value, str):
        return re.sub("[\ud800-\udfff]", "?", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value.literal if isinstance(value, Raw) else value


def _has_surrogate(text: str) -> bool:
    return re.search("[\ud800-\udfff]", text) is not None


def _dump(draw, value) -> str:
    """A JSON text for one row: ascii-escaped or raw, sometimes with a key given twice (first or last wins)."""
    ascii_ = draw(st.booleans())
    text = _to_json(value, ensure_ascii=ascii_, separators=draw(st.sampled_from([None, (",", ":")])))
    if isinstance(value, dict) and value and draw(st.integers(0, 5)) == 0:
        key = json.dumps(draw(st.sampled_from(sorted(value))))
        junk = json.dumps(draw(json_values), allow_nan=True)
        if draw(st.booleans()):
            text = "{" + f"{key}: {junk}, " + text[1:]  # the real value, later, wins
        else:
            text = text[:-1] + f", {key}: {junk}" + "}"  # the junk wins
    return text


def _encode(text: str, bom: bool) -> bytes:
    # surrogatepass: a raw lone surrogate becomes bytes that are not UTF-8, which the loader must reject
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")


BLANKS = ["", " ", "\t", "  \t "]


@st.composite
def jsonl_file(draw, kind: str, suffix: str = ".jsonl") -> Fuzzed:
    # in a .json file a first line holding an array would make the whole file an array: objects only there
    rows = draw(st.lists(rows_of(kind, objects_only=suffix == ".json"), min_size=1, max_size=4))
    nl, bom = draw(st.sampled_from(["\n", "\r\n"])), draw(st.booleans())
    parts, singles, line = [], [], 1
    for row in rows:
        for _ in range(draw(st.integers(0, 1))):
            parts.append(draw(st.sampled_from(BLANKS)) + nl)
            line += 1
        text = _dump(draw, row)
        parts.append(text + nl)
        singles.append((_encode(text + "\n", False), line))
        line += 1
    body = "".join(parts)
    if not draw(st.booleans()):
        body = body[: -len(nl)]  # no newline at the end
    f = Fuzzed(suffix, _encode(body, bom), singles)
    if _has_surrogate(body):  # undecodable bytes: reported when their chunk is decoded, maybe before a bad row
        f.singles = None
    return f


@st.composite
def json_array_file(draw, kind: str) -> Fuzzed:
    rows = draw(st.lists(rows_of(kind), min_size=0, max_size=4))
    nl, bom, indent = draw(st.sampled_from(["\n", "\r\n"])), draw(st.booleans()), draw(st.sampled_from([None, 1, 2]))
    text = "[" + nl
    singles, line = [], 2
    for i, row in enumerate(rows):
        element = _to_json(row, ensure_ascii=draw(st.booleans()), indent=indent).replace("\n", nl)
        singles.append((_encode("[" + element + "]", False), line))
        text += element + ("," if i < len(rows) - 1 else "") + nl
        line += _lines(element) + 1
    text += "]" + draw(st.sampled_from(["", nl, " " + nl + nl]))
    f = Fuzzed(".json", _encode(text, bom), singles if rows else None)
    if _has_surrogate(text):
        f.singles = None
    return f


def _cell(draw, value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return draw(st.sampled_from(["true", "True", "TRUE", "1" if value else "0"]))
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    return str(value)


@st.composite
def csv_file(draw, kind: str) -> Fuzzed:
    rows = [_scrub(r) for r in draw(st.lists(rows_of(kind, objects_only=True), min_size=1, max_size=4))]
    header = list(dict.fromkeys(k for row in rows for k in row)) or ["text"]
    nl, bom = draw(st.sampled_from(["\n", "\r\n"])), draw(st.booleans())
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))

    def record(cells) -> str:
        # csv quotes a cell holding a character of the line terminator, so a bare \r in a cell goes unquoted
        # with "\n" (and reads as a line break): write "\r\n", then swap in the terminator wanted
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n", quoting=quoting).writerow(cells)
        return out.getvalue().removesuffix("\r\n") + nl

    head = record(header)
    text, singles, line = head, [], 1 + _lines(head)
    for row in rows:
        for _ in range(draw(st.integers(0, 1))):
            text += nl  # blank lines between records are skipped
            line += 1
        rec = record([_cell(draw, row.get(k)) for k in header])
        singles.append((_encode(head + rec, False), line))
        text += rec
        line += _lines(rec)
    return Fuzzed(".csv", _encode(text, bom), singles)


def _table(rows: list[dict]) -> pa.Table:
    """Rows as a Parquet-writable table; columns pyarrow cannot type are stored as JSON strings."""
    try:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, io.BytesIO())
        return table
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        text = [{k: v if v is None or isinstance(v, str) else json.dumps(v, allow_nan=True) for k, v in row.items()}
                for row in rows]
        return pa.Table.from_pylist(text)


def _parquet_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


# Parquet types JSON has no counterpart for, with values at the edge of what Python can hold
EXOTIC = [
    (pa.int32(), pa.date32(), [0, 19_000, 2**31 - 1, -(2**31)]),
    (pa.int64(), pa.duration("s"), [0, -5, 2**62]),
    (pa.int64(), pa.timestamp("ms"), [0, 2**62, -(2**62)]),
    (pa.int64(), pa.time64("us"), [0, 86_399_999_999]),
    (pa.binary(), pa.binary(), [b"", b"\xff\x00", b"hi"]),
    (pa.float64(), pa.float16(), [0.5, float("nan"), 1e6]),
    (pa.string(), pa.large_string(), ["hi", ""]),
    (pa.binary(), pa.string(), [b"ok", b"\xff\xfe", b"\xed\xa0\x80"]),  # strings that are not UTF-8
]


@st.composite
def parquet_file(draw, kind: str) -> Fuzzed:
    rows = [_scrub(r) for r in draw(st.lists(rows_of(kind, objects_only=True), min_size=1, max_size=4))]
    table = _table(rows)
    if draw(st.integers(0, 3)) == 0:
        storage, typ, pool = draw(st.sampled_from(EXOTIC))
        n = table.num_rows  # 0 when every row is {}: a table without columns has no rows
        values = draw(st.lists(st.sampled_from(pool + [None]), min_size=n, max_size=n))
        name = _scrub(draw(keys))
        name = name if name not in table.column_names else name + "_2"
        table = table.append_column(name, pa.array(values, storage).cast(typ, safe=False))
    singles = [(_parquet_bytes(table.slice(i, 1)), i) for i in range(table.num_rows)]
    return Fuzzed(".parquet", _parquet_bytes(table), singles or None)


def structured(kind: str, suffix: str):
    if suffix == ".jsonl":
        return jsonl_file(kind)
    if suffix == ".json":
        return st.one_of(json_array_file(kind), jsonl_file(kind, ".json"))
    return csv_file(kind) if suffix == ".csv" else parquet_file(kind)


GARBAGE_LINES = [
    "[" * 100_000, "{" * 50_000, '{"a":' * 20_000, "[" * 100_000 + "]" * 100_000,
    '{"text": ' + "9" * 5000 + "}", '{"label": ' + "1" * 5000 + "}", '{"margin": -' + "7" * 4400 + "}",
    '{"text": NaN}', '{"text": Infinity}', "NaN", "-Infinity", "[1, 2", "{'text': 'x'}", "\ufeff{}", "\x00",
    '{"text": "a\\ud800"}', "]", ",", "\u2028", "\x1c",
]


@st.composite
def damaged(draw, kind: str, suffix: str) -> Fuzzed:
    """A structured file spoiled: cut at a random byte, bytes or a garbage line spliced in, or replaced."""
    how = draw(st.sampled_from(["cut", "cut", "splice", "line", "empty", "random"]))
    if how == "empty":
        data = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\n", b"\r\n\r\n", b"  \n\t\n", b"\xef\xbb\xbf\n"]))
        return Fuzzed(suffix, data, notes=["empty"])
    if how == "random":
        return Fuzzed(suffix, draw(st.binary(max_size=64)), notes=["random"])
    base = draw(structured(kind, suffix)).data
    if how == "cut":
        return Fuzzed(suffix, base[: draw(st.integers(0, max(0, len(base) - 1)))], notes=["cut"])
    at = draw(st.integers(0, len(base)))
    if how == "splice":
        junk = draw(st.one_of(st.binary(min_size=1, max_size=8),
                              st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\r", b"\xef\xbb\xbf"])))
    else:
        at = base.rfind(b"\n", 0, at) + 1  # a line boundary
        junk = draw(st.sampled_from(GARBAGE_LINES)).encode("utf-8", "surrogatepass") + b"\n"
    return Fuzzed(suffix, base[:at] + junk + base[at:], notes=[how])


# ----------------------------------------------------------------------------------------- the property


def _write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _load(path: str, kind: str):
    """The loaded records or the DataError; any other exception propagates and fails the test."""
    try:
        return load_examples(path, kind, skip_invalid=False)
    except DataError as err:
        return err


def _tail(err: DataError) -> str:
    """The message without its location prefix."""
    message = str(err)
    head = err.path or ""
    if err.line is not None:
        head = f"{err.path}:{err.line}"
    else:
        located = re.match(re.escape(head) + r" row \d+", message)
        head = located.group(0) if located else head
    assert message.startswith(head + ": "), message[:300]
    return message[len(head) + 2 :]


def _strings_to_tokenize(example) -> list[str]:
    out = []
    for name in ("prompt", "completion", "chosen", "rejected", "text", "messages", "steps"):
        value = getattr(example, name, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.append(item.get("content"))
            elif isinstance(item, str):
                out.append(item)
    return out


# A row's problem names a field unless it is about the row as a whole, or the problem is the whole file's (a
# text file is read whole, so only "no rows" is; a Parquet file may also fail to open).
FILE_PROBLEMS = {".parquet": ("no rows: the source is empty", "cannot read file", "cannot read Parquet file")}
WHOLE_ROW_PROBLEMS = ("malformed JSON", "malformed CSV", "not UTF-8 text", "expected a JSON object per row",
                      "no recognised ", "row has ")


def check_located(err: DataError, path: str, suffix: str) -> None:
    """What every DataError must say: the file; for a row its line (text) or ``row N`` (Parquet); and the
    field, unless the problem is the whole row."""
    message = str(err)
    assert err.path == path and message.startswith(path), message[:300]
    tail = _tail(err)
    if err.field is not None:
        assert tail.startswith(f"field '{err.field}': "), message[:300]
        return
    if tail.startswith(FILE_PROBLEMS.get(suffix, ("no rows: the source is empty",))):
        return
    if suffix == ".parquet":
        assert re.match(re.escape(path) + r" row \d+: ", message), f"no row in: {message[:300]}"
    else:
        assert err.line is not None and err.line >= 1, f"no line in: {message[:300]}"
    assert tail.startswith(WHOLE_ROW_PROBLEMS), f"a row's problem without a field: {message[:300]}"


def check_loaded(loaded, kind: str) -> None:
    assert loaded.examples, "loaded with no examples"
    for example in loaded.examples:
        assert type(example) is RECORD[kind]
        for text in _strings_to_tokenize(example):
            assert isinstance(text, str)
            text.encode("utf-8")  # a lone surrogate here reaches the tokenizer as a TypeError


def check_file(f: Fuzzed, kind: str, test: str) -> str:
    """Apply the property to one fuzzed file; return the outcome ("loaded" or "DataError")."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "data" + f.suffix, f.data)
        got = _load(path, kind)
        outcome = "DataError" if isinstance(got, DataError) else "loaded"
        OUTCOMES[(test, kind, f.suffix)][outcome] += 1
        if isinstance(got, DataError):
            check_located(got, path, f.suffix)
        else:
            check_loaded(got, kind)
        if f.singles is None:
            return outcome
        # structured: the file behaves like its rows read one at a time
        alone = []
        for i, (data, _) in enumerate(f.singles):
            single = _write(tmp, f"row{i}{f.suffix}", data)
            one = _load(single, kind)
            if isinstance(one, DataError):
                check_located(one, single, f.suffix)
            alone.append(one)
        bad = next((i for i, one in enumerate(alone) if isinstance(one, DataError)), None)
        if bad is None:
            assert not isinstance(got, DataError), f"every row loads alone, but the file fails: {got}"
            assert len(got.examples) == sum(len(one.examples) for one in alone)
            return outcome
        assert isinstance(got, DataError), f"row {bad} fails alone ({alone[bad]}) but the file loads"
        where = f.singles[bad][1]
        if f.suffix == ".parquet":
            assert str(got).startswith(f"{path} row {where}: "), (str(got)[:300], where)
        else:
            assert got.line == where, (str(got)[:300], where)
        assert got.field == alone[bad].field, (str(got)[:300], str(alone[bad])[:300])
        assert _tail(got) == _tail(alone[bad])
        return outcome


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", KINDS)
def test_structured_files(kind, suffix):
    @fuzz(12, share=len(SUFFIXES))
    @given(f=structured(kind, suffix))
    def run(f):
        check_file(f, kind, "structured")

    run()


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_files(kind, suffix):
    @fuzz(6, share=len(SUFFIXES))
    @given(f=damaged(kind, suffix))
    def run(f):
        check_file(f, kind, "damaged")

    run()


def _parquet_of(**columns) -> bytes:
    return _parquet_bytes(pa.table(columns))


# What the fuzzing found, kept as fixed inputs so each stays checked whatever the random draws (each raised
# something other than DataError, or a DataError without its line, before the fix in alignkit/data/formats.py)
FOUND = {
    "long-integer": ("sft", "DataError", Fuzzed(".jsonl", b'{"text": "ok"}\n{"text": ' + b"9" * 5000 + b"}\n", [
        (b'{"text": "ok"}\n', 1), (b'{"text": ' + b"9" * 5000 + b"}\n", 2)])),
    "deep-nesting": ("sft", "DataError", Fuzzed(".json", b'[{"text": "ok"},\n' + b"[" * 50_000 + b"]" * 50_000 + b"]")),
    "csv-cell-over-128k": ("sft", "loaded", Fuzzed(".csv", b'text\n"' + b"x" * 200_000 + b'"\n')),
    "csv-row-over-lines": ("sft", "DataError", Fuzzed(".csv", b'text,n\nok,1\n,"a\nb"\n', [
        (b"text,n\nok,1\n", 2), (b'text,n\n,"a\nb"\n', 3)])),
    "not-utf8": ("sft", "DataError", Fuzzed(".jsonl", b'{"text": "ok"}\r\n{"text": "caf\xe9"}\r\n')),
    "lone-surrogate": ("sft", "DataError", Fuzzed(".jsonl", b'{"text": "a\\ud800"}\n')),
    "surrogate-in-step": ("stepwise", "DataError", Fuzzed(
        ".json", b'[{"prompt": "p", "steps": ["a", "b\\ud800"], "labels": [1, 0]}]')),
    "margin-over-float": ("preference", "DataError", Fuzzed(
        ".csv", b"prompt,chosen,rejected,margin\np,a,b,1" + b"0" * 400 + b"\n")),
    "parquet-date": ("prompt", "DataError", Fuzzed(".parquet", _parquet_of(
        prompt=["a", "b"], when=pa.array([0, 2**31 - 1], pa.int32()).cast(pa.date32())))),
}


@pytest.mark.parametrize("name", FOUND)
def test_found_by_fuzzing(name):
    kind, outcome, f = FOUND[name]
    assert check_file(f, kind, "found") == outcome


# one valid row per kind, with its longest text field, to blow up to megabytes
BIG_ROWS = {
    "sft": ({"text": None}, "text"),
    "preference": ({"prompt": "q", "chosen": None, "rejected": "no"}, "chosen"),
    "unpaired": ({"prompt": None, "completion": "a", "label": True}, "prompt"),
    "prompt": ({"prompt": None, "answer": "4"}, "prompt"),
    "stepwise": ({"prompt": "q", "steps": ["a", None], "labels": [1, 0]}, "steps"),
    "belief": ({"prompt": "q", "beliefs": {"a": 0.5, "b": 0.5}, "belief": "a", "chosen": None, "rejected": "no"}, "chosen"),
}


@given(
    kind=st.sampled_from(KINDS), suffix=st.sampled_from(SUFFIXES), megabytes=st.integers(1, 5),
    unit=st.sampled_from(["x", "\u00e9", "\U0001f600", "\u202e\u200b", "a\r\n", "\\", '"', ","]),
    where=st.sampled_from(["field", "extra", "garbage"]),
)
@fuzz(6, cap=60)
def test_huge_fields(kind, suffix, megabytes, unit, where):
    """1-5 MB strings: in a text field (loads), an unused column (loads), a wrongly typed field (DataError)."""
    big = unit * (megabytes * 1_000_000 // len(unit.encode()))
    row, key = json.loads(json.dumps(BIG_ROWS[kind][0])), BIG_ROWS[kind][1]
    if where == "field" and key == "steps":
        row["steps"][1] = big
    elif where == "field":
        row[key] = big
    elif where == "extra":
        row[key] = "fill" if key != "steps" else ["a", "b"]
        row["notes"] = big
    else:
        row[key] = [[big]]  # a list where text belongs (also in CSV, where a cell like [...] is read as JSON)
    if key != "steps" and row.get(key) is None:
        row[key] = "fill"
    if suffix == ".parquet":
        data = _parquet_bytes(_table([row]))
    elif suffix == ".csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(list(row))
        writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in row.values()])
        data = out.getvalue().encode()
    else:
        data = (json.dumps([row]) if suffix == ".json" else json.dumps(row, ensure_ascii=False) + "\n").encode()
    start = time.perf_counter()
    outcome = check_file(Fuzzed(suffix, data), kind, "huge")
    assert outcome == ("DataError" if where == "garbage" else "loaded")
    assert time.perf_counter() - start < 30  # linear, not quadratic


# ------------------------------------------------------------------------------------------- the CLI

CLI_METHOD = {
    "sft": ["sft"], "preference": ["dpo"], "unpaired": ["dpo", "loss=kto"], "stepwise": ["rm", "process=true"],
    "prompt": ["grpo"], "belief": ["gdpo"],
}


class ModelLoaded(Exception):
    """Raised by the patched model loaders: the recipe got as far as loading a model."""


@contextlib.contextmanager
def no_model_loading():
    """Every way a recipe loads a model raises ModelLoaded."""
    import alignkit.models.loading
    import alignkit.models.reward
    import alignkit.recipes.common
    import alignkit.recipes.rl
    import alignkit.recipes.rm

    def refuse(*args, **kwargs):
        raise ModelLoaded

    targets = [
        (alignkit.models.loading, "load_model"), (alignkit.recipes.common, "load_model"),
        (alignkit.recipes.rl, "load_model"), (alignkit.models.reward, "load_reward_backbone"),
        (alignkit.recipes.rm, "load_reward_backbone"),
    ]
    with contextlib.ExitStack() as stack:
        for module, name in targets:
            stack.enter_context(mock.patch.object(module, name, refuse))
        yield


def run_cli(argv: list[str]) -> tuple[int, str]:
    from alignkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def _bad_data_is_caught_before_the_model(kind: str, f: Fuzzed):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "data" + f.suffix, f.data)
        # only inputs the loader rejects: the CLI must reject them too, without loading a model
        assume(isinstance(_load(path, kind), DataError))
        OUTCOMES[("cli", kind, f.suffix)]["DataError"] += 1
        argv = [*CLI_METHOD[kind], "model=tiny", f"data={path}", f"output_dir={tmp}/out", "max_steps=1",
                "progress=false"]
        with no_model_loading():
            rc, stderr = run_cli(argv)
        assert rc == 2, stderr[-2000:]
        assert "alignkit: error: " + path in stderr, stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_cli_rejects_bad_data_before_loading_a_model(kind):
    @fuzz(8, cap=200)
    @given(f=st.sampled_from(SUFFIXES).flatmap(lambda s: st.one_of(structured(kind, s), damaged(kind, s))))
    def run(f):
        _bad_data_is_caught_before_the_model(kind, f)

    run()


@given(f=jsonl_file("sft"))
@fuzz(8, cap=40)
def test_cli_sft_trains_or_rejects_any_rows(f):
    """The real CLI on fuzzed SFT rows, including ones that load: exit 0 (trained) or 2 (bad data), never 1."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "data.jsonl", f.data)
        loaded = _load(path, "sft")
        OUTCOMES[("cli-train", "sft", ".jsonl")]["DataError" if isinstance(loaded, DataError) else "loaded"] += 1
        rc, stderr = run_cli(["sft", "model=tiny", f"data={path}", f"output_dir={tmp}/out", "max_steps=1",
                              "progress=false", "batch_size=2", "max_length=64", "save_steps=0"])
        assert rc in (0, 2), stderr[-3000:]
        if isinstance(loaded, DataError):
            assert rc == 2 and str(loaded) in stderr
        if rc == 0:
            assert (Path(tmp) / "out" / "final").is_dir()


def test_cli_sft_on_odd_but_valid_text():
    """BOM, CRLF, emoji, RTL and zero-width characters, a JSON-escaped lone surrogate: 0 or 2, never 1."""
    rows = [{"text": "\u202eabc\u200b \U0001f44d\U0001f3fd e\u0301"}, {"prompt": "\u05e9", "completion": "\ufeffok"},
            {"messages": [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": "\u2028x"}]}]
    with tempfile.TemporaryDirectory() as tmp:
        good = _write(tmp, "good.jsonl", b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in rows).encode())
        bad = _write(tmp, "bad.jsonl", b'{"text": "fine"}\r\n{"text": "a\\ud800b"}\r\n')
        common = ["model=tiny", "max_steps=1", "progress=false", "save_steps=0"]
        rc, stderr = run_cli(["sft", f"data={good}", f"output_dir={tmp}/good", *common])
        assert rc == 0, stderr[-3000:]
        with no_model_loading():
            rc, stderr = run_cli(["sft", f"data={bad}", f"output_dir={tmp}/bad", *common])
        assert rc == 2 and f"{bad}:2: field 'text'" in stderr, stderr[-3000:]


# ------------------------------------------------------------------------------------------ reporting


def outcome_table() -> str:
    per_kind: dict[str, Counter] = defaultdict(Counter)
    lines = [f"{'test':<11} {'kind':<11} {'file':<9} {'inputs':>7} {'loaded':>7} {'DataError':>9}"]
    for (test, kind, suffix), counts in sorted(OUTCOMES.items()):
        total = sum(counts.values())
        lines.append(f"{test:<11} {kind:<11} {suffix:<9} {total:>7} {counts['loaded']:>7} {counts['DataError']:>9}")
        per_kind[kind].update(counts)
    lines.append("per kind (all tests):")
    for kind, counts in sorted(per_kind.items()):
        lines.append(f"  {kind:<11} {sum(counts.values()):>7} inputs: {counts['loaded']:>6} loaded, "
                     f"{counts['DataError']:>6} DataError, 0 other")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes(request):
    yield
    if FUZZ:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\nFUZZ_EXAMPLES={FUZZ}\n{outcome_table()}")


if __name__ == "__main__":
    # Standalone: every property with FUZZ_EXAMPLES examples (the CLI training runs stay few), then the table.
    start = time.perf_counter()
    test_every_kind_has_a_record_type()
    for kind in KINDS:
        for suffix in SUFFIXES:
            test_structured_files(kind, suffix)
            test_damaged_files(kind, suffix)
    test_huge_fields()
    for name in FOUND:
        test_found_by_fuzzing(name)
    for kind in KINDS:
        test_cli_rejects_bad_data_before_loading_a_model(kind)
    test_cli_sft_trains_or_rejects_any_rows()
    test_cli_sft_on_odd_but_valid_text()
    print(f"FUZZ_EXAMPLES={FUZZ}, {time.perf_counter() - start:.0f} s; any other exception would have stopped the run")
    print(outcome_table())
