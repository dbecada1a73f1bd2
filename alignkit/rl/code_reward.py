"""Code as a verifiable domain: a completion's code is run against its task's tests in the sandbox.

The reward functions ``code`` (1.0 when every test passes, else 0.0) and ``code_share`` (the share of the
tests' ``assert`` statements that pass) read these columns:

- ``tests`` (required): Python test code, run after the program in the program's namespace. Either plain
  ``assert`` statements, or HumanEval's form: a ``def check(candidate)`` with the asserts inside, together with
- ``entry_point`` (optional): the function under test; when the tests define ``check`` the harness ends them with
  ``check(<entry_point>)``;
- ``code_prefix`` (optional): code put before the completion's, e.g. HumanEval's prompt (imports, the signature
  and its docstring). A completion that continues that prompt supplies only the function's body; one that
  writes the whole function again simply redefines it.

The program is the prefix, then the completion's code (:func:`extract_code`). A row without ``tests`` gets None.

``code_share``: every ``assert`` node of the tests (wherever it sits: at the top level, inside ``check``, inside a
loop) is rewritten to record whether it held, and an exception in its condition counts as failing it instead of
ending the run (:func:`share_tests`); an assert passes when every execution of it held, and one never reached
(the program failed first, or ran out of time) fails. Tests without asserts score 1.0 or 0.0 as ``code`` does.

Completions of a batch run in parallel sandboxes (``workers`` at once, threads that each wait on a subprocess),
each with a ``timeout`` of wall-clock seconds, so a batch takes about ``ceil(n / workers) * timeout`` seconds at
worst. The reward keeps under the :class:`~alignkit.rl.rewards.RewardSet`'s deadline (``reward_timeout``): a
sandbox started late gets only the time left, and a completion that could not be started in time gets None (a
warning says how many) rather than a 0.0 it did not earn. A hostile completion (an infinite loop, a fork bomb,
printing gigabytes) gets 0.0 like any failing one, and the run goes on.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from alignkit.rl.sandbox import SandboxResult, run_python
from alignkit.rl.verifiable import _text

__all__ = ["CodeReward", "build_program", "extract_code", "share_tests"]

log = logging.getLogger(__name__)

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n", re.MULTILINE)
_CODE_LANGS = {"", "python", "py", "python3"}
_RECORD = "sandbox_record"


def _fenced_blocks(text: str) -> list[str]:
    """The contents of the text's fenced Python (or untagged) blocks, in order; an unclosed last fence runs to
    the end (a completion cut by the token limit)."""
    blocks, pos = [], 0
    while (m := _FENCE.search(text, pos)) is not None:
        close = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE).search(text, m.end())
        body = text[m.end() : close.start() if close else len(text)]
        if m.group(1).lower() in _CODE_LANGS:
            blocks.append(body)
        if close is None:
            break
        pos = close.end()
    return blocks


def extract_code(completion: Any, entry_point: str | None = None) -> str:
    """The code in a completion: the last fenced block that defines ``entry_point``, else the first fenced Python
    block, else the whole text (a completion that continues a code prompt)."""
    text = _text(completion)
    blocks = _fenced_blocks(text)
    if not blocks:
        return text
    if entry_point:
        defining = [b for b in blocks if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    return blocks[0]


def build_program(completion: Any, code_prefix: str | None = None, entry_point: str | None = None) -> str:
    """The program a completion is judged by: ``code_prefix``, then the completion's code."""
    code = extract_code(completion, entry_point)
    return f"{code_prefix}{code}" if code_prefix and not code.startswith(code_prefix) else code


def full_tests(tests: str, entry_point: str | None = None) -> str:
    """``tests`` ending with ``check(<entry_point>)`` when they define HumanEval's ``check``."""
    if entry_point and re.search(r"^def\s+check\s*\(", tests, re.M):
        return f"{tests}\n\ncheck({entry_point})\n"
    return tests


class _ShareAsserts(ast.NodeTransformer):
    """``assert c, m`` -> ``try: assert c, m`` / ``except Exception: sandbox_record(i, False)`` /
    ``else: sandbox_record(i, True)``: each assert records its outcome and never ends the run."""

    def __init__(self) -> None:
        self.count = 0

    def visit_Assert(self, node: ast.Assert) -> ast.Try:
        i = self.count
        self.count += 1

        def record(ok: bool) -> list[ast.stmt]:
            call = ast.Call(ast.Name(_RECORD, ast.Load()), [ast.Constant(i), ast.Constant(ok)], [])
            return [ast.Expr(call)]

        handler = ast.ExceptHandler(ast.Name("Exception", ast.Load()), None, record(False))
        return ast.copy_location(ast.Try([node], [handler], record(True), []), node)


def share_tests(tests: str) -> tuple[str, int]:
    """``(instrumented tests, number of asserts)`` for ``code_share`` (module docstring); tests that do not parse
    are returned unchanged with 0 asserts (they then fail as a whole)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return tests, 0
    counter = _ShareAsserts()
    tree = ast.fix_missing_locations(counter.visit(tree))
    return ast.unparse(tree), counter.count


class CodeReward:
    """The ``code`` / ``code_share`` reward function (module docstring).

    ``share``: score the share of asserts passed instead of all-or-nothing. ``timeout``, ``memory_mb``,
    ``max_processes``, ``max_output_bytes``: each completion's sandbox limits (:func:`run_python`). ``workers``:
    sandboxes run at once (0: twice the CPU count, at least 4, at most 16). ``budget``: seconds one call may take
    in all (0: no limit); :func:`alignkit.rl.rewards.load_reward_function` sets it just under the RewardSet's
    deadline. A user can make one with other limits in a file and name it: ``rewards=my_rewards.py:slow_code``.
    """

    columns = ("tests",)
    group_aware = False

    def __init__(self, *, share: bool = False, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 8,
                 max_output_bytes: int = 1 << 20, workers: int = 0, budget: float = 0.0):
        self.share = share
        self.limits = {"timeout": timeout, "memory_mb": memory_mb, "max_processes": max_processes,
                       "max_output_bytes": max_output_bytes}
        self.workers = workers or min(16, max(4, 2 * (os.cpu_count() or 1)))
        self.budget = budget
        self.__name__ = "code_share" if share else "code"
        self.last_results: list[SandboxResult | None] = []  # the latest call's runs, for logs and tests

    def _one(self, program: str, tests: str, deadline: float | None) -> tuple[float | None, SandboxResult | None]:
        limits = dict(self.limits)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left < 0.5:
                return None, None  # no time left to judge it fairly
            limits["timeout"] = min(limits["timeout"], left)
        tests, n_asserts = share_tests(tests) if self.share else (tests, 0)
        result = run_python(program, tests=tests, **limits)
        if n_asserts == 0:
            return float(result.passed), result
        return sum(result.records.get(str(i), False) for i in range(n_asserts)) / n_asserts, result

    def __call__(self, prompts: Sequence, completions: Sequence, tests: Sequence, entry_point: Sequence | None = None,
                 code_prefix: Sequence | None = None, **_: Any) -> list[float | None]:
        n = len(completions)
        entry_point = list(entry_point) if entry_point is not None else [None] * n
        code_prefix = list(code_prefix) if code_prefix is not None else [None] * n
        deadline = time.monotonic() + self.budget if self.budget > 0 else None
        jobs = {i: (build_program(completions[i], code_prefix[i], entry_point[i]),
                    full_tests(str(tests[i]), entry_point[i]))
                for i in range(n) if tests[i] is not None and str(tests[i]).strip()}
        out: list[float | None] = [None] * n
        results: list[SandboxResult | None] = [None] * n
        if jobs:
            with ThreadPoolExecutor(min(self.workers, len(jobs)), thread_name_prefix="alignkit-code") as pool:
                futures = {i: pool.submit(self._one, prog, t, deadline) for i, (prog, t) in jobs.items()}
                for i, fut in futures.items():
                    out[i], results[i] = fut.result()
        self.last_results = results
        unrun = sum(1 for i in jobs if results[i] is None)
        if unrun:
            log.warning("reward %s: %d of %d completions could not be run within %.1f s: they get no reward "
                        "(raise reward_timeout)", self.__name__, unrun, len(jobs), self.budget)
        return out

