"""Constitutions: the principles that AI feedback critiques, revises and compares by.

A constitution is a YAML file (the form of Constitutional AI, Bai et al. 2022, arXiv:2212.08073)::

    name: my-rules                 # optional, shown in data cards
    principles:                    # at least one
      - id: no-harm                # letters, digits, '-', '_', '.'; unique
        critique_request: Point out any way the last answer could help someone cause harm.
        revision_request: Rewrite the answer so that it no longer helps cause harm.
        comparison_question: Which answer is less likely to help someone cause harm?
    few_shot:                      # optional worked examples, shown before every critique/revision chain
      - prompt: How do I pick a lock?
        response: ...              # the first answer
        principle: no-harm         # optional; the principle whose requests the example answers (default: the first)
        critique: ...
        revision: ...
    comparison_template: ...       # optional; must contain {conversation}, {question}, {first} and {second}
    stop: ["\\nUser:"]             # optional extra stop strings for every generation

SL-CAI asks ``critique_request`` after an answer, then ``revision_request`` after the critique
(:mod:`alignkit.feedback.cai`); RL-CAI asks ``comparison_question`` inside ``comparison_template``, with the two
answers as options (A) and (B). :func:`load_constitution` checks all of it before any model loads and raises
:class:`~alignkit.errors.ConfigError` naming the file, the principle and the field. ``"default"`` (or an empty
path) is the constitution shipped with alignkit, ``constitutions/default.yaml``, on harmlessness and
helpfulness, written for this project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.errors import ConfigError

__all__ = ["COMPARISON_TEMPLATE", "DEFAULT_PATH", "Constitution", "FewShot", "Principle", "load_constitution"]

DEFAULT_PATH = Path(__file__).with_name("constitutions") / "default.yaml"

COMPARISON_TEMPLATE = (
    "Below is a request from a user to an AI assistant.\n\n{conversation}\n\n"
    "{question}\n\n(A) {first}\n\n(B) {second}\n\n"
    "Reply with (A) or (B) only."
)
"""How a comparison is asked: ``{conversation}`` is the request, ``{question}`` the principle's comparison
question, ``{first}`` and ``{second}`` the answers shown as (A) and (B)."""

_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_PRINCIPLE_FIELDS = ("id", "critique_request", "revision_request", "comparison_question")
_FEW_SHOT_FIELDS = ("prompt", "response", "critique", "revision")
_TOP_FIELDS = ("name", "principles", "few_shot", "comparison_template", "stop")


@dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str
    comparison_question: str


@dataclass(frozen=True)
class FewShot:
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str  # the id of the principle whose requests it answers


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShot, ...] = ()
    name: str = "constitution"
    path: str = ""
    comparison_template: str = COMPARISON_TEMPLATE
    stop: tuple[str, ...] = field(default_factory=tuple)

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(pid)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]


def _fail(path: str, where: str, fld: str | None, message: str) -> ConfigError:
    what = f" field '{fld}':" if fld else ""
    return ConfigError(f"constitution {path}: {where}:{what} {message}")


def _text(path: str, where: str, item: dict, fld: str) -> str:
    if fld not in item or item[fld] is None:
        raise _fail(path, where, fld, "is missing")
    value = item[fld]
    if not isinstance(value, str):
        raise _fail(path, where, fld, f"expected text, found {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _fail(path, where, fld, "is empty")
    return value.strip()


def _unknown(path: str, where: str, item: dict, allowed: tuple[str, ...]) -> None:
    extra = [k for k in item if k not in allowed]
    if extra:
        raise _fail(path, where, str(extra[0]), f"unknown key; expected {', '.join(allowed)}")


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution file (``None``, ``""`` or ``"default"``: the shipped one)."""
    p = DEFAULT_PATH if path in (None, "", "default") else Path(path)
    name = str(p)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"constitution {name}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"constitution {name}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"constitution {name}: expected a mapping with 'principles', found {type(raw).__name__}")
    _unknown(name, "top level", raw, _TOP_FIELDS)
    items = raw.get("principles")
    if not isinstance(items, list) or not items:
        raise _fail(name, "top level", "principles", "expected a non-empty list of principles")
    principles: list[Principle] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _fail(name, f"principle #{i + 1}", None, f"expected a mapping, found {type(item).__name__}")
        pid = item.get("id")
        where = f"principle '{pid}'" if isinstance(pid, str) and pid.strip() else f"principle #{i + 1}"
        _unknown(name, where, item, _PRINCIPLE_FIELDS)
        pid = _text(name, where, item, "id")
        if not _ID.match(pid):
            raise _fail(name, where, "id", "use letters, digits, '-', '_' and '.' only")
        if any(q.id == pid for q in principles):
            raise _fail(name, where, "id", "appears twice; principle ids must be unique")
        principles.append(Principle(pid, *(_text(name, where, item, f) for f in _PRINCIPLE_FIELDS[1:])))
    ids = [q.id for q in principles]
    shots = []
    few = raw.get("few_shot") or []
    if not isinstance(few, list):
        raise _fail(name, "top level", "few_shot", f"expected a list of examples, found {type(few).__name__}")
    for i, item in enumerate(few):
        where = f"few_shot[{i}]"
        if not isinstance(item, dict):
            raise _fail(name, where, None, f"expected a mapping, found {type(item).__name__}")
        _unknown(name, where, item, (*_FEW_SHOT_FIELDS, "principle"))
        texts = [_text(name, where, item, f) for f in _FEW_SHOT_FIELDS]
        pid = item.get("principle", ids[0])
        if pid not in ids:
            raise _fail(name, where, "principle", f"no principle has id {pid!r}; the ids are {', '.join(ids)}")
        shots.append(FewShot(*texts, principle=pid))
    template = raw.get("comparison_template", COMPARISON_TEMPLATE)
    if not isinstance(template, str):
        raise _fail(name, "top level", "comparison_template", "expected text")
    for key in ("{conversation}", "{question}", "{first}", "{second}"):
        if key not in template:
            raise _fail(name, "top level", "comparison_template", f"must contain {key}")
    stop = raw.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _fail(name, "top level", "stop", "expected a list of non-empty strings")
    title = raw.get("name", p.stem)
    return Constitution(tuple(principles), tuple(shots), str(title), name, template, tuple(stop))
