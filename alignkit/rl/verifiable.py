"""Verifiable rewards (RLVR): answer extraction, safe equivalence, format, length and language rewards.

Reward-function interface
-------------------------
A reward function is a callable ``fn(prompts, completions, **columns) -> list[float | None]``: one value
per completion, or ``None`` where the reward does not apply (e.g. the row has no reference answer).
The row's other dataset columns (``answer``, ``lengths``, ...) arrive as keyword lists aligned with
``completions``; a function takes the columns it needs and ignores the rest through ``**_``.
A completion is a string, or a list of chat messages (the last message's ``content`` is used).

Safety
------
Model text is hostile input. Extraction is linear-time string scanning (no backtracking-prone regexes).
Symbolic comparison never ``eval``s raw text: LaTeX is translated by a small hand-written converter,
the result must pass a character whitelist (``[0-9a-z+-*/().,]`` and spaces), every identifier must be a
known function name or a single letter, the length and exponents are capped, and only then is it handed to
``sympy.parsing.sympy_parser.parse_expr`` with a restricted namespace (no builtins) in a separate worker
process that is killed (and replaced) when it exceeds the time limit.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from alignkit.data.answers import number_strings, parse_number

__all__ = [
    "RewardFn",
    "answers_equal",
    "correctness_reward",
    "extract_answer",
    "format_reward",
    "l1_exact",
    "l1_max",
    "language_consistency",
    "length_control",
    "length_control_reward",
    "make_l1_reward",
    "make_language_reward",
    "make_overlong_reward",
    "overlong_penalty",
    "warm_up_worker",
]

RewardFn = Callable[..., list]  # (prompts, completions, **columns) -> list[float | None]

_MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is truncated (nobody's final answer is that long)
_MAX_SYMBOLIC_CHARS = 300  # longer expressions are not compared symbolically (returns False)
_MAX_POWERS = 3  # at most this many '**' in an expression
_MAX_INT_EXPONENT = 100  # |integer exponent| cap
_MAX_GROUP_EXPONENT_CHARS = 8  # a parenthesised exponent may hold at most this many characters


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            return str(last.get("content", ""))
    return "" if completion is None else str(completion)


# --------------------------------------------------------------------------------------------- extraction


def _balanced(text: str, open_idx: int) -> int | None:
    """Index of the '}' closing the '{' at ``open_idx`` (None if unbalanced). Linear scan."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance.

    Only the last occurrence of each command is tried, so the scan stays linear on hostile input.
    """
    best: tuple[int, str] | None = None
    for cmd in ("\\boxed", "\\fbox"):
        start = text.rfind(cmd)
        if start < 0:
            continue
        j = start + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _balanced(text, j)
            if end is not None and (best is None or start > best[0]):
                best = (start, text[j + 1 : end])
    return None if best is None else best[1]


def _answer_tag(text: str) -> str | None:
    start = text.rfind("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start + 8)
    return text[start + 8 : end] if end >= 0 else None


_ANSWER_IS = re.compile(r"answer(?: is|:)[ \t]*", re.IGNORECASE)  # no nested quantifiers: linear


def _answer_phrase(text: str) -> str | None:
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end() : last.end() + _MAX_ANSWER_CHARS]
    line = rest.split("\n", 1)[0].strip()
    # "The answer is 42." / "Answer: $42$." -> "42"
    line = line.rstrip(".").strip()
    if line.startswith("$") and line.endswith("$") and len(line) >= 2:
        line = line.strip("$").strip()
    boxed = _last_boxed(line)
    return (boxed if boxed is not None else line) or None


def _last_number_str(text: str) -> str | None:
    return next(number_strings(text), None)


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None.

    Priority: the last ``\\boxed{...}`` (balanced braces, nesting allowed), then the last
    ``<answer>...</answer>`` tag, then the last "answer is X" / "Answer: X" (to the end of that line),
    else the last number. Every step is a linear scan; hostile text (unbalanced braces, megabytes) is safe.
    """
    text = _text(text)
    for finder in (_last_boxed, _answer_tag, _answer_phrase, _last_number_str):
        found = finder(text)
        if found is not None and found.strip():
            return found.strip()[:_MAX_ANSWER_CHARS]
    return None


# --------------------------------------------------------------------------------------------- equivalence

_SIMPLE_NUMBER = re.compile(r"-?(?:\d[\d,]*)?\.?\d+(?:/-?\d+)?")  # fullmatch only; no nested quantifiers
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _strip_wrappers(s: str) -> str:
    s = s.strip().strip("$").strip()
    boxed = _last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    if boxed is not None:
        s = boxed.strip()
    s = s.strip("$").strip()
    for a, b in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("\\displaystyle", ""),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        s = s.replace(a, b)
    s = s.rstrip(".").strip()
    return s


def _split_percent(s: str) -> tuple[str, bool]:
    for suffix in ("\\%", "%"):
        if s.endswith(suffix):
            return s[: -len(suffix)].strip(), True
    return s, False


def _fast_number(s: str) -> Fraction | None:
    t = s.replace(" ", "")
    if len(t) > 100 or not _SIMPLE_NUMBER.fullmatch(t):
        return None  # keeps exponents like "1e99999999" away from Fraction()
    try:
        return parse_number(t)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


class _Reject(Exception):
    pass


_COMMANDS = {
    "pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "sin": "sin", "cos": "cos",
    "tan": "tan", "log": "log", "ln": "log", "exp": "exp", "left": "", "right": "", "quad": "",
}
_FUNCS = {"pi", "oo", "sin", "cos", "tan", "log", "exp", "sqrt", "root"}


def _arg(s: str, i: int) -> tuple[str, int]:
    """A LaTeX argument at ``i``: ``{...}`` or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _Reject("missing argument")
    if s[i] == "{":
        end = _balanced(s, i)
        if end is None:
            raise _Reject("unbalanced")
        return s[i + 1 : end], end + 1
    if s[i] == "\\":
        raise _Reject("command as bare argument")
    return s[i], i + 1


def _latex_to_sympy(s: str, depth: int = 0) -> str:
    """Translate simple LaTeX to a sympy expression string (raises _Reject on anything else)."""
    if depth > 20:
        raise _Reject("too deep")
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            j = i + 1
            while j < len(s) and s[j].isalpha():
                j += 1
            cmd = s[i + 1 : j] if j > i + 1 else s[i + 1 : i + 2]
            j = max(j, i + 2)
            if cmd == "frac":
                num, j = _arg(s, j)
                den, j = _arg(s, j)
                out.append(f"(({_latex_to_sympy(num, depth + 1)})/({_latex_to_sympy(den, depth + 1)}))")
            elif cmd == "sqrt":
                index = None
                if j < len(s) and s[j] == "[":
                    close = s.find("]", j)
                    if close < 0:
                        raise _Reject("unbalanced [")
                    index, j = s[j + 1 : close], close + 1
                body, j = _arg(s, j)
                body = _latex_to_sympy(body, depth + 1)
                out.append(f"root({body},{_latex_to_sympy(index, depth + 1)})" if index else f"sqrt({body})")
            elif cmd in ("text", "mathrm", "textbf", "mathbf"):
                body, j = _arg(s, j)
                out.append(_latex_to_sympy(body, depth + 1))
            elif cmd in _COMMANDS:
                out.append(_COMMANDS[cmd] if not _COMMANDS[cmd].isalpha() else f" {_COMMANDS[cmd]}")
            else:
                raise _Reject(f"unknown command \\{cmd}")
            i = j
        elif c == "{":
            end = _balanced(s, i)
            if end is None:
                raise _Reject("unbalanced")
            out.append(f"({_latex_to_sympy(s[i + 1 : end], depth + 1)})")
            i = end + 1
        elif c == "}":
            raise _Reject("unbalanced")
        elif c == "^":
            body, i = _arg(s, i + 1)
            out.append(f"**({_latex_to_sympy(body, depth + 1)})")
        else:
            out.append(c)
            i += 1
    return "".join(out)


_WHITELIST = re.compile(r"[0-9a-z+\-*/().,\s]*")
_IDENT = re.compile(r"[a-z]+")
_NUMERIC_SUFFIX = re.compile(r"[0-9.][a-z_]")  # digit glued to a letter: exponent/complex/hex literal
_POW_RHS = re.compile(r"\*\*\s*(\(?)")


def _to_safe_expr(s: str) -> str | None:
    """A whitelisted, size-capped sympy expression string for ``s``, or None if it cannot be made safe."""
    if len(s) > _MAX_SYMBOLIC_CHARS:
        return None
    try:
        expr = _latex_to_sympy(s)
    except _Reject:
        return None
    expr = _THOUSANDS.sub("", expr).replace("^", "**").strip()
    if not expr or len(expr) > _MAX_SYMBOLIC_CHARS or not _WHITELIST.fullmatch(expr):
        return None
    if any(len(name) > 1 and name not in _FUNCS for name in _IDENT.findall(expr)):
        return None
    if _NUMERIC_SUFFIX.search(expr):
        return None  # Python literals such as 1e999999999, 2j, 0x1f are not maths answers (and 1e9.. is huge)
    if expr.count("(") != expr.count(")"):
        return None
    # Exponent caps: few powers; each exponent a small integer, a letter, or a short parenthesised group
    # with no power inside (so 9**9**9**9 and (9**9)**(9**9)-style towers never reach sympy).
    if expr.count("**") > _MAX_POWERS:
        return None
    for m in _POW_RHS.finditer(expr):
        rest = expr[m.end():]
        if m.group(1):
            close = rest.find(")")
            group = rest[:close] if close >= 0 else rest
            if close < 0 or "(" in group or "*" in group or len(group.strip()) > _MAX_GROUP_EXPONENT_CHARS:
                return None
            numbers = re.findall(r"\d+", group)
            after = rest[close + 1 :]
        else:
            tok = re.match(r"-?\s*(\d+|[a-z])", rest)
            if tok is None:
                return None
            numbers = re.findall(r"\d+", tok.group(0))
            after = rest[tok.end() :]
        if after.lstrip().startswith("**"):
            return None  # a power tower: a**b**c
        if any(len(n) > 4 or int(n) > _MAX_INT_EXPONENT for n in numbers):
            return None
    return expr


# -- the sympy worker process ------------------------------------------------------------------------


def _sympy_equal(a: str, b: str) -> bool:
    """Runs in the worker. ``a`` and ``b`` already passed ``_to_safe_expr``."""
    import sympy
    from sympy.parsing.sympy_parser import (
        auto_number,
        auto_symbol,
        implicit_multiplication,
        parse_expr,
        rationalize,
        repeated_decimals,
    )

    names: dict[str, Any] = {
        "pi": sympy.pi, "oo": sympy.oo, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
        "exp": sympy.exp, "sqrt": sympy.sqrt, "root": sympy.root,
    }
    names.update({ch: sympy.Symbol(ch) for ch in "abcdefghijklmnopqrstuvwxyz" if ch not in ("e",)})
    names["e"] = sympy.E
    global_dict = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
                   "Symbol": sympy.Symbol, "__builtins__": {}}
    transforms = (auto_symbol, repeated_decimals, auto_number, rationalize, implicit_multiplication)

    def parse(s: str):
        return parse_expr(s, local_dict=dict(names), global_dict=dict(global_dict), transformations=transforms)

    x, y = parse(a), parse(b)
    if isinstance(x, tuple) or isinstance(y, tuple):
        x = tuple(x) if isinstance(x, tuple) else (x,)
        y = tuple(y) if isinstance(y, tuple) else (y,)
        return len(x) == len(y) and all(_expr_equal(p, q) for p, q in zip(x, y))
    return _expr_equal(x, y)


def _expr_equal(x: Any, y: Any) -> bool:
    import sympy

    if isinstance(x, tuple) or isinstance(y, tuple):
        return False
    if x == y:
        return True
    return bool(sympy.simplify(x - y) == 0)


def _worker_main(conn) -> None:
    with contextlib.suppress(Exception):  # not available on every platform
        import resource

        limit = 2 * 1024**3  # address-space cap: a runaway computation dies instead of eating the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import sympy  # noqa: F401 - import before announcing readiness so the first job is not charged for it

    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            result = _sympy_equal(*job)
        except BaseException:  # noqa: BLE001 - any failure to parse or compare means "not equal"
            result = False
        conn.send(bool(result))


class _SympyWorker:
    """One reusable spawned worker; killed and replaced when a job runs past its time limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._ready = False

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="alignkit-sympy")
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(2)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self._ready = None, None, False

    def _ensure(self, startup_timeout: float) -> bool:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self._start()
        if not self._ready:
            try:
                if not self._conn.poll(startup_timeout):
                    self._kill()
                    return False
                self._conn.recv()
            except (EOFError, OSError):
                self._kill()
                return False
            self._ready = True
        return True

    def warm_up(self, startup_timeout: float = 60.0) -> bool:
        with self._lock:
            return self._ensure(startup_timeout)

    def compare(self, a: str, b: str, timeout: float, startup_timeout: float = 60.0) -> bool:
        with self._lock:
            if not self._ensure(startup_timeout):
                return False
            try:
                self._conn.send((a, b))
                if self._conn.poll(timeout):
                    return bool(self._conn.recv())
            except (EOFError, OSError):
                pass
            self._kill()
            self._start()  # start the replacement now so its import overlaps with the caller's work
            return False


_WORKER = _SympyWorker()


def warm_up_worker() -> bool:
    """Start the sympy worker ahead of time (its start-up is not charged to any ``answers_equal`` timeout)."""
    return _WORKER.warm_up()


def _symbolic_equal(a: str, b: str, timeout: float) -> bool:
    ea, eb = _to_safe_expr(a), _to_safe_expr(b)
    if ea is None or eb is None:
        return False
    if ea.replace(" ", "") == eb.replace(" ", ""):
        return True
    return _WORKER.compare(ea, eb, timeout)


def _equal_plain(pred: str, ref: str, timeout: float) -> bool:
    if pred.replace(" ", "") == ref.replace(" ", ""):
        return True
    p, r = _fast_number(pred), _fast_number(ref)
    if p is not None and r is not None:
        return p == r
    return _symbolic_equal(pred, ref, timeout)


def answers_equal(pred: str, ref: str, timeout: float = 2.0) -> bool:
    """Whether ``pred`` and ``ref`` denote the same answer (exact, never approximate).

    1. Normalise: strip ``$``, a ``\\boxed{}`` wrapper, LaTeX spacing, ``\\displaystyle``, degree signs,
       a trailing period; ``\\dfrac``/``\\tfrac`` -> ``\\frac``.
    2. Identical strings (ignoring spaces) are equal.
    3. Fast path: plain numbers (integers, decimals, thousands separators, ``a/b``, negatives) are compared
       exactly as fractions via :func:`alignkit.data.answers.parse_number`.
    4. Otherwise simple LaTeX (``\\frac``, ``\\sqrt``, ``\\sqrt[n]``, ``^{...}``, ``\\left(``/``\\right)``,
       ``\\pi``, ``\\cdot``) is translated to a whitelisted expression and compared with sympy
       (``simplify(a - b) == 0``, decimals made rational) in a worker process; past ``timeout`` seconds the
       worker is killed and the answer is False. Anything that cannot be made safe compares False.

    Percentages: when exactly one side ends with ``%``, ``x%`` equals both ``x`` and ``x/100``
    (``"50%"`` == ``"50"`` == ``"0.5"``), because datasets write percent answers either way;
    when both sides carry ``%`` their numbers are compared. ``2\\pi`` does not equal ``6.2832`` (exact).
    """
    if pred is None or ref is None:
        return False
    pred, ref = _strip_wrappers(str(pred)), _strip_wrappers(str(ref))
    if not pred or not ref:
        return False
    p, p_pct = _split_percent(pred)
    r, r_pct = _split_percent(ref)
    if p_pct == r_pct:
        return _equal_plain(p, r, timeout)
    x, other = (p, r) if p_pct else (r, p)
    if _equal_plain(x, other, timeout):
        return True
    return _equal_plain(f"({x})/100" if _fast_number(x) is None else _frac_str(_fast_number(x) / 100), other,
                        timeout)


def _frac_str(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


# --------------------------------------------------------------------------------------------- rewards


def correctness_reward(prompts: Sequence, completions: Sequence, answer: Sequence, **_: Any) -> list:
    """1.0 if the extracted answer equals the reference ``answer`` column, else 0.0; None if no reference.

    A reference containing ``\\boxed{}`` (a full worked solution) is reduced to its boxed answer first.
    """
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        if ref is None or not str(ref).strip():
            out.append(None)
            continue
        ref = str(ref)
        if "\\boxed" in ref:
            ref = _last_boxed(ref) or ref
        pred = extract_answer(_text(completion))
        out.append(1.0 if pred is not None and answers_equal(pred, ref) else 0.0)
    return out


_THINK_ANSWER_SEP = re.compile(r"</think>\s*<answer>")


def _matches_format(s: str) -> bool:
    """Same language as ``^<think>.*?</think>\\s*<answer>.*?</answer>$`` (DOTALL), decided in linear time."""
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    # The earliest separator after "<think>" leaves the most room for the answer, so checking it suffices.
    m = _THINK_ANSWER_SEP.search(s, 7)
    return m is not None and m.end() <= len(s) - len("</answer>")


def format_reward(prompts: Sequence, completions: Sequence, **_: Any) -> list:
    """1.0 if the completion (whitespace-stripped) is ``<think>...</think>`` then ``<answer>...</answer>``."""
    return [1.0 if _matches_format(_text(c).strip()) else 0.0 for c in completions]


def overlong_penalty(lengths: Sequence[int] | int, max_len: int, buffer: int) -> list[float] | float:
    """DAPO overlong reward shaping (Yu et al. 2503.14476), with max length ``L`` and buffer ``B``.

    ``0`` if ``|y| <= L - B``; ``((L - B) - |y|) / B`` if ``L - B < |y| <= L`` (linear from 0 to -1);
    ``-1`` beyond ``L``. A scalar length gives a scalar.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    soft = max_len - buffer

    def one(n: int) -> float:
        if n <= soft:
            return 0.0
        if n <= max_len:
            return (soft - n) / buffer
        return -1.0

    if isinstance(lengths, (int, float)):
        return one(lengths)
    return [one(n) for n in lengths]


def make_overlong_reward(max_len: int, buffer: int) -> RewardFn:
    """A reward function applying :func:`overlong_penalty`.

    Lengths come from a ``lengths`` column (token counts, what DAPO means); without that column the
    character length of each completion is used, so set ``max_len``/``buffer`` in characters then.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")

    def overlong_reward(prompts: Sequence, completions: Sequence, lengths: Sequence | None = None, **_: Any):
        ns = list(lengths) if lengths is not None else [len(_text(c)) for c in completions]
        return overlong_penalty(ns, max_len, buffer)

    return overlong_reward


def length_control(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi k1.5 length reward (2501.12599) over one group of responses to the same prompt.

    ``lam = 0.5 - (len - min_len) / (max_len - min_len)``; reward ``lam`` if correct, ``min(0, lam)`` if
    wrong. When all lengths are equal the denominator is 0 and every reward is 0 (no length signal).
    """
    if len(lengths) != len(correct):
        raise ValueError("lengths and correct must have the same size")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def length_control_reward(prompts: Sequence, completions: Sequence, answer: Sequence,
                          lengths: Sequence | None = None, **_: Any) -> list:
    """Reward-function form of :func:`length_control`: groups are completions sharing the same prompt.

    Correctness comes from :func:`correctness_reward`; lengths from a ``lengths`` column (tokens) or the
    character length. Rows without a reference answer get None and are left out of their group.
    """
    ok = correctness_reward(prompts, completions, answer)
    ns = list(lengths) if lengths is not None else [len(_text(c)) for c in completions]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if ok[i] is not None:
            groups.setdefault(repr(p), []).append(i)
    out: list[float | None] = [None] * len(completions)
    for idx in groups.values():
        for i, v in zip(idx, length_control([ns[i] for i in idx], [ok[i] == 1.0 for i in idx])):
            out[i] = v
    return out


def l1_exact(correct: bool, n_tokens: float, budget: float, alpha: float = 0.0003) -> float:
    """L1's LCPO-Exact reward (Aggarwal and Welleck 2503.04697, section 3, "Length Controlled Policy
    Optimization"): ``r = 1[y correct] - alpha * |n_gold - n_y|``, with ``n_gold`` the number of tokens the
    prompt asks for (``budget``) and ``n_y`` the completion's. A wrong answer is penalised for its length error
    too. The paper trains with ``alpha = 0.0003``.

    Golden: correct, 1200 tokens for a budget of 1000 -> ``1 - 0.0003 * 200 = 0.94``; wrong, 700 tokens ->
    ``0 - 0.0003 * 300 = -0.09``.
    """
    return float(bool(correct)) - alpha * abs(budget - n_tokens)


def l1_max(correct: bool, n_tokens: float, budget: float, alpha: float = 0.0003, delta: float = 0.5) -> float:
    """L1's LCPO-Max reward (Aggarwal and Welleck 2503.04697, section 3): ``budget`` is a ceiling,
    ``r = 1[y correct] * clip(alpha * (n_gold - n_y) + delta, 0, 1)``. A wrong answer gets 0 whatever its
    length; a correct one gets ``delta`` at the budget, more below it (1 from ``(1 - delta) / alpha`` tokens
    under), less above it, and 0 from ``delta / alpha`` tokens over (``delta = 0.5`` as in the paper, so a
    correct answer slightly over the budget still beats a wrong one).

    Golden (alpha 0.0003, delta 0.5, budget 1000): correct at 500 tokens -> ``0.15 + 0.5 = 0.65``; at 1500 ->
    ``-0.15 + 0.5 = 0.35``; at 4000 -> ``-0.9 + 0.5`` clipped to 0; with a budget of 4000 and 100 tokens ->
    ``1.17 + 0.5`` clipped to 1; wrong -> 0.
    """
    return float(bool(correct)) * min(1.0, max(0.0, alpha * (budget - n_tokens) + delta))


def make_l1_reward(mode: str, alpha: float = 0.0003, delta: float = 0.5) -> RewardFn:
    """A reward function applying :func:`l1_exact` (``mode="exact"``) or :func:`l1_max` (``mode="max"``).

    Correctness comes from :func:`correctness_reward` (the ``answer`` column), the budget ``n_gold`` from the
    ``budget`` column (tokens; the prompt itself should state it, e.g. "Think for 1000 tokens.", as L1's
    prompts do), ``n_y`` from ``lengths`` (the completion's token count, supplied by the trainer; without it the
    character length, so give budgets in characters then). A row without a reference answer or a budget gets
    None.
    """
    if mode not in ("exact", "max"):
        raise ValueError(f"mode must be 'exact' or 'max', got {mode!r}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")

    def l1_reward(prompts: Sequence, completions: Sequence, answer: Sequence, budget: Sequence,
                  lengths: Sequence | None = None, **_: Any) -> list:
        ok = correctness_reward(prompts, completions, answer)
        ns = list(lengths) if lengths is not None else [len(_text(c)) for c in completions]
        out: list[float | None] = []
        for correct, n, gold in zip(ok, ns, budget):
            if correct is None or gold is None or not str(gold).strip():
                out.append(None)
            elif mode == "exact":
                out.append(l1_exact(correct == 1.0, n, float(gold), alpha))
            else:
                out.append(l1_max(correct == 1.0, n, float(gold), alpha, delta))
        return out

    l1_reward.__name__ = f"l1_{mode}_reward"
    return l1_reward


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F)


def _chain_of_thought(text: str) -> str:
    start = text.find("<think>")
    if start < 0:
        return text
    end = text.find("</think>", start + 7)
    return text[start + 7 :] if end < 0 else text[start + 7 : end]


def language_consistency(text: str, target: str = "en") -> float:
    """Share of the chain of thought written in ``target`` (DeepSeek-R1's language-consistency reward).

    The chain of thought is the text inside ``<think>...</think>`` if present, else the whole text. A simple
    rule over alphabetic characters (``str.isalpha``; digits, symbols and spaces do not count):
    ``"en"``: the share that are ASCII letters; ``"zh"``: the share that are CJK ideographs.
    With no alphabetic character at all the result is 1.0 (nothing is in another language).
    """
    if target not in ("en", "zh"):
        raise ValueError(f"unsupported target language {target!r} (use 'en' or 'zh')")
    letters = [ch for ch in _chain_of_thought(_text(text)) if ch.isalpha()]
    if not letters:
        return 1.0
    hit = (lambda ch: ch.isascii()) if target == "en" else _is_cjk
    return sum(1 for ch in letters if hit(ch)) / len(letters)


def make_language_reward(target: str = "en") -> RewardFn:
    """A reward function returning :func:`language_consistency` of each completion."""
    language_consistency("", target)  # validates target

    def language_reward(prompts: Sequence, completions: Sequence, **_: Any) -> list:
        return [language_consistency(_text(c), target) for c in completions]

    return language_reward
