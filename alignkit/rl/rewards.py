"""Reward-function plumbing for online RL: named rewards, user rewards, reward models, and a guarded set.

Interface
---------
A reward function is any callable ``fn(prompts, completions, **columns) -> list[float | None]``: one value
per completion, ``None`` where the reward does not apply (see :mod:`alignkit.rl.verifiable`). ``columns``
carries the data row's other fields (``answer``, ...) repeated once per completion, plus ``lengths`` (the
completion token counts) supplied by the trainer; a function takes what it needs and ignores the rest
through ``**_``.

Where rewards come from (:func:`load_reward_function`)
------------------------------------------------------
- a name in :data:`REWARD_FUNCTIONS` (``correctness``, ``format``, ``length``, ``overlong``, ``language``,
  ``l1_exact``, ``l1_max``, ``code``, ``code_share``), built once from a :class:`RewardContext` holding the
  trainer's settings (``code`` runs the completion's code in a sandbox: :mod:`alignkit.rl.code_reward`);
- ``rm:PATH``: a reward model trained by alignkit (``RewardScorer.load(PATH).score(prompts, completions)``,
  normalised and aspect-weighted as the model's ``alignkit_rm.json`` says); loaded on first use, once;
- ``package.module:function`` or ``path/to/file.py:function``: a user's function, imported.

Columns
-------
A function declares the data columns it reads as ``fn.columns`` (a tuple of names; the registry's entries do,
a user function may). The trainer checks them against every data row before any model is loaded, so a
missing ``answer`` column is an error naming the row, not a run in which no completion gets a reward.
``lengths`` and the thinking split of each completion (:data:`SUPPLIED_COLUMNS`: ``thinking_tokens``,
``answer_tokens``, ``reasoning`` and ``answer_text``, the text after the thinking block; :mod:`alignkit.rl.thinking`)
are supplied by the trainer (:func:`completion_columns`), not the data. The completion itself stays the whole
text, so rewards written before thinking see what they saw.

Group-aware rewards
-------------------
Most rewards score each completion on its own. A GROUP-AWARE reward compares completions that answer the
same prompt, so its value for one completion depends on the others of the call: ``length`` (Kimi k1.5
length control, 2501.12599) ranks each completion's length between the shortest and the longest of its
prompt's group. Such a function must see whole groups: the trainer passes a prompt's G completions in one
call, and when :class:`RewardSet` retries after an exception it retries prompt by prompt, never one
completion alone (which would make every length reward 0). A user function declares itself group-aware
with an attribute ``fn.group_aware = True``.

Failure handling (:class:`RewardSet`)
-------------------------------------
User code and reward models fail; an RL run must not. Each function is called on the whole batch in a
worker thread with a deadline of ``timeout`` seconds (per function, per batch, retries included):

- it raises -> it is called again per completion (per prompt group if group-aware), so only the
  completions that raise get ``None``;
- the deadline passes -> every completion not yet scored gets ``None``; the hung thread is abandoned (a
  daemon thread, never joined), so the step goes on;
- it returns the wrong number of values -> ``None`` for all completions of that call; a value that is not
  a finite real number (a string, NaN, inf) -> ``None`` for that entry.

An abandoned call may still be running when the next batch calls the same function, so a reward function
should be thread-safe (the built-in ones and ``rm:`` are). Each case counts in :attr:`RewardScores.failures` and logs ONE warning per function per batch naming the
function, the count and the first exception. ``None`` returned on purpose ("does not apply") is not a
failure.

Reward models on the run's device, sharded
------------------------------------------
A reward model (``rm:PATH``) is put where the policy computes by the context's ``place_model`` (the run's
device; under ``strategy=fsdp2`` sharded over the processes like the policy, so each holds 1/N of it). A
sharded forward is a collective, so every process must make the same number of them: such a function is
COLLECTIVE (``fn.collective``). The set calls it in the caller's thread, with no deadline and no retry (a
process cannot time out or retry alone while the others wait in a collective), and on every call, even one
with no completions on this process; its scorer agrees with the other processes on the number of batches
before the first and makes up the difference with filler passes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import numbers
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import ConfigError
from alignkit.rl import verifiable as V
from alignkit.rl.code_reward import CodeReward
from alignkit.rl.verifiable import RewardFn
from alignkit.train import dist, strategy

__all__ = [
    "REWARD_FUNCTIONS",
    "SUPPLIED_COLUMNS",
    "RewardContext",
    "RewardModelReward",
    "RewardScores",
    "RewardSet",
    "RewardSpec",
    "build_reward_set",
    "completion_columns",
    "get_reward",
    "load_reward_function",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardContext:
    """The trainer settings reward factories may need, passed once.

    ``max_new_tokens``: the generation limit L (DAPO overlong shaping); ``overlong_buffer``: its buffer B
    (penalty from ``L - B`` tokens on); ``language``: the target language of ``language`` (``en``/``zh``);
    ``timeout``: seconds one reward function may take on one batch (0 or less: no limit); ``place_model``:
    puts a loaded reward model where the run computes (its device, sharded under ``strategy=fsdp2``);
    ``l1_alpha``, ``l1_delta``: the coefficients of the L1/LCPO rewards ``l1_exact`` and ``l1_max``.
    """

    max_new_tokens: int = 1024
    overlong_buffer: int = 256
    language: str = "en"
    timeout: float = 30.0
    l1_alpha: float = 0.0003
    l1_delta: float = 0.5
    place_model: Callable[[Any], Any] | None = field(default=None, compare=False)  # a reward model, once loaded


@dataclass(frozen=True)
class RewardSpec:
    """A registry entry. ``factory(ctx)`` builds the reward function. ``columns``: the data columns it
    reads (besides prompts and completions). ``group_aware``: its value for a completion depends on the
    other completions to the same prompt in the call (see the module docstring)."""

    name: str
    factory: Callable[[RewardContext], RewardFn]
    columns: tuple[str, ...]
    group_aware: bool
    description: str


def _warmed(fn: RewardFn, *, group_aware: bool = False) -> RewardFn:
    """``fn`` with a ``warm_up()`` starting the sympy worker (its spawn is not charged to a reward timeout)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list:
        return fn(*args, **kwargs)

    wrapper.warm_up = V.warm_up_worker  # type: ignore[attr-defined]
    wrapper.group_aware = group_aware  # type: ignore[attr-defined]
    return wrapper


def _overlong(ctx: RewardContext) -> RewardFn:
    try:
        return V.make_overlong_reward(ctx.max_new_tokens, ctx.overlong_buffer)
    except ValueError as e:
        raise ConfigError(f"reward 'overlong': {e} (set overlong_buffer between 1 and max_new_tokens)") from None


def _code(share: bool) -> Callable[[RewardContext], RewardFn]:
    """The sandboxed code reward, finishing a batch just inside the RewardSet's deadline (alignkit.rl.code_reward)."""

    def factory(ctx: RewardContext) -> RewardFn:
        budget = ctx.timeout - max(1.0, 0.1 * ctx.timeout) if ctx.timeout and ctx.timeout > 0 else 0.0
        if ctx.timeout and ctx.timeout > 0 and budget < 1.0:
            raise ConfigError(f"reward 'code': reward_timeout={ctx.timeout} leaves no time to run code (use >= 2)")
        return CodeReward(share=share, budget=budget)

    return factory


def _language(ctx: RewardContext) -> RewardFn:
    try:
        return V.make_language_reward(ctx.language)
    except ValueError as e:
        raise ConfigError(f"reward 'language': {e}") from None


def _l1(mode: str) -> Callable[[RewardContext], RewardFn]:
    def factory(ctx: RewardContext) -> RewardFn:
        try:
            return _warmed(V.make_l1_reward(mode, ctx.l1_alpha, ctx.l1_delta))
        except ValueError as e:
            raise ConfigError(f"reward 'l1_{mode}': {e} (set l1_alpha)") from None

    return factory


REWARD_FUNCTIONS: dict[str, RewardSpec] = {
    s.name: s
    for s in (
        RewardSpec("code", _code(False), ("tests",), group_aware=False,
                   description="1 if the completion's code passes the 'tests' column in the sandbox, else 0"),
        RewardSpec("code_share", _code(True), ("tests",), group_aware=False,
                   description="share of the 'tests' column's asserts the completion's code passes (sandboxed)"),
        RewardSpec("correctness", lambda ctx: _warmed(V.correctness_reward), ("answer",), group_aware=False,
                   description="1 if the extracted final answer equals the 'answer' column, else 0"),
        RewardSpec("format", lambda ctx: V.format_reward, (), group_aware=False,
                   description="1 if the completion is <think>...</think><answer>...</answer>, else 0"),
        RewardSpec("length", lambda ctx: _warmed(V.length_control_reward, group_aware=True),
                   ("answer", "lengths"), group_aware=True,
                   description="Kimi k1.5 length control within each prompt's group, in [-0.5, 0.5]"),
        RewardSpec("overlong", _overlong, ("lengths",), group_aware=False,
                   description="DAPO overlong shaping: 0 up to L-B tokens, linear to -1 at L, -1 beyond"),
        RewardSpec("language", _language, (), group_aware=False,
                   description="share of the chain of thought written in the target language"),
        RewardSpec("l1_exact", _l1("exact"), ("answer", "budget", "lengths"), group_aware=False,
                   description="L1/LCPO-Exact: 1[correct] - l1_alpha * |budget - tokens|"),
        RewardSpec("l1_max", _l1("max"), ("answer", "budget", "lengths"), group_aware=False,
                   description="L1/LCPO-Max: 1[correct] * clip(l1_alpha * (budget - tokens) + l1_delta, 0, 1)"),
    )
}

SUPPLIED_COLUMNS = ("lengths", "thinking_tokens", "answer_tokens", "reasoning", "answer_text")
"""Columns the trainer passes to reward functions itself (not read from the data)."""


def completion_columns(completions: Sequence) -> dict[str, list]:
    """The :data:`SUPPLIED_COLUMNS` of rollout completions (:class:`alignkit.rl.rollout.Completion`), one entry
    each. ``answer_text``, not ``answer``: that name is the data's reference answer."""
    return {"lengths": [len(c.token_ids) for c in completions],
            "thinking_tokens": [c.thinking_tokens for c in completions],
            "answer_tokens": [c.answer_tokens for c in completions],
            "reasoning": [c.reasoning for c in completions], "answer_text": [c.answer for c in completions]}

_SPEC_FORMS = "rm:PATH, package.module:function, path/to/file.py:function"


def get_reward(name: str) -> RewardSpec:
    """The registry entry called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown reward function {name!r}; choose one of: {', '.join(sorted(REWARD_FUNCTIONS))}, "
            f"or {_SPEC_FORMS}"
        ) from None


# --------------------------------------------------------------------------------------------- loading


class RewardModelReward:
    """Reward function scoring with a trained reward model (``rm:PATH``).

    The model is loaded on the first call (or by :meth:`warm_up`), once, under a lock, so a call running in
    a worker thread that is abandoned mid-load does not cause a second load. Values are
    ``RewardScorer.score``: the aspects normalised by the training mean and std, then weighted.
    """

    group_aware = False

    def __init__(self, path: str | Path, place: Callable[[Any], Any] | None = None, **scorer_kwargs: Any):
        self.path = Path(path)
        self.place = place  # puts the loaded model on the run's device (sharded under strategy=fsdp2)
        self.scorer_kwargs = scorer_kwargs
        self._scorer = None
        self._lock = threading.Lock()

    @property
    def collective(self) -> bool:
        """Whether scoring is a collective (the model sharded over several processes): module docstring."""
        return self._scorer is not None and dist.world() > 1 and strategy.is_sharded(self._scorer.model)

    def warm_up(self) -> None:
        with self._lock:
            if self._scorer is None:
                from alignkit.models.reward import RewardScorer

                scorer = RewardScorer.load(self.path, **self.scorer_kwargs)
                if self.place is not None:
                    self.place(scorer.model)
                self._scorer = scorer

    def __call__(self, prompts: Sequence, completions: Sequence, **_: Any) -> list:
        self.warm_up()
        return self._scorer.score(list(prompts), list(completions)).tolist()


def _import_function(spec: str, target: str, attr: str, what: str = "reward") -> Callable:
    """``attr`` of the module ``target`` (a dotted name, or a .py file imported under a private name); any
    failure is a :class:`ConfigError` naming the ``what`` ``spec``."""
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            mod_name = f"_alignkit_reward_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module  # lets the file's dataclasses / pickling find their module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - any failure to import the user's code is a config problem
        raise ConfigError(f"{what} {spec!r}: cannot import {target!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{what} {spec!r}: {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: {target}:{attr} is not callable")
    return fn


def load_reward_function(spec: str, ctx: RewardContext) -> tuple[str, RewardFn]:
    """``(name, fn)`` for one reward spec; raises :class:`ConfigError` naming the spec on any problem.

    Forms: a registry name (name = that name); ``rm:PATH`` (name ``rm``; PATH must hold an alignkit reward
    model, checked now, loaded on first use); ``package.module:function`` or ``path/to/file.py:function``
    (name = the function's name; a relative file path is relative to the working directory).
    ``rm:`` takes precedence over a module called ``rm``.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"empty reward spec; choose one of: {', '.join(sorted(REWARD_FUNCTIONS))}, or {_SPEC_FORMS}")
    if spec in REWARD_FUNCTIONS:
        entry = REWARD_FUNCTIONS[spec]
        fn = entry.factory(ctx)
        if entry.columns and getattr(fn, "columns", None) != entry.columns:
            fn = functools.wraps(fn)(functools.partial(fn))  # own object: the shared function stays untouched
            fn.columns = entry.columns  # type: ignore[attr-defined]
        return spec, fn
    if spec.startswith("rm:"):
        from alignkit.models.reward import META

        path = Path(spec[3:].strip())
        if not (path / META).is_file():
            raise ConfigError(f"reward {spec!r}: {path} is not an alignkit reward model directory (no {META})")
        return "rm", RewardModelReward(path, place=ctx.place_model)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        get_reward(spec)  # raises the "unknown reward function" message listing the choices
    return attr, _import_function(spec, target, attr)


# --------------------------------------------------------------------------------------------- the set


@dataclass
class RewardScores:
    """Rewards of one batch. ``total[i] = sum_f weight_f * r_f[i]`` over the functions that gave a value for
    completion i, ``None`` when none did. ``per_function``: each function's values (unweighted).
    ``failures``: per function, how many completions got ``None`` because it raised, timed out or returned
    a bad value."""

    total: list[float | None]
    per_function: dict[str, list[float | None]]
    failures: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``reward/<name>/mean`` and ``/std`` (population std) over the non-None values, and
        ``reward/<name>/failed``; the same for ``reward/total`` (without ``failed``). A mean/std over no
        value at all is NaN."""
        out: dict[str, float] = {}
        for name, values in [*self.per_function.items(), ("total", self.total)]:
            xs = [v for v in values if v is not None]
            mean = sum(xs) / len(xs) if xs else math.nan
            out[f"reward/{name}/mean"] = mean
            out[f"reward/{name}/std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else math.nan
            if name in self.failures:
                out[f"reward/{name}/failed"] = float(self.failures[name])
        return out


class _Timeout(Exception):
    pass


def _describe(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_with_deadline(job: Callable[[], Any], deadline: float | None) -> Any:
    """``job()`` in a daemon thread; raises :class:`_Timeout` if it is not done by ``deadline`` (then the
    thread is left running: Python cannot kill a thread, and joining it would hang the run)."""
    if deadline is None:
        return job()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = job()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="alignkit-reward", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        raise _Timeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _check_values(values: Any, n: int) -> tuple[list[float | None], int, str | None]:
    """``(values, n_bad, problem)``: the returned values as floats, bad entries replaced by None."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # tensors and arrays
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        return [None] * n, n, f"returned {got} for {n} completions"
    out: list[float | None] = []
    bad = 0
    for v in values:
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
            v = v.item()  # a 0-d tensor or array inside a list
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out.append(float(v))
        else:
            out.append(None)
            bad += 1
    return out, bad, (f"returned {bad} non-finite or non-numeric value(s)" if bad else None)


def _groups(prompts: Sequence, group_aware: bool) -> list[list[int]]:
    """Retry units: each completion alone, or the completions sharing a prompt (group-aware functions)."""
    if not group_aware:
        return [[i] for i in range(len(prompts))]
    units: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        units.setdefault(repr(p), []).append(i)
    return list(units.values())


class RewardSet:
    """Several weighted reward functions, called safely (see the module docstring).

    ``functions``: ``(name, fn, weight)`` triples, names unique. ``timeout``: seconds each function may
    spend on one batch, retries included (0 or less: no limit, and calls run in the caller's thread).
    Functions run one after another; a batch takes at most ``len(functions) * timeout`` seconds.
    """

    def __init__(self, functions: list[tuple[str, RewardFn, float]], timeout: float = 30.0):
        names = [name for name, _, _ in functions]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward function names must be unique, got {names}")
        if not functions:
            raise ConfigError("at least one reward function is needed")
        self.functions = list(functions)
        self.timeout = timeout

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.functions]

    def warm_up(self) -> None:
        """Load what the functions load lazily (reward models, the sympy worker) outside any timeout."""
        for _, fn, _ in self.functions:
            if callable(getattr(fn, "warm_up", None)):
                fn.warm_up()

    @property
    def collective(self) -> bool:
        """Whether a function's call is a collective, which every process must make (module docstring)."""
        return any(getattr(fn, "collective", False) for _, fn, _ in self.functions)

    def __call__(self, prompts: Sequence, completions: Sequence, columns: dict[str, Sequence] | None = None) -> RewardScores:
        n = len(completions)
        columns = dict(columns or {})
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            bad = {k: len(v) for k, v in columns.items() if len(v) != n}
            raise ValueError(f"prompts ({len(prompts)}) and columns {bad} must have one entry per completion ({n})")
        per_function: dict[str, list[float | None]] = {}
        failures: dict[str, int] = {}
        for name, fn, _ in self.functions:
            if getattr(fn, "collective", False):  # every process calls it, in this thread (module docstring)
                values, failures[name], problem = _check_values(fn(list(prompts), list(completions), **columns), n)
                if problem:
                    log.warning("reward function %r %s: %d of %d completions get no reward", name, problem,
                                failures[name], n)
                per_function[name] = values
            elif n == 0:
                per_function[name], failures[name] = [], 0
            else:
                per_function[name], failures[name] = self._score(name, fn, list(prompts), list(completions), columns)
        total: list[float | None] = []
        for i in range(n):
            parts = [w * per_function[name][i] for name, _, w in self.functions if per_function[name][i] is not None]
            total.append(sum(parts) if parts else None)
        return RewardScores(total, per_function, failures)

    def _score(self, name: str, fn: RewardFn, prompts: list, completions: list,
               columns: dict[str, Sequence]) -> tuple[list[float | None], int]:
        n = len(completions)
        deadline = time.monotonic() + self.timeout if self.timeout and self.timeout > 0 else None
        try:
            values, bad, problem = _check_values(
                _run_with_deadline(lambda: fn(prompts, completions, **columns), deadline), n)
        except _Timeout:
            log.warning("reward function %r timed out after %.1f s on %d completions: they get no reward",
                        name, self.timeout, n)
            return [None] * n, n
        except Exception as first:  # noqa: BLE001 - a reward function's bug must not end the run
            return self._retry(name, fn, prompts, completions, columns, deadline, first)
        if problem:
            log.warning("reward function %r %s: %d of %d completions get no reward", name, problem, bad, n)
        return values, bad

    def _retry(self, name: str, fn: RewardFn, prompts: list, completions: list, columns: dict[str, Sequence],
               deadline: float | None, first: Exception) -> tuple[list[float | None], int]:
        """After the batch call raised: call again unit by unit (one completion, or one prompt's group), all
        within the same deadline; units that raise, time out or return bad values get None."""
        n = len(completions)
        out: list[float | None] = [None] * n
        done = [False] * n  # written by the worker; read at the deadline (an abandoned worker may go on)
        bad = [0]
        problems: list[str] = []

        def job() -> None:
            for idx in _groups(prompts, bool(getattr(fn, "group_aware", False))):
                sub = {k: [v[i] for i in idx] for k, v in columns.items()}
                try:
                    values = fn([prompts[i] for i in idx], [completions[i] for i in idx], **sub)
                    values, n_bad, problem = _check_values(values, len(idx))
                except Exception as e:  # noqa: BLE001
                    values, n_bad, problem = [None] * len(idx), len(idx), f"raised {_describe(e)}"
                if problem and len(problems) < 1:
                    problems.append(problem)
                for i, v in zip(idx, values):
                    out[i] = v
                    done[i] = True
                bad[0] += n_bad

        timed_out = False
        try:
            _run_with_deadline(job, deadline)
        except _Timeout:
            timed_out = True
        values = [v if ok else None for v, ok in zip(list(out), list(done))]
        n_failed = min(n, bad[0] + (n - sum(done) if timed_out else 0))
        log.warning(
            "reward function %r raised %s; scored the %d completions one %s at a time: %d get no reward%s%s",
            name, _describe(first), n,
            "prompt group" if getattr(fn, "group_aware", False) else "completion", n_failed,
            f" (first problem: {problems[0]})" if problems else "",
            " (timed out before finishing)" if timed_out else "",
        )
        return values, n_failed


def _parse_weights(weights: str, n: int, specs: list[str]) -> list[float]:
    if not weights.strip():
        return [1.0] * n
    parts = [w.strip() for w in weights.split(",")]
    try:
        values = [float(w) for w in parts]
    except ValueError:
        raise ConfigError(f"reward weights must be comma-separated numbers, got {weights!r}") from None
    if not all(math.isfinite(w) for w in values):
        raise ConfigError(f"reward weights must be finite, got {weights!r}")
    if len(values) != n:
        raise ConfigError(f"{len(values)} reward weights ({weights!r}) for {n} reward functions ({', '.join(specs)})")
    return values


def build_reward_set(specs: str, weights: str, ctx: RewardContext) -> RewardSet:
    """A :class:`RewardSet` from config strings: comma-separated reward specs (see
    :func:`load_reward_function`) and comma-separated weights (empty: all 1). Duplicate names get a
    suffix (``rm``, ``rm_2``). Paths containing commas cannot be given here."""
    parts = [s.strip() for s in specs.split(",")]
    if not specs.strip() or any(not s for s in parts):
        raise ConfigError(f"reward functions must be a comma-separated list of specs, got {specs!r}")
    ws = _parse_weights(weights, len(parts), parts)
    functions: list[tuple[str, RewardFn, float]] = []
    seen: dict[str, int] = {}
    for spec, w in zip(parts, ws):
        name, fn = load_reward_function(spec, ctx)
        seen[name] = seen.get(name, 0) + 1
        functions.append((name if seen[name] == 1 else f"{name}_{seen[name]}", fn, w))
    return RewardSet(functions, timeout=ctx.timeout)
