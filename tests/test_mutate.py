"""``scripts/mutate.py --check``: every mutation's snippet still occurs exactly once in the source, so a change to
the training code that moves a mutated line fails here (update the list) instead of silently dropping the
mutation. The mutation run itself (minutes) is ``python scripts/mutate.py``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutate.py"


def _module():
    spec = importlib.util.spec_from_file_location("mutate_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_applies_exactly_once():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_a_missing_or_repeated_snippet(capsys):
    mod = _module()
    good = mod.MUTATIONS[0]
    missing = mod.Mutation("missing", good.file, "this snippet is not in the file", "x", good.tests, "-")
    repeated = mod.Mutation("repeated", "alignkit/rl/trainer.py", "self", "this", good.tests, "-")
    assert mod.check([good]) == 0
    assert mod.check([missing]) == 1 and mod.check([repeated]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "found 0 times" in out and "repeated" in out
    # the list names real test files and each mutation once
    assert len({m.name for m in mod.MUTATIONS}) == len(mod.MUTATIONS)
    assert all((SCRIPT.parents[1] / t.split("::")[0]).is_file() for m in mod.MUTATIONS for t in m.tests)
