"""Reading training data and turning each row into a validated, canonical record.

Sources: a ``.jsonl``, ``.json`` (an array of objects, or JSON lines), ``.parquet`` or ``.csv`` file, or a
Hugging Face ``datasets`` name (``name`` or ``name:split``, default split ``train``). Files are read here rather
than through ``datasets`` because errors must name the physical line of a bad row, which ``datasets`` does not
keep; Parquet files and hub datasets, which have no lines, are located by ``row N`` (0-based, as ``ds[N]``).

Row formats use TRL's field names, so data is used unchanged. ``Text`` is a string or a list of messages
``{"role", "content"}`` (role: system, user, assistant or tool):

* SFT: ``messages`` (with at least one assistant message) | ``prompt``/``completion`` | ``text``. Messages and
  prompt/completion rows may carry thinking (reasoning models, :mod:`alignkit.data.thinking`): an assistant
  message's ``reasoning_content`` beside its ``content``, or inline ``<think>...</think>`` text opening its content
  or a plain completion string, or an R1-style prefill (a string prompt ending with ``<think>``, the completion
  the rest of the thinking, then ``</think>`` and the answer). An optional ``mode`` column (``think`` or
  ``no_think``) states the example's mode; without it non-empty reasoning means think. See "Thinking" below.
* Preference: ``prompt``/``chosen``/``rejected`` (optional numeric ``margin``, and ``soft_label`` in [0, 1], the
  probability that ``chosen`` is the better response, as ``alignkit cai stage=label`` writes it) |
  ``chosen``/``rejected`` with an implicit prompt | ranking ``prompt``/``responses``/``ranking``.
* Unpaired (KTO): ``prompt``/``completion``/``label``; preference rows are accepted too, each pair giving a
  desirable (chosen) and an undesirable (rejected) example.
* Prompt-only (RL, evaluation): ``prompt``, with every other column kept in ``extra`` (e.g. ``answer``).
* Stepwise (process reward models): ``prompt`` (a string), ``steps`` (a non-empty list of non-blank strings, the
  reasoning steps in order) and ``labels`` (one boolean or 0/1 per step: is that step correct).
* Belief (GDPO): ``prompt``, ``beliefs`` (an object: belief -> the group's share, shares summing to 1 within
  0.01) and either ``pairs`` (a list of ``{belief, chosen, rejected}``, optional ``rejected_belief``: the stance
  the rejected response takes) or one pair per row as ``belief``/``chosen``/``rejected``; or the
  GlobalOpinionQA-derived layout of the GDPO paper's data: ``prompt`` (optional ``context`` before it),
  ``options`` (a list, or its Python ``repr`` as GlobalOpinionQA ships it), ``probabilities`` (one share per
  option), ``accept_choice``/``accept_response`` (the annotator's belief and the response consistent with it),
  ``reject_response`` (one that is not; optional ``reject_choice``, and ``accept_choice_id``/``reject_choice_id``,
  an option's index from 0 or 1, checked against the text). Rows of the same prompt must give the same beliefs
  and shares.

Implicit prompt (``chosen``/``rejected`` without ``prompt``), as TRL's ``extract_prompt`` does it: for message
lists the prompt is the longest common prefix of whole messages; for strings it is the longest common character
prefix, except that a space just before the point where they differ stays with the responses
(``"Q: 2+2? A: 4"`` / ``"Q: 2+2? A: 5"`` -> prompt ``"Q: 2+2? A:"``, responses ``" 4"`` / ``" 5"``). The
character rule can cut inside a word when both responses start alike; give a ``prompt`` column to avoid it.

Thinking (SFT rows): inline thinking is moved into the reasoning field (``reasoning_content`` of the message, the
record's ``reasoning`` for a string completion), the reasoning stripped of surrounding whitespace and the answer
left in ``content`` / ``completion``. A row is a thinking row when it has a ``mode`` or any of its trained turns has
reasoning (``""`` included); then every trained assistant turn gets a reasoning string, ``""`` where it has none
(rendered as the empty block ``<think>\n\n</think>\n\n`` before the answer: Qwen3's no-think form). Errors
(naming the field): a ``mode`` other than think/no_think; ``mode=think`` with a trained turn without reasoning, or
``mode=no_think`` with one that has some; a ``<think>`` block never closed, two blocks, text before the block, or
both inline thinking and ``reasoning_content`` in one message; markers inside ``reasoning_content``; reasoning on
a message that is not the assistant's; a blank answer after the thinking; a prefill prompt whose completion
does not close the block. Rows without thinking are read exactly as before.

In every record, ``origin`` says where the row came from and ``extra`` holds the columns the format did not use.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.thinking import (MODES, REASONING_KEY, THINK_CLOSE, THINK_OPEN, has_thinking, mode_of,
                                    opens_thinking, split_thinking)
from alignkit.errors import DataError

Message = dict[str, str]
Text = str | list[Message]
ROLES = ("system", "user", "assistant", "tool")
KINDS = ("sft", "preference", "unpaired", "prompt", "stepwise", "belief")
SHARE_TOLERANCE = 0.01  # how far from 1 a belief distribution may sum (it is then renormalised)
_KEEP_SKIPPED = 5  # how many skipped-row messages LoadedData keeps


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Origin:
    """Where a row came from: ``line`` is the 1-based line in a text file (None for Parquet and hub datasets);
    ``row`` is the 0-based index of the row in the source."""

    path: str
    line: int | None
    row: int

    def error(self, message: str, field: str | None = None) -> DataError:
        """A DataError located at this row: ``path:line:`` for text files, ``path row N:`` otherwise."""
        if self.line is not None:
            return DataError(message, path=self.path, line=self.line, field=field)
        err = DataError(message, path=f"{self.path} row {self.row}", field=field)
        err.path = self.path  # the text names the row; the attribute stays the plain path
        return err


@dataclass(frozen=True)
class SFTExample:
    """One supervised example in exactly one shape: ``messages`` (loss on assistant turns), ``prompt`` +
    ``completion`` (loss on the completion), or ``text`` (loss on all of it). The other fields are None.

    Thinking: the assistant messages' ``reasoning_content``, or ``reasoning`` beside a string ``completion``
    (None: no thinking block; ``""``: an empty one). ``mode``: ``think``, ``no_think`` or None (no thinking)."""

    prompt: Text | None
    completion: Text | None
    messages: list[Message] | None
    text: str | None
    origin: Origin
    extra: dict = field(default_factory=dict)
    reasoning: str | None = None
    mode: str | None = None

    def __post_init__(self):
        shapes = [self.messages is not None, self.completion is not None, self.text is not None]
        if sum(shapes) != 1 or (self.prompt is None) != (self.completion is None):
            raise ValueError("SFTExample needs exactly one of: messages, prompt + completion, text")
        if self.reasoning is not None and not isinstance(self.completion, str):
            raise ValueError("SFTExample.reasoning goes with a string completion (messages carry reasoning_content)")

    @property
    def shape(self) -> str:
        """``"messages"``, ``"prompt_completion"`` or ``"text"``."""
        if self.messages is not None:
            return "messages"
        return "text" if self.text is not None else "prompt_completion"


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred and a dispreferred response. ``group`` is shared by the pairs expanded from
    one ranking row (and unique otherwise), so a prompt's pairs can be kept together. ``soft_label``: the
    probability that ``chosen`` is better (None: a hard label, probability 1)."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None
    group: int
    origin: Origin
    extra: dict = field(default_factory=dict)
    soft_label: float | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt and one response labelled desirable (True) or undesirable (False), as KTO uses."""

    prompt: Text
    completion: Text
    label: bool
    origin: Origin
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptExample:
    """A prompt alone, for RL rollouts and evaluation; columns such as ``answer`` are in ``extra``."""

    prompt: Text
    origin: Origin
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepwiseExample:
    """A prompt and a solution split into reasoning steps, each labelled correct (True) or not, for a process
    reward model (Lightman et al. 2023, arXiv:2305.20050). ``steps`` and ``labels`` have the same length."""

    prompt: str
    steps: list[str]
    labels: list[bool]
    origin: Origin
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BeliefExample:
    """A prompt whose group holds ``beliefs`` with shares ``target`` (summing to 1), and one annotator's pair
    conditioned on a belief: given ``belief``, ``chosen`` (consistent with it) is preferred to ``rejected``.
    ``rejected_belief``: the belief the rejected response expresses, when known (pooled DPO pairs need it).
    ``group``: shared by every pair of one prompt, so a prompt's pairs stay on one side of a split."""

    prompt: Text
    beliefs: tuple[str, ...]
    target: tuple[float, ...]
    belief: str
    chosen: str
    rejected: str
    rejected_belief: str | None
    group: int
    origin: Origin
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedData:
    """The records read from a source, with counts of rows read and skipped."""

    examples: list
    n_rows: int
    n_skipped: int
    skipped: list[str]  # the messages of the first skipped rows
    source: str = ""
    kind: str = ""


# ---------------------------------------------------------------------------------------- reading rows

# A row is either a dict or the DataError that made it unusable; the loader decides whether to skip it.
_Rows = Iterator[tuple[Origin, "dict | DataError"]]
_JSON_WS = re.compile(r"[ \t\n\r]*")


def read_rows(source: str) -> Iterator[tuple[Origin, dict]]:
    """Yield ``(origin, row)`` for each raw row of ``source``; a malformed row raises DataError."""
    for origin, row in _scan(source):
        if isinstance(row, DataError):
            raise row
        yield origin, row


def _scan(source: str) -> _Rows:
    readers: dict[str, Callable[[str], _Rows]] = {
        ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv,
    }
    suffix = Path(source).suffix.lower()
    if suffix in readers:
        return readers[suffix](source)
    if os.path.isfile(source):
        raise DataError(f"unknown file extension {suffix!r}; expected one of {', '.join(readers)}", path=source)
    return _read_hub(source)


@contextmanager
def _reading(path: str):
    """Turn failures to open or decode a file into a DataError naming it (and the line of a byte that is
    not UTF-8)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from exc


def _not_utf8(path: str, exc: UnicodeDecodeError) -> DataError:
    """The decoder only knows an offset in its current chunk, so find the first bad byte in the whole file;
    its line is counted as the readers count lines (``\r\n``, ``\r`` or ``\n``)."""
    try:
        data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        line = 1 + len(re.findall(rb"\r\n|\r|\n", data[: whole.start]))
        bad = data[whole.start : whole.end].hex(" ")
        return DataError(f"not UTF-8 text: {whole.reason} (bytes {bad})", path=path, line=line)
    except OSError:
        pass
    return DataError(f"cannot read file: not UTF-8 text ({exc})", path=path)


def _read_jsonl(path: str) -> _Rows:
    with _reading(path), open(path, encoding="utf-8-sig") as f:
        yield from _json_lines(path, f)


def _read_json(path: str) -> _Rows:
    with _reading(path), open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        yield from _json_array(path, text)
    else:
        hint = " (a .json file must hold a JSON array of objects, or one object per line)"
        yield from _json_lines(path, io.StringIO(text), hint)


def _json_lines(path: str, lines: Iterable[str], hint: str = "") -> _Rows:
    """One JSON object per non-blank line; a malformed line is a bad row, not the end of the file."""
    row = 0
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        origin = Origin(path, line_no, row)
        row += 1
        try:
            value = json.loads(line)
        except _JSON_ERRORS as exc:
            yield origin, origin.error(f"malformed JSON: {_json_problem(exc)}{hint}")
            continue
        yield origin, _as_object(origin, value)


def _json_array(path: str, text: str) -> _Rows:
    """Elements of a top-level JSON array, each located on the line where it starts. A syntax error ends the
    file, since the rest of the array cannot be found reliably."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:  # positions only move forward, so lines are counted once
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, pos), pos
        return line

    def skip_space(pos: int) -> int:
        return _JSON_WS.match(text, pos).end()

    pos = skip_space(text.index("[") + 1)
    if text.startswith("]", pos):
        pos = skip_space(pos + 1)
    else:
        for row in itertools.count():
            origin = Origin(path, line_at(pos), row)
            try:
                value, pos = decoder.raw_decode(text, pos)
            except _JSON_ERRORS as exc:
                where = exc.lineno if isinstance(exc, json.JSONDecodeError) else line_at(pos)
                raise DataError(f"malformed JSON: {_json_problem(exc)}", path=path, line=where) from None
            yield origin, _as_object(origin, value)
            pos = skip_space(pos)
            if text.startswith(",", pos):
                pos = skip_space(pos + 1)
            elif text.startswith("]", pos):
                pos = skip_space(pos + 1)
                break
            else:
                message = "malformed JSON: expected ',' or ']' after an array element"
                raise DataError(message, path=path, line=line_at(pos))
    if pos < len(text):
        raise DataError("malformed JSON: unexpected content after the array", path=path, line=line_at(pos))


# Besides JSONDecodeError, json raises ValueError for an integer too long to convert and RecursionError for
# arrays or objects nested deeper than the interpreter's recursion limit.
_JSON_ERRORS = (ValueError, RecursionError)


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg.removesuffix(' at')} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deeply"
    return f"an integer has more than {sys.get_int_max_str_digits()} digits"


def _as_object(origin: Origin, value: Any) -> dict | DataError:
    if isinstance(value, dict):
        return value
    return origin.error(f"expected a JSON object per row, found {_found(value)}")


# csv refuses fields over 128 KiB by default; JSON lines have no such limit, so neither do CSV files here.
_CSV_FIELD_LIMIT = 2**31 - 1


def _read_csv(path: str) -> _Rows:
    """CSV with a header (the first non-blank line); blank lines are skipped. A row is located at the line
    where it starts (a quoted cell may span lines). Empty cells are null; cells that look like JSON lists
    (e.g. messages) are parsed; ``label``, ``margin`` and ``soft_label`` cells are read as JSON scalars (true, 0,
    0.5) when they parse. When a column name repeats, its last cell wins (as for a repeated key in JSON)."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    with _reading(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        row = 0
        while True:
            start = reader.line_num + 1  # where the next row starts
            try:
                cells = next(reader, None)
            except csv.Error as exc:  # the reader cannot go on after this
                raise DataError(f"malformed CSV: {exc}", path=path, line=start) from None
            if cells is None:
                return
            if not cells:  # a blank line
                continue
            if header is None:
                header = cells
                continue
            origin = Origin(path, start, row)
            row += 1
            if len(cells) > len(header):
                yield origin, origin.error(f"row has {len(cells)} cells but the header has {len(header)} columns")
                continue
            values = dict(itertools.zip_longest(header, cells))  # missing trailing cells are null
            yield origin, {key: _csv_cell(key, value) for key, value in values.items()}


def _csv_cell(key: str, value: str | None) -> Any:
    if not value:
        return None
    stripped = value.strip()
    typed = key in ("label", "margin", "soft_label")
    if typed or (stripped.startswith("[") and stripped.endswith("]")):
        try:
            parsed = json.loads(stripped.lower() if typed else stripped)
        except _JSON_ERRORS:
            return value
        if typed or isinstance(parsed, list):
            return parsed
    return value


def _read_parquet(path: str) -> _Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    with _reading(path):
        try:
            for batch in pq.ParquetFile(path).iter_batches():
                try:
                    values = batch.to_pylist()
                except (ValueError, OverflowError, pa.ArrowException):  # e.g. a date Python cannot hold
                    values = [_parquet_row(batch, i, Origin(path, None, row + i)) for i in range(batch.num_rows)]
                for value in values:
                    yield Origin(path, None, row), value
                    row += 1
        except pa.ArrowException as exc:
            raise DataError(f"cannot read Parquet file: {exc}", path=path) from exc


def _parquet_row(batch, i: int, origin: Origin) -> dict | DataError:
    """Row ``i`` of a batch that did not convert as a whole: the row, or an error naming its bad column."""
    import pyarrow as pa

    row = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            row[name] = column[i].as_py()
        except (ValueError, OverflowError, pa.ArrowException) as exc:
            return origin.error(f"cannot convert the {column.type} value to Python: {exc}", name)
    return row


def _read_hub(source: str) -> _Rows:
    """A Hugging Face dataset, ``name`` or ``name:split`` (default split ``train``)."""
    name, _, split = source.partition(":")
    split = split or "train"
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many unrelated types (network, missing config, bad split)
        raise DataError(
            f"not a .jsonl/.json/.parquet/.csv file, and loading it as Hugging Face dataset {name!r} "
            f"(split {split!r}) failed: {type(exc).__name__}: {exc}",
            path=source,
        ) from exc
    for row, value in enumerate(dataset):
        yield Origin(source, None, row), dict(value)


# ------------------------------------------------------------------------------------- field validators


class _RowError(Exception):
    """A bad field; the loader adds the row's location."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _found(value: Any) -> str:
    """How a found value is described in errors: its JSON type, and the value itself when short."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
    name = "null" if value is None else names.get(type(value), type(value).__name__)
    if isinstance(value, (str, int, float)) and len(repr(value)) <= 40:
        return f"{name} {value!r}"
    return f"an empty {name}" if value in ([], {}) else name


_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(value: Any, field: str, *, response: bool = False) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, found {_found(value)}")
    if response and not value.strip():
        raise _RowError(field, "empty response: expected non-blank text")
    return _unicode(value, field)


def _unicode(value: str, field: str) -> str:
    """Text a tokenizer will see must be valid Unicode. Only a JSON escape such as ``"\\ud800"`` without its
    pair gets a lone surrogate this far; tokenizers reject it with a TypeError far from the data."""
    bad = _SURROGATE.search(value)
    if bad:
        message = f"not valid Unicode: a lone surrogate {bad.group()!r} at character {bad.start()}"
        raise _RowError(field, f"{message} (a JSON \\u escape of half a pair)")
    return value


def _messages(value: Any, field: str, *, response: bool = False) -> list[Message]:
    """A non-empty list of messages. A response needs an assistant message, and no assistant message may be
    blank. Keys besides role and content (e.g. ``tool_calls``) are kept unless null."""
    if not isinstance(value, list) or not value:
        raise _RowError(field, f"expected a non-empty list of messages, found {_found(value)}")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _RowError(where, f"expected a message {{'role': ..., 'content': ...}}, found {_found(message)}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                found = f"found keys {sorted(message)}"
                raise _RowError(f"{where}.{key}", f"is missing; a message needs 'role' and 'content', {found}")
        role = message["role"]
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"unknown role {_found(role)}; expected one of {', '.join(ROLES)}")
        content = _string(message["content"], f"{where}.content", response=response and role == "assistant")
        kept = {**{k: v for k, v in message.items() if v is not None}, "role": role, "content": content}
        if kept.get(REASONING_KEY) is not None:
            kept[REASONING_KEY] = _reasoning(kept[REASONING_KEY], role, f"{where}.{REASONING_KEY}")
        messages.append(kept)
    if response and not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise _RowError(field, f"expected at least one assistant message, found roles: {roles}")
    return messages


def _reasoning(value: Any, role: str, field: str) -> str:
    """A message's ``reasoning_content``: an assistant's string without thinking markers, stripped."""
    if role != "assistant":
        raise _RowError(field, f"only assistant messages carry reasoning, this one is {role!r}")
    reasoning = _string(value, field)
    if has_thinking(reasoning):
        raise _RowError(field, f"holds a {THINK_OPEN} or {THINK_CLOSE} marker; give the reasoning without them")
    return reasoning.strip()


def _inline(text: str, field: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a response that may open with inline thinking: ``<think>r</think>a``, or
    ``r</think>a`` (an R1-style continuation: the prompt opened the block). ``(None, text)`` without markers."""
    if not has_thinking(text):
        return None, text
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if opens > 1 or closes > 1:
        raise _RowError(field, f"holds more than one thinking block ({opens} {THINK_OPEN}, {closes} {THINK_CLOSE}); "
                               "expected one, opening the response")
    if opens and not closes:
        raise _RowError(field, f"opens a {THINK_OPEN} block that is never closed with {THINK_CLOSE} (a cut trace?)")
    if opens and not text.lstrip().startswith(THINK_OPEN):
        raise _RowError(field, f"has text before its {THINK_OPEN} block; the thinking must open the response")
    if text.find(THINK_CLOSE) < text.find(THINK_OPEN):
        raise _RowError(field, f"closes a thinking block with {THINK_CLOSE} before opening one")
    return split_thinking(text)


def _check_mode(value: Any, reasonings: list[tuple[str, str | None]]) -> tuple[str | None, list[str | None]]:
    """The example's mode and each trained turn's reasoning (``(field, reasoning)`` pairs) under the mode
    rules of the module docstring: a thinking row gives every turn a string, ``""`` where it has none."""
    if value is not None and value not in MODES:
        raise _RowError("mode", f"expected one of {', '.join(MODES)}, found {_found(value)}")
    if value is None and all(r is None for _, r in reasonings):
        return None, [None] * len(reasonings)
    out = []
    for where, reasoning in reasonings:
        reasoning = reasoning or ""
        if value is not None and mode_of(reasoning) != value:
            has = "has reasoning" if reasoning else "has no reasoning"
            raise _RowError(where, f"{has}, but the row's mode is {value}")
        out.append(reasoning)
    return value or ("think" if any(out) else "no_think"), out


def _thinking_turns(messages: list[Message], field: str, mode: Any) -> tuple[list[Message], str | None]:
    """Messages with inline thinking moved into ``reasoning_content`` and the mode rules applied to the
    assistant turns (all of them are trained on)."""
    turns, answers = [], {}
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        where = f"{field}[{i}]"
        inline, answers[i] = _inline(m["content"], f"{where}.content")
        if inline is not None and m.get(REASONING_KEY) is not None:
            raise _RowError(f"{where}.content", f"has a {THINK_OPEN} block and the message has {REASONING_KEY} "
                                                "too; give the thinking once")
        if inline is not None and not answers[i].strip():
            raise _RowError(f"{where}.content", "empty answer after the thinking block: expected non-blank text")
        turns.append((i, f"{where}.{REASONING_KEY}" if inline is None else f"{where}.content",
                      m.get(REASONING_KEY, inline)))
    mode, reasonings = _check_mode(mode, [(where, r) for _, where, r in turns])
    if mode is None:
        return messages, None
    out = list(messages)
    for (i, _, _), reasoning in zip(turns, reasonings):
        out[i] = {**messages[i], "content": answers[i], REASONING_KEY: reasoning}
    return out, mode


def _thinking_completion(prompt: str, completion: str, mode: Any) -> tuple[str, str | None, str | None]:
    """``(answer, reasoning, mode)`` of a string completion: inline thinking, or the rest of a prefill's."""
    reasoning, answer = _inline(completion, "completion")
    if opens_thinking(prompt) and (reasoning is None or THINK_OPEN in completion):
        raise _RowError("completion", f"the prompt opens a thinking block (it ends with {THINK_OPEN}), so the "
                                      f"completion must continue the thinking and close it with {THINK_CLOSE} before "
                                      "the answer")
    if reasoning is not None and THINK_OPEN not in completion and not opens_thinking(prompt):
        raise _RowError("completion", f"closes a thinking block with {THINK_CLOSE} that neither it nor the prompt "
                                      f"opened (a prefill prompt ends with {THINK_OPEN})")
    if reasoning is not None and not answer.strip():
        raise _RowError("completion", "empty answer after the thinking block: expected non-blank text")
    mode, [reasoning] = _check_mode(mode, [("completion", reasoning)])
    return (completion if mode is None else answer), reasoning, mode


def _text(value: Any, field: str, *, response: bool = False) -> Text:
    """A string or a list of messages; a response must not be empty or blank."""
    if isinstance(value, list):
        return _messages(value, field, response=response)
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string or a list of messages, found {_found(value)}")
    return _string(value, field, response=response)


def _same_form(**texts: Text) -> None:
    """Prompt and responses must all be strings or all message lists (plain text vs chat template)."""
    (first, first_value), *rest = texts.items()
    for name, value in rest:
        if isinstance(value, str) != isinstance(first_value, str):
            mismatch = f"is {_form(value)} but {first} is {_form(first_value)}"
            raise _RowError(name, f"{mismatch}; use one form for all of {', '.join(texts)}")


def _form(text: Text) -> str:
    return "a string" if isinstance(text, str) else "a list of messages"


def _distinct(chosen: Text, rejected: Text) -> None:
    if chosen == rejected:
        raise _RowError("rejected", "is identical to chosen; a preference pair needs two different responses")


def _finite(value: Any, field: str) -> float | None:
    """An optional finite number, such as a pair's ``margin`` (null: None)."""
    if value is None:
        return None
    try:  # float() of an integer past 1.8e308 raises OverflowError
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _RowError(field, f"expected a finite number, found {_found(value)}")
    return number


def _soft_label(value: Any) -> float | None:
    """An optional probability in [0, 1] that chosen is the better response (null: None, a hard label)."""
    number = _finite(value, "soft_label")
    if number is not None and not 0.0 <= number <= 1.0:
        raise _RowError("soft_label", f"expected a probability in [0, 1] that chosen is better, found {_found(value)}")
    return number


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise _RowError("label", f"expected a boolean (true/false or 0/1), found {_found(value)}")


def _steps(value: Any) -> list[str]:
    """A non-empty list of non-blank strings."""
    if not isinstance(value, list) or not value:
        raise _RowError("steps", f"expected a non-empty list of step strings, found {_found(value)}")
    for i, step in enumerate(value):
        if not isinstance(step, str):
            raise _RowError(f"steps[{i}]", f"expected a string, found {_found(step)}")
        if not step.strip():
            raise _RowError(f"steps[{i}]", "empty step: expected non-blank text")
        _unicode(step, f"steps[{i}]")
    return list(value)


def _step_labels(value: Any, n_steps: int) -> list[bool]:
    """One boolean (or 0/1) per step."""
    if not isinstance(value, list):
        raise _RowError("labels", f"expected a list of booleans, one per step, found {_found(value)}")
    if len(value) != n_steps:
        raise _RowError("labels", f"has {len(value)} labels but steps has {n_steps} entries; expected one per step")
    labels = []
    for i, label in enumerate(value):
        try:
            labels.append(_label(label))
        except _RowError as err:
            raise _RowError(f"labels[{i}]", err.message) from None
    return labels


def _ranks(value: Any, n_responses: int) -> list[int]:
    """A permutation of 1..K, one rank per response (1 = best)."""
    if not isinstance(value, list):
        raise _RowError("ranking", f"expected a list of integer ranks, found {_found(value)}")
    for i, rank in enumerate(value):
        if type(rank) is not int:
            raise _RowError(f"ranking[{i}]", f"expected an integer rank, found {_found(rank)}")
    if len(value) != n_responses:
        found = f"has {len(value)} ranks but responses has {n_responses} entries"
        raise _RowError("ranking", f"{found}; expected one rank per response")
    tied = [rank for rank, count in Counter(value).items() if count > 1]
    if tied:
        who = [i for i, rank in enumerate(value) if rank == tied[0]]
        raise _RowError("ranking", f"tie: rank {tied[0]} is given to responses {who}; ranks must differ, found {value}")
    missing = sorted(set(range(1, n_responses + 1)) - set(value))
    if missing:
        raise _RowError("ranking", f"gap: ranks must be 1..{n_responses} (1 = best), found {value}, missing {missing}")
    return value


def _split_shared_prefix(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) for rows without a prompt; see the module docstring for the rule."""
    limit = min(len(chosen), len(rejected))
    n = next((i for i in range(limit) if chosen[i] != rejected[i]), limit)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        message = "no prompt field, and chosen and rejected share no prefix to use as the prompt"
        raise _RowError("chosen", f"{message}; add a 'prompt' field")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if n == len(value):
            message = "empty response: all of it is shared with the other response, so nothing is left"
            raise _RowError(name, f"{message} once the implicit prompt is removed")
    return chosen[:n], chosen[n:], rejected[n:]


# --------------------------------------------------------------------------------------- row formats

Record = SFTExample | PreferenceExample | UnpairedExample | PromptExample | StepwiseExample | BeliefExample


@dataclass(frozen=True)
class _Format:
    name: str
    keys: tuple[str, ...]  # required; a row is in this format when all are present and not null
    parse: Callable[[dict, Origin, dict], list[Record]]  # (row, origin, extra) -> records
    optional: tuple[str, ...] = ()

    def used(self, key: str) -> bool:
        return key in self.keys or key in self.optional


def _sft_messages(row, origin, extra):
    messages, mode = _thinking_turns(_messages(row["messages"], "messages", response=True), "messages", row.get("mode"))
    return [SFTExample(None, None, messages, None, origin, extra, mode=mode)]


def _sft_prompt_completion(row, origin, extra):
    prompt = _text(row["prompt"], "prompt")
    completion = _text(row["completion"], "completion", response=True)
    _same_form(prompt=prompt, completion=completion)
    reasoning = None
    if isinstance(completion, list):
        completion, mode = _thinking_turns(completion, "completion", row.get("mode"))
    else:
        completion, reasoning, mode = _thinking_completion(prompt, completion, row.get("mode"))
    return [SFTExample(prompt, completion, None, None, origin, extra, reasoning, mode)]


def _sft_text(row, origin, extra):
    return [SFTExample(None, None, None, _string(row["text"], "text", response=True), origin, extra)]


def _explicit_pair(row, origin, extra):
    prompt = _text(row["prompt"], "prompt")
    chosen = _text(row["chosen"], "chosen", response=True)
    rejected = _text(row["rejected"], "rejected", response=True)
    _same_form(prompt=prompt, chosen=chosen, rejected=rejected)
    _distinct(chosen, rejected)
    return [_pair(row, prompt, chosen, rejected, origin, extra)]


def _implicit_pair(row, origin, extra):
    chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
    _same_form(chosen=chosen, rejected=rejected)
    _distinct(chosen, rejected)
    prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
    chosen, rejected = _text(chosen, "chosen", response=True), _text(rejected, "rejected", response=True)
    return [_pair(row, prompt, chosen, rejected, origin, extra)]


def _pair(row, prompt, chosen, rejected, origin, extra) -> PreferenceExample:
    """A pair row's record, with its optional ``margin`` and ``soft_label`` columns."""
    margin, soft_label = _finite(row.get("margin"), "margin"), _soft_label(row.get("soft_label"))
    return PreferenceExample(prompt, chosen, rejected, margin, origin.row, origin, extra, soft_label)


def _ranking_pairs(row, origin, extra):
    """All K(K-1)/2 pairs of a ranked row, ordered by the chosen response's rank, then the rejected one's."""
    prompt = _text(row["prompt"], "prompt")
    value = row["responses"]
    if not isinstance(value, list):
        raise _RowError("responses", f"expected a list of responses, found {_found(value)}")
    if len(value) < 2:
        raise _RowError("responses", f"expected at least 2 responses to rank, found {len(value)}")
    responses = [_text(r, f"responses[{i}]", response=True) for i, r in enumerate(value)]
    _same_form(prompt=prompt, **{f"responses[{i}]": r for i, r in enumerate(responses)})
    for i, j in ((i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))):
        if responses[i] == responses[j]:
            raise _RowError("responses", f"responses {i} and {j} are identical; ranked responses must differ")
    ranks = _ranks(row["ranking"], len(responses))
    best_first = [responses[i] for i in sorted(range(len(ranks)), key=ranks.__getitem__)]
    return [
        PreferenceExample(prompt, best_first[a], best_first[b], None, origin.row, origin, extra)
        for a in range(len(best_first))
        for b in range(a + 1, len(best_first))
    ]


def _unpaired(row, origin, extra):
    prompt = _text(row["prompt"], "prompt")
    completion = _text(row["completion"], "completion", response=True)
    _same_form(prompt=prompt, completion=completion)
    return [UnpairedExample(prompt, completion, _label(row["label"]), origin, extra)]


def _prompt_only(row, origin, extra):
    return [PromptExample(_text(row["prompt"], "prompt"), origin, extra)]


def _stepwise(row, origin, extra):
    prompt = _string(row["prompt"], "prompt")
    steps = _steps(row["steps"])
    return [StepwiseExample(prompt, steps, _step_labels(row["labels"], len(steps)), origin, extra)]


def _as_unpaired(parse_pairs):
    """Preference rows read for KTO: each pair gives its chosen as desirable and its rejected as undesirable.
    A pair's soft label stays in ``extra`` (KTO has no use for it, but a recipe can tell that the data had one)."""

    def parse(row, origin, extra):
        return [
            UnpairedExample(pair.prompt, response, label, origin,
                            extra if pair.soft_label is None else {**extra, "soft_label": pair.soft_label})
            for pair in parse_pairs(row, origin, extra)
            for response, label in ((pair.chosen, True), (pair.rejected, False))
        ]

    return parse


def _distribution(names: list, shares: list, field: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Beliefs (at least 2 distinct non-blank strings) and their shares (finite, >= 0, summing to 1 within
    ``SHARE_TOLERANCE``; renormalised to sum to 1 exactly)."""
    if len(names) < 2:
        raise _RowError(field, f"expected at least 2 beliefs, found {len(names)}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise _RowError(field, f"belief {i} must be a non-blank string, found {_found(name)}")
        _unicode(name, field)
    dup = next((n for n, c in Counter(names).items() if c > 1), None)
    if dup is not None:
        raise _RowError(field, f"belief {dup!r} is listed twice")
    values = []
    for name, share in zip(names, shares):
        number = _finite(share, f"{field}.{name}")
        if number is None or number < 0:
            raise _RowError(f"{field}.{name}", f"expected a share >= 0, found {_found(share)}")
        values.append(number)
    total = sum(values)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise _RowError(field, f"the shares sum to {total:.6g}; a distribution over beliefs must sum to 1 "
                               f"(within {SHARE_TOLERANCE})")
    return tuple(names), tuple(v / total for v in values)


def _beliefs(value: Any) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if not isinstance(value, dict):
        raise _RowError("beliefs", f"expected an object belief -> share, found {_found(value)}")
    return _distribution(list(value), list(value.values()), "beliefs")


def _known(value: Any, beliefs: tuple[str, ...], field: str) -> str:
    name = _string(value, field)
    if name not in beliefs:
        raise _RowError(field, f"unknown belief {name!r}; the prompt's beliefs are {list(beliefs)}")
    return name


def _belief_pair(prompt, beliefs, target, pair: dict, where: str, origin, extra) -> BeliefExample:
    for key in ("belief", "chosen", "rejected"):
        if pair.get(key) is None:
            raise _RowError(f"{where}{key}", f"is missing; a belief pair needs belief, chosen and rejected")
    belief = _known(pair["belief"], beliefs, f"{where}belief")
    chosen = _string(pair["chosen"], f"{where}chosen", response=True)
    rejected = _string(pair["rejected"], f"{where}rejected", response=True)
    if chosen == rejected:
        raise _RowError(f"{where}rejected", "is identical to chosen; a preference pair needs two different responses")
    other = pair.get("rejected_belief")
    other = None if other is None else _known(other, beliefs, f"{where}rejected_belief")
    return BeliefExample(prompt, beliefs, target, belief, chosen, rejected, other, origin.row, origin, extra)


def _belief_nested(row, origin, extra):
    prompt = _text(row["prompt"], "prompt")
    beliefs, target = _beliefs(row["beliefs"])
    pairs = row["pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise _RowError("pairs", f"expected a non-empty list of {{belief, chosen, rejected}}, found {_found(pairs)}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise _RowError(f"pairs[{i}]", f"expected an object {{belief, chosen, rejected}}, found {_found(pair)}")
    return [_belief_pair(prompt, beliefs, target, pair, f"pairs[{i}].", origin, extra) for i, pair in enumerate(pairs)]


def _belief_flat(row, origin, extra):
    prompt = _text(row["prompt"], "prompt")
    beliefs, target = _beliefs(row["beliefs"])
    return [_belief_pair(prompt, beliefs, target, row, "", origin, extra)]


def _options(value: Any) -> list:
    """GlobalOpinionQA's options: a list, or the Python repr of one (``"['Yes', 'No']"``, as it ships)."""
    if isinstance(value, str):
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise _RowError("options", f"expected a list of options (or its Python repr), found {_found(value)}") from None
    if not isinstance(value, (list, tuple)):
        raise _RowError("options", f"expected a list of options, found {_found(value)}")
    return list(value)


def _choice(row, text_key: str, id_key: str, options: tuple[str, ...]) -> str | None:
    """An option named by its text and/or its index (from 0 or 1); the two must agree."""
    text, idx = row.get(text_key), row.get(id_key)
    if text is not None:
        text = _known(text, options, text_key)
    if idx is None:
        return text
    if isinstance(idx, str) and idx.strip().isdigit():
        idx = int(idx)
    if type(idx) is not int:
        raise _RowError(id_key, f"expected an option index, found {_found(idx)}")
    fits = [options[i] for i in (idx, idx - 1) if 0 <= i < len(options)]
    if text is None:
        if len(fits) != 1 or (idx == 0) == (idx == len(options)):
            raise _RowError(id_key, f"cannot tell which of {list(options)} index {idx} names without {text_key}")
        return fits[0]
    if text not in fits:
        raise _RowError(id_key, f"index {idx} does not name {text!r} (counting from 0 or 1) in {list(options)}")
    return text


def _belief_opinionqa(row, origin, extra):
    prompt = _string(row["prompt"], "prompt")
    if row.get("context") is not None:
        prompt = _string(row["context"], "context").rstrip() + "\n\n" + prompt
    options = _options(row["options"])
    shares = row["probabilities"]
    if not isinstance(shares, list) or len(shares) != len(options):
        n = len(shares) if isinstance(shares, list) else _found(shares)
        raise _RowError("probabilities", f"expected one share per option ({len(options)}), found {n}")
    beliefs, target = _distribution(options, shares, "probabilities")
    pair = {"belief": _choice(row, "accept_choice", "accept_choice_id", beliefs),
            "chosen": row["accept_response"], "rejected": row["reject_response"],
            "rejected_belief": _choice(row, "reject_choice", "reject_choice_id", beliefs)}
    return [_belief_pair(prompt, beliefs, target, pair, "", origin, extra)]


def _same_beliefs(examples: list) -> list:
    """Every pair of one prompt must give the same beliefs and shares; pairs of one prompt share a ``group``
    (the row of its first pair)."""
    import dataclasses

    first: dict[str, BeliefExample] = {}
    out = []
    for ex in examples:
        key = json.dumps(ex.prompt, sort_keys=True)
        seen = first.setdefault(key, ex)
        if (ex.beliefs, ex.target) != (seen.beliefs, seen.target) and (
                ex.beliefs != seen.beliefs or max(abs(a - b) for a, b in zip(ex.target, seen.target)) > 1e-9):
            where = seen.origin.line if seen.origin.line is not None else f"row {seen.origin.row}"
            raise ex.origin.error(f"the same prompt has other beliefs or shares at {where}: "
                                  f"{dict(zip(seen.beliefs, seen.target))}", "beliefs")
        out.append(ex if ex.group == seen.group else dataclasses.replace(ex, group=seen.group))
    return out


_PAIR_OPTIONAL = ("margin", "soft_label")
_EXPLICIT = _Format("prompt/chosen/rejected", ("prompt", "chosen", "rejected"), _explicit_pair, _PAIR_OPTIONAL)
_IMPLICIT = _Format("chosen/rejected (implicit prompt)", ("chosen", "rejected"), _implicit_pair, _PAIR_OPTIONAL)

# Tried in order; the first whose keys are all present wins (e.g. ultrachat rows have both prompt and messages).
_FORMATS: dict[str, tuple[_Format, ...]] = {
    "sft": (
        _Format("messages", ("messages",), _sft_messages, ("mode",)),
        _Format("prompt/completion", ("prompt", "completion"), _sft_prompt_completion, ("mode",)),
        _Format("text", ("text",), _sft_text),
    ),
    "preference": (
        _Format("prompt/responses/ranking", ("prompt", "responses", "ranking"), _ranking_pairs),
        _EXPLICIT,
        _IMPLICIT,
    ),
    "unpaired": (
        _Format("prompt/completion/label", ("prompt", "completion", "label"), _unpaired),
        _Format(_EXPLICIT.name, _EXPLICIT.keys, _as_unpaired(_explicit_pair), _EXPLICIT.optional),
        _Format(_IMPLICIT.name, _IMPLICIT.keys, _as_unpaired(_implicit_pair), _IMPLICIT.optional),
    ),
    "prompt": (_Format("prompt", ("prompt",), _prompt_only),),
    "stepwise": (_Format("prompt/steps/labels", ("prompt", "steps", "labels"), _stepwise),),
    "belief": (
        _Format("prompt/beliefs/pairs", ("prompt", "beliefs", "pairs"), _belief_nested),
        _Format("prompt/beliefs/belief/chosen/rejected", ("prompt", "beliefs", "belief", "chosen", "rejected"),
                _belief_flat, ("rejected_belief",)),
        _Format("GlobalOpinionQA (prompt/options/probabilities/accept_choice/accept_response/reject_response)",
                ("prompt", "options", "probabilities", "accept_choice", "accept_response", "reject_response"),
                _belief_opinionqa, ("context", "accept_choice_id", "reject_choice", "reject_choice_id")),
    ),
}


def _parse_row(row: dict, origin: Origin, kind: str) -> list[Record]:
    formats = _FORMATS[kind]
    present = {key for key, value in row.items() if value is not None}
    for fmt in formats:
        if present.issuperset(fmt.keys):
            extra = {key: value for key, value in row.items() if not fmt.used(key)}
            try:
                return fmt.parse(row, origin, extra)
            except _RowError as err:
                raise origin.error(err.message, err.field) from None
    found = ", ".join(sorted(present)) or "none"
    closest = max(formats, key=lambda fmt: (len(present.intersection(fmt.keys)), -len(set(fmt.keys) - present)))
    if not present.intersection(closest.keys):
        expected = " | ".join(fmt.name for fmt in formats)
        raise origin.error(f"no recognised {kind} format: expected keys {expected}; found keys: {found}")
    missing = next(key for key in closest.keys if key not in present)
    state = "is null" if missing in row else "is missing"
    raise origin.error(f"{state}; a {closest.name} row needs {', '.join(closest.keys)}; found keys: {found}", missing)


# ------------------------------------------------------------------------------------------- loading


def load_examples(source: str, kind: str, *, skip_invalid: bool = False) -> LoadedData:
    """Read ``source`` and validate every row as ``kind`` (``"sft"``, ``"preference"``, ``"unpaired"``,
    ``"prompt"`` or ``"stepwise"``). A bad row raises DataError naming the file, line and field, unless ``skip_invalid``, in
    which case it is counted and skipped. An unreadable or empty source is always an error."""
    if kind not in _FORMATS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    loaded = LoadedData(examples=[], n_rows=0, n_skipped=0, skipped=[], source=source, kind=kind)
    for origin, row in _scan(source):
        loaded.n_rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            loaded.examples.extend(_parse_row(row, origin, kind))
        except DataError as err:
            if not skip_invalid:
                raise
            loaded.n_skipped += 1
            if len(loaded.skipped) < _KEEP_SKIPPED:
                loaded.skipped.append(str(err))
    if loaded.n_rows == 0:
        raise DataError("no rows: the source is empty", path=source)
    if not loaded.examples:
        raise DataError(f"all {loaded.n_rows} rows are invalid; the first: {loaded.skipped[0]}", path=source)
    if kind == "belief":
        loaded.examples = _same_beliefs(loaded.examples)
    return loaded


def soft_label(example) -> float | None:
    """A record's soft label: a pair's ``soft_label``, or the one a KTO example keeps in ``extra`` from the pair
    it came from (None: none)."""
    if isinstance(example, PreferenceExample):
        return example.soft_label
    return getattr(example, "extra", {}).get("soft_label")


_NOUNS = {
    "sft": ("SFT example", "SFT examples"),
    "preference": ("preference pair", "preference pairs"),
    "unpaired": ("unpaired example", "unpaired examples"),
    "prompt": ("prompt", "prompts"),
    "stepwise": ("stepwise example", "stepwise examples"),
    "belief": ("belief-conditioned pair", "belief-conditioned pairs"),
}


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n:,} {singular if n == 1 else plural}"


def describe(loaded: LoadedData) -> str:
    """One line for the log, e.g. ``1,234 preference pairs from data.jsonl (617 rows, 2 rows skipped)``."""
    notes = []
    used_rows = loaded.n_rows - loaded.n_skipped
    if used_rows != len(loaded.examples):
        notes.append(_count(used_rows, "row", "rows"))
    if loaded.n_skipped:
        notes.append(_count(loaded.n_skipped, "row", "rows") + " skipped")
    what = _count(len(loaded.examples), *_NOUNS.get(loaded.kind, ("example", "examples")))
    return f"{what} from {loaded.source}" + (f" ({', '.join(notes)})" if notes else "")
