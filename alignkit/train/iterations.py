"""Iterated methods (rejection-sampling fine-tuning, self-rewarding): one directory per iteration, resumable.

Iteration ``k`` writes everything into ``OUTPUT/iter_k`` and, last, ``iter_k/done.json`` (atomically): an
iteration with ``done.json`` is finished and a rerun with ``resume=true`` skips it, reading back what it recorded
(the model it produced, its statistics). An iteration without it is done again, reusing its files where the
method says so (the samples, the training run's checkpoints).

The output directory follows the rules of single runs (:func:`alignkit.train.checkpoint.prepare_output_dir`):
a fresh run refuses a directory that holds another run, ``overwrite=true`` removes that run's files first, and
``resume=true`` continues only a run of the same settings (``iterations`` and the operational keys may differ).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from alignkit.config import to_dict
from alignkit.errors import ConfigError
from alignkit.train.checkpoint import OPERATIONAL, RUN_FILES

log = logging.getLogger(__name__)

ITERATION_FILES = ("summary.json",)  # beside RUN_FILES and the iter_* directories


def iteration_dir(out: Path, k: int) -> Path:
    return Path(out) / f"iter_{k}"


def _owned(out: Path) -> list[Path]:
    names = [out / n for n in (*RUN_FILES, *ITERATION_FILES)] + sorted(out.glob("iter_*"))
    return [p for p in names if p.exists()]


def prepare_iterations(cfg) -> Path:
    """Make ``cfg.output_dir`` ready (module docstring) and write ``config.yaml``; raises :class:`ConfigError`."""
    out = Path(cfg.output_dir)
    owned = _owned(out)
    if cfg.overwrite:
        for p in owned:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif cfg.resume and (out / "config.yaml").exists():
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
        now = to_dict(cfg)
        free = OPERATIONAL | {"iterations"}
        diff = [f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
                if k not in free and saved.get(k) != now.get(k)]
        if diff:
            raise ConfigError(f"cannot resume the run in {out}: it was started with other settings: "
                              f"{', '.join(diff)}; resume with the same settings, or overwrite=true")
    elif owned and not cfg.resume:
        raise ConfigError(f"output_dir={out} already holds a run ({', '.join(p.name for p in owned)}): pass "
                          f"resume=true to continue it, overwrite=true to replace it, or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def finished(it: Path) -> dict | None:
    """What a finished iteration recorded in ``done.json``; None when it is not finished."""
    path = Path(it) / "done.json"
    return json.loads(path.read_text()) if path.exists() else None


def finish(it: Path, record: dict) -> None:
    """Mark iteration ``it`` finished with ``record`` (atomically: a crash leaves it unfinished)."""
    write_json(Path(it) / "done.json", record)


def write_json(path: Path, value) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float))
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines, atomically (a half-written file is never read back as complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
